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
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np

from edgevl.artifact import names
from edgevl.artifact.folder import (
    MANIFEST,
    Artifact,
    check_output,
    load_artifact,
    os_reason,
    sha256_file,
    staged_folder,
    write_manifest,
)
from edgevl.artifact.manifest import EmbeddingSpec, Quantization
from edgevl.artifact.onnx_files import describe_graph, save_graph
from edgevl.calibrate import data, report
from edgevl.calibrate.embedding import compare, own_table, tied_to_lm_head
from edgevl.calibrate.graph_edit import (
    file_size,
    load_graph,
    precision_by_op,
    weight_summary,
)
from edgevl.calibrate.options import QuantizeOptions
from edgevl.calibrate.context import Context, GraphResult
from edgevl.calibrate.recipes import RECIPES
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.table import Backend, get_backend
from edgevl.runtime.embeddings import EmbeddingTable
from edgevl.runtime.backends.probe import package_versions

REPORT = "quant_report.json"
GRAPHS = names.GRAPH_KINDS


class GateFailed(EdgevlError):
    """A quantized graph lost more than --max-drop; the message names it."""


def _progress(enabled: bool, desc: str):
    if not enabled:
        return None
    from tqdm import tqdm
    return lambda items: tqdm(items, desc=desc, unit="sample", leave=False)


def _check_source(src: Artifact) -> None:
    if src.manifest.quantization:
        raise EdgevlError(f"{src.path} is already quantized ({src.manifest.quantization.recipe}); "
                          f"quantize the fp32 export instead.")
    inputs = [src.manifest.graph(names.VISION).input(names.PIXEL_VALUES),
              src.manifest.graph(names.DECODER).input(names.INPUTS_EMBEDS)]
    if any(t.dtype != "float32" for t in inputs):
        raise EdgevlError(f"{src.path} is not an fp32 export; quantize the output of `edgevl export --dtype fp32`.")


@contextmanager
def _work_folder():
    """A temporary folder for the captured feeds and candidate graphs, removed at the end; an OSError while it is
    written (a full or read-only $TMPDIR) is one sentence naming it."""
    where = tempfile.gettempdir()
    try:
        with tempfile.TemporaryDirectory(prefix="edgevl-quantize-") as tmp:
            yield Path(tmp)
    except OSError as e:
        raise EdgevlError(f"the work folder of `edgevl quantize` in {where} ($TMPDIR) could not be written: "
                          f"{os_reason(e)}.") from None


def _inputs(artifact, opts: QuantizeOptions) -> list[tuple[str, Path]]:
    """What quantize reads: the artifact and the calibration data."""
    return [("the artifact", Path(artifact))] + ([("the calibration data", Path(opts.calib))] if opts.calib else [])


def quantize(artifact, output, opts: QuantizeOptions, backend: Backend | None = None, log=print,
             table=print) -> dict:
    """Quantize the artifact folder `artifact` into `output`; returns the report (also in output/quant_report.json).

    `backend` runs calibration and measurement (default: ort-cpu). Raises GateFailed (nothing written)
    when a graph drops more than the recipe's --max-drop and not `opts.force`. `log` receives progress
    lines, `table` the measurement table (also when the gate fails).
    """
    t_start = time.perf_counter()
    opts.check()
    handler = RECIPES[opts.recipe]
    handler.check(opts)                                   # fail before the (long) capture, not after
    max_drop = handler.default_max_drop if opts.max_drop is None else opts.max_drop
    backend = backend or get_backend("ort-cpu")
    # its graphs are candidates in a work folder: none of their int8 prefill copies is worth keeping
    backend = replace(backend, options=replace(backend.options, keep_int8_copies=False))
    inputs = _inputs(artifact, opts)
    out = check_output(Path(output), opts.force, inputs)   # before any work: never replace or write into an input
    src = load_artifact(artifact)
    _check_source(src)

    pool, source = data.load_samples(opts.calib, opts.samples + opts.eval_samples, opts.seed)
    inputs += [("a calibration image", Path(image)) for s in pool for image in s.images if isinstance(image, str)]
    check_output(out, opts.force, inputs)                 # a .jsonl's images are inputs too
    calib_set, eval_set = data.split_samples(pool, opts.samples, opts.eval_samples, opts.seed)
    from edgevl.runtime.pipeline import Pipeline

    with _work_folder() as work:
        fp32 = Pipeline(src, backend=backend)
        log(f"capturing {len(calib_set)} calibration and {len(eval_set)} held-out samples ({source})")
        calib_store, eval_store = data.FeedStore(work / "calib"), data.FeedStore(work / "eval")
        data.capture(fp32, calib_set, calib_store, opts.calib_steps, _progress(opts.progress, "calibration"))
        data.capture(fp32, eval_set, eval_store, opts.new_tokens, _progress(opts.progress, "held-out"))
        ctx = Context(src, work / "graphs", calib_store, opts, max_drop, backend,
                      decision_samples=min(8, len(calib_set)), log=log)
        ctx.work.mkdir()
        log(f"quantizing with recipe {opts.recipe}")
        results = handler.make(ctx)
        quantization = Quantization(
            recipe=opts.recipe, options={"max_drop": max_drop, "seed": opts.seed, **handler.options(opts)},
            calibration={"source": source, "digest": data.samples_digest(calib_set), "samples": len(calib_set),
                         "decode_steps": opts.calib_steps, "eval_digest": data.samples_digest(eval_set),
                         "eval_samples": len(eval_set)},
            graphs={g: r.description for g, r in results.items()},
            kept_higher_precision={g: [{k: v for k, v in kept.items() if k != "nodes"} for kept in r.kept]
                                   for g, r in results.items()},
            source_manifest_sha256=sha256_file(src.path / MANIFEST), source_path=str(src.path))
        with staged_folder(out, force=opts.force, inputs=inputs) as staged:
            embeddings = _write_artifact(src, staged, results, quantization, opts)
            log("loading the quantized artifact through the runtime and measuring it on held-out samples")
            quant = Pipeline.load(staged, backend=backend)       # verifies every hash, like any user would
            rep = _measure(fp32, quant, staged, results, quantization, opts, eval_store, eval_set)
            rep["duration_s"] = time.perf_counter() - t_start
            (staged / REPORT).write_text(_json(rep))
            _finish_manifest(src, staged, results, replace(quantization, report=REPORT, passed=not rep["failed"]),
                             embeddings)
            table(report.format_table(rep))
            if rep["failed"] and not opts.force:
                raise GateFailed("; ".join(report.gate(rep["graphs"], max_drop))
                                 + "; nothing was written (pass --force to keep it anyway).")
            if rep["failed"]:
                log(f"gate failed for {', '.join(rep['failed'])}; written anyway because of --force")
    return rep


EMBEDDING_PRECISION = {"fp16": "fp16", "int8": "int8", "w4a16": "int4"}   # an untied table, per recipe


def _write_artifact(src: Artifact, staged: Path, results: dict[str, GraphResult], quantization: Quantization,
                    opts: QuantizeOptions) -> EmbeddingSpec:
    """Graphs, side files and the embedding table into `staged`, then a first manifest; returns the table's spec."""
    skip = {f for kind in GRAPHS for f in src.manifest.graph(kind).files} | set(src.manifest.embeddings.files)
    for name in src.manifest.files:
        if name not in skip and name != REPORT:
            (staged / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src.file(name), staged / name)
    for kind, result in results.items():
        save_graph(load_graph(result.path), staged / src.manifest.graph(kind).file)
    embeddings = _embeddings(src, staged, opts)
    _finish_manifest(src, staged, results, quantization, embeddings)
    return embeddings


def _embeddings(src: Artifact, staged: Path, opts: QuantizeOptions) -> EmbeddingSpec:
    """Tied embeddings: the quantized lm_head's own rows (stored once). Otherwise a table of their own at the
    recipe's precision; a tied table whose lm_head was kept in a form without rows per token stays fp32."""
    spec, decoder = src.manifest.embeddings, src.manifest.graph(names.DECODER).file
    if src.config.tie_word_embeddings:
        tied = tied_to_lm_head(staged, decoder, spec.vocab, spec.hidden)
        if tied is not None:
            return tied
    precision = EMBEDDING_PRECISION[opts.recipe] if not src.config.tie_word_embeddings else "fp32"
    table = EmbeddingTable(spec, src.file, np.float32)
    rows = np.concatenate([table.rows(np.arange(i, min(i + 16384, spec.vocab))) for i in range(0, spec.vocab, 16384)])
    return own_table(staged, rows, precision, opts.block_size if precision == "int4" else 128)


def _finish_manifest(src: Artifact, staged: Path, results: dict[str, GraphResult], quantization: Quantization,
                     embeddings: EmbeddingSpec) -> None:
    """The source's manifest with this artifact's graphs, embedding table, quantization and versions."""
    graphs = {}
    for name, spec in src.manifest.graphs.items():
        result = results[spec.kind]
        graphs[name] = replace(describe_graph(staged / spec.file, spec.kind, result.precision, spec.variant,
                                              spec.kv_cache), int8_prefill=result.int8_prefill)
    manifest = replace(src.manifest, graphs=graphs, embeddings=embeddings, quantization=quantization,
                       versions={**src.manifest.versions,
                                 **{f"{k} (quantize)": v for k, v in package_versions(("onnxruntime", "onnx")).items()
                                    if k != "edgevl"}})
    write_manifest(staged, manifest)


def _measure(fp32, quant, staged: Path, results: dict[str, GraphResult], quantization: Quantization,
             opts: QuantizeOptions, eval_store, eval_set) -> dict:
    src, max_drop, cal = fp32.artifact, quantization.options["max_drop"], quantization.calibration
    graphs = {}
    for kind in GRAPHS:
        runner = quant.vision if kind == names.VISION else quant.decoder
        metrics = report.score_graph(kind, runner, eval_store)
        before, after = src.graph_path(kind), staged / src.manifest.graph(kind).file
        r = results[kind]
        graphs[kind] = {
            "precision": r.description, "precision_short": r.precision,
            "size_bytes": {"fp32": file_size(before), "quantized": file_size(after),
                           "ratio": file_size(after) / file_size(before)},
            "matmul_weights": weight_summary(load_graph(after)),
            "ops": precision_by_op(after), "metrics": metrics,
            "gate": {"metric": report.GATED[kind][0], "drop": metrics["drop"], "max_drop": max_drop,
                     "passed": metrics["drop"] <= max_drop},
            "kept_higher_precision": r.kept, "trials": r.trials, "details": r.details}
    pipeline = report.compare_pipelines(fp32, quant, eval_set, opts.new_tokens, _progress(opts.progress, "comparing"))
    emb = quant.embeddings.spec
    used = [quant.prepare(s.prompt, list(s.images)).input_ids for s in eval_set]
    sample = np.unique(np.concatenate([np.random.default_rng(0).integers(0, emb.vocab, 2048), *used]))
    embeddings = {"encoding": emb.encoding, "precision": emb.precision, "tied": emb.tied, "bytes": emb.nbytes,
                  "fp32_bytes": 4 * emb.vocab * emb.hidden,
                  **compare(EmbeddingTable(fp32.artifact.manifest.embeddings, fp32.artifact.file, np.float32),
                            EmbeddingTable(emb, quant.artifact.file, np.float32), sample)}
    failed = [g for g in GRAPHS if not graphs[g]["gate"]["passed"]]
    threads = quant.backend.options.threads
    return {"recipe": quantization.recipe, "method": opts.method,
            "max_drop": max_drop, "backend": f"{quant.backend.name}" + (f", {threads} threads" if threads else ""),
            "calibration": {"source": cal["source"], "digest": cal["digest"], "samples": cal["samples"],
                            "eval_samples": len(eval_set)},
            "graphs": graphs, "embeddings": embeddings, "pipeline": pipeline, "failed": failed}

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
