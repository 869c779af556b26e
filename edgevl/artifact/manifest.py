"""The artifact contract: `Manifest` and what it holds, typed, validated on the way in, JSON on the way out.

    Manifest
      source          SourceModel (name_or_path, model_type)
      dtype, opset    what the export was asked for
      config          ModelConfig: the model facts the runtime needs (no hard-coded sizes downstream)
      image_processor ImageProcessorSettings (pixels identical to transformers')
      video_processor ImageProcessorSettings for video frames (their own pixel budget)
      graphs          name -> GraphSpec (kind, file, data files, precision, custom ops, variant, I/O)
      embeddings      EmbeddingSpec (dense or block-quantized table, or the tied lm_head's weight)
      quantization    Quantization | None (recipe, its options, calibration, report, gate)
      versions        package versions that made it
      files           relative path -> sha256 of every file of the folder but manifest.json

The exporter and `edgevl quantize` build a Manifest (quantize derives its own from the source's with
`dataclasses.replace`); everything else reads one through `Manifest.from_json`, which checks every
field (through `fields.Fields`) and answers a bad one with one sentence naming it (`ManifestError`). Paths are only strings
here; `edgevl.artifact.folder` resolves them inside the artifact folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from edgevl.artifact import names
from edgevl.artifact.fields import Fields as _Fields
from edgevl.artifact.fields import ManifestError
from edgevl.artifact.fields import check as _check
from edgevl.artifact.fields import is_int as _is_int
from edgevl.errors import EdgevlError
from edgevl.artifact.model_config import ModelConfig
from edgevl.artifact.processors import ImageProcessorSettings

FORMAT = "edgevl-artifact"
FORMAT_VERSION = 2
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "int8", "uint8", "bool", "float64")
PRECISIONS = ("fp32", "fp16", "bf16", "int8", "int4")
VARIANTS = names.VARIANTS


# ----------------------------------------------------------------------------- the parts
Dim = int | str   # a fixed size, or a symbolic name / exporter expression such as "(num_patches//4)"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                       # numpy dtype name: float32, float16, int64, ...
    shape: tuple[Dim, ...]

    @classmethod
    def parse(cls, f: _Fields) -> "TensorSpec":
        shape = f.list("shape")
        for i, d in enumerate(shape):
            _check((_is_int(d) and d >= 0) or (isinstance(d, str) and d), f.path(f"shape[{i}]"),
                   "a size or a dimension name", d)
        return cls(f.str("name"), f.str("dtype", choices=DTYPES), tuple(shape))

    def to_json(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSpec:
    """One ONNX graph of the artifact: what it is, where its files are, what goes in and out."""

    kind: str                                # names.VISION | names.DECODER
    file: str                                # the graph, relative to the artifact folder
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    precision: str = "fp32"                  # what its weight matrices are stored as (PRECISIONS)
    data_files: tuple[str, ...] = ()         # external-data files the graph references
    custom_ops: tuple[str, ...] = ()         # "<domain>.<op>" nodes a backend must run or inline (names.MROPE)
    variant: str = "ort"                     # VARIANTS
    kv_cache: str | None = None              # decoders: names.IN_PLACE (one buffer written by position) | CONCAT
    opset: int = 18                          # the default ONNX domain's opset the graph imports
    # 4-bit decoders: `edgevl quantize` measured its prompts on int8 copies of the 4-bit weights within its
    # accuracy budget (runtime/backends/int8_prefill.py); ort-cpu then runs them so by default
    int8_prefill: bool = False

    @classmethod
    def parse(cls, f: _Fields) -> "GraphSpec":
        def tensors(key):
            return tuple(TensorSpec.parse(_Fields(v, f.path(f"{key}[{i}]"))) for i, v in enumerate(f.list(key)))

        spec = cls(kind=f.str("kind", choices=names.GRAPH_KINDS), file=f.str("file"), inputs=tensors("inputs"),
                   outputs=tensors("outputs"), precision=f.str("precision", choices=PRECISIONS),
                   data_files=f.strs("data_files", default=()), custom_ops=f.strs("custom_ops", default=()),
                   variant=f.str("variant", default="ort", choices=VARIANTS),
                   kv_cache=f.str("kv_cache", default=None, choices=names.KV_CACHES),
                   opset=f.int("opset", minimum=1), int8_prefill=f.bool("int8_prefill", default=False))
        if spec.int8_prefill and (spec.kind != names.DECODER or spec.precision != "int4"):
            raise ManifestError(f"manifest field '{f.path('int8_prefill')}' is for 4-bit decoders only.")
        seen = [t.name for t in (*spec.inputs, *spec.outputs)]
        if len(set(seen)) != len(seen):
            raise ManifestError(f"manifest field '{f.where}' names a tensor twice.")
        if (spec.kind == names.DECODER) != (spec.kv_cache is not None):
            raise ManifestError(f"manifest field '{f.path('kv_cache')}' must be set for decoders and only for them.")
        required = {names.IN_PLACE: (names.SEQLENS_K, names.TOTAL_SEQUENCE_LENGTH),
                    names.CONCAT: (names.ATTENTION_MASK,)}.get(spec.kv_cache, ())
        missing = [n for n in required if n not in {t.name for t in spec.inputs}]
        if missing:
            raise ManifestError(f"manifest field '{f.path('inputs')}' has no {missing[0]} input, which a "
                                f"{spec.kv_cache} decoder needs.")
        return spec

    def to_json(self) -> dict:
        out = {"kind": self.kind, "variant": self.variant, "opset": self.opset, "file": self.file,
               "data_files": list(self.data_files), "precision": self.precision, "custom_ops": list(self.custom_ops),
               "inputs": [t.to_json() for t in self.inputs], "outputs": [t.to_json() for t in self.outputs]}
        if self.int8_prefill:
            out["int8_prefill"] = True
        return {**out, "kv_cache": self.kv_cache} if self.kv_cache else out

    @property
    def files(self) -> tuple[str, ...]:
        return (self.file, *self.data_files)

    def input(self, name: str) -> TensorSpec:
        for t in self.inputs:
            if t.name == name:
                return t
        raise EdgevlError(f"the {self.kind} graph {self.file} has no input {name!r}.")

    @property
    def float_weights(self) -> bool:
        return self.precision in ("fp32", "fp16", "bf16")


@dataclass(frozen=True)
class SourceModel:
    name_or_path: str
    model_type: str

    def to_json(self) -> dict:
        return {"name_or_path": self.name_or_path, "model_type": self.model_type}


@dataclass(frozen=True)
class ArrayRef:
    """A C-order array stored raw at byte `offset` of `file` (a .npy file's data, or a graph's external data)."""

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def parse(cls, f: _Fields) -> "ArrayRef":
        return cls(f.str("file"), f.int("offset", minimum=0), f.str("dtype", choices=DTYPES), f.ints("shape", minimum=0))

    def to_json(self) -> dict:
        return {"file": self.file, "offset": self.offset, "dtype": self.dtype, "shape": list(self.shape)}

    @property
    def nbytes(self) -> int:
        count = 1
        for d in self.shape:
            count *= d
        return count * {"float32": 4, "float16": 2, "uint8": 1, "int8": 1}.get(self.dtype, 8)


EMBEDDING_ENCODINGS = ("dense", "blocks")


@dataclass(frozen=True)
class EmbeddingSpec:
    """The token embedding table the runtime gathers rows from (memory-mapped; runtime/embeddings.py).

    dense   weight [vocab, hidden] float32 / float16
    blocks  onnxruntime MatMulNBits' layout: weight uint8 [vocab, n_blocks, block_size * bits / 8], scales
            [vocab * n_blocks] float, zero_points uint8 (packed for 4 bits), rows dequantized per token
    tied    the arrays ARE the decoder's lm_head initializers in its external-data file: stored once
    """

    encoding: str
    weight: ArrayRef
    vocab: int
    hidden: int
    bits: int | None = None
    block_size: int | None = None
    scales: ArrayRef | None = None
    zero_points: ArrayRef | None = None
    tied: bool = False

    @classmethod
    def parse(cls, f: _Fields) -> "EmbeddingSpec":
        encoding = f.str("encoding", choices=EMBEDDING_ENCODINGS)
        spec = cls(encoding=encoding, weight=ArrayRef.parse(f.obj("weight")), vocab=f.int("vocab", minimum=1),
                   hidden=f.int("hidden", minimum=1), bits=f.int("bits", default=None, minimum=1),
                   block_size=f.int("block_size", default=None, minimum=1),
                   scales=ArrayRef.parse(f.obj("scales")) if f.has("scales") else None,
                   zero_points=ArrayRef.parse(f.obj("zero_points")) if f.has("zero_points") else None,
                   tied=f.bool("tied", default=False))
        if encoding == "dense" and spec.weight.shape != (spec.vocab, spec.hidden):
            raise ManifestError("manifest field 'embeddings.weight.shape' must be [vocab, hidden].")
        if encoding == "blocks":
            if spec.bits not in (4, 8) or not spec.block_size or spec.scales is None:
                raise ManifestError("manifest field 'embeddings' needs bits (4 or 8), block_size and scales for "
                                    "the blocks encoding.")
            blocks = -(-spec.hidden // spec.block_size)
            if spec.weight.shape != (spec.vocab, blocks, spec.block_size * spec.bits // 8) or \
                    spec.weight.dtype != "uint8":
                raise ManifestError("manifest field 'embeddings.weight' does not have MatMulNBits' blocked layout.")
        return spec

    def to_json(self) -> dict:
        out = {"encoding": self.encoding, "vocab": self.vocab, "hidden": self.hidden, "tied": self.tied,
               "weight": self.weight.to_json()}
        if self.encoding == "blocks":
            out.update(bits=self.bits, block_size=self.block_size, scales=self.scales.to_json(),
                       zero_points=self.zero_points.to_json() if self.zero_points else None)
        return out

    @property
    def arrays(self) -> tuple[ArrayRef, ...]:
        return tuple(a for a in (self.weight, self.scales, self.zero_points) if a is not None)

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(a.file for a in self.arrays))

    @property
    def shape(self) -> tuple[int, int]:
        return (self.vocab, self.hidden)

    @property
    def dtype(self) -> str:
        """What a gathered row is: the dense weight's dtype, or the scales' for blocks."""
        return self.weight.dtype if self.encoding == "dense" else self.scales.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the table on disk (shared with the lm_head when tied)."""
        return sum(a.nbytes for a in self.arrays)

    @property
    def row_bytes(self) -> int:
        """Bytes read to gather one token's row."""
        return self.nbytes // self.vocab

    @property
    def precision(self) -> str:
        if self.encoding == "blocks":
            return f"int{self.bits}"
        return {"float32": "fp32", "float16": "fp16"}[self.weight.dtype]


@dataclass(frozen=True)
class Quantization:
    """How `edgevl quantize` made this artifact from an fp32 one."""

    recipe: str
    options: dict                            # the recipe's own settings (method, block size, ...)
    calibration: dict                        # source, digests and sample counts
    graphs: dict                             # graph name -> one line on what was done to it
    kept_higher_precision: dict              # graph name -> groups kept higher, and why
    source_manifest_sha256: str
    source_path: str
    report: str | None = None                # the report file (listed in files)
    passed: bool | None = None               # the quality gate; None while it is being written

    @classmethod
    def parse(cls, f: _Fields) -> "Quantization":
        return cls(recipe=f.str("recipe"), options=f.json("options"), calibration=f.json("calibration"),
                   graphs=f.json("graphs"), kept_higher_precision=f.json("kept_higher_precision"),
                   source_manifest_sha256=f.str("source_manifest_sha256"), source_path=f.str("source_path"),
                   report=f.str("report", default=None), passed=f.bool("passed", default=None))

    def to_json(self) -> dict:
        return {fld.name: getattr(self, fld.name) for fld in fields(self)}


# ----------------------------------------------------------------------------- the manifest
@dataclass(frozen=True)
class Manifest:
    source: SourceModel
    dtype: str
    opset: int
    config: ModelConfig
    image_processor: ImageProcessorSettings
    video_processor: ImageProcessorSettings
    graphs: dict[str, GraphSpec]
    embeddings: EmbeddingSpec
    quantization: Quantization | None = None
    versions: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    # -- reading
    @classmethod
    def from_json(cls, data: Any) -> "Manifest":
        """Validate a parsed manifest.json; ManifestError (one sentence naming the field) if anything is off."""
        f = _Fields(data, "")
        if f.raw("format", None) != FORMAT:
            raise ManifestError(f"this is not an edgevl manifest (format {f.raw('format', None)!r}).")
        version = f.raw("format_version", None)
        if version != FORMAT_VERSION:
            raise ManifestError(f"the artifact has format version {version}; this edgevl reads version "
                                f"{FORMAT_VERSION}: re-export the model with this edgevl.")
        source = f.obj("source_model")
        graphs_f = f.obj("graphs")
        graphs = {name: GraphSpec.parse(_Fields(entry, f"graphs.{name}")) for name, entry in graphs_f.data.items()}
        files_f = f.obj("files")
        files = {}
        for name, digest in files_f.data.items():
            _check(isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                   f"files.{name}", "a sha256 hex digest", digest)
            files[name] = digest
        manifest = cls(
            source=SourceModel(source.str("name_or_path"), source.str("model_type")),
            dtype=f.str("dtype", choices=("fp32", "fp16")), opset=f.int("opset", minimum=1),
            config=ModelConfig.parse(f.obj("config")),
            image_processor=_processor(f, "image_processor"), video_processor=_processor(f, "video_processor"),
            graphs=graphs, embeddings=EmbeddingSpec.parse(f.obj("embeddings")),
            quantization=Quantization.parse(f.obj("quantization")) if f.has("quantization") else None,
            versions={str(k): str(v) for k, v in f.json("versions").items()}, files=files)
        manifest.check()
        return manifest

    def check(self) -> None:
        """Cross-field rules: the graphs the runtime needs exist, with the I/O it feeds."""
        for kind in names.GRAPH_KINDS:
            self.graph(kind)                       # ManifestError if missing
        for name, spec in self.graphs.items():
            if spec.kind == names.DECODER:
                got = sum(1 for t in spec.inputs if names.is_past(t.name))
                if got != 2 * self.config.num_hidden_layers:
                    raise ManifestError(f"manifest field 'graphs.{name}.inputs' has {got} KV-cache inputs for "
                                        f"{self.config.num_hidden_layers} layers.")
        if self.embeddings.hidden != self.config.hidden_size or self.embeddings.vocab > self.config.vocab_size:
            raise ManifestError("manifest field 'embeddings' does not match config.hidden_size / vocab_size.")

    # -- writing
    def to_json(self) -> dict:
        return {"format": FORMAT, "format_version": self.format_version, "source_model": self.source.to_json(),
                "dtype": self.dtype, "opset": self.opset, "config": self.config.to_json(),
                "image_processor": self.image_processor.to_dict(), "video_processor": self.video_processor.to_dict(),
                "graphs": {n: g.to_json() for n, g in self.graphs.items()}, "embeddings": self.embeddings.to_json(),
                "quantization": self.quantization.to_json() if self.quantization else None,
                "versions": dict(self.versions), "files": dict(sorted(self.files.items()))}

    # -- questions the runtime asks
    def graph(self, kind: str, variant: str | None = None) -> GraphSpec:
        """The graph of `kind` for `variant` ("ort" graphs may use onnxruntime contrib ops; None: the first)."""
        for spec in self.graphs.values():
            if spec.kind == kind and variant in (None, spec.variant):
                return spec
        raise ManifestError(f"the manifest has no {kind} graph of the {variant!r} variant.")

    @property
    def variants(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(spec.variant for spec in self.graphs.values()))

    def graph_name(self, spec: GraphSpec) -> str:
        return next(name for name, s in self.graphs.items() if s == spec)

    def referenced_files(self) -> list[str]:
        """Every file the runtime opens: graphs, their data, the embedding table, tokenizer and template."""
        out = [f for spec in self.graphs.values() for f in spec.files]
        out += [*self.embeddings.files, "tokenizer.json", "chat_template.jinja"]
        if self.quantization and self.quantization.report:
            out.append(self.quantization.report)
        return out


def _processor(f: _Fields, key: str) -> ImageProcessorSettings:
    try:
        return ImageProcessorSettings.from_dict(f.obj(key).data)
    except ManifestError:
        raise
    except (EdgevlError, TypeError, ValueError) as e:
        raise ManifestError(f"manifest field '{key}' is not valid ({e}).") from None
