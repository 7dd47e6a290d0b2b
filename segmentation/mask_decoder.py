"""Mask files -> class indices under a classes file (:mod:`segmentation.mask_classes`), and header reads.

Masks come in two formats (``mask_format``), both PNG:

- ``index``: single channel, each pixel the class index (0..N-1) or the ignore value. 8-bit greyscale
  (mode ``L``), palette (mode ``P``: the value is the palette index, as Pascal VOC's masks) or 16-bit
  greyscale.
- ``color``: RGB (``RGB``, ``RGBA`` with alpha dropped, or ``P`` read through its palette), each pixel
  one of the classes' colours or an ``ignore_colors`` entry.

:class:`MaskDecoder` turns a mask file into uint8 class indices ``[H, W]`` (ignore value where
ignored). A value that is neither a class nor ignored is an error naming the file and the values
(``on_unknown_value: error``), or becomes the ignore value with a warning naming them
(``on_unknown_value: ignore``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

from mbv3_dense.data.image_io import ImageReadError, read_image_rgb, read_label_png
from segmentation.mask_classes import MaskClasses

log = logging.getLogger(__name__)

MaskFormat = Literal["index", "color"]
UnknownValuePolicy = Literal["error", "ignore"]
# Mask modes each format reads (PIL modes); everything else is refused naming the file.
INDEX_MODES = ("L", "P", "I;16", "I;16B", "I;16L", "I")
COLOR_MODES = ("RGB", "RGBA", "P")
# EXIF orientations that swap width and height (transpose, rotate 90/270, transverse).
_SWAPPING_ORIENTATIONS = {5, 6, 7, 8}


class MaskValueError(ValueError):
    """A mask that does not fit its classes file (values or colours outside it, wrong format); names the file."""


def _header(path: Path, what: str, *, orientation: bool = False) -> tuple[tuple[int, int], str, int | None]:
    """``((width, height), mode, EXIF orientation or None)`` from the header, without decoding pixels
    (``orientation``: read the EXIF orientation too, which for some formats reads further into the file)."""
    try:
        with Image.open(path) as img:
            return img.size, img.mode, img.getexif().get(ExifTags.Base.Orientation) if orientation else None
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: {what} not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not a readable {what} (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: corrupt or truncated {what} ({err})") from err


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image as :func:`~mbv3_dense.data.image_io.read_image_rgb` returns it (EXIF
    orientation applied), from the header alone.

    Raises:
        ImageReadError: missing file or unreadable header.
    """
    (width, height), _, orientation = _header(path, "image", orientation=True)
    return (height, width) if orientation in _SWAPPING_ORIENTATIONS else (width, height)


def check_mask_options(mask_format: str, on_unknown_value: str) -> None:
    """Raise ``ValueError`` naming the option when ``mask_format`` or ``on_unknown_value`` is not one it takes."""
    if mask_format not in ("index", "color"):
        raise ValueError(f"mask_format must be 'index' or 'color', got {mask_format!r}")
    if on_unknown_value not in ("error", "ignore"):
        raise ValueError(f"on_unknown_value must be 'error' or 'ignore', got {on_unknown_value!r}")


class MaskDecoder:
    """Mask files of one format -> ``[H, W]`` uint8 class indices (``classes.ignore_index`` where ignored).

    Args:
        classes: the classes file's content.
        mask_format: ``"index"`` or ``"color"`` (module docstring).
        on_unknown_value: ``"error"``: a value (colour) that is neither a class nor ignored raises
            :class:`MaskValueError` naming the file and the values; ``"ignore"``: such pixels become the
            ignore value, with a warning naming the file, the values and the pixel count (once per file
            and process).

    Raises:
        MaskValueError: ``color`` masks with a classes file without colours.
    """

    def __init__(self, classes: MaskClasses, *, mask_format: MaskFormat = "index",
                 on_unknown_value: UnknownValuePolicy = "error") -> None:
        check_mask_options(mask_format, on_unknown_value)
        if mask_format == "color" and classes.colors is None:
            raise MaskValueError(f"{classes.source}: mask_format is 'color' but the classes file gives no colours; "
                                 "give every class a color: [r, g, b] (a .yaml or .json classes file)")
        self.classes = classes
        self.mask_format = mask_format
        self.on_unknown_value = on_unknown_value
        self._warned: set[Path] = set()
        n, ignore = classes.num_classes, classes.ignore_index
        if mask_format == "index":
            # Every uint8 value -> class index, ignore, or a marker (256) for values the file does not know.
            self._lookup = np.full(256, 256, dtype=np.int16)
            self._lookup[:n] = np.arange(n)
            self._lookup[ignore] = ignore
        else:
            colors = [*classes.colors, *classes.ignore_colors]
            targets = [*range(n), *([ignore] * len(classes.ignore_colors))]
            keys = np.array([(r << 16) | (g << 8) | b for r, g, b in colors], dtype=np.uint32)
            order = np.argsort(keys)
            self._keys, self._targets = keys[order], np.array(targets, dtype=np.uint8)[order]

    @property
    def files_with_unknown_values(self) -> list[Path]:
        """The masks whose unknown values this decoder mapped to the ignore value (``on_unknown_value: ignore``),
        in this process, sorted."""
        return sorted(self._warned)

    def describe(self) -> str:
        """What this decoder accepts, for messages."""
        c = self.classes
        if self.mask_format == "index":
            return f"class indices 0..{c.num_classes - 1} and the ignore value {c.ignore_index} ({c.source})"
        return f"the {c.num_classes} class colours and {len(c.ignore_colors)} ignore colours of {c.source}"

    def check_mode(self, path: Path, mode: str) -> str | None:
        """A message naming ``path`` when a mask of PIL mode ``mode`` does not fit the format, else ``None``."""
        if self.mask_format == "index" and mode not in INDEX_MODES:
            hint = " (a colour mask: set mask_format: color)" if mode in ("RGB", "RGBA") else ""
            return f"{path}: mask has mode {mode}; index masks are single-channel PNGs (L, P or 16-bit){hint}"
        if self.mask_format == "color" and mode not in COLOR_MODES:
            hint = " (a single-channel mask of class indices: set mask_format: index)" if mode in INDEX_MODES else ""
            return f"{path}: mask has mode {mode}; colour masks are RGB PNGs (RGB, RGBA or P){hint}"
        return None

    def header(self, path: Path) -> tuple[tuple[int, int], str | None]:
        """``((width, height), problem or None)`` of a mask from its header (no decoding).

        Raises:
            ImageReadError: missing file or unreadable header.
        """
        size, mode, _ = _header(path, "mask")
        return size, self.check_mode(path, mode)

    def decode(self, path: str | Path) -> np.ndarray:
        """Read ``path`` into ``[H, W]`` uint8 class indices (ignore value where ignored).

        Raises:
            ImageReadError: missing, corrupt or truncated file.
            MaskValueError: a mode that does not fit ``mask_format``; values (colours) the classes file does
                not know, under ``on_unknown_value="error"``.
        """
        path = Path(path)
        problem = self.header(path)[1]
        if problem is not None:
            raise MaskValueError(problem)
        if self.mask_format == "index":
            return self._decode_index(path, read_label_png(path))
        return self._decode_color(path, read_image_rgb(path))

    def _decode_index(self, path: Path, values: np.ndarray) -> np.ndarray:
        if values.dtype != np.uint8:  # 16-bit masks: values above 255 are never classes
            too_large = values > 255
            if too_large.any():
                self._unknown(path, np.unique(values[too_large]).tolist(), int(too_large.sum()))
            values = np.where(too_large, self.classes.ignore_index, values).astype(np.uint8)
        mapped = self._lookup[values]
        unknown = mapped == 256
        if unknown.any():
            self._unknown(path, np.flatnonzero(np.bincount(values[unknown], minlength=256)).tolist(),
                          int(unknown.sum()))
            mapped[unknown] = self.classes.ignore_index
        return mapped.astype(np.uint8)

    def _decode_color(self, path: Path, rgb: np.ndarray) -> np.ndarray:
        channels = rgb.astype(np.uint32)
        keys = (channels[..., 0] << 16) | (channels[..., 1] << 8) | channels[..., 2]
        where = np.minimum(np.searchsorted(self._keys, keys), len(self._keys) - 1)
        known = self._keys[where] == keys
        out = self._targets[where]
        if not known.all():
            colors = [[int(k >> 16), int((k >> 8) & 255), int(k & 255)] for k in np.unique(keys[~known])]
            self._unknown(path, colors, int((~known).sum()))
            out[~known] = self.classes.ignore_index
        return out

    def _unknown(self, path: Path, values: list, pixels: int) -> None:
        what = "colours" if self.mask_format == "color" else "values"
        shown = ", ".join(map(str, values[:10])) + (f" and {len(values) - 10} more" if len(values) > 10 else "")
        message = (f"{path}: mask {what} {shown} ({pixels} pixels) are not in the classes file: it accepts "
                   f"{self.describe()}")
        if self.on_unknown_value == "error":
            raise MaskValueError(f"{message}; fix the mask or the classes file, or set on_unknown_value: ignore")
        if path not in self._warned:
            self._warned.add(path)
            log.warning("%s; mapped to %d (ignore)", message, self.classes.ignore_index)
