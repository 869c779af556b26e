"""Shapes and bytes, as pure functions: optimization profiles, buffer sizes, KV-cache and weight memory.

TensorRT (native or through ONNX Runtime's TensorRT EP) needs, for every input with a
symbolic dim, a (min, opt, max) range: an *optimization profile*. The manifest names
every symbolic dim of both graphs,

    vision   pixel_values [num_patches, 1176]       rotary_pos_ids [num_patches, 2]
             window_gather/window_mask [num_windows, slots]   (Qwen2.5-VL only)
    decoder  inputs_embeds [batch, sequence, H]     position_ids [3, batch, sequence]
             attention_mask [batch, total_sequence] past_key_values.{i}.* [batch, kv, past_sequence, D]

so one table (`dim_ranges`) turns the user's limits (max batch, max context = KV-cache
size, max image patches) into ranges per dim, and every input's profile follows from its
dims. The decoder gets three profiles: "decode" (one new token, opt at a half-full cache),
"prefill" (a whole prompt, empty cache) and "extend" (a few new tokens after a cache: a chat's
next turn); a runner picks the first profile that holds the shapes of a call (`select_profile`).
Every profile's min, opt and max are shapes the graphs run (tests/runtime/backends/test_sizing.py runs them).
Nothing here imports onnxruntime or tensorrt.
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass

import numpy as np

from edgevl.artifact import names
from edgevl.artifact.manifest import TensorSpec
from edgevl.artifact.model_config import ModelConfig
from edgevl.errors import EdgevlError

DEFAULT_ENGINE_CONTEXT = 4096      # KV positions an engine is built for unless --max-context says otherwise
DEFAULT_MAX_IMAGE_PATCHES = 4096   # 14x14-pixel patches per vision call: 896x896 pixels; 448x448 is 1024
OPT_PROMPT = 512                   # prefill length the prefill profile is tuned for (one 448x448 image + text)
OPT_PATCHES = 1024                 # vision profile tuned for a 448x448 image
EXTEND_OPT = 64                    # new tokens the extend profile is tuned for (a chat's next question)


@dataclass(frozen=True)
class Limits:
    """What engines must accept: the user's sizes, resolved against the model's config."""

    max_batch: int = 1
    max_context: int = DEFAULT_ENGINE_CONTEXT   # prompt + generated tokens = KV-cache positions
    max_image_patches: int = DEFAULT_MAX_IMAGE_PATCHES

    def __post_init__(self):
        for field in ("max_batch", "max_context", "max_image_patches"):
            if getattr(self, field) < 1:
                raise EdgevlError(f"--{field.replace('_', '-')} must be at least 1, not {getattr(self, field)}.")

    @classmethod
    def resolve(cls, config: ModelConfig, max_batch: int | None = None, max_context: int | None = None,
                max_image_patches: int | None = None) -> "Limits":
        """Defaults filled in; the context by `resolve_context`'s one rule, with the engines' default."""
        return cls(max_batch or 1, resolve_context(config, max_context, DEFAULT_ENGINE_CONTEXT),
                   max_image_patches or DEFAULT_MAX_IMAGE_PATCHES)


def resolve_context(config: ModelConfig, requested: int | None, default: int | None) -> int:
    """KV-cache positions (prompt + generated tokens) for every backend, by one rule: `--max-context` as asked,
    refused with a sentence when it is above the model's context; without it the backend's default (engines and
    ort-cuda: 4096; None: the model's context), never above the model's context."""
    model_max = config.max_position_embeddings
    if requested is not None:
        if requested > model_max:
            raise EdgevlError(f"--max-context {requested} is above the model's context of {model_max} tokens.")
        return requested
    return min(default or model_max, model_max)


Range = tuple[int, int, int]                                   # (min, opt, max) of one dim


@dataclass(frozen=True)
class Profile:
    """One optimization profile: input name -> (min shape, opt shape, max shape)."""

    name: str
    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def dim_ranges(kind: str, limits: Limits, config: ModelConfig) -> list[tuple[str, dict[str, Range]]]:
    """Per profile of a graph of `kind` (names.VISION | names.DECODER): its name and (min, opt, max) per
    symbolic dim. Each of the min, opt and max corners is a shape the graph runs (TensorRT checks all three
    against the network when it builds): the decoder's past + sequence == total at every corner, the vision
    encoder's patch counts whole merged tokens."""
    b, c = limits.max_batch, limits.max_context
    if kind == names.VISION:
        smallest = config.spatial_merge_size ** 2                 # one merged token
        top = max(limits.max_image_patches // smallest * smallest, smallest)
        opt = min(OPT_PATCHES, top) // smallest * smallest
        ranges = {names.NUM_PATCHES: (smallest, opt, top)}
        if config.vision_window_size:                             # Qwen2.5-VL: one window per merged unit at most
            slots = (config.vision_window_size // config.patch_size) ** 2
            ranges[names.NUM_WINDOWS] = (1, max(1, -(-opt // slots)), top // smallest)
        return [("image", ranges)]
    if kind == names.DECODER:
        if c < 2:
            raise EdgevlError("--max-context must be at least 2 (a prompt token and a new one).")
        return [(name, _decoder_dims(b, past, sequence)) for name, past, sequence in _decoder_profiles(c)]
    raise EdgevlError(f"no profile rules for a graph of kind {kind!r}.")


def _decoder_profiles(c: int) -> list[tuple[str, Range, Range]]:
    """(name, past range, sequence range) of the decoder's profiles for a KV cache of c positions:

    decode   one new token after 1 .. c-1 cached ones (tuned for a half-full cache)
    prefill  a prompt of 1 .. c tokens into an empty cache (tuned for OPT_PROMPT)
    extend   2 .. c/4 new tokens after 1 .. 3c/4 cached ones: a chat's next turn, a prompt after a reused prefix
             (tuned for EXTEND_OPT tokens after a half-full cache); only where c >= 8
    A profile is a box whose max corner must itself be runnable (past + sequence <= c), so no single box holds
    every (past, sequence) with past + sequence <= c; a call outside the three is refused by select_profile."""
    half, prompt = max(1, c // 2), min(OPT_PROMPT, c)
    profiles = [("decode", (1, half, c - 1), (1, 1, 1)), ("prefill", (0, 0, 0), (1, prompt, c))]
    chunk = c // 4
    if chunk >= 2:
        profiles.append(("extend", (1, min(half, c - chunk), c - chunk), (2, min(EXTEND_OPT, chunk), chunk)))
    return profiles


def _decoder_dims(batch: int, past: Range, sequence: Range) -> dict[str, Range]:
    total = tuple(p + s for p, s in zip(past, sequence))
    return {names.BATCH: (1, 1, batch), names.SEQUENCE: sequence, names.PAST_SEQUENCE: past,
            names.TOTAL_SEQUENCE: total}


def build_profiles(kind: str, inputs: tuple[TensorSpec, ...], limits: Limits, config: ModelConfig) -> list[Profile]:
    """Profiles for a graph's inputs (its GraphSpec's inputs)."""
    profiles = []
    for name, ranges in dim_ranges(kind, limits, config):
        shapes = {}
        for value in inputs:
            dims = value.shape
            if all(isinstance(d, int) for d in dims):
                continue                                       # static input: no profile entry needed
            picked = []
            for d in dims:
                if isinstance(d, int):
                    picked.append((d, d, d))
                elif d in ranges:
                    picked.append(ranges[d])
                else:
                    raise EdgevlError(f"{kind} input {value.name} has a dim {d!r} with no size rule; "
                                      f"this edgevl does not know how to bound it.")
            shapes[value.name] = tuple(tuple(r[i] for r in picked) for i in range(3))
        profiles.append(Profile(name, shapes))
    return profiles


def ort_trt_profile_options(profiles: list[Profile]) -> dict[str, str]:
    """ONNX Runtime TensorRT EP's explicit profiles: 'name:1x2x3,name2:...' per min/opt/max.

    Several profiles are written by listing each input once per profile, in profile order.
    """
    def shape(s):
        return "x".join(str(d) for d in s)

    out = {}
    for i, key in enumerate(("trt_profile_min_shapes", "trt_profile_opt_shapes", "trt_profile_max_shapes")):
        out[key] = ",".join(f"{name}:{shape(s[i])}" for p in profiles for name, s in p.shapes.items())
    return out


def select_profile(profiles: list[Profile], shapes: dict[str, tuple[int, ...]]) -> int:
    """Index of the first profile whose [min, max] holds every given input shape; EdgevlError if none."""
    for i, p in enumerate(profiles):
        if all(name not in p.shapes or _within(shapes[name], p.shapes[name]) for name in shapes):
            return i
    # Say which limit the call broke, in the user's words.
    for name, shape in shapes.items():
        top = tuple(max(p.shapes[name][2][k] for p in profiles) for k in range(len(shape))) \
            if all(name in p.shapes for p in profiles) else None
        if top and any(s > t for s, t in zip(shape, top)):
            raise EdgevlError(f"{name} has shape {list(shape)} but the engines were built for at most {list(top)}; "
                              f"rebuild with a larger --max-context / --max-batch / --max-image-patches.")
    listed = ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())
    raise EdgevlError(f"no optimization profile of the engines ({', '.join(p.name for p in profiles)}) holds a call "
                      f"with {listed}; docs/jetson.md says which calls each profile takes.")


def _within(shape, rng) -> bool:
    lo, _, hi = rng
    return len(shape) == len(lo) and all(a <= s <= b for s, a, b in zip(shape, lo, hi))


# ----------------------------------------------------------------------------- buffer sizing
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def eval_dim(dim, env: dict[str, int]) -> int:
    """A manifest dim -> int: an int, a name ('batch') or an exporter expression ('(num_patches//4)')."""
    if isinstance(dim, int):
        return dim

    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, int):
            return node.value
        if isinstance(node, ast.Name) and node.id in env:
            return int(env[node.id])
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        raise EdgevlError(f"cannot size the dim {dim!r} (unknown name or operator).")

    try:
        return ev(ast.parse(str(dim), mode="eval"))
    except SyntaxError:
        raise EdgevlError(f"cannot size the dim {dim!r}.") from None


def max_dims(kind: str, limits: Limits, config: ModelConfig) -> dict[str, int]:
    """Largest value of every symbolic dim over all profiles of a graph."""
    env: dict[str, int] = {}
    for _, ranges in dim_ranges(kind, limits, config):
        for name, (_, _, hi) in ranges.items():
            env[name] = max(env.get(name, 0), hi)
    return env


def max_tensor_bytes(value: TensorSpec, env: dict[str, int]) -> int:
    """Bytes of the largest tensor a graph input/output can hold under `env` (buffers sized once)."""
    count = 1
    for d in value.shape:
        count *= eval_dim(d, env)
    return count * np.dtype(value.dtype).itemsize


# ----------------------------------------------------------------------------- memory arithmetic
def weights_bytes(artifact) -> dict[str, int]:
    """Bytes per part of an Artifact: each graph's files (weights the accelerator holds) and the embedding
    table (memory-mapped on the host, only the rows of the tokens used are read)."""
    m = artifact.manifest
    sizes = {name: sum(artifact.file(f).stat().st_size for f in spec.files) for name, spec in m.graphs.items()}
    sizes["embeddings"] = 0 if m.embeddings.tied else m.embeddings.nbytes   # tied: the decoder's lm_head bytes
    return sizes


def memory_plan(artifact, batch: int, max_context: int) -> dict[str, int]:
    """Device bytes to expect: graph weights + a double KV cache in the decoder's dtype (host: embeddings).

    A decode step over a Concat-grown cache holds the past and the new present cache at once."""
    w = weights_bytes(artifact)
    decoder = artifact.manifest.graph(names.DECODER)
    kv_dtype = decoder.input(names.INPUTS_EMBEDS).dtype
    kv = artifact.config.kv_cache_bytes(batch, max_context, np.dtype(kv_dtype).itemsize)
    device = sum(v for k, v in w.items() if k != "embeddings") + 2 * kv
    return {**{f"weights_{k}": v for k, v in w.items()}, "kv_cache": kv, "kv_cache_double": 2 * kv,
            "device_total": device}
