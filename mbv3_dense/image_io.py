"""Reading images from disk: one reader, strict about broken files, forgiving about modes.

Two decoders, chosen by measurement (docs/data_pipeline.md): OpenCV decodes the common files,
8-bit JPEG (greyscale or colour) and 8-bit PNG, about twice as fast as PIL on PNG and COCO-sized
JPEGs; PIL decodes everything else (CMYK JPEG, 16-bit PNG, TIFF, BMP, WebP, GIF, ...) and every file
that fails the checks below. ``torchvision.io``'s decoders were as fast, but torchvision 0.29
deprecates them.

Strictness is PIL's: cv2 returns ``None`` or a partial image where PIL raises
(docs/known_traps.md), so a file goes to cv2 only when it is complete by its container (a JPEG
that ends with its end-of-image marker, a PNG whose last chunk is IEND), and any file cv2 cannot
decode is handed to PIL, which decodes it or raises :class:`ImageReadError` naming the file. Both
apply EXIF orientation and give the same pixels on the files cv2 takes (tests/test_data_pipeline.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"  # the whole IEND chunk: length 0, type, CRC
JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
# PNG colour types cv2 converts to RGB as PIL's convert("RGB") does: grey, RGB, palette, grey+alpha, RGBA.
PNG_RGB_COLOUR_TYPES = (0, 2, 3, 4, 6)
PNG_GREY = 0
# JPEG start-of-frame markers (C0-CF except DHT C4, JPG C8, DAC CC): the frame header gives the components.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}



class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the cause."""


def _read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: {what} not found") from err
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read the file ({err})") from err


def _png_header(data: bytes) -> tuple[int, int] | None:
    """``(bit depth, colour type)`` of a complete PNG (signature, IHDR first, IEND last), else ``None``."""
    if len(data) < 33 or not data.startswith(PNG_SIGNATURE) or data[12:16] != b"IHDR" or not data.endswith(PNG_IEND):
        return None
    return data[24], data[25]


def _jpeg_components(data: bytes) -> int | None:
    """Colour components of a complete JPEG (SOI first, EOI last), from its frame header; else ``None``."""
    if not data.startswith(JPEG_SOI) or not data.rstrip(b"\x00").endswith(JPEG_EOI):
        return None
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in JPEG_SOF:
            return data[i + 9]
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _cv2_decode(data: bytes, flags: int) -> np.ndarray | None:
    return cv2.imdecode(np.frombuffer(data, dtype=np.uint8), flags)


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` into an ``[H, W, 3]`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images
    are converted to RGB.

    Raises:
        ImageReadError: missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    data = _read_bytes(path, "image file")
    png = _png_header(data)
    if (png is not None and png[0] == 8 and png[1] in PNG_RGB_COLOUR_TYPES) or _jpeg_components(data) in (1, 3):
        array = _cv2_decode(data, cv2.IMREAD_COLOR_RGB)  # applies EXIF orientation, as PIL's path below
        if array is not None:
            return array
    return _pil_rgb(path)


@contextmanager
def _pil_errors(path: Path, kind: str) -> Iterator[None]:
    """PIL's exceptions while decoding ``path`` (``kind``: "image" or "label") as :class:`ImageReadError`
    naming the file and the cause."""
    try:
        yield
    except ImageReadError:
        raise
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: {kind} file not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: corrupt or truncated {'label image' if kind == 'label' else 'image'} ({err})") \
            from err


def _pil_rgb(path: Path) -> np.ndarray:
    with _pil_errors(path, "image"), Image.open(path) as img:
        img.load()  # decode fully now: truncation raises here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            scale = 255.0 / max(float(arr.max()), 1.0)
            img = Image.fromarray((arr * scale).astype(np.uint8))
        rgb = img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy()


def read_label_png(path: str | Path) -> np.ndarray:
    """Decode a single-channel label PNG into an ``[H, W]`` integer array, without any conversion.

    8-bit greyscale PNGs (Cityscapes' labelIds) are decoded by cv2, everything else by PIL.

    Raises:
        ImageReadError: missing or corrupt file, or a file with colour channels (RGB/RGBA label
            images are a common mistake: Cityscapes' ``*_color.png`` instead of ``*_labelIds.png``).
    """
    path = Path(path)
    data = _read_bytes(path, "label file")
    if _png_header(data) == (8, PNG_GREY):
        array = _cv2_decode(data, cv2.IMREAD_UNCHANGED)
        if array is not None and array.ndim == 2:
            return array
    with _pil_errors(path, "label"), Image.open(path) as img:
        img.load()
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ImageReadError(f"{path}: label image has mode {img.mode}; expected a single-channel PNG of ids")
        return np.asarray(img).astype(np.int64 if img.mode.startswith("I") else np.uint8)
