# Sourced by run_cpu.sh and run_compare.sh (from the repository root): the preset's fp32 export and its quantized
# artifacts, each made once under ~/.cache/edgevl/presets/ ($EDGEVL_CACHE), and this machine's name.
# Needs PY, PRESET, RECIPES; sets FP32, QUANTIZED (an array) and MACHINE.
FP32=$("$PY" -c "import sys; from edgevl.bench.preset_cache import ensure_preset
print(ensure_preset('$PRESET', log=lambda m: print('[bench]', m, file=sys.stderr, flush=True)))")

QUANTIZED=()
[ -n "$RECIPES" ] || echo "[bench] RECIPES is empty: measuring fp32 only" >&2
for recipe in $RECIPES; do
    out="$(dirname "$FP32")/export-$recipe"
    # benchmarks/quantize_bench.py's artifacts of the same preset are as good: reuse them.
    [ -f "$(dirname "$FP32")/quantize-bench-$recipe/manifest.json" ] && out="$(dirname "$FP32")/quantize-bench-$recipe"
    if [ ! -f "$out/manifest.json" ]; then
        echo "[bench] edgevl quantize $recipe -> $out" >&2
        # --force: random weights have razor-thin logit margins, so the quality gate is not the point
        # here (latency is); the report inside the artifact still records the measured agreement.
        "$PY" -m edgevl quantize "$FP32" -o "$out" --recipe "$recipe" --force >&2 \
            || { echo "[bench] edgevl quantize --recipe $recipe failed: skipping $recipe" >&2; continue; }
    fi
    QUANTIZED+=("$out")
done

MACHINE=$("$PY" -c "from edgevl.bench.machine import machine_info, machine_slug; print(machine_slug(machine_info()))")
