"""Reading images from disk: one reader, strict about broken files, forgiving about modes.

Three decoders, chosen by measurement (docs/data_pipeline.md): libspng (through ``pyspng``) decodes 8-bit
PNG, the fastest of the PNG decoders measured (PIL, OpenCV, imagecodecs' libpng and libspng); OpenCV decodes
8-bit JPEG (greyscale or colour), about twice as fast as PIL on COCO-sized JPEGs; PIL decodes everything
else (CMYK JPEG, 16-bit PNG, PNG with EXIF orientation, TIFF, BMP, WebP, GIF, ...) and every file that fails
the checks below. ``torchvision.io``'s decoders were as fast as OpenCV's, but torchvision 0.29 deprecates them.

Strictness is PIL's. OpenCV returns ``None`` or a partial image where PIL raises (docs/known_traps.md), and
pyspng ignores the chunk checksums, so a damaged PNG can decode to wrong pixels without an error. A file goes
to the fast decoders only when it is complete and intact by its container: a JPEG that ends with its
end-of-image marker; a PNG whose chunks all lie inside the file with correct CRCs (which cover the compressed
pixels), IHDR first and IEND last. Any file that fails these checks, or that a fast decoder cannot decode, is
handed to PIL, which decodes it or raises :class:`ImageReadError` naming the file. The fast decoders give PIL's
pixels on the files they take (tests/test_data_pipeline.py, tests/test_image_io_decoders.py).

PNG is decoded top to bottom, so :func:`read_image_rgb` and :func:`read_label_png` can stop after the rows a
crop needs (``rows=``): a training crop that ends above the frame's bottom skips the inflating of the rest.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pyspng
from PIL import Image, ImageOps, UnidentifiedImageError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI, JPEG_EOI = b"\xff\xd8\xff", b"\xff\xd9"
# PNG colour types libspng converts to RGB as PIL's convert("RGB") does: grey, RGB, palette, grey+alpha, RGBA.
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


@dataclass(frozen=True)
class PngLayout:
    """The header of a complete, intact PNG (:func:`png_layout`)."""

    width: int
    height: int
    bit_depth: int
    colour_type: int
    interlaced: bool
    exif: bool  # has an eXIf chunk (orientation), which only PIL's path applies


def png_layout(data: bytes) -> PngLayout | None:
    """The layout of ``data`` if it is a complete PNG whose every chunk is intact, else ``None``.

    Complete and intact: the signature, IHDR first, every chunk inside the file with the CRC its bytes give
    (the CRCs of the IDAT chunks cover the compressed pixels), IEND last and nothing after it. Checking the
    CRCs of a 4 MB Cityscapes frame takes about 2 ms, a twentieth of decoding it.
    """
    if not data.startswith(PNG_SIGNATURE):
        return None
    view, size, pos, header, exif = memoryview(data), len(data), len(PNG_SIGNATURE), None, False
    while pos + 12 <= size:
        length = int.from_bytes(view[pos:pos + 4], "big")
        end = pos + 12 + length
        if end > size or zlib.crc32(view[pos + 4:pos + 8 + length]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        kind = bytes(view[pos + 4:pos + 8])
        if header is None:
            if kind != b"IHDR" or length != 13:
                return None
            header = bytes(view[pos + 8:pos + 21])
        elif kind == b"eXIf":
            exif = True
        elif kind == b"IEND":
            if end != size:
                return None
            return PngLayout(width=int.from_bytes(header[0:4], "big"), height=int.from_bytes(header[4:8], "big"),
                             bit_depth=header[8], colour_type=header[9], interlaced=header[12] != 0, exif=exif)
        pos = end
    return None


def _first_rows(data: bytes, layout: PngLayout, rows: int | None) -> tuple[bytes, int]:
    """``data`` with its IHDR saying ``rows`` rows, and that count, when fewer than all rows are asked of a
    non-interlaced PNG: the decoder then stops inflating after them (the IDAT data left over is ignored).
    The file's CRCs were checked whole (:func:`png_layout`), so the rows decoded are the file's."""
    if rows is None or rows >= layout.height or layout.interlaced:
        return data, layout.height
    rows = max(1, int(rows))
    header = data[16:20] + rows.to_bytes(4, "big") + data[24:29]  # IHDR: width, height, depth .. interlace
    return data[:16] + header + zlib.crc32(b"IHDR" + header).to_bytes(4, "big") + data[33:], rows


def _spng_decode(data: bytes, layout: PngLayout, rows: int | None, fmt: str) -> np.ndarray | None:
    """libspng's decoding of the first ``rows`` rows (all: ``None``) in ``fmt``, or ``None`` when it fails."""
    data, height = _first_rows(data, layout, rows)
    try:
        array = pyspng.load(data, fmt)
    except RuntimeError:
        return None
    return array if array.shape[:2] == (height, layout.width) else None


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


def read_image_rgb(path: str | Path, *, rows: int | None = None) -> np.ndarray:
    """Decode ``path`` into an ``[H, W, 3]`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images
    are converted to RGB.

    Args:
        path: the image file.
        rows: at least the first ``rows`` rows of the image are wanted (a crop that ends there). A PNG is then
            decoded only down to that row and the array has ``min(rows, H)`` rows; other files (and PNGs with
            EXIF orientation or interlacing) are decoded whole and may return all rows. ``None``: all rows.

    Raises:
        ImageReadError: missing, unreadable, truncated, corrupt or not an image.
    """
    path = Path(path)
    return decode_image_rgb(_read_bytes(path, "image file"), path, rows=rows)


def decode_image_rgb(data: bytes, source: str | Path, *, rows: int | None = None) -> np.ndarray:
    """:func:`read_image_rgb` of a file's bytes held in memory (a streaming chunk's item): the same decoder
    for the same bytes, so the same pixels. ``source`` names the bytes in errors (a path, or a chunk and item).

    Raises:
        ImageReadError: truncated, corrupt or not an image.
    """
    png = png_layout(data) if data.startswith(PNG_SIGNATURE) else None
    if png is not None and png.bit_depth == 8 and png.colour_type in PNG_RGB_COLOUR_TYPES and not png.exif:
        array = _spng_decode(data, png, rows, "RGB")
        if array is not None:
            return array
    elif png is None and _jpeg_components(data) in (1, 3):
        array = _cv2_decode(data, cv2.IMREAD_COLOR_RGB)  # applies EXIF orientation, as PIL's path below
        if array is not None:
            return array
    return _pil_rgb(data, source)


@contextmanager
def _pil_errors(path: str | Path, kind: str) -> Iterator[None]:
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


def _pil_rgb(data: bytes, source: str | Path) -> np.ndarray:
    with _pil_errors(source, "image"), Image.open(io.BytesIO(data)) as img:
        img.load()  # decode fully now: truncation raises here, not later
        img = ImageOps.exif_transpose(img)
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            scale = 255.0 / max(float(arr.max()), 1.0)
            img = Image.fromarray((arr * scale).astype(np.uint8))
        rgb = img.convert("RGB")
        return np.asarray(rgb, dtype=np.uint8).copy()


def read_label_png(path: str | Path, *, rows: int | None = None) -> np.ndarray:
    """Decode a single-channel label PNG into an ``[H, W]`` integer array, without any conversion.

    8-bit greyscale PNGs (Cityscapes' labelIds) are decoded by libspng, everything else by PIL.

    Args:
        path: the label file.
        rows: as :func:`read_image_rgb`'s: an 8-bit greyscale PNG is decoded only down to that row.

    Raises:
        ImageReadError: missing or corrupt file, or a file with colour channels (RGB/RGBA label
            images are a common mistake: Cityscapes' ``*_color.png`` instead of ``*_labelIds.png``).
    """
    path = Path(path)
    return decode_label_png(_read_bytes(path, "label file"), path, rows=rows)


def decode_label_png(data: bytes, source: str | Path, *, rows: int | None = None) -> np.ndarray:
    """:func:`read_label_png` of a file's bytes held in memory (a streaming chunk's item); ``source`` names
    them in errors.

    Raises:
        ImageReadError: corrupt file, or a file with colour channels.
    """
    png = png_layout(data) if data.startswith(PNG_SIGNATURE) else None
    if png is not None and (png.bit_depth, png.colour_type) == (8, PNG_GREY):
        array = _spng_decode(data, png, rows, "L")
        if array is not None:
            return array
    with _pil_errors(source, "label"), Image.open(io.BytesIO(data)) as img:
        img.load()
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise ImageReadError(f"{source}: label image has mode {img.mode}; expected a single-channel PNG of ids")
        return np.asarray(img).astype(np.int64 if img.mode.startswith("I") else np.uint8)
