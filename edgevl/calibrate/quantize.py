"""`edgevl quantize`: an FP32 artifact folder -> a quantized artifact folder, measured and gated.

  1. samples     built-in photographs / folder / JSONL, split (seeded) into calibration and held-out
  2. capture     both splits run through the FP32 Pipeline; every vision / decoder feed recorded to disk
  3. make        the recipe quantizes each graph (recipes.py), scoring its choices on calibration feeds
  4. write       graphs + copied side files + manifest.json into a staged folder (renamed into place at the
                 very end: a failed or interrupted run leaves nothing half-written)
  5. load        the staged folder through the normal runtime (Pipeline.load verifies every hash)
  6. measure     held-out feeds and generations vs FP32 -> quant_report.json + the printed table
  7. gate        a graph below --max-drop fails the run (nothing is written) unless --force
"""

from __future__ import annotations

import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path

from edgevl.calibrate import data, report
from edgevl.calibrate.graphs import (
    file_size,
    graph_files,
    load_graph,
    precision_by_op,
    save_graph,
    weight_summary,
)
from edgevl.calibrate.passes import CALIBRATION_METHODS, W4_ALGORITHMS
from edgevl.calibrate.recipes import INT8_ACTIVATIONS, RECIPES, Context
from edgevl.errors import EdgevlError
from edgevl.export.graph_info import describe_graph
from edgevl.runtime.artifact import (
    MANIFEST,
    load_artifact,
    sha256_file,
    staged_folder,
    write_manifest,
)
from edgevl.runtime.backends import get_backend

REPORT = "quant_report.json"
GRAPHS = ("vision", "decoder")


class GateFailed(EdgevlError):
    """A quantized graph lost more than --max-drop; the message names it."""


def _check_options(recipe, samples, eval_samples, method, max_drop, block_size, w4_algorithm, new_tokens, calib_steps):
    if recipe not in RECIPES:
        raise EdgevlError(f"--recipe must be one of {', '.join(RECIPES)}, not {recipe!r}.")
    if method not in CALIBRATION_METHODS:
        raise EdgevlError(f"--method must be one of {', '.join(CALIBRATION_METHODS)}, not {method!r}.")
    if w4_algorithm not in W4_ALGORITHMS:
        raise EdgevlError(f"--w4-algorithm must be one of {', '.join(W4_ALGORITHMS)}, not {w4_algorithm!r}.")
    if samples < 1 or eval_samples < 1:
        raise EdgevlError("--samples and --eval-samples must be at least 1.")
    if max_drop is not None and not 0 <= max_drop <= 1:
        raise EdgevlError(f"--max-drop must be between 0 and 1, not {max_drop}.")
    if block_size < 16 or block_size & (block_size - 1):
        raise EdgevlError(f"--block-size must be a power of two of at least 16, not {block_size}.")
    if new_tokens < 1 or calib_steps < 1:
        raise EdgevlError("--new-tokens must be at least 1.")
    if recipe == "w4a16" and w4_algorithm != "rtn":       # fail before the (long) capture, not after
        from edgevl.calibrate.passes import nbits_weights
        nbits_weights(None, [], 4, block_size, w4_algorithm, check_only=True)


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda items: tqdm(items, desc=desc, unit="sample", leave=False)


def quantize(artifact, output, recipe: str, calib: str | None = None, samples: int = 16, eval_samples: int = 4,
             method: str = "minmax", max_drop: float | None = None, force: bool = False, seed: int = 0,
             new_tokens: int = 8, calib_steps: int = 4, block_size: int = 128, w4_algorithm: str = "rtn",
             backend: str | None = None, threads: int = 0, progress: bool = True, log=print, table=print,
             activations: str = "auto") -> dict:
    """Quantize the artifact folder `artifact` into `output`; returns the report (also in output/quant_report.json).

    Raises GateFailed (nothing written) when a graph drops more than `max_drop` and not `force`.
    `log` receives progress lines, `table` the measurement table (also when the gate fails).
    """
    t_start = time.perf_counter()
    _check_options(recipe, samples, eval_samples, method, max_drop, block_size, w4_algorithm, new_tokens, calib_steps)
    if activations not in INT8_ACTIVATIONS:
        raise EdgevlError(f"--activations must be one of {', '.join(INT8_ACTIVATIONS)}, not {activations!r}.")
    handler = RECIPES[recipe]
    max_drop = handler.default_max_drop if max_drop is None else max_drop
    get_backend(backend)
    src = load_artifact(artifact)
    if src.manifest.get("quantization"):
        raise EdgevlError(f"{artifact} is already quantized ({src.manifest['quantization'].get('recipe')}); "
                          f"quantize the fp32 export instead.")
    if any(i["dtype"] != "float32" for g in GRAPHS for i in src.manifest["graphs"][g]["inputs"]
           if i["name"] in ("pixel_values", "inputs_embeds")):
        raise EdgevlError(f"{artifact} is not an fp32 export; quantize the output of `edgevl export --dtype fp32`.")
    out = Path(output).resolve()
    if out == src.path.resolve():
        raise EdgevlError("OUT_Q must be a new folder, not the source artifact itself.")
    if out.exists() and not force:
        raise EdgevlError(f"{out} already exists; pass --force to replace it.")

    pool, source = data.load_samples(calib, samples + eval_samples, seed)
    calib_set, eval_set = data.split_samples(pool, samples, eval_samples, seed)
    from edgevl.runtime.pipeline import Pipeline

    with tempfile.TemporaryDirectory(prefix="edgevl-quantize-") as tmp:
        work = Path(tmp)
        fp32 = Pipeline(src, backend=backend, threads=threads)
        log(f"capturing {len(calib_set)} calibration and {len(eval_set)} held-out samples ({source})")
        calib_store, eval_store = data.FeedStore(work / "calib"), data.FeedStore(work / "eval")
        data.capture(fp32, calib_set, calib_store, calib_steps, _progress(progress, "calibration"))
        data.capture(fp32, eval_set, eval_store, new_tokens, _progress(progress, "held-out"))
        ctx = Context(src, work / "graphs", calib_store, method, block_size, w4_algorithm, max_drop,
                      activations=activations, decision_samples=min(8, len(calib_set)), backend=backend,
                      threads=threads, log=log, progress=progress)
        ctx.work.mkdir()
        log(f"quantizing with recipe {recipe}")
        results = handler.make(ctx)

        quantization = {"recipe": recipe, "method": method, "max_drop": max_drop, "seed": seed,
                        **({"activations": activations} if recipe in ("int8", "w4a16") else {}),
                        **({"w4_algorithm": w4_algorithm, "block_size": block_size} if recipe == "w4a16" else {}),
                        "calibration": {"source": source, "digest": data.samples_digest(calib_set),
                                        "samples": len(calib_set), "decode_steps": calib_steps,
                                        "eval_digest": data.samples_digest(eval_set), "eval_samples": len(eval_set)},
                        "precision": {g: r.description for g, r in results.items()},
                        "kept_higher_precision": {g: [{k: v for k, v in kept.items() if k != "nodes"}
                                                      for kept in r.kept] for g, r in results.items()},
                        "source_artifact": {"path": str(src.path), "manifest_sha256": sha256_file(src.path / MANIFEST)}}
        with staged_folder(out, force=force) as staged:
            _write_artifact(src, staged, results, quantization)
            log("loading the quantized artifact through the runtime and measuring it on held-out samples")
            rep = _measure(fp32, staged, handler, results, quantization, eval_store, eval_set, new_tokens,
                           backend, threads, max_drop, progress)
            rep["duration_s"] = time.perf_counter() - t_start
            (staged / REPORT).write_text(_json(rep))
            _finish_manifest(src, staged, results, quantization, rep)
            table(report.format_table(rep))
            if rep["failed"] and not force:
                raise GateFailed("; ".join(report.gate(rep["graphs"], max_drop))
                                 + "; nothing was written (pass --force to keep it anyway).")
            if rep["failed"]:
                log(f"gate failed for {', '.join(rep['failed'])}; written anyway because of --force")
    return rep


def _write_artifact(src, staged: Path, results, quantization: dict) -> None:
    graph_names = {p.name for g in GRAPHS for p in graph_files(src.graph_path(g))}
    for name in src.manifest["files"]:
        if name not in graph_names and name != REPORT:
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.path / name, staged / name)
    for graph, result in results.items():
        save_graph(load_graph(result.path), staged / src.manifest["graphs"][graph]["file"])
    _match_embeddings(src, staged)
    _finish_manifest(src, staged, results, quantization, None)


def _match_embeddings(src, staged: Path) -> None:
    """Store embed_tokens.npy in the decoder's input dtype (fp16 for the fp16 recipe, like `export --dtype fp16`).

    The runtime gathers decode-step embeddings straight from the table, so its dtype must be the
    decoder's `inputs_embeds` dtype; an fp16 table also halves its size.
    """
    import numpy as np

    dtype = next(i["dtype"] for i in describe_graph(staged / src.manifest["graphs"]["decoder"]["file"])["inputs"]
                 if i["name"] == "inputs_embeds")
    name = src.manifest["embeddings"]["file"]
    table = np.load(src.path / name, mmap_mode="r")
    if table.dtype != np.dtype(dtype):
        out = np.lib.format.open_memmap(staged / name, mode="w+", dtype=dtype, shape=table.shape)
        for start in range(0, len(table), 16384):                    # in slices: the 7B table is 2 GB
            out[start:start + 16384] = table[start:start + 16384]
        out.flush()
        del out


def _finish_manifest(src, staged: Path, results, quantization: dict, rep: dict | None) -> None:
    import numpy as np

    manifest = {k: v for k, v in src.manifest.items() if k not in ("format", "format_version", "files")}
    manifest["graphs"] = {g: describe_graph(staged / src.manifest["graphs"][g]["file"]) for g in GRAPHS}
    table = np.load(staged / src.manifest["embeddings"]["file"], mmap_mode="r")
    manifest["embeddings"] = {**src.manifest["embeddings"], "dtype": str(table.dtype)}
    manifest["precision"] = {**src.manifest.get("precision", {}), **{g: r.precision for g, r in results.items()},
                             "embeddings": {"float16": "fp16", "float32": "fp32"}.get(str(table.dtype),
                                                                                      str(table.dtype))}
    manifest["quantization"] = {**quantization, "report": REPORT if rep else None,
                                "passed": None if rep is None else not rep["failed"]}
    versions = dict(manifest.get("versions", {}))
    for name in ("onnxruntime", "onnx"):
        try:
            versions[f"{name} (quantize)"] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    manifest["versions"] = versions
    write_manifest(staged, manifest)


def _measure(fp32, staged, handler, results, quantization, eval_store, eval_set, new_tokens, backend, threads,
             max_drop, progress) -> dict:
    src = fp32.artifact
    quant = handler.load(staged, backend=backend, threads=threads)
    graphs = {}
    for graph in GRAPHS:
        runner = quant.vision if graph == "vision" else quant.decoder
        metrics = report.score_graph(graph, runner, eval_store)
        before, after = src.graph_path(graph), staged / src.manifest["graphs"][graph]["file"]
        r = results[graph]
        graphs[graph] = {
            "precision": r.description, "precision_short": r.precision,
            "size_bytes": {"fp32": file_size(before), "quantized": file_size(after),
                           "ratio": file_size(after) / file_size(before)},
            "matmul_weights": weight_summary(load_graph(after)),
            "ops": precision_by_op(after), "metrics": metrics,
            "gate": {"metric": report.GATED[graph][0], "drop": metrics["drop"], "max_drop": max_drop,
                     "passed": metrics["drop"] <= max_drop},
            "kept_higher_precision": r.kept, "trials": r.trials, "details": r.details}
    pipeline = report.compare_pipelines(fp32, quant, eval_set, new_tokens, _progress(progress, "comparing"))
    failed = [g for g in GRAPHS if not graphs[g]["gate"]["passed"]]
    return {"recipe": quantization["recipe"], "method": quantization["method"], "max_drop": max_drop,
            "backend": f"{quant.backend.name}" + (f", {threads} threads" if threads else ""),
            "calibration": {"source": quantization["calibration"]["source"],
                            "digest": quantization["calibration"]["digest"],
                            "samples": quantization["calibration"]["samples"], "eval_samples": len(eval_set)},
            "graphs": graphs, "pipeline": pipeline, "failed": failed}


def _json(obj) -> str:
    import json

    import numpy as np

    def default(o):
        if isinstance(o, (np.integer, np.floating, np.bool_)):
            return o.item()
        if isinstance(o, Path):
            return str(o)
        raise TypeError(type(o).__name__)
    return json.dumps(obj, indent=2, default=default) + "\n"
