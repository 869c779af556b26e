"""Loading graphs (runtime/backends/runner.py's activate_all): at the same time, or one after the other, and a graph
that fails to load leaves nothing loaded."""

from __future__ import annotations

import pytest

from edgevl.errors import EdgevlError


class _Gate:
    """A stand-in runner whose activate() waits at a barrier: it only gets through when the other
    runner is activating at the same moment (no timing assumptions: a sequential load breaks the barrier)."""

    def __init__(self, barrier, fail=False):
        self.barrier, self.fail, self.active = barrier, fail, False

    def activate(self):
        self.barrier.wait()
        if self.fail:
            raise EdgevlError("cannot load this graph")
        self.active = True

    def deactivate(self):
        self.active = False


def test_graphs_load_at_the_same_time():
    import threading

    from edgevl.runtime.backends.runner import activate_all
    barrier = threading.Barrier(2, timeout=10)
    gates = [_Gate(barrier), _Gate(barrier)]
    activate_all(gates)
    assert all(g.active for g in gates)


def test_sequential_load_and_a_failed_graph_leave_nothing_loaded():
    import threading

    from edgevl.runtime.backends.runner import activate_all
    barrier = threading.Barrier(1)             # passes at once: nothing waits for a partner
    plain = [_Gate(barrier), _Gate(barrier)]
    activate_all(plain, concurrently=False)
    assert all(g.active for g in plain)
    pair = threading.Barrier(2, timeout=10)
    gates = [_Gate(pair), _Gate(pair, fail=True)]
    with pytest.raises(EdgevlError, match="cannot load"):
        activate_all(gates)
    assert not any(g.active for g in gates)    # the one that loaded was released again
