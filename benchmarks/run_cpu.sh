#!/usr/bin/env bash
# Regenerates benchmarks/results/cpu-<machine>.{json,md,png}: edgevl vs transformers on this CPU.
#
#   model     qwen2-vl-2b-l4 (random weights, real Qwen2-VL-2B widths and vocabulary, 4 LLM + 4 ViT layers),
#             built and exported once under ~/.cache/edgevl/presets/ ($EDGEVL_CACHE)
#   artifacts fp32, plus int8 and w4a16 from `edgevl quantize` when this edgevl has it (skipped otherwise)
#   workload  one synthetic 448x448 image, a 289-token prompt, 32 new tokens; decode also on a synthetic
#             KV cache at 512..4096 tokens
#   reference transformers, eager PyTorch fp32 with sdpa attention, same process
#   fast load fp32 again with --fast-load (no pre-packing of float weights) into cpu-<machine>-fast-load.*:
#             the load-time / run-time trade-off (FAST_LOAD=0 skips it)
#
# Environment: PRESET (qwen2-vl-2b-l4; e.g. qwen2.5-vl-3b-l4, the Qwen2.5-VL-3B widths with 4 LLM layers and
# 8 ViT blocks, into cpu-<preset>-<machine>.*), PY (python with edgevl[export,bench]; default .venv/bin/python),
# RUNS (5), WARMUP (1),
# NEW_TOKENS (32), THREADS (0 = each library's default), RECIPES ("int8 w4a16"; empty: fp32 only),
# INTERLEAVE (1: alternate edgevl and transformers runs, for a shared machine; peak RSS is then both
# models together). Takes ~5-10 minutes on 2 cores plus the first build/quantization; run it on a quiet
# machine (the report says how busy the machine was).
#
# The prompt is "Describe this image." + chat template + 256 image tokens = 289 tokens with the preset's
# small stand-in tokenizer (the real Qwen2 tokenizer needs ~278 for the same text).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
PRESET=${PRESET:-qwen2-vl-2b-l4}
RUNS=${RUNS:-5}
WARMUP=${WARMUP:-1}
NEW_TOKENS=${NEW_TOKENS:-32}
THREADS=${THREADS:-0}
RECIPES=${RECIPES-int8 w4a16}
EXTRA=()
[ "${INTERLEAVE:-0}" = 1 ] && EXTRA+=(--interleave)

source benchmarks/preset_artifacts.sh
OUT=benchmarks/results/cpu-$MACHINE
[ "$PRESET" = qwen2-vl-2b-l4 ] || OUT=benchmarks/results/cpu-$PRESET-$MACHINE
mkdir -p benchmarks/results
"$PY" -m edgevl bench --preset "$PRESET" "${QUANTIZED[@]}" \
    --image-size 448x448 --prompt "Describe this image." --new-tokens "$NEW_TOKENS" \
    --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" --reference hf "${EXTRA[@]}" \
    --decode-contexts 512 1024 2048 4096 \
    --json "$OUT.json" --markdown "$OUT.md" --plot "$OUT.png"

if [ "${FAST_LOAD:-1}" = 1 ]; then
    "$PY" -m edgevl bench --preset "$PRESET" --fast-load \
        --image-size 448x448 --prompt "Describe this image." --new-tokens "$NEW_TOKENS" \
        --runs "$RUNS" --warmup "$WARMUP" --threads "$THREADS" --reference hf "${EXTRA[@]}" \
        --json "$OUT-fast-load.json" --markdown "$OUT-fast-load.md"
fi
