#!/usr/bin/env bash
# edgevl and OpenVINO GenAI in alternating rounds, for stages whose single-run rankings this VM's memory-bandwidth
# noise decides (fp32 decode moves 30-50 % between runs for every engine): each round runs `edgevl bench` on an
# artifact, then the OpenVINO peer's driver (prefix cache off, as in the bench) on the matching export, 3 runs each
# after a warm-up, same synthetic 448x448 image and prompt; prints each round's vision, prefill, TTFT (ms) and decode
# (ms/token) medians and the median over rounds of each stage's edgevl/OpenVINO ratio.
#
#   bash benchmarks/paired_openvino.sh ARTIFACT OPENVINO_MODEL_FOLDER [ROUNDS] [HINTS_JSON]
#
# OPENVINO_MODEL_FOLDER: a folder `make bench-compare` converted (~/.cache/edgevl/peers/openvino/models/<src>/<fmt>);
# HINTS_JSON: its plugin properties (default: the f32 hints, '{"INFERENCE_PRECISION_HINT": "f32", ...}').
set -euo pipefail
cd "$(dirname "$0")/.."
ART=$1; OVM=$2; ROUNDS=${3:-4}
HINTS=${4:-'{"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32"}'}
PY=${PY:-.venv/bin/python}
OVPY=${OVPY:-$HOME/.cache/edgevl/peers/openvino/venv/bin/python}
TMP=$(mktemp -d /tmp/edgevl-paired-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
IMG=$("$PY" -c "from pathlib import Path; from edgevl.bench.measure import synthetic_image; print(synthetic_image(448, 448, Path('$TMP')))")
cat > "$TMP/request.json" <<JSON
{"model": "$OVM", "device": "CPU", "properties": $HINTS, "image": "$IMG", "prompt": "Describe this image.",
 "new_tokens": 32, "runs": 3, "warmup": 1, "prefix_caching": false}
JSON
for i in $(seq "$ROUNDS"); do
  "$PY" -m edgevl bench "$ART" --image "$IMG" --prompt "Describe this image." --new-tokens 32 --runs 3 --warmup 1 \
      --no-progress --json "$TMP/edgevl-$i.json" > /dev/null
  "$OVPY" edgevl/bench/peers/openvino_driver.py "$TMP/request.json" 2> /dev/null | tail -1 > "$TMP/openvino-$i.json"
done
"$PY" - "$TMP" "$ROUNDS" <<'PY'
import json, statistics as st, sys
from edgevl.bench.peers.openvino import stage_times
tmp, rounds = sys.argv[1], int(sys.argv[2])
STAGES = ("vision_ms", "prefill_ms", "ttft_ms", "decode")
ours, theirs = [], []
for i in range(1, rounds + 1):
    e = json.load(open(f"{tmp}/edgevl-{i}.json"))["rows"][0]["edgevl"]["stages"]
    ours.append({**{k: e[k]["median"] for k in STAGES[:3]}, "decode": e["decode_ms_per_token"]["median"]})
    runs = [stage_times(r) for r in json.load(open(f"{tmp}/openvino-{i}.json"))["runs"]]
    theirs.append({**{k: st.median(r[k] for r in runs) for k in STAGES[:3]},
                   "decode": st.median(d for r in runs for d in r["decode_ms"])})
    print(f"round {i}: " + " | ".join(f"{k} edgevl {ours[-1][k]:.1f} OpenVINO {theirs[-1][k]:.1f}" for k in STAGES))
ratios = {k: st.median(o[k] / t[k] for o, t in zip(ours, theirs)) for k in STAGES}
print("medians of the per-round ratios edgevl/OpenVINO (below 1: edgevl faster): "
      + ", ".join(f"{k.removesuffix('_ms')} {r:.2f}x" for k, r in ratios.items()))
PY
