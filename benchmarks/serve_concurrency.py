"""Concurrent streaming clients against one `edgevl serve`: FIFO (--max-batch 1) vs continuous batching.

    .venv/bin/python benchmarks/serve_concurrency.py [ARTIFACT] [--clients 1 4 8] [--rounds 3]

Two servers run side by side: `edgevl serve ARTIFACT --max-batch 1` (one request at a time in arrival order,
as the server ran before batching) and `--max-batch 8`. For each client count, rounds alternate between them
(so both meet the same background load on a shared machine): that many streaming clients send one request
each at the same instant (a barrier) and read their server-sent events. Measured per round:
aggregate tokens/s (tokens generated, from the server's /metrics, over the wall time from the first send to
the last [DONE]) and each client's time to first token (send -> the reply's first chunk, which the server sends
at the first token: the preset's stand-in tokenizer decodes most of the random model's tokens to no text, so
content chunks would come late). Two workloads:

    text    a short chat prompt (~40 tokens), 128 new tokens (decode-bound: what batching is for)
    image   one 448x448 image + "Describe this image." (289 prompt tokens, as `make bench`), 32 new tokens
            (prefill-bound on a CPU: vision and prefill are compute-bound and cannot be batched for free)

Greedy decoding; each client has its own prompt. Before the timed rounds, the batching server serves every
client's request alone once (also the warm-up), and the 8-client round's texts are compared with those: the
same tokens whatever the company ("identical to alone").

Results: benchmarks/results/serve-cpu-<machine>.{json,md}. Not a test: the numbers depend on the machine and
on what else runs on it (the report gives the cores other processes took, edgevl.bench.machine.CpuContention
minus the server's own CPU time).

ARTIFACT defaults to the qwen2-vl-2b-l4 preset's w4a16 export under ~/.cache/edgevl/presets.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgevl.bench.machine import CpuContention, machine_info, machine_slug  # noqa: E402
from edgevl.bench.measure import synthetic_image  # noqa: E402

DEFAULT_ARTIFACT = Path.home() / ".cache/edgevl/presets/qwen2-vl-2b-l4/export-w4a16"
WORKLOADS = {"text": 128, "image": 32}        # new tokens per request


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(artifact: Path, max_batch: int, threads: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "edgevl", "serve", str(artifact), "--port", str(port), "--model-name", "bench",
           "--max-batch", str(max_batch), "--max-queue", "64", "--threads", str(threads), "--allow-local-files"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError("the server did not start")


def server_cpu_s(pid: int) -> float:
    """utime + stime of the server process (all its threads), seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def metric(base: str, name: str) -> float:
    for line in httpx.get(f"{base}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def request_body(workload: str, client: int, image: Path) -> dict:
    if workload == "text":
        content = f"Client {client}: tell me a long story about a lighthouse keeper and the {client + 2} ships."
    else:
        content = [{"type": "image_url", "image_url": {"url": str(image)}},
                   {"type": "text", "text": "Describe this image."}]
        # one image for everyone would make every prompt the same: each client's own words after it
        content[1]["text"] = "Describe this image." if client == 0 else f"Describe this image, {client}."
    return {"model": "bench", "messages": [{"role": "user", "content": content}], "max_tokens": WORKLOADS[workload],
            "temperature": 0, "stream": True}


def stream_one(base: str, body: dict, start: threading.Barrier | None, out: dict) -> None:
    if start is not None:
        start.wait()
    t0 = time.perf_counter()
    first, text = None, []
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            first = first or time.perf_counter()   # the role chunk: the server sends it at the first token
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                text.append(delta)
    out.update(ttft_s=(first or time.perf_counter()) - t0, e2e_s=time.perf_counter() - t0, text="".join(text),
               sent=t0)


def one_round(proc, base: str, workload: str, clients: int, image: Path) -> dict:
    bodies = [request_body(workload, c, image) for c in range(clients)]
    outs = [{} for _ in bodies]
    start = threading.Barrier(clients)
    tokens0, steps0 = metric(base, "edgevl_generation_tokens_total"), metric(base, "edgevl_decode_step_rows_count")
    rows0, step_s0 = metric(base, "edgevl_decode_step_rows_sum"), metric(base, "edgevl_decode_step_seconds_sum")
    prompt0 = metric(base, "edgevl_prompt_tokens_total")
    cpu0 = server_cpu_s(proc.pid)
    threads = [threading.Thread(target=stream_one, args=(base, b, start, o)) for b, o in zip(bodies, outs)]
    with CpuContention() as busy:
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    server_cores = (server_cpu_s(proc.pid) - cpu0) / wall
    tokens = metric(base, "edgevl_generation_tokens_total") - tokens0
    steps = metric(base, "edgevl_decode_step_rows_count") - steps0
    return {"workload": workload, "clients": clients, "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "ttft_s": [o["ttft_s"] for o in outs], "e2e_s": [o["e2e_s"] for o in outs],
            "texts": [o["text"] for o in outs],
            "prompt_tokens_per_request": (metric(base, "edgevl_prompt_tokens_total") - prompt0) / clients,
            "decode_steps": steps,
            "mean_rows_per_step": (metric(base, "edgevl_decode_step_rows_sum") - rows0) / steps if steps else None,
            "ms_per_step": 1000 * (metric(base, "edgevl_decode_step_seconds_sum") - step_s0) / steps if steps else None,
            "other_cores": None if busy.other_cores is None else max(0.0, busy.other_cores - server_cores)}


def alone_texts(base: str, workload: str, clients: int, image: Path) -> list[str]:
    texts = []
    for c in range(clients):
        out = {}
        stream_one(base, request_body(workload, c, image), None, out)
        texts.append(out["text"])
    return texts


def median(values):
    return statistics.median(values) if values else None


def summarize(rounds: list[dict]) -> dict:
    """Medians over rounds: aggregate tokens/s, each round's median and max client TTFT."""
    return {"tokens_per_s": median([r["tokens_per_s"] for r in rounds]),
            "ttft_median_s": median([median(r["ttft_s"]) for r in rounds]),
            "ttft_max_s": median([max(r["ttft_s"]) for r in rounds]),
            "mean_rows_per_step": median([r["mean_rows_per_step"] for r in rounds if r["mean_rows_per_step"]]),
            "ms_per_step": median([r["ms_per_step"] for r in rounds if r["ms_per_step"]]),
            "other_cores": median([r["other_cores"] for r in rounds if r["other_cores"] is not None])}


def markdown(report: dict) -> str:
    info = report["machine"]
    lines = ["# edgevl serve: concurrent streaming clients, FIFO vs continuous batching",
             "",
             f"- machine: {info['cpu_model']}, {info['logical_cores']} logical cores, "
             f"{(info['ram_bytes'] or 0) / 2**30:.1f} GiB RAM, no GPU; onnxruntime {info['versions'].get('onnxruntime')}",
             f"- artifact: {report['artifact']} (qwen2-vl-2b-l4 preset, random weights: meaningless text, real "
             f"latency); ort-cpu, {report['threads'] or 'default'} threads",
             f"- servers: `edgevl serve --max-batch 1` (FIFO: one request at a time, arrival order) and "
             f"`--max-batch {report['max_batch']}` (continuous batching); {report['rounds']} rounds per cell, medians",
             "- aggregate tok/s: tokens generated (server's /metrics) / wall time from the first send to the last "
             "[DONE]; TTFT: each client's send -> the reply's first chunk (sent at the first token); greedy, each "
             "client its own prompt",
             "- others' cores: CPU other processes took during the rounds (CpuContention minus the server's own "
             "time); near 0 = quiet, 1 = one of the cores was busy elsewhere",
             ""]
    for workload, new in WORKLOADS.items():
        cells = report["summary"].get(workload)
        if not cells:
            continue
        sizes = [r["prompt_tokens_per_request"] for r in report["rounds_raw"] if r["workload"] == workload]
        tokens = f"{min(sizes):.0f}-{max(sizes):.0f}" if sizes and min(sizes) != max(sizes) else f"{sizes[0]:.0f}"
        prompt = (f"text prompt, {tokens} tokens" if workload == "text" else
                  f"448x448 image + text, {tokens} prompt tokens")
        lines += [f"## {workload}: {prompt}, {new} new tokens", "",
                  "| clients | FIFO tok/s | batching tok/s | ratio | FIFO TTFT median / max s | batching TTFT "
                  "median / max s | decode ms/step FIFO / batching (requests per step) | others' cores FIFO / batching |",
                  "|---|---|---|---|---|---|---|---|"]
        for clients in report["clients"]:
            f, b = cells["fifo"].get(str(clients)), cells["batching"].get(str(clients))
            if not f or not b:
                continue
            lines.append(
                f"| {clients} | {f['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | "
                f"{b['tokens_per_s'] / f['tokens_per_s']:.2f}× | {f['ttft_median_s']:.2f} / {f['ttft_max_s']:.2f} | "
                f"{b['ttft_median_s']:.2f} / {b['ttft_max_s']:.2f} | {f['ms_per_step'] or 0:.1f} / "
                f"{b['ms_per_step'] or 0:.1f} ({b['mean_rows_per_step'] or 0:.1f}) | {f['other_cores']:.2f} / "
                f"{b['other_cores']:.2f} |")
        top = cells["batching"].get(str(max(report["clients"])))
        one = cells["fifo"].get(str(max(report["clients"])))
        if top and one and top["ms_per_step"] and one["ms_per_step"]:
            rows = top["mean_rows_per_step"]
            lines += ["", f"Decode alone: a step of {rows:.1f} requests took {top['ms_per_step'] / one['ms_per_step']:.1f}× "
                          f"a one-request step, {rows * one['ms_per_step'] / top['ms_per_step']:.1f}× the tokens per "
                          f"second; vision and prefill are compute-bound and cost the same batched or not."]
        same = report["identical"].get(workload)
        if same:
            lines += ["", f"Identical to alone (batching server, {max(report['clients'])} clients vs each request "
                          f"served alone): {same['same']}/{same['of']} texts."]
        target = report["targets"].get(workload)
        if target:
            lines += ["", f"Target ({max(report['clients'])} clients: batching >= 4× FIFO tok/s, no client's TTFT worse than FIFO's median "
                          f"TTFT): {target['ratio']:.2f}× ({'met' if target['ratio'] >= 4 else 'not met'}); "
                          f"worst batching TTFT {target['worst_ttft_s']:.2f} s vs FIFO median "
                          f"{target['fifo_median_ttft_s']:.2f} s "
                          f"({'met' if target['worst_ttft_s'] <= target['fifo_median_ttft_s'] else 'not met'})."]
        lines.append("")
    return "\n".join(lines)


def rewrite(json_path: Path) -> None:
    """The Markdown report again from a JSON report (after a change to `markdown`)."""
    report = json.loads(json_path.read_text())
    json_path.with_suffix(".md").write_text(markdown(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", nargs="?", type=Path, default=DEFAULT_ARTIFACT)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--max-batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="edgevl-serve-bench-") as tmp:
        report = measure(args, synthetic_image(448, 448, Path(tmp)))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"serve-cpu-{machine_slug(report['machine'])}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    stem.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))
    return 0


def measure(args, image: Path) -> dict:
    """Every workload x client count, FIFO and batching rounds alternating; the report without its files."""
    info = machine_info()
    report = {"machine": info, "artifact": args.artifact.name, "threads": args.threads, "rounds": args.rounds,
              "max_batch": args.max_batch, "clients": args.clients, "rounds_raw": [], "summary": {},
              "identical": {}, "targets": {}}
    # Both servers run side by side and the rounds alternate (FIFO, batching, FIFO, ...): on a shared machine
    # both modes then meet the same background load.
    servers = {mode: start_server(args.artifact, max_batch, args.threads)
               for mode, max_batch in (("fifo", 1), ("batching", args.max_batch))}
    try:
        for workload in args.workloads:
            alone = {}
            for mode, (proc, base) in servers.items():
                print(f"[serve-bench] {mode}: {workload}, each request alone (warm-up)", file=sys.stderr, flush=True)
                alone[mode] = alone_texts(base, workload, max(args.clients), image)
            for clients in args.clients:
                rounds = {mode: [] for mode in servers}
                for _ in range(args.rounds):
                    for mode, (proc, base) in servers.items():
                        r = one_round(proc, base, workload, clients, image)
                        r["mode"] = mode
                        rounds[mode].append(r)
                        print(f"[serve-bench]   {mode} {workload} {clients} clients: {r['tokens_per_s']:.1f} tok/s, "
                              f"TTFT median {median(r['ttft_s']):.2f} s, max {max(r['ttft_s']):.2f} s, others' "
                              f"cores {r['other_cores']:.2f}", file=sys.stderr, flush=True)
                for mode, done in rounds.items():
                    report["rounds_raw"] += done
                    report["summary"].setdefault(workload, {}).setdefault(mode, {})[str(clients)] = summarize(done)
                if clients == max(args.clients):
                    done = rounds["batching"]
                    same = sum(a == b for r in done for a, b in zip(alone["batching"], r["texts"]))
                    report["identical"][workload] = {"same": same, "of": len(alone["batching"]) * len(done)}
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    for workload, cells in report["summary"].items():
        top = str(max(args.clients))
        if top in cells.get("fifo", {}) and top in cells.get("batching", {}):
            f, b = cells["fifo"][top], cells["batching"][top]
            report["targets"][workload] = {"ratio": b["tokens_per_s"] / f["tokens_per_s"],
                                           "worst_ttft_s": b["ttft_max_s"], "fifo_median_ttft_s": f["ttft_median_s"]}
    return report


if __name__ == "__main__":
    sys.exit(main())
