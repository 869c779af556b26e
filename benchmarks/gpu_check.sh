#!/usr/bin/env bash
# GPU verification for the H100/H200 test machine (PyTorch + transformers + CUDA 13, CPU-only onnxruntime,
# no TensorRT libraries, no package registry). Run from the project root:
#
#   benchmarks/gpu_check.sh prepare   start the benchmark model (random $EDGEVL_BENCH_PRESET + fp16 export) in the
#                                     background, detached (setsid) so it outlives the calling command
#   benchmarks/gpu_check.sh           (= all) the whole check, at most 8 minutes (BUDGET_S=470; stages time-boxed):
#     1. install onnxruntime-gpu 1.31.1 (CUDA 13) from the chunks that ../shared/device/ort-gpu-wheel.sh prepared
#        and that were copied to /root/acc/part* (join + pip install --target /root/ortgpu, as that script prints)
#     2. edgevl doctor, then `pytest -m gpu tests/runtime/backends/test_gpu.py` (tiny model: ort-cuda fp16 greedy
#        tokens vs transformers, with and without CUDA graphs; the fp32 decoder refused; fp32 vision vs the CPU
#        within 1e-4)
#     3. wait for the benchmark model (started in the background now if `prepare` did not run before)
#     4. benchmarks/gpu_bench.py on the 2B-width preset: ort-cuda fp16 without and with --cuda-graph against
#        transformers bf16 sdpa in the same run (vision / TTFT / decode ms, greedy tokens vs transformers'),
#        one 448x448 image, 64 new tokens
#   Results: benchmarks/results/gpu-<card>-<date>.json; with the logs copied into $OUT after every stage.
#   Targets (issue 20, H100, 2B fp16): decode <= 3 ms/token, vision <= 10 ms at 448x448, TTFT <= 25 ms.
#
# Knobs (environment): EDGEVL_GPU_WORK (/root/edgevl-work), EDGEVL_BENCH_PRESET (qwen2-vl-2b; qwen2-vl-2b-l4 is the
# same widths at 4 layers, quicker to export), EDGEVL_GPU_TINY (prebuilt tiny models from
# `benchmarks/gpu_prepare.py tiny DIR`; default /root/gpu-tiny if there), ACC (/root/acc), ORTGPU (/root/ortgpu),
# ORT_WHEEL (joined wheel name), ORT_WHEEL_BYTES (its size), SKIP_ORT_INSTALL=1, BENCH_BACKEND (ort-cuda),
# BENCH_CUDA_GRAPH (both | off | on), BENCH_HF_DEVICE (cuda), BENCH_TOKENS (64), BENCH_RUNS (3), BENCH_IMAGE (448),
# PYTEST_S (150), BUDGET_S (470: the benchmark is skipped when too little of it is left). A CPU dry run of the whole
# script (ort-cuda faked by benchmarks/gpu_dryrun.py, a tiny benchmark model, transformers on the CPU):
#   PYTHON=$(which python) EDGEVL_GPU_WORK=/tmp/gc EDGEVL_BENCH_PRESET=tiny SKIP_ORT_INSTALL=1 BENCH_BACKEND=ort-cpu \
#   BENCH_HF_DEVICE=cpu BENCH_TOKENS=4 BENCH_RUNS=1 PYTEST_S=900 BUDGET_S=1800 PYTHONPATH=benchmarks \
#   PYTEST_ADDOPTS="-p gpu_dryrun -k 'not kv_cache_stays and not doctor_sees'" benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=${EDGEVL_GPU_WORK:-/root/edgevl-work}
PRESET=${EDGEVL_BENCH_PRESET:-qwen2-vl-2b}
ACC=${ACC:-/root/acc}
ORTGPU=${ORTGPU:-/root/ortgpu}
ORT_WHEEL=${ORT_WHEEL:-onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl}
BUDGET_S=${BUDGET_S:-470}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
mkdir -p "$WORK"
say() { echo "[gpu_check $(date +%H:%M:%S) +${SECONDS}s] $*"; }
collect() { [ -n "${OUT:-}" ] && cp "$@" "$OUT/" 2>/dev/null; return 0; }

start_prepare() {
  if [ -e "$WORK/prepare.started" ]; then say "benchmark model: started earlier at $(cat "$WORK/prepare.started")"; return; fi
  date +%T > "$WORK/prepare.started"
  say "benchmark model: random $PRESET + fp16 export, in the background -> $WORK (log: $WORK/prepare.log)"
  # From a private copy of the code: later calls re-sync this checkout while the export still runs.
  rm -rf "$WORK/src" && mkdir -p "$WORK/src" && cp -r edgevl benchmarks pyproject.toml "$WORK/src/"
  # A new session (setsid) with every inherited descriptor closed: nothing holds the caller's output open.
  "$PY" - "$WORK" "$PRESET" <<'EOF'
import subprocess, sys
work, preset = sys.argv[1], sys.argv[2]
with open(f"{work}/prepare.log", "wb") as log:
    subprocess.Popen([sys.executable, "benchmarks/gpu_prepare.py", "bench", work, "--preset", preset],
                     cwd=f"{work}/src", stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                     start_new_session=True, close_fds=True)
EOF
}

if [ "${1:-all}" = prepare ]; then
  start_prepare
  exit 0
fi

say "start; $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
start_prepare

# 1. onnxruntime-gpu beside (not over) the image's CPU build: PYTHONPATH=$ORTGPU puts it first.
if [ "${SKIP_ORT_INSTALL:-0}" = 1 ]; then
  say "SKIP_ORT_INSTALL=1: using the onnxruntime already importable"
elif PYTHONPATH=$ORTGPU "$PY" -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
  say "onnxruntime-gpu already in $ORTGPU"
else
  bytes=$(cat "$ACC"/part* 2>/dev/null | wc -c)
  say "joining $(ls "$ACC"/part* 2>/dev/null | xargs -n1 basename | tr '\n' ' ')from $ACC: $bytes bytes"
  if [ "$bytes" != "${ORT_WHEEL_BYTES:-255569273}" ]; then
    say "FATAL: expected ${ORT_WHEEL_BYTES:-255569273} bytes in part0..part4 (copy .device/ortgpu/p0..p4 to $ACC)"
    exit 3
  fi
  cat "$ACC"/part* > "$ACC/$ORT_WHEEL"
  "$PY" -m pip install -q --no-deps --target "$ORTGPU" "$ACC/$ORT_WHEEL" || { say "FATAL: pip install failed"; exit 3; }
fi
# The CUDA 13 / cuDNN 9 libraries of the image's nvidia-* pip packages, for onnxruntime's CUDA EP.
NVLIBS=$("$PY" - <<'EOF'
import glob, os, site
found = (glob.glob(os.path.join(sp, "nvidia", "**", "lib*.so*"), recursive=True) for sp in site.getsitepackages())
print(":".join(sorted({os.path.dirname(p) for paths in found for p in paths})))
EOF
)
export LD_LIBRARY_PATH="$NVLIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export PYTHONPATH="$ORTGPU:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.__file__, o.get_available_providers())'

# 2. doctor + GPU tests
say "edgevl doctor"
"$PY" -c 'from edgevl.runtime.doctor import collect, format_report; print(format_report(collect()))'
if [ -z "${EDGEVL_GPU_TINY:-}" ] && [ -d /root/gpu-tiny/fp16 ]; then export EDGEVL_GPU_TINY=/root/gpu-tiny; fi
say "pytest -m gpu tests/runtime/backends/test_gpu.py (tiny models: ${EDGEVL_GPU_TINY:-exported here})"
timeout "${PYTEST_S:-150}" "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/runtime/backends/test_gpu.py 2>&1 | tee "$WORK/pytest_gpu.log"
PYTEST_RC=${PIPESTATUS[0]}
say "pytest exit status $PYTEST_RC"
collect "$WORK/pytest_gpu.log"

# 3. wait for the benchmark model, leaving the benchmark at least 150 s of the budget
while [ ! -e "$WORK/prepare.done" ] && [ ! -e "$WORK/prepare.failed" ] && [ $SECONDS -lt $((BUDGET_S - 150)) ]; do
  say "waiting for the benchmark model: $(tail -c 400 "$WORK/prepare.log" | tr '\r' '\n' | grep -v '^\s*$' | tail -1)"
  sleep 15
done
collect "$WORK/prepare.log"
BENCH_RC=4
if [ -e "$WORK/prepare.done" ] && [ $((BUDGET_S - SECONDS)) -lt 60 ]; then
  say "benchmark skipped: only $((BUDGET_S - SECONDS)) s of the budget left"
elif [ -e "$WORK/prepare.done" ]; then
  # 4. benchmark (writes benchmarks/results/gpu-<card>-<date>.json)
  say "benchmark: ${BENCH_BACKEND:-ort-cuda} fp16 (CUDA graphs: ${BENCH_CUDA_GRAPH:-both}) vs transformers bf16 sdpa ($((BUDGET_S - SECONDS)) s left)"
  timeout $((BUDGET_S - SECONDS)) "$PY" benchmarks/gpu_bench.py --model "$WORK/model" --artifact "$WORK/fp16" \
      --backend "${BENCH_BACKEND:-ort-cuda}" --cuda-graph "${BENCH_CUDA_GRAPH:-both}" \
      --hf-device "${BENCH_HF_DEVICE:-cuda}" --image-size "${BENCH_IMAGE:-448}" \
      --new-tokens "${BENCH_TOKENS:-64}" --runs "${BENCH_RUNS:-3}"
  BENCH_RC=$?
  collect benchmarks/results/gpu-*.json
else
  say "benchmark model not ready: $(cat "$WORK/prepare.failed" 2>/dev/null || echo 'still running')"
  tail -5 "$WORK/prepare.log" | tr '\r' '\n' | tail -5
fi
say "done: pytest $PYTEST_RC, benchmark $BENCH_RC"
[ "$PYTEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
