"""Measuring a quantized artifact against its FP32 source, the gate, and the printed table.

Every number comes from real runs on recorded feeds (data.FeedStore) or real generations:

  vision    per image: cosine similarity and relative error ||q - f|| / ||f|| of image_embeds
            [n/4, hidden] rows vs the FP32 embeddings recorded for the same feed
  decoder   teacher-forced along the FP32 greedy path: the quantized decoder runs the recorded
            prefill and decode feeds with *its own* KV cache; per position, top-1 agreement and
            KL(p_fp32 || p_quant) of the next-token distributions
  pipeline  whole generations (quantized vision + decoder): greedy-token agreement over N new
            tokens (matching prefix / FP32 length) and latency before/after on the same backend

Gate: a graph fails when its score drops more than --max-drop below FP32's 1.0 (vision: mean
cosine similarity; decoder: top-1 agreement).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

from edgevl.artifact import names
from edgevl.calibrate.data import FeedStore
from edgevl.runtime.backends.tensors import to_host

GATED = {names.VISION: ("cosine_mean", "mean cosine similarity of image embeddings"),
         names.DECODER: ("top1_agreement", "top-1 agreement of next-token logits")}
CONFIDENT_MARGIN = float(np.log(1.5))     # logits: fp32's top-1 at least 1.5x as likely as its top-2
SHOWN_OPS = ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "Conv", "LayerNormalization", "RMSNormalization",
             "Softmax", "MRoPE", "RotaryEmbedding", "MultiHeadAttention", "GroupQueryAttention", "Attention", "Pow",
             "ReduceMean", "Add", "Mul")


# ----------------------------------------------------------------------------- pure metrics
def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine similarity of two [n, d] arrays (float64)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return np.sum(a * b, -1) / np.maximum(np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1), 1e-30)


def relative_error(q: np.ndarray, ref: np.ndarray) -> float:
    q, ref = q.astype(np.float64), ref.astype(np.float64)
    return float(np.linalg.norm(q - ref) / max(np.linalg.norm(ref), 1e-30))


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    z = x - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_rows(ref_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(q)) per row of [n, vocab] logits, in nats."""
    lp, lq = log_softmax(ref_logits), log_softmax(q_logits)
    return np.sum(np.exp(lp) * (lp - lq), -1)


def prefix_agreement(ref: list[int], q: list[int]) -> float:
    """Fraction of the reference's tokens that the other sequence reproduces before first diverging."""
    if not ref:
        return 1.0
    n = next((i for i, (a, b) in enumerate(zip(ref, q)) if a != b), min(len(ref), len(q)))
    return n / len(ref)


# ----------------------------------------------------------------------------- graph scores
def score_vision(runner, store: FeedStore, samples: int | None = None) -> dict:
    """Quantized vision runner vs the recorded FP32 image_embeds. `loss` (1 - cosine) drives decisions."""
    dtype = runner.input_metadata()[names.PIXEL_VALUES].dtype
    cos, rel, seconds = [], [], []
    for path in store.files(names.VISION, samples):
        feed, ref = FeedStore.load(path)
        t0 = time.perf_counter()
        out = runner.infer({**feed, names.PIXEL_VALUES: feed[names.PIXEL_VALUES].astype(dtype)})[names.IMAGE_EMBEDS]
        seconds.append(time.perf_counter() - t0)
        cos.append(float(cosine_rows(out, ref[names.IMAGE_EMBEDS]).mean()))
        rel.append(relative_error(out, ref[names.IMAGE_EMBEDS]))
    if not cos:
        return {"images": 0, "cosine_mean": 1.0, "cosine_min": 1.0, "rel_error_mean": 0.0, "loss": 0.0, "drop": 0.0}
    mean = float(np.mean(cos))
    return {"images": len(cos), "cosine_mean": mean, "cosine_min": float(np.min(cos)),
            "rel_error_mean": float(np.mean(rel)), "loss": 1.0 - mean, "drop": 1.0 - mean,
            "ms_per_image": 1e3 * float(np.mean(seconds))}


def decoder_logits(runner, sequence: list[tuple[dict, np.ndarray]], seconds: list | None = None):
    """Run one recorded sequence (prefill, then decode feeds) with the runner's own KV cache; yields logits.

    `seconds` collects the time of each decode step (not the prefill).
    """
    dtype = runner.input_metadata()[names.INPUTS_EMBEDS].dtype
    cache = None
    for feed, _ in sequence:
        feed = {**feed, names.INPUTS_EMBEDS: feed[names.INPUTS_EMBEDS].astype(dtype)}
        for name in [k for k in feed if names.is_past(k)]:
            feed[name] = cache[name] if cache is not None else feed[name].astype(dtype)
        t0 = time.perf_counter()
        out = runner.infer(feed)
        if cache is not None and seconds is not None:
            seconds.append(time.perf_counter() - t0)
        cache = {k: out[names.present_for(k)] for k in feed if names.is_past(k)}
        yield to_host(out[names.LOGITS])


def score_decoder(runner, store: FeedStore, samples: int | None = None) -> dict:
    """Teacher-forced top-1 agreement and KL vs the recorded FP32 logits. `loss` (mean KL) drives decisions."""
    agree, kls, margins, seconds = [], [], [], []
    for sequence in store.decoder_sequences(samples):
        for (_, ref), logits in zip(sequence, decoder_logits(runner, sequence, seconds)):
            agree.extend(np.argmax(ref, -1) == np.argmax(logits, -1))
            kls.extend(kl_rows(ref, logits.astype(np.float32)))
            top2 = np.sort(ref.astype(np.float64), -1)[:, -2:]
            margins.extend(top2[:, 1] - top2[:, 0])          # fp32 top-1 minus top-2 logit
    top1 = float(np.mean(agree)) if agree else 1.0
    kl = float(np.mean(kls)) if kls else 0.0
    # Flips at near-ties say little: also top-1 agreement where fp32 prefers its token >= 1.5x over the next.
    confident = np.asarray(margins) >= CONFIDENT_MARGIN
    return {"positions": len(agree), "top1_agreement": top1, "kl_mean": kl,
            "kl_max": float(np.max(kls)) if kls else 0.0,
            "fp32_margin_median": float(np.median(margins)) if margins else 0.0,
            "confident_positions": int(confident.sum()),
            "top1_agreement_confident": float(np.mean(np.asarray(agree)[confident])) if confident.any() else None,
            "loss": kl, "drop": 1.0 - top1,
            "decode_ms": 1e3 * float(np.mean(seconds)) if seconds else 0.0}


def score_graph(kind: str, runner, store: FeedStore, samples: int | None = None) -> dict:
    return {names.VISION: score_vision, names.DECODER: score_decoder}[kind](runner, store, samples)


# ----------------------------------------------------------------------------- pipelines
def compare_pipelines(ref, quant, samples, new_tokens: int, progress=None) -> dict:
    """Greedy generations of both pipelines on the same samples, FP32 first, then quantized.

    One pipeline at a time: onnxruntime's worker threads keep spinning for a moment after a
    run, which would slow down whichever session runs right after another one.
    """
    def run(pipe, sample, n):
        return pipe.generate(sample.prompt, images=list(sample.images), max_new_tokens=n, do_sample=False,
                             repetition_penalty=1.0)

    results = {}
    for name, pipe in (("fp32", ref), ("quantized", quant)):
        run(pipe, samples[0], 2)        # warm-up: the first runs allocate buffers
        results[name] = [run(pipe, s, new_tokens) for s in (progress(samples) if progress else samples)]
    agreement = [prefix_agreement(r.token_ids, q.token_ids) for r, q in zip(results["fp32"], results["quantized"])]
    identical = sum(r.token_ids == q.token_ids for r, q in zip(results["fp32"], results["quantized"]))
    latency = {name: _latency([(r.timings, bool(s.images)) for r, s in zip(rs, samples)])
               for name, rs in results.items()}
    latency["speedup"] = {k: latency["fp32"][k] / latency["quantized"][k] if latency["quantized"][k] else None
                          for k in latency["fp32"]}
    return {"greedy": {"new_tokens": new_tokens, "samples": len(samples),
                       "prefix_agreement": float(np.mean(agreement)), "identical_sequences": int(identical)},
            "latency": latency}


def _latency(runs) -> dict:
    vision = [t.vision_s for t, has_image in runs if has_image]
    steps = [s for t, _ in runs for s in t.decode_s_per_token]
    return {"vision_ms": 1e3 * statistics.median(vision) if vision else 0.0,
            "prefill_ms": 1e3 * statistics.median(t.prefill_s for t, _ in runs),
            "decode_ms_per_token": 1e3 * sum(steps) / len(steps) if steps else 0.0}


# ----------------------------------------------------------------------------- gate and table
def gate(graphs: dict[str, dict], max_drop: float) -> list[str]:
    """One sentence per failing graph; empty when every graph is within `max_drop` of FP32."""
    failures = []
    for graph, (metric, what) in GATED.items():
        m = graphs.get(graph, {}).get("metrics")
        if m is not None and m["drop"] > max_drop:
            failures.append(f"the {graph} graph's {what} is {m[metric]:.4f}, {m['drop']:.4f} below fp32 "
                            f"(--max-drop {max_drop:g})")
    return failures


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def format_table(report: dict) -> str:
    cal = report["calibration"]
    lines = [(f"edgevl quantize --recipe {report['recipe']} ({report['method']} calibration on "
              f"{cal['samples']} samples, evaluated on {cal['eval_samples']} held-out samples)"),
             f"{'graph':8} {'precision':60} {'size fp32 -> quantized':30} {'quality vs fp32 (held-out)':46} gate"]
    for name, g in report["graphs"].items():
        m, size = g["metrics"], g["size_bytes"]
        quality = (f"cos {m['cosine_mean']:.4f} (min {m['cosine_min']:.4f}) rel.err {m['rel_error_mean']:.4f}"
                   if name == names.VISION else f"top-1 {m['top1_agreement']:.3f} KL {m['kl_mean']:.4f}"
                   + (f" (confident {m['top1_agreement_confident']:.2f})" if m.get("top1_agreement_confident")
                      is not None else ""))
        verdict = "ok  " if g["gate"]["passed"] else "FAIL"
        sizes = f"{_mb(size['fp32'])} -> {_mb(size['quantized'])} ({size['ratio']:.2f}x)"
        lines.append(f"{name:8} {g['precision'][:60]:60} {sizes:30} {quality:46} "
                     f"{verdict} (drop {g['gate']['drop']:.4f} vs max {g['gate']['max_drop']:g})")
    for name, g in report["graphs"].items():
        ops = ", ".join(f"{op} " + "/".join(f"{p} {c}" for p, c in g["ops"][op].items())
                        for op in SHOWN_OPS if op in g["ops"])
        lines.append(f"  {name} ops: {ops}")
        for kept in g.get("kept_higher_precision", []):
            lines.append(f"  {name} keeps {kept['group']} at {kept['precision']}: {kept['why']}")
        for what, note in g.get("details", {}).get("notes", {}).items():
            lines.append(f"  {name} {what}: {note}")
    e = report.get("embeddings")
    if e:
        lines.append(f"embeddings {e['precision']} {e['encoding']}{' (the lm_head itself: tied, stored once)' if e['tied'] else ''}"
                     f": {_mb(e['bytes'])} (fp32 {_mb(e['fp32_bytes'])}); rows vs fp32 cos {e['cosine_mean']:.4f} "
                     f"(min {e['cosine_min']:.4f}), rel.err {e['rel_error_mean']:.4f} over {e['rows']} rows")
    gen, lat = report["pipeline"]["greedy"], report["pipeline"]["latency"]
    lines.append(f"greedy tokens: {gen['prefix_agreement']:.3f} of {gen['new_tokens']} new tokens agree (prefix), "
                 f"{gen['identical_sequences']}/{gen['samples']} sequences identical")
    f, q = lat["fp32"], lat["quantized"]
    speed = lat["speedup"]["decode_ms_per_token"]
    lines.append(f"latency ({report['backend']}): vision {f['vision_ms']:.1f} -> {q['vision_ms']:.1f} ms, "
                 f"prefill {f['prefill_ms']:.1f} -> {q['prefill_ms']:.1f} ms, decode {f['decode_ms_per_token']:.2f} "
                 f"-> {q['decode_ms_per_token']:.2f} ms/token" + (f" ({speed:.2f}x)" if speed else ""))
    return "\n".join(lines)
