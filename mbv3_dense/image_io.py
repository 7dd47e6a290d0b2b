"""Reading images from disk: one function, strict about broken files, forgiving about modes.

PIL is used rather than cv2 because PIL raises on garbage and truncation where cv2 returns
``None`` or a partial image (docs/known_traps.md). EXIF orientation is applied explicitly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageReadError(ValueError):
    """An image file that cannot be decoded; the message names the file and the cause."""


def read_image_rgb(path: str | Path) -> np.ndarray:
    """Decode ``path`` into an ``[H, W, 3]`` uint8 RGB array.

    EXIF orientation is applied; grayscale, palette, RGBA (alpha dropped), CMYK and 16-bit images
    are converted to RGB.

    Raises:
        ImageReadError: missing, unreadable, truncated or not an image.
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode fully now: truncation raises here, not later
            img = ImageOps.exif_transpose(img)
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(img, dtype=np.float32)
                scale = 255.0 / max(float(arr.max()), 1.0)
                img = Image.fromarray((arr * scale).astype(np.uint8))
            rgb = img.convert("RGB")
            return np.asarray(rgb, dtype=np.uint8).copy()
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: image file not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: corrupt or truncated image ({err})") from err


def read_label_png(path: str | Path) -> np.ndarray:
    """Decode a single-channel label PNG into an ``[H, W]`` integer array, without any conversion.

    Raises:
        ImageReadError: missing or corrupt file, or a file with colour channels (RGB/RGBA label
            images are a common mistake: Cityscapes' ``*_color.png`` instead of ``*_labelIds.png``).
    """
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                raise ImageReadError(
                    f"{path}: label image has mode {img.mode}; expected a single-channel PNG of ids"
                )
            return np.asarray(img).astype(np.int64 if img.mode.startswith("I") else np.uint8)
    except ImageReadError:
        raise
    except FileNotFoundError as err:
        raise ImageReadError(f"{path}: label file not found") from err
    except UnidentifiedImageError as err:
        raise ImageReadError(f"{path}: not a readable image (unknown or corrupt format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path}: corrupt or truncated label image ({err})") from err
