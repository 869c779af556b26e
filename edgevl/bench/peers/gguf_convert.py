"""Run llama.cpp's own `convert_hf_to_gguf.py`, accepting a stand-in tokenizer's pre-tokenizer.

    python gguf_convert.py LLAMA_CPP_DIR [--pre-tokenizer NAME] -- CONVERTER ARGS...

Runs with the llama.cpp peer's Python (not edgevl's; nothing here imports edgevl). The
converter names a BPE tokenizer's pre-tokenizer by hashing the tokens of a fixed text and
looking the hash up in a list of known models (`TextModel.get_vocab_base_pre`); any other
vocabulary is refused ("BPE pre-tokenizer was not recognized"). edgevl's random-weight
presets carry a small stand-in BPE vocabulary behind Qwen2's real pre-tokenizer (the
same split regex and byte-level mapping), so the hash is unknown although llama.cpp's
"qwen2" pre-tokenizer is exactly right. With --pre-tokenizer NAME this script wraps that
method: a recognized hash is kept, an unrecognized one becomes NAME (logged), and then
the converter's main() runs unchanged. The vendored files are never edited. The caller
(edgevl.bench.peers.llama_cpp) passes --pre-tokenizer only after checking that the
model's tokenizer.json uses Qwen2's pre-tokenizer.
"""

from __future__ import annotations

import logging
import os
import runpy
import sys
from pathlib import Path

# Run as a script, this folder comes first on sys.path and its modules (openvino.py above all) would shadow
# the peer's own packages: drop it.
sys.path[:] = [p for p in sys.path if os.path.realpath(p or ".") != os.path.dirname(os.path.realpath(__file__))]


def patch_pre_tokenizer(name: str) -> None:
    from conversion.base import TextModel  # the vendored converter's package

    original = TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer) -> str:
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            logging.getLogger("gguf_convert").warning(
                "tokenizer hash not in llama.cpp's list: using pre-tokenizer %r as asked", name)
            return name

    TextModel.get_vocab_base_pre = get_vocab_base_pre


def main(argv: list[str]) -> None:
    if "--" not in argv or not argv:
        sys.exit("usage: gguf_convert.py LLAMA_CPP_DIR [--pre-tokenizer NAME] -- CONVERTER ARGS...")
    ours, theirs = argv[:argv.index("--")], argv[argv.index("--") + 1:]
    root = Path(ours[0])
    pre = ours[ours.index("--pre-tokenizer") + 1] if "--pre-tokenizer" in ours else None
    script = root / "convert_hf_to_gguf.py"
    sys.path[:0] = [str(root), str(root / "gguf-py")]
    if pre:
        patch_pre_tokenizer(pre)
    sys.argv = [str(script), *theirs]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
