"""`BackendOptions`: the user's backend settings (flags, or a Triton model's parameters), validated once."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from edgevl.artifact.model_config import ModelConfig
from edgevl.cache import cache_root
from edgevl.errors import EdgevlError
from edgevl.runtime.backends.sizing import Limits
from edgevl.runtime.limits import validate_threads


class BackendSettings(Protocol):
    """The backend settings by the names of their flags (add_backend_flags' argparse namespace; a Triton model's
    config.pbtxt parameters, serve/triton/handler.ModelSettings)."""

    threads: int
    fast_load: bool
    max_batch: int | None
    max_context: int | None
    max_image_patches: int | None
    precision: str
    engine_cache: str | None
    cuda_graph: bool
    int8_prefill: bool | None


@dataclass(frozen=True)
class BackendOptions:
    """User settings shared by every backend (each uses the ones it needs)."""

    threads: int = 0                       # CPU threads: run/chat/serve/bench share one onnxruntime pool of
                                           # this size for the process (ort_session.share_thread_pool);
                                           # quantize gives each session its own
    prepack: bool = True                   # ort-cpu: re-pack float weights at load (slower load, faster run)
    device_id: int = 0                     # which GPU
    max_batch: int | None = None           # engines: largest batch (default 1)
    max_context: int | None = None         # KV-cache positions = prompt + new tokens (engines default 4096)
    max_image_patches: int | None = None   # engines: 14x14 patches per vision call (default 4096)
    precision: str = "graph"               # graph | fp16 | int8 (engines; see trt.BuildOptions)
    cache_dir: Path | None = None          # engine cache (default $EDGEVL_CACHE or ~/.cache/edgevl)
    cuda_graph: bool = False               # ort-cuda: decode steps captured and replayed as CUDA graphs
    int8_prefill: bool | None = None       # ort-cpu: a 4-bit decoder's prompts on int8 copies (int8_prefill.py);
                                           # None: where its quantizer measured it and the CPU has int8 dot products
    keep_int8_copies: bool = True          # ...and keeps those copies under cache/int8-prefill for later loads
                                           # (quantize does not: its graphs are candidates in a work folder)
    log: Callable[[str], None] = field(default=lambda msg: None, compare=False)

    def __post_init__(self):
        for name in ("max_batch", "max_context", "max_image_patches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise EdgevlError(f"--{name.replace('_', '-')} must be at least 1, not {value}.")

    @classmethod
    def from_settings(cls, settings: BackendSettings, device_id: int = 0,
                      log: Callable[[str], None] | None = None) -> BackendOptions:
        """The options the flags (or the Triton model's parameters) ask for, validated: the one place they are read."""
        return cls(threads=validate_threads(settings.threads, "--threads"), prepack=not settings.fast_load,
                   device_id=device_id, max_batch=settings.max_batch, max_context=settings.max_context,
                   max_image_patches=settings.max_image_patches, precision=settings.precision,
                   cache_dir=Path(settings.engine_cache) if settings.engine_cache else None,
                   cuda_graph=settings.cuda_graph, int8_prefill=settings.int8_prefill,
                   **({"log": log} if log else {}))

    def limits(self, config: ModelConfig) -> Limits:
        return Limits.resolve(config, self.max_batch, self.max_context, self.max_image_patches)

    @property
    def cache(self) -> Path:
        return Path(self.cache_dir) if self.cache_dir else cache_root()
