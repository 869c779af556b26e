#!/usr/bin/env bash
# The graph benchmarks (fused attention, in-place KV cache): this edgevl against transformers and against the
# edgevl before them (OLD_COMMIT, the graphs with naive attention and a Concat-grown cache), on this CPU.
#
#   benchmarks/graphs_bench.sh [STAGE ...]      stages, in order (default: all of them):
#     build     random-weight presets qwen2-vl-2b-l4 and qwen2-vl-2b (full depth), exported by both edgevls
#               (the same model folders), w4a16 by both (int8 too for 2b-l4); cached under $EDGEVL_CACHE
#     vision    benchmarks/vision_scaling.py: vision ms and memory at 448x448 .. 4032x3024 (2b-l4 fp32),
#               transformers and the old graphs (up to the size they fit in memory), a fresh process each
#     decode    decode ms/token at 512, 2048, 8192, 16384 tokens of context on the full-depth 2B, fp32 and
#               w4a16, both edgevls, each against its memory floor (benchmarks/decode_summary.py)
#     ttft      `edgevl bench` 2b-l4 fp32/int8/w4a16 vs transformers, both edgevls (TTFT, decode, load)
#   Results: benchmarks/results/graphs-<machine>-{vision,decode,ttft-new,ttft-old}.{json,md}
#
# Both edgevls run from git worktrees (NEW_COMMIT: HEAD when the script starts, in NEW_DIR /tmp/edgevl-new;
# OLD_COMMIT 6d82f66 in OLD_DIR /tmp/edgevl-old), so editing the checkout while it runs changes nothing.
# Environment: PY (.venv/bin/python), NEW_COMMIT, NEW_DIR, OLD_COMMIT, OLD_DIR, EDGEVL_CACHE (~/.cache/edgevl;
# the old edgevl's exports go to $EDGEVL_CACHE/old-graphs), RUNS (3). Hours on 2 cores (the full-depth 2B
# exports and quantizations, the 12 MP vision calls).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OLD_COMMIT=${OLD_COMMIT:-6d82f66}
OLD_DIR=${OLD_DIR:-/tmp/edgevl-old}
NEW_COMMIT=${NEW_COMMIT:-$(git rev-parse HEAD)}
NEW_DIR=${NEW_DIR:-/tmp/edgevl-new}
CACHE=${EDGEVL_CACHE:-$HOME/.cache/edgevl}
OLD_CACHE=$CACHE/old-graphs
RUNS=${RUNS:-3}
STAGES=${*:-build vision decode ttft}
log() { echo "[graphs_bench $(date +%H:%M:%S)] $*" >&2; }

[ -d "$OLD_DIR/edgevl" ] || git worktree add -f "$OLD_DIR" "$OLD_COMMIT" >&2
if [ "$(git -C "$NEW_DIR" rev-parse HEAD 2>/dev/null)" != "$(git rev-parse "$NEW_COMMIT")" ]; then
  git worktree remove --force "$NEW_DIR" 2>/dev/null || rm -rf "$NEW_DIR"
  git worktree add -f --detach "$NEW_DIR" "$NEW_COMMIT" >&2
fi
log "new edgevl: $(git -C "$NEW_DIR" rev-parse --short HEAD) in $NEW_DIR; old edgevl: $OLD_COMMIT in $OLD_DIR"
# -P: without it `python -m` / `-c` put the current folder (this checkout) first on sys.path, ahead of
# PYTHONPATH, and both sides would run the checkout's edgevl.
new() { EDGEVL_CACHE=$CACHE PYTHONPATH=$NEW_DIR "$PY" -P "$@"; }
old() { EDGEVL_CACHE=$OLD_CACHE PYTHONPATH=$OLD_DIR "$PY" -P "$@"; }
MACHINE=$(new -c "from edgevl.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))")
OUT=benchmarks/results/graphs-$MACHINE
mkdir -p benchmarks/results

preset() {   # preset NAME SIDE -> the fp32 export folder, built once; the old edgevl gets the same model folder
  local name=$1 side=$2
  if [ "$side" = old ]; then
    mkdir -p "$OLD_CACHE/presets/$name"
    [ -e "$OLD_CACHE/presets/$name/model" ] || ln -s "$CACHE/presets/$name/model" "$OLD_CACHE/presets/$name/model"
  fi
  $side -c "import sys; from edgevl.bench.presets import ensure_preset as e" 2>/dev/null \
    && mod=edgevl.bench.presets || mod=edgevl.bench.preset_cache
  $side -c "import sys; from $mod import ensure_preset
print(ensure_preset('$name', log=lambda m: print('[build]', m, file=sys.stderr, flush=True)))"
}

quantized() {   # quantized FP32 RECIPE SIDE SAMPLES -> the quantized folder, made once
  local fp32=$1 recipe=$2 side=$3 samples=$4 out
  out="$(dirname "$fp32")/export-$recipe"
  if [ ! -f "$out/manifest.json" ] && [ -f "$out.failed" ]; then
    log "$side edgevl quantize $recipe -> $out failed before ($out.failed): not retried, its cells are skipped"
  elif [ ! -f "$out/manifest.json" ]; then
    log "$side edgevl quantize $recipe ($samples samples) -> $out"
    # --force: random weights have razor-thin logit margins; latency is the point here, not the gate.
    # A failure (the old edgevl runs out of 24 GiB quantizing the full 2B) is remembered, not retried each run.
    $side -m edgevl quantize "$fp32" -o "$out" --recipe "$recipe" --samples "$samples" --eval-samples 2 \
      --force --no-progress >&2 || { date > "$out.failed"; log "$side edgevl quantize $recipe failed: skipped"; }
  fi
  echo "$out"
}

if [[ " $STAGES " == *" build "* ]]; then
  for name in qwen2-vl-2b-l4 qwen2-vl-2b; do
    for side in new old; do
      fp32=$(preset $name $side)
      log "$side $name fp32: $fp32"
      samples=16; [ $name = qwen2-vl-2b ] && samples=4
      recipes="w4a16"; [ $name = qwen2-vl-2b-l4 ] && recipes="int8 w4a16"
      for recipe in $recipes; do quantized "$fp32" $recipe $side $samples > /dev/null; done
    done
  done
fi

if [[ " $STAGES " == *" vision "* ]]; then
  new "$NEW_DIR/benchmarks/vision_scaling.py" "$(preset qwen2-vl-2b-l4 new)" --runs "$RUNS" \
    --old-code "$OLD_DIR" --old-artifact "$(preset qwen2-vl-2b-l4 old)" \
    --json "$OUT-vision.json" --markdown "$OUT-vision.md"
fi

if [[ " $STAGES " == *" decode "* ]]; then
  reports=()
  for side in new old; do
    fp32=$(preset qwen2-vl-2b $side)
    for art in "$fp32" "$(dirname "$fp32")/export-w4a16"; do
      [ -f "$art/manifest.json" ] || { log "no $side $art: skipped"; continue; }
      label="$side $(basename "$art" | sed 's/export-//')"
      json="$OUT-decode-$(echo "$label" | tr ' ' '-').json"
      log "decode vs context: $label"
      $side -m edgevl bench "$art" --image-size none --prompt "Hi" --new-tokens 2 --runs 1 --warmup 0 \
        --decode-contexts 512 2048 8192 16384 --no-progress --json "$json" > /dev/null
      reports+=("$label=$json")
    done
  done
  new "$NEW_DIR/benchmarks/decode_summary.py" "${reports[@]}" --json "$OUT-decode.json" --markdown "$OUT-decode.md"
fi

if [[ " $STAGES " == *" ttft "* ]]; then
  for side in new old; do
    fp32=$(preset qwen2-vl-2b-l4 $side)
    log "TTFT / decode vs transformers: $side edgevl"
    $side -m edgevl bench "$fp32" "$(dirname "$fp32")/export-int8" "$(dirname "$fp32")/export-w4a16" \
      --image-size 448x448 --prompt "Describe this image." --new-tokens 32 --runs "$RUNS" --warmup 1 \
      --reference hf --no-progress --json "$OUT-ttft-$side.json" --markdown "$OUT-ttft-$side.md" > /dev/null
  done
fi
log "done: $OUT-*"
