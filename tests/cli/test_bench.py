"""edgevl/cli/bench.py's own pieces (the bench itself: tests/bench/)."""

from __future__ import annotations


def test_backend_notes_print_once_across_the_bench_s_repeated_loads():
    from edgevl.cli.bench import _once
    printed = []
    log = _once(printed.append)
    for _ in range(3):                    # warm-up load + two measured loads of one engine
        log("decoder: prompts run on int8 copies of its 4-bit weights")
        log("vision: loaded")
    log("decoder: prompts run on its 4-bit weights")
    assert printed == ["decoder: prompts run on int8 copies of its 4-bit weights", "vision: loaded",
                       "decoder: prompts run on its 4-bit weights"]
