"""bench/peers/gguf_convert.py, the wrapper around llama.cpp's converter: it names an unknown pre-tokenizer without
editing the converter, which keeps its own check otherwise."""

from __future__ import annotations

import subprocess
import sys

from edgevl.bench.peers import llama_cpp


def test_gguf_convert_wrapper_names_an_unknown_pre_tokenizer_without_editing_the_converter(tmp_path):
    """A stand-in for the vendored converter: the same module layout, a hash check that refuses."""
    root = tmp_path / "llama.cpp"
    (root / "conversion").mkdir(parents=True)
    (root / "gguf-py").mkdir()
    (root / "conversion" / "__init__.py").write_text("")
    (root / "conversion" / "base.py").write_text(
        "class TextModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized - update get_vocab_base_pre()')\n")
    (root / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom conversion.base import TextModel\n"
        "open(sys.argv[sys.argv.index('--outfile') + 1], 'w').write(TextModel().get_vocab_base_pre(None))\n")
    out = tmp_path / "out.txt"
    run = [sys.executable, str(llama_cpp.CONVERTER), str(root)]
    proc = subprocess.run([*run, "--pre-tokenizer", "qwen2", "--", "model", "--outfile", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert out.read_text() == "qwen2" and "using pre-tokenizer 'qwen2'" in proc.stderr
    proc = subprocess.run([*run, "--", "model", "--outfile", str(out)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "not recognized" in proc.stderr     # without the flag: the converter's own check
