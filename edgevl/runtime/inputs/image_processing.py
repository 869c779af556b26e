"""Qwen2-VL image preprocessing in numpy + PIL, bit-exact with transformers.

Mirrors `Qwen2VLImageProcessorPil` (transformers 5.x) step by step:

0. `load_image` (image_loading.py): EXIF orientation applied (`ImageOps.exif_transpose`, as transformers'
   `load_image`);
1. convert to RGB (alpha is composited onto white, as `image_transforms.convert_to_rgb`);
2. `smart_resize` to a multiple of `patch_size * merge_size`, PIL bicubic;
3. rescale in float64 then cast to float32 (`image_transforms.rescale`);
4. normalize in float32 (`image_transforms.normalize`);
5. cut into patches in merge-block order, each patch repeated `temporal_patch_size`
   times, flattened to `[C, T, P, P]`.

The vision graph runs per image, so `preprocess_image` handles one image and
`preprocess_images` concatenates them like the transformers processor does.
"""

from __future__ import annotations

import math
import os

import numpy as np
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.image_loading import load_image, open_image

def smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 56 * 56,
                 max_pixels: int = 14 * 14 * 4 * 1280) -> tuple[int, int]:
    """Target (height, width): multiples of `factor`, area within [min, max], aspect kept.

    Same arithmetic as transformers' `smart_resize` (Python `round` is
    banker's rounding there too); its ValueError becomes an EdgevlError.
    """
    if height <= 0 or width <= 0:
        raise EdgevlError(f"Image size must be positive, got {width}x{height} (width x height).")
    if max(height, width) / min(height, width) > 200:
        raise EdgevlError(
            f"Image aspect ratio {max(height, width) / min(height, width):.1f} "
            f"({width}x{height}) is too extreme; it must be at most 200."
        )
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def _pixels_hwc(source, settings: ImageProcessorSettings) -> np.ndarray:
    """Decoded, converted, resized image as uint8 [H, W, 3]."""
    if settings.do_convert_rgb:
        image = load_image(source)
    else:
        image, name = open_image(source)
        if image.mode != "RGB":
            raise EdgevlError(
                f"{name} has mode {image.mode!r} but do_convert_rgb is off; give an RGB image."
            )
    if settings.do_resize:
        height, width = smart_resize(image.height, image.width, settings.factor,
                                     settings.min_pixels, settings.max_pixels)
        # transformers round-trips through a PIL image and calls the same resize.
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    return np.asarray(image)


def rescale_normalize(pixels: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [H, W, 3] with transformers' exact dtype steps.

    A uint8 channel has only 256 values, so the float steps run once on a [256, 3] table and
    each channel becomes a lookup: the same bits as converting every pixel, ~5x faster.
    """
    if pixels.dtype == np.uint8 and pixels.ndim >= 1 and pixels.shape[-1] == 3:
        table = _rescale_normalize_each(np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1), settings)
        return np.stack([np.take(table[:, c], pixels[..., c]) for c in range(3)], axis=-1)
    return _rescale_normalize_each(pixels, settings)


def _rescale_normalize_each(pixels: np.ndarray, settings: ImageProcessorSettings) -> np.ndarray:
    x = pixels
    if settings.do_rescale:
        # image_transforms.rescale: multiply in float64, then cast to float32.
        x = (x.astype(np.float64) * settings.rescale_factor).astype(np.float32)
    if settings.do_normalize:
        # image_transforms.normalize: integer input becomes float32; mean/std take x's dtype.
        if not np.issubdtype(x.dtype, np.floating):
            x = x.astype(np.float32)
        mean = np.asarray(settings.image_mean, dtype=x.dtype)
        std = np.asarray(settings.image_std, dtype=x.dtype)
        x = (x - mean) / std
    return x.astype(np.float32)


def patchify(x: np.ndarray, settings: ImageProcessorSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """float32 frames [T, H, W, C] (T a multiple of temporal_patch_size) -> ([t*gh*gw, C*tp*P*P], (t, gh, gw)),
    patches in transformers' merge-block order. A still image is T = tp identical frames."""
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    frames, height, width, channels = x.shape
    if height % (p * m) or width % (p * m):
        raise EdgevlError(
            f"Image size {width}x{height} is not a multiple of {p * m}; enable do_resize or resize it first."
        )
    gt, gh, gw = frames // tp, height // p, width // p
    blocks = x.reshape(gt, tp, gh // m, m, p, gw // m, m, p, channels)
    # -> [gt, bh, bw, mh, mw, C, tp, ph, pw]
    blocks = blocks.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)
    return np.ascontiguousarray(blocks.reshape(gt * gh * gw, channels * tp * p * p)), (gt, gh, gw)


def preprocess_image(image, settings: ImageProcessorSettings) -> tuple[np.ndarray, tuple[int, int, int]]:
    """One image (path or PIL) -> (pixel_values float32 [1*gh*gw, C*T*P*P], grid_thw (1, gh, gw))."""
    pixels = _pixels_hwc(image, settings)
    x = rescale_normalize(pixels, settings)                                    # [H, W, C]
    return patchify(np.broadcast_to(x, (settings.temporal_patch_size, *x.shape)), settings)


def preprocess_images(images, settings: ImageProcessorSettings) -> tuple[np.ndarray, np.ndarray]:
    """Images (paths or PIL) -> (pixel_values float32 [sum patches, D], image_grid_thw int64 [n, 3]).

    Equal to `Qwen2VLImageProcessorPil(...)(images, return_tensors="np")`'s
    `pixel_values` and `image_grid_thw`.
    """
    if isinstance(images, (str, os.PathLike, Image.Image, bytes, bytearray, memoryview)):
        images = [images]
    if len(images) == 0:
        raise EdgevlError("No images were given to preprocess.")
    results = [preprocess_image(image, settings) for image in images]
    pixel_values = np.concatenate([patches for patches, _ in results], axis=0)
    image_grid_thw = np.array([grid for _, grid in results], dtype=np.int64)
    return pixel_values, image_grid_thw
