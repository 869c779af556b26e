"""edgevl.runtime.inputs.image_processing against transformers' Qwen2VLImageProcessorPil on real photos."""

import subprocess
import sys

import numpy as np
import pytest
import skimage.data
from PIL import Image
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_module

from edgevl.errors import EdgevlError
from edgevl.artifact.processors import ImageProcessorSettings
from edgevl.runtime.inputs.image_loading import load_image
from edgevl.runtime.inputs.image_processing import preprocess_image, preprocess_images, smart_resize

# preprocessor_config.json of Qwen/Qwen2-VL-2B-Instruct (old flat form).
REAL_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2VLProcessor",
}
REAL = ImageProcessorSettings.from_dict(REAL_CONFIG)


def photo(name: str) -> Image.Image:
    return Image.fromarray(getattr(skimage.data, name)())


def hf_outputs(images, config: dict):
    processor = hf_module.Qwen2VLImageProcessorPil.from_dict(config)
    out = processor(images, return_tensors="np")
    return out["pixel_values"], out["image_grid_thw"]


def assert_matches_hf(images, settings=REAL, hf_images=None):
    """Our output on `images` equals transformers' on `hf_images` (default: the same images)."""
    ours_pv, ours_grid = preprocess_images(images, settings)
    ref_pv, ref_grid = hf_outputs(images if hf_images is None else hf_images, settings.to_dict())
    assert ours_pv.dtype == np.float32 and ours_grid.dtype == np.int64
    assert ours_pv.shape == ref_pv.shape
    assert np.array_equal(ours_grid, ref_grid)
    # Same IEEE ops in the same order, so the result is bit-identical (brief allows 1e-6).
    np.testing.assert_array_equal(ours_pv, ref_pv)


def with_alpha(image: Image.Image) -> Image.Image:
    """RGBA with a horizontal alpha ramp (0 at the left, 255 at the right)."""
    rgba = image.convert("RGBA")
    ramp = np.linspace(0, 255, image.width).astype(np.uint8)
    rgba.putalpha(Image.fromarray(np.tile(ramp, (image.height, 1))))
    return rgba


def palette_with_transparency() -> Image.Image:
    image = photo("chelsea").quantize(32)
    image.info["transparency"] = 0  # palette index 0 is see-through
    return image


CASES = {
    "astronaut": lambda: photo("astronaut"),
    "coffee": lambda: photo("coffee"),
    "chelsea": lambda: photo("chelsea"),
    "rocket": lambda: photo("rocket"),
    "camera_L": lambda: photo("camera"),
    "crop_333x517": lambda: photo("astronaut").crop((100, 0, 433, 517)).copy(),
    "thin_29x1000": lambda: photo("coffee").resize((1000, 29)),
    "tall_7x900": lambda: photo("rocket").resize((7, 900)),
    "tiny_10x12": lambda: photo("chelsea").resize((10, 12)),
    "one_pixel": lambda: photo("coffee").resize((1, 1)),
    "rgba_ramp": lambda: with_alpha(photo("coffee")),
    "la": lambda: with_alpha(photo("camera")).convert("LA"),
    "palette": lambda: photo("chelsea").quantize(64),
    "palette_transparent": palette_with_transparency,
    "cmyk": lambda: photo("coffee").convert("CMYK"),
    "binary_1": lambda: photo("camera").convert("1"),
}


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_wide_pixel_modes_are_refused(mode):
    """transformers clips >8-bit pixels to 255 without a word; we refuse with a sentence."""
    image = Image.fromarray((skimage.data.camera().astype(np.uint16) * 3)[:200, :300]).convert(mode)
    with pytest.raises(EdgevlError, match="8-bit"):
        preprocess_images([image], ImageProcessorSettings())


@pytest.mark.parametrize("name", sorted(CASES))
def test_single_image_matches_transformers(name):
    assert_matches_hf([CASES[name]()])


def test_several_images_at_once():
    images = [CASES[n]() for n in ("astronaut", "camera_L", "crop_333x517", "rgba_ramp", "tiny_10x12")]
    assert_matches_hf(images)


def test_reduced_max_pixels_downscales():
    settings = ImageProcessorSettings.from_dict({**REAL_CONFIG, "max_pixels": 200_000})
    image = photo("astronaut")
    pixel_values, grid = preprocess_image(image, settings)
    assert grid[1] * grid[2] * 14 * 14 <= 200_000 < 512 * 512
    assert_matches_hf([image, photo("rocket")], settings)


def test_raised_min_pixels_upscales():
    settings = ImageProcessorSettings.from_dict({"size": {"shortest_edge": 400_000, "longest_edge": 1_000_000}})
    assert_matches_hf([photo("chelsea")], settings)


@pytest.mark.parametrize("flags", [{"do_normalize": False}, {"do_rescale": False}, {"do_resize": False}])
def test_switches_match_transformers(flags):
    settings = ImageProcessorSettings.from_dict({**REAL_CONFIG, **flags})
    image = photo("coffee").crop((0, 0, 280, 336))  # multiple of 28 so do_resize=False works
    assert_matches_hf([image], settings)


def test_preprocess_image_layout():
    pixel_values, grid = preprocess_image(photo("chelsea"), REAL)
    assert grid == (1, 22, 32)  # 300x451 -> 308x448
    assert pixel_values.shape == (22 * 32, 3 * 2 * 14 * 14)
    # the two temporal copies of each patch are identical: [n, C, T, P*P]
    per_time = pixel_values.reshape(-1, 3, 2, 14 * 14)
    assert np.array_equal(per_time[:, :, 0], per_time[:, :, 1])


def test_paths_match_transformers_paths(tmp_path):
    jpg = tmp_path / "rocket.jpg"
    photo("rocket").save(jpg, quality=90)
    assert_matches_hf([str(jpg)], hf_images=[str(jpg)])
    assert_matches_hf([jpg], hf_images=[Image.open(jpg)])


def test_exif_orientation_is_applied_like_transformers_load_image(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    photo("chelsea").save(path, exif=exif)
    assert load_image(path).size == (300, 451)
    assert_matches_hf([str(path)], hf_images=[str(path)])


def test_rgba_file_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    with_alpha(photo("astronaut")).save(path)
    rgb = np.asarray(load_image(path))
    assert rgb[:, 0].min() == 255  # fully transparent column -> white
    # transformers composites PIL inputs (its own path loader would drop alpha instead).
    assert_matches_hf([str(path)], hf_images=[Image.open(path)])


def test_smart_resize_matches_transformers():
    for height in (1, 13, 28, 29, 55, 224, 333, 517, 1000, 4000):
        for width in (1, 14, 56, 100, 451, 640, 3000):
            if max(height, width) / min(height, width) > 200:
                continue
            for max_pixels in (50_000, 12845056):
                args = (height, width, 28, 3136, max_pixels)
                assert smart_resize(*args) == hf_module.smart_resize(*args)


def test_settings_dict_forms():
    new = ImageProcessorSettings.from_dict({"size": {"shortest_edge": 100, "longest_edge": 2000}})
    assert (new.min_pixels, new.max_pixels) == (100, 2000)
    size = {"shortest_edge": 100, "longest_edge": 2000}
    flat_wins = ImageProcessorSettings.from_dict({"size": size, "min_pixels": 7})
    assert flat_wins.min_pixels == 7
    assert ImageProcessorSettings.from_dict(REAL.to_dict()) == REAL
    hf = hf_module.Qwen2VLImageProcessorPil.from_dict(REAL.to_dict())
    assert (hf.size.shortest_edge, hf.size.longest_edge) == (3136, 12845056)
    assert REAL.image_mean == tuple(REAL_CONFIG["image_mean"])
    with pytest.raises(EdgevlError):
        ImageProcessorSettings.from_dict({"resample": 2})


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jpg"
    with pytest.raises(EdgevlError, match="nope.jpg"):
        load_image(path)
    with pytest.raises(EdgevlError, match="nope.jpg"):
        preprocess_images([str(path)], REAL)


def test_corrupt_file(tmp_path):
    path = tmp_path / "broken.jpg"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(EdgevlError, match="broken.jpg"):
        load_image(path)


def test_truncated_file(tmp_path):
    good = tmp_path / "good.jpg"
    photo("coffee").save(good)
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(good.read_bytes()[:2000])
    with pytest.raises(EdgevlError, match="cut.jpg"):
        load_image(cut)


def test_bad_inputs():
    with pytest.raises(EdgevlError, match="'La'"):
        load_image(Image.new("La", (8, 8)))
    with pytest.raises(EdgevlError, match="aspect ratio"):
        preprocess_image(Image.new("RGB", (1000, 4)), REAL)
    with pytest.raises(EdgevlError):
        preprocess_images([], REAL)
    with pytest.raises(EdgevlError):
        load_image(42)


def test_runtime_modules_do_not_import_torch():
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import edgevl.runtime.inputs.image_processing, edgevl.runtime.inputs.rope_index\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("rescale, normalize", [(True, True), (True, False), (False, True), (False, False)])
def test_lookup_table_normalization_is_bit_identical_to_per_pixel(rescale, normalize):
    from dataclasses import replace

    from edgevl.runtime.inputs.image_processing import _rescale_normalize_each, rescale_normalize
    settings = replace(ImageProcessorSettings(), do_rescale=rescale, do_normalize=normalize)
    rng = np.random.default_rng(0)
    for shape in [(17, 23, 3), (4, 28, 56, 3)]:          # an image, and video frames
        pixels = rng.integers(0, 256, shape, dtype=np.uint8)
        fast, each = rescale_normalize(pixels, settings), _rescale_normalize_each(pixels, settings)
        assert fast.dtype == each.dtype == np.float32 and fast.shape == each.shape
        assert np.array_equal(fast.view(np.uint32), each.view(np.uint32))
