"""One image loader for every entry point: the same EXIF-rotated JPEG gives the same pixels through
`edgevl run` (a path), the server (a base64 data URL) and the Python API (a PIL image)."""

from __future__ import annotations

import base64
import io
import warnings

import numpy as np
import pytest
from PIL import Image

from edgevl.errors import EdgevlError
from edgevl.runtime.inputs.image_loading import ImageTooLarge, load_image


def _photo() -> Image.Image:
    import skimage.data
    return Image.fromarray(skimage.data.chelsea())      # 451x300, landscape


@pytest.fixture(scope="module")
def rotated_jpeg(tmp_path_factory):
    """A landscape photo stored with EXIF orientation 6 (display rotated 90 degrees clockwise): portrait."""
    path = tmp_path_factory.mktemp("exif") / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6
    _photo().save(path, exif=exif, quality=90)
    return path


def test_every_source_kind_gives_the_same_upright_rgb_image(rotated_jpeg):
    data = rotated_jpeg.read_bytes()
    images = [load_image(rotated_jpeg), load_image(str(rotated_jpeg)), load_image(data),
              load_image(io.BytesIO(data)), load_image(Image.open(rotated_jpeg))]
    for image in images:
        assert image.mode == "RGB" and image.size == (300, 451)      # rotated upright
        assert np.array_equal(np.asarray(image), np.asarray(images[0]))
    # Loading an already upright image again changes nothing (the orientation tag is gone).
    assert np.array_equal(np.asarray(load_image(images[-1])), np.asarray(images[0]))


def test_load_image_matches_transformers_load_image(rotated_jpeg):
    image_utils = pytest.importorskip("transformers.image_utils")
    for source in (str(rotated_jpeg), Image.open(rotated_jpeg)):
        expected = image_utils.load_image(source)
        ours = load_image(str(rotated_jpeg) if isinstance(source, str) else Image.open(rotated_jpeg))
        assert ours.size == expected.size and np.array_equal(np.asarray(ours), np.asarray(expected))


def test_same_pixels_through_run_serve_and_the_python_api(rotated_jpeg, pipeline):
    from edgevl.serve.requests import Media, RequestLimits

    by_path = pipeline.prepare("What is this?", images=[rotated_jpeg])                       # edgevl run
    url = "data:image/jpeg;base64," + base64.b64encode(rotated_jpeg.read_bytes()).decode()
    media = Media(RequestLimits())
    media.url_part("image_url", url)
    by_server = pipeline.prepare("What is this?", images=media.images)                      # edgevl serve
    by_api = pipeline.prepare("What is this?", images=[Image.open(rotated_jpeg)])              # Python API
    for other in (by_server, by_api):
        assert other.grids == by_path.grids
        assert np.array_equal(other.pixel_values[0], by_path.pixel_values[0])
        assert np.array_equal(other.input_ids, by_path.input_ids)
    # Not vacuous: ignoring the orientation gives the transposed grid.
    (_, gh, gw), = by_path.grids
    assert gh > gw
    raw = Image.open(rotated_jpeg)
    raw.load()
    raw.getexif().clear()
    raw.info.pop("exif", None)
    assert pipeline.prepare("What is this?", images=[raw.convert("RGB")]).grids == [(1, gw, gh)]


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    Image.new("RGB", (200, 100), (10, 20, 30)).save(path)
    with pytest.raises(ImageTooLarge) as e:
        load_image(path.read_bytes(), max_pixels=19_999)
    assert (e.value.width, e.value.height, e.value.max_pixels) == (200, 100, 19_999)
    assert "200x100 pixels" in str(e.value)
    assert load_image(path, max_pixels=20_000).size == (200, 100)
    with pytest.raises(ImageTooLarge):
        load_image(Image.open(path), max_pixels=100)


def test_decompression_bombs_are_refused_with_pil_s_limit(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (100, 100)).save(path)               # 10000 pixels
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(ImageTooLarge, match="100x100"):     # over the limit: refused by edgevl
            load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 4000)
    with pytest.raises(ImageTooLarge, match="too large to decode safely"):   # over twice: PIL refuses to open
        load_image(path.read_bytes())
    assert isinstance(ImageTooLarge("x", 1, 1, 1), EdgevlError)


def test_undecodable_sources_are_one_sentence():
    with pytest.raises(EdgevlError) as e:
        load_image(b"definitely not an image")
    message = str(e.value)
    assert message == "Image given as bytes could not be read as an image (UnidentifiedImageError)."
    with pytest.raises(EdgevlError, match="^the upload could not be read"):
        load_image(io.BytesIO(b"junk"), label="the upload")
    with pytest.raises(EdgevlError, match="file path, bytes, a binary file object or a PIL image"):
        load_image(42)
