"""Models for the GPU check, written ahead of time (here, or in the background on the GPU machine).

    python benchmarks/gpu_prepare.py tiny DIR              DIR/model (tiny, random), DIR/fp32, DIR/fp16 exports
    python benchmarks/gpu_prepare.py bench DIR [--preset qwen2-vl-2b]
                                                           DIR/model (random weights, real shapes), DIR/fp16

`tiny` output is what tests/runtime/backends/test_gpu.py reads from EDGEVL_GPU_TINY=DIR (a few MB: small enough to
carry to the GPU machine). `bench` runs `python -m edgevl.synthetic.random_model` and `edgevl export --dtype fp16`
as separate processes (each frees its memory) and writes DIR/prepare.done, or DIR/prepare.failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def log(msg: str) -> None:
    print(f"[gpu_prepare {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def tiny(out: Path) -> None:
    from edgevl.export.exporter import export_model
    from edgevl.synthetic.random_model import write_random_model
    model = write_random_model(out / "model", preset="tiny", seed=0)      # the same bytes as tests/conftest.py
    for dtype in ("fp32", "fp16"):
        export_model(str(model), out / dtype, dtype=dtype, force=True, log=log)
    log(f"wrote {out}/model, fp32, fp16")


def bench(out: Path, preset: str) -> int:
    out.mkdir(parents=True, exist_ok=True)
    for marker in ("prepare.done", "prepare.failed"):
        (out / marker).unlink(missing_ok=True)
    steps = [[sys.executable, "-m", "edgevl.synthetic.random_model", str(out / "model"), "--preset", preset],
             [sys.executable, "-m", "edgevl", "export", str(out / "model"), "-o", str(out / "fp16"), "--dtype", "fp16",
              "--force"]]
    t0 = time.perf_counter()
    for cmd in steps:
        log(" ".join(cmd[1:]))
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            (out / "prepare.failed").write_text(" ".join(cmd) + "\n")
            log("FAILED")
            return 1
        log(f"done after {time.perf_counter() - t0:.0f} s")
    (out / "prepare.done").write_text(f"{time.perf_counter() - t0:.0f} s\n")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("what", choices=["tiny", "bench"], help="tiny: test models; bench: the benchmark model")
    p.add_argument("out", type=Path, help="output folder")
    p.add_argument("--preset", default="qwen2-vl-2b", help="benchmark preset (default: qwen2-vl-2b)")
    args = p.parse_args(argv)
    if args.what == "tiny":
        tiny(args.out)
        return 0
    return bench(args.out, args.preset)


if __name__ == "__main__":
    sys.exit(main())
