"""The image and video processor settings an artifact carries (manifest.image_processor / video_processor): the
fields of a Qwen-VL `preprocessor_config.json` that change pixels, read the way transformers reads them. Part of
the artifact contract: the exporter writes them, the runtime's preprocessing (runtime/inputs/) reads them."""

from __future__ import annotations

from dataclasses import dataclass

from edgevl.errors import EdgevlError

# OpenAI CLIP statistics, the Qwen2-VL defaults.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PIL_BICUBIC = 3  # `resample` value transformers stores for bicubic


@dataclass(frozen=True)
class ImageProcessorSettings:
    """The fields of a Qwen2-VL `preprocessor_config.json` that change pixels."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True

    @property
    def factor(self) -> int:
        """Side lengths after resizing are multiples of this."""
        return self.patch_size * self.merge_size

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: C * T * P * P."""
        return 3 * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_dict(cls, d: dict) -> ImageProcessorSettings:
        """Read a `preprocessor_config.json` dict (old flat or new `size` form).

        As in transformers, top-level `min_pixels`/`max_pixels` win over `size`.
        Keys that do not change pixels (`image_processor_type`, ...) are ignored.
        """
        d = {k: v for k, v in d.items() if v is not None}
        resample = d.get("resample", PIL_BICUBIC)
        if resample != PIL_BICUBIC:
            raise EdgevlError(f"Image resample mode {resample!r} is not supported; only bicubic (3) is.")
        size = d.get("size") or {}
        if not isinstance(size, dict):
            raise EdgevlError(
                f"Image processor 'size' must be a dict with shortest_edge/longest_edge, got {size!r}."
            )
        min_pixels = d.get("min_pixels", size.get("shortest_edge", size.get("min_pixels", cls.min_pixels)))
        max_pixels = d.get("max_pixels", size.get("longest_edge", size.get("max_pixels", cls.max_pixels)))
        settings = cls(
            min_pixels=int(min_pixels),
            max_pixels=int(max_pixels),
            patch_size=int(d.get("patch_size", cls.patch_size)),
            temporal_patch_size=int(d.get("temporal_patch_size", cls.temporal_patch_size)),
            merge_size=int(d.get("merge_size", cls.merge_size)),
            image_mean=tuple(float(x) for x in d.get("image_mean", cls.image_mean)),
            image_std=tuple(float(x) for x in d.get("image_std", cls.image_std)),
            rescale_factor=float(d.get("rescale_factor", cls.rescale_factor)),
            do_resize=bool(d.get("do_resize", cls.do_resize)),
            do_rescale=bool(d.get("do_rescale", cls.do_rescale)),
            do_normalize=bool(d.get("do_normalize", cls.do_normalize)),
            do_convert_rgb=bool(d.get("do_convert_rgb", cls.do_convert_rgb)),
        )
        _check_settings(settings)
        return settings

    def to_dict(self) -> dict:
        """A JSON-able dict that `from_dict` (ours or transformers') reads back."""
        return {
            "min_pixels": self.min_pixels,
            "max_pixels": self.max_pixels,
            "size": {"shortest_edge": self.min_pixels, "longest_edge": self.max_pixels},
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "resample": PIL_BICUBIC,
            "do_resize": self.do_resize,
            "do_rescale": self.do_rescale,
            "do_normalize": self.do_normalize,
            "do_convert_rgb": self.do_convert_rgb,
        }


def _check_settings(s: ImageProcessorSettings) -> None:
    for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
        if getattr(s, name) <= 0:
            raise EdgevlError(f"Image processor setting {name} must be positive, got {getattr(s, name)}.")
    if len(s.image_mean) != 3 or len(s.image_std) != 3:
        raise EdgevlError("Image processor image_mean and image_std must each have 3 values (RGB).")
