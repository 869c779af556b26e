#!/usr/bin/env bash
# make bench-compare: edgevl against what users would pick instead on this CPU, in one run ->
# benchmarks/results/compare-cpu-<machine>.{json,md,png} (compare-cpu-<preset>-<machine>.* for another PRESET).
#
#   model     the preset's random-weight model (qwen2-vl-2b-l4: Qwen2-VL-2B widths and vocabulary, 4 LLM + 4 ViT
#             layers), exported and quantized as `make bench` does (fp32, int8, w4a16; reused when present)
#   engines   edgevl (each artifact), transformers fp32, llama.cpp (llama-mtmd-cli: F32 / Q8_0 + F32 mmproj /
#             Q4_0 + F16 mmproj) and OpenVINO GenAI (VLMPipeline at fp32 / int8 / int4, each with the CPU's
#             default precision and with f32 hints), all on the same source model folder, image and prompt;
#             the peers from `make bench-peers`, their conversions cached under ~/.cache/edgevl/peers/
#   workload  one synthetic 448x448 image, "Describe this image." (289 prompt tokens), 32 new tokens, greedy,
#             EOS ignored; decode also at a 4096-token context (synthetic KV cache: edgevl, transformers, llama-bench)
#
# Environment: PRESET (qwen2-vl-2b-l4), PY (.venv/bin/python), RUNS (5), WARMUP (1), NEW_TOKENS (32), THREADS
# (0 = each engine's default), RECIPES ("int8 w4a16"), REFERENCES ("hf llama.cpp openvino"). ~15 minutes on
# 2 cores once the peers' conversions exist (the first run converts: a few minutes more). Run it on a quiet
# machine: the report states the load average and how many cores other processes kept busy.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-qwen2-vl-2b-l4}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-1}
NEW_TOKENS=${NEW_TOKENS:-32}
THREADS=${THREADS:-0}
RECIPES=${RECIPES-int8 w4a16}
read -r -a REFS <<< "${REFERENCES:-hf llama.cpp openvino}"

source benchmarks/preset_artifacts.sh
OUT=benchmarks/results/compare-cpu-$MACHINE
[ "$PRESET" = qwen2-vl-2b-l4 ] || OUT=benchmarks/results/compare-cpu-$PRESET-$MACHINE
mkdir -p benchmarks/results
"$PY" -m edgevl bench --preset "$PRESET" "${QUANTIZED[@]}" \
    --image-size 448x448 --prompt "Describe this image." --new-tokens "$NEW_TOKENS" \
    --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" --reference "${REFS[@]}" \
    --decode-contexts 4096 --json "$OUT.json" --markdown "$OUT.md" --plot "$OUT.png"
