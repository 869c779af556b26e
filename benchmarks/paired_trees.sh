#!/usr/bin/env bash
# Two edgevl source trees (e.g. before and after a refactor) on the SAME artifacts in alternating rounds: for every
# artifact each round runs `edgevl bench` from both trees back to back, A then B in odd rounds and B then A in even
# ones (one synthetic 448x448 image, "Describe this image.", 32 new tokens, 5 runs after a warm-up, a 64 MiB
# bandwidth probe); prints per-round and median stage times and the B/A ratios, and writes them as JSON and
# Markdown. Both trees run with this checkout's Python environment (PYTHONPATH selects the tree), so only edgevl's
# own code differs.
#
#   bash benchmarks/paired_trees.sh TREE_A TREE_B OUT_PREFIX ARTIFACT [ARTIFACT ...]
#
#   TREE_A / TREE_B   source folders holding edgevl/ (`git worktree add /tmp/before <commit>` gives an old one)
#   OUT_PREFIX        results go to OUT_PREFIX.json and OUT_PREFIX.md
# Environment: ROUNDS (3), PY (.venv/bin/python). Run it on a quiet machine: rounds alternate so that drift in the
# machine's speed hits both trees alike, but a busy machine still widens the spread.
set -euo pipefail
cd "$(dirname "$0")/.."
A=$(cd "$1" && pwd); B=$(cd "$2" && pwd); OUT=$3; shift 3
ROUNDS=${ROUNDS:-3}
PY=${PY:-$PWD/.venv/bin/python}
TMP=$(mktemp -d /tmp/edgevl-trees-XXXXXX)
trap 'rm -rf "$TMP"' EXIT
IMG=$("$PY" -c "from pathlib import Path; from edgevl.bench.measure import synthetic_image; print(synthetic_image(448, 448, Path('$TMP')))")
for i in $(seq "$ROUNDS"); do
  order="A B"; [ $((i % 2)) = 0 ] && order="B A"
  for art in "$@"; do
    name=$(basename "$art")
    for side in $order; do
      tree=$A; [ "$side" = B ] && tree=$B
      (cd "$TMP" && PYTHONPATH="$tree" "$PY" -m edgevl bench "$art" --image "$IMG" --prompt "Describe this image." \
          --new-tokens 32 --runs 5 --warmup 1 --bandwidth-mib 64 --no-progress --json "$TMP/$side-$name-$i.json" \
          > /dev/null 2>&1)
    done
  done
  echo "round $i of $ROUNDS done" >&2
done
"$PY" - "$TMP" "$ROUNDS" "$OUT" "$A" "$B" "$@" <<'PY'
import json, platform, statistics as st, sys
tmp, rounds, out, tree_a, tree_b, *arts = sys.argv[1:]
rounds = int(rounds)
stages = ("vision_ms", "prefill_ms", "ttft_ms", "decode_ms_per_token")
rows, machine = [], None
for art in arts:
    name = art.rstrip("/").split("/")[-1]
    per = {side: {s: [] for s in stages} for side in "AB"}
    for i in range(1, rounds + 1):
        for side in "AB":
            report = json.load(open(f"{tmp}/{side}-{name}-{i}.json"))
            machine = machine or report["machine"]["cpu_model"]
            found = report["rows"][0]["edgevl"]["stages"]
            for s in stages:
                per[side][s].append(found[s]["median"])
    med = {side: {s: st.median(v) for s, v in per[side].items()} for side in "AB"}
    rows.append({"artifact": name, "rounds": per, "median": med,
                 "ratio_b_over_a": {s: med["B"][s] / med["A"][s] for s in stages}})
result = {"tree_a": tree_a, "tree_b": tree_b, "rounds": rounds, "machine": machine,
          "cores": __import__("os").cpu_count(), "python": platform.python_version(), "rows": rows}
json.dump(result, open(out + ".json", "w"), indent=1)
lines = [f"# edgevl bench, two trees in {rounds} alternating rounds", "",
         f"A = `{tree_a}`, B = `{tree_b}`; {machine}, {result['cores']} cores; medians over rounds of each round's "
         f"median (5 runs), ms; A and B back to back per artifact, their order swapped every round.", "",
         "| artifact | tree | vision | prefill | TTFT | decode ms/token |", "|---|---|---|---|---|---|"]
for r in rows:
    for side in "AB":
        m = r["median"][side]
        lines.append(f"| {r['artifact']} | {side} | " + " | ".join(f"{m[s]:.1f}" for s in stages) + " |")
    lines.append(f"| | B/A | " + " | ".join(f"{r['ratio_b_over_a'][s]:.2f}x" for s in stages) + " |")
open(out + ".md", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
PY
