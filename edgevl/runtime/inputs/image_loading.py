"""Image loading: headers read lazily (size, EXIF orientation, pixel limits) and pixels decoded like transformers.

`read_image_header` knows an image's size without decoding a pixel (PIL opens lazily), so a prompt's cost is
known first (budget.py); `load_image` is the one decoder of every entry point: EXIF orientation applied
(`ImageOps.exif_transpose`, as transformers' `load_image`), alpha composited onto white (as its
`convert_to_rgb`), wide pixel modes refused, decompression bombs refused before decoding.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from edgevl.errors import EdgevlError


class ImageTooLarge(EdgevlError):
    """An image has more pixels than allowed (`load_image(max_pixels=...)`, or PIL's decompression-bomb
    limit `Image.MAX_IMAGE_PIXELS` for files and bytes); refused before its pixels are decoded."""

    def __init__(self, message: str, width: int, height: int, max_pixels: int):
        super().__init__(message)
        self.width, self.height, self.max_pixels = width, height, max_pixels


def _describe(source, label: str | None) -> str:
    """How error messages name an image: "Image file 'x.jpg'", "Image given as bytes", ..."""
    if isinstance(source, (str, os.PathLike)):
        return f"Image file {os.fspath(source)!r}"
    if label:
        return label
    if isinstance(source, Image.Image):
        return "Image given as a PIL image"
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "Image given as bytes"
    return "Image given as a file object"


def _check_pixels(image: Image.Image, max_pixels: int | None, name: str) -> None:
    if max_pixels is not None and image.width * image.height > max_pixels:
        raise ImageTooLarge(f"{name} is {image.width}x{image.height} pixels, more than the {max_pixels} "
                            f"pixels allowed.", image.width, image.height, max_pixels)


def _exif_orientation(image: Image.Image) -> int:
    try:
        return int(image.getexif().get(0x0112, 1))  # also reads an XMP tiff:Orientation, as exif_transpose
    except Exception:  # unreadable EXIF: transformers' exif_transpose would fail too; keep the pixels as they are
        return 1


@dataclass(frozen=True)
class ImageInput:
    """An image whose size is known from its header and whose pixels are not decoded yet (`read_image_header`):
    its source (a path, bytes or a PIL image), its size as the model sees it (EXIF orientation applied), the
    pixel limit it was checked against and its name in error messages."""

    source: object = field(repr=False)
    width: int
    height: int
    max_pixels: int | None
    name: str

    @property
    def size(self) -> tuple[int, int]:
        """(width, height), as PIL's `Image.size`."""
        return self.width, self.height


def read_image_header(source, max_pixels: int | None = None, label: str | None = None) -> ImageInput:
    """An image's size from its header alone (PIL opens lazily: no pixel is decoded), checked against max_pixels
    (ImageTooLarge) as `load_image` checks it; width and height swap for an EXIF rotation by 90 degrees."""
    if isinstance(source, ImageInput):
        return source
    name = _describe(source, label)
    if isinstance(source, Image.Image):
        _check_pixels(source, max_pixels, name)
        return ImageInput(source, *_oriented(source, _exif_orientation(source)), max_pixels, name)
    if hasattr(source, "read") and not isinstance(source, (str, os.PathLike)):
        source = source.read()                # read once: the header now, the pixels later
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    with _opened_lazily(source, max_pixels, name) as im:
        return ImageInput(source, *_oriented(im, _header_orientation(im)), max_pixels, name)


def _oriented(image: Image.Image, orientation: int) -> tuple[int, int]:
    """(width, height) after exif_transpose: orientations 5-8 turn the image by 90 degrees."""
    return (image.height, image.width) if orientation in (5, 6, 7, 8) else (image.width, image.height)


def _header_orientation(image: Image.Image) -> int:
    """The EXIF orientation without decoding: PIL's PNG reader decodes the whole image to look for an eXIf
    chunk after the pixels, so a PNG without one before them counts as upright here (the token count is the
    same either way: smart_resize treats height and width alike)."""
    if image.format == "PNG" and "exif" not in image.info:
        return 1
    return _exif_orientation(image)


class _opened_lazily:
    """`with _opened_lazily(source, max_pixels, name) as im`: PIL's lazy open of a path or bytes, the pixel
    count checked against max_pixels (None: PIL's `Image.MAX_IMAGE_PIXELS`) before anything is decoded."""

    def __init__(self, source, max_pixels: int | None, name: str):
        self.source, self.name, self.image = source, name, None
        self.max_pixels = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels

    def __enter__(self) -> Image.Image:
        source, name = self.source, self.name
        if isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(os.fspath(source)):
                raise EdgevlError(f"{name} does not exist or is not a file.")
            detail = True
        elif isinstance(source, bytes):
            source, detail = io.BytesIO(source), False
        elif hasattr(source, "read"):
            detail = False
        else:
            raise EdgevlError(f"An image must be a file path, bytes, a binary file object or a PIL image, "
                              f"got {type(source).__name__}.")
        try:
            self.image = Image.open(source)
        except Image.DecompressionBombError as err:  # over twice Image.MAX_IMAGE_PIXELS: PIL refuses to open it
            raise ImageTooLarge(f"{name} is too large to decode safely ({err}).", 0, 0,
                                2 * (Image.MAX_IMAGE_PIXELS or 0)) from err
        except Exception as err:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
            # PIL's text for bytes and file objects names a Python object ("<_io.BytesIO object at 0x...>").
            why = f"{type(err).__name__}: {err}" if detail else type(err).__name__
            raise EdgevlError(f"{name} could not be read as an image ({why}).") from err
        try:
            _check_pixels(self.image, self.max_pixels, name)     # the header only: nothing is decoded yet
        except BaseException:
            self.image.close()
            raise
        return self.image

    def __exit__(self, *exc):
        self.image.close()
        return False


def open_image(source, max_pixels: int | None = None, label: str | None = None) -> tuple[Image.Image, str]:
    """Decode an image fully, its EXIF orientation applied, as transformers' `load_image`
    (`ImageOps.exif_transpose`, for paths and PIL images alike).

    source: a path, bytes, a binary file object, a PIL image or an ImageInput. max_pixels: refuse larger
    images (ImageTooLarge) before decoding; for files and bytes None means PIL's `Image.MAX_IMAGE_PIXELS`
    (a decompression bomb is a few KB that decodes to gigabytes), for a PIL image no limit.
    Returns (image, name used in error messages).
    """
    if isinstance(source, ImageInput):
        source, max_pixels, label = source.source, source.max_pixels if max_pixels is None else max_pixels, source.name
    name = _describe(source, label)
    if isinstance(source, Image.Image):
        _check_pixels(source, max_pixels, name)
        if _exif_orientation(source) in (2, 3, 4, 5, 6, 7, 8):
            try:
                return ImageOps.exif_transpose(source), name
            except Exception as err:  # a lazily opened PIL image whose data is broken
                raise EdgevlError(f"{name} could not be decoded ({type(err).__name__}: {err}).") from err
        return source, name
    if isinstance(source, (bytearray, memoryview)):
        source = bytes(source)
    try:
        with _opened_lazily(source, max_pixels, name) as im:
            im.load()                               # decode now so truncated files fail here, not later
            return ImageOps.exif_transpose(im), name   # a new image either way: `im` closes here
    except EdgevlError:
        raise
    except Exception as err:  # PIL decoders raise many types (OSError, SyntaxError, ValueError, ...)
        why = f"{type(err).__name__}: {err}" if isinstance(source, (str, os.PathLike)) else type(err).__name__
        raise EdgevlError(f"{name} could not be read as an image ({why}).") from err


# Integer / float pixel data wider than 8 bits. transformers converts these with
# PIL's convert("RGB"), which clips every value to 255 (a white or garbage image):
# we refuse them with a sentence instead of answering about a picture nobody sent.
WIDE_MODES = {"I", "F", "I;16", "I;16B", "I;16L", "I;16N"}


def to_rgb(image: Image.Image, name: str = "Image given as a PIL image") -> Image.Image:
    """transformers' `convert_to_rgb` for PIL: alpha (band A or palette transparency)
    is composited onto opaque white, everything else goes through `convert("RGB")`
    (CMYK uses PIL's naive formula, like transformers). Wide modes are refused.
    """
    if image.mode in WIDE_MODES:
        raise EdgevlError(f"{name} has {image.mode!r} pixels (more than 8 bits per channel), which "
                          f"edgevl does not support; convert it to 8-bit RGB first.")
    has_alpha = "A" in image.getbands() or image.info.get("transparency") is not None
    try:
        if has_alpha:
            rgba = image.convert("RGBA")
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(white, rgba).convert("RGB")
        return image.convert("RGB")
    except ValueError as err:  # PIL: "conversion from X to RGB not supported"
        raise EdgevlError(
            f"{name} has pixel mode {image.mode!r}, which cannot be converted to RGB."
        ) from err
    except OSError as err:  # a lazily opened PIL image whose data is broken
        raise EdgevlError(f"{name} could not be decoded ({err}).") from err


def load_image(source, max_pixels: int | None = None, label: str | None = None) -> Image.Image:
    """The one image loader of every entry point (`edgevl run`, chat, the server, the Python API):
    a path, bytes, a binary file object or a PIL image -> an RGB PIL image, EXIF orientation applied
    like transformers' `load_image`, alpha composited on white like its processor.

    max_pixels: larger images raise ImageTooLarge before they are decoded (files and bytes default to
    PIL's `Image.MAX_IMAGE_PIXELS`, the decompression-bomb bound). label: the image's name in error
    messages instead of "Image given as bytes" and the like (a path always names itself).
    """
    image, name = open_image(source, max_pixels, label)
    return to_rgb(image, name)
