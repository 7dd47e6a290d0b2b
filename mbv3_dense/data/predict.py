"""Prediction on a user's own images: tolerant reading, batching, and the writer base class.

The three tasks share everything here; each task package adds its writer (what to write for one
image) and its LightningModule's ``predict_step``. The images come from :func:`mbv3_dense.data.listing.list_images`.

- :class:`PredictImageDataset` reads each file at its original size. A file that cannot be used
  (not an image, truncated, missing, more than ``max_pixels``) does not stop the run: it travels
  in the batch as a :class:`SkippedFile` with the reason, and the writer warns naming it and counts
  it. CMYK, 16-bit and other modes are converted to RGB, with a note that is counted too.
- :class:`PredictionWriter` (a Lightning ``BasePredictionWriter``) writes each batch as it comes,
  so memory does not grow with the number of images, refuses to write over an earlier run's files
  unless ``overwrite``, and ends with one summary line (written, skipped and why, converted,
  images/s) and ``summary.json``. Scripts use the same object through :meth:`~PredictionWriter.open`,
  :meth:`~PredictionWriter.write` and :meth:`~PredictionWriter.close`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mbv3_dense.data.image_io import ImageReadError, read_image_rgb
from mbv3_dense.data.listing import ImageFile
from mbv3_dense.data.sampling import worker_init

log = logging.getLogger(__name__)

#: Images with more pixels than this are skipped (a 1024x2048 Cityscapes frame is 2.1M; a 50 MP
#: photo still fits). LR-ASPP's logits alone take 19 x 4 bytes a pixel.
DEFAULT_MAX_PIXELS = 50_000_000


class SkippedFile(NamedTuple):
    """A file that was not predicted on: ``reason`` is a short category, ``message`` names the file."""

    path: Path
    reason: str
    message: str


class PredictBatch(NamedTuple):
    """A batch of readable images and the files skipped while reading it.

    ``images``: uint8 ``[3, H_i, W_i]`` RGB at original size; ``inputs``: the data module's
    per-image transform applied and stacked (classification: the uint8 resized centre crops, which
    ``predict_step`` normalises; ``None`` when it has none: the model preprocesses);
    ``files``: the :class:`ImageFile` of each image; ``notes``: per image, a conversion note or ``None``.
    """

    images: list[Tensor]
    inputs: Tensor | None
    files: list[ImageFile]
    notes: list[str | None]
    skipped: list[SkippedFile]


# ---------------------------------------------------------------------------------------------- reading
class SkipImage(Exception):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


_CONVERTED = {"CMYK": "CMYK", "I;16": "16-bit", "I;16B": "16-bit", "I;16L": "16-bit", "I": "32-bit integer",
              "F": "32-bit float", "LA": "grayscale with alpha", "RGBA": "RGBA (alpha dropped)",
              "P": "palette", "PA": "palette with alpha", "1": "1-bit", "YCbCr": "YCbCr", "LAB": "LAB", "HSV": "HSV"}


def read_for_prediction(path: Path, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, str | None]:
    """``([H, W, 3] uint8 RGB, note)``; the note says what was converted (CMYK, 16-bit, ...), or ``None``.

    Grayscale images are read as RGB without a note (the common case, nothing is lost).

    Raises:
        SkipImage: with a reason (``missing``, ``not an image``, ``too large``, ``truncated or corrupt``)
            and a message naming the file.
    """
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = img.mode
    except FileNotFoundError:
        raise SkipImage("missing", f"{path}: file not found") from None
    except Image.DecompressionBombError as err:
        raise SkipImage("too large", f"{path}: {err}") from None
    except UnidentifiedImageError:
        raise SkipImage("not an image", f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise SkipImage("truncated or corrupt", f"{path}: corrupt image header ({err})") from None
    if width * height > max_pixels:
        raise SkipImage("too large", f"{path}: {width}x{height} = {width * height / 1e6:.1f} MP is more than "
                                     f"max_pixels = {max_pixels / 1e6:.1f} MP (raise the limit to predict on it)")
    try:
        array = read_image_rgb(path)
    except ImageReadError as err:
        raise SkipImage("truncated or corrupt", str(err)) from None
    except Image.DecompressionBombError as err:
        raise SkipImage("too large", f"{path}: {err}") from None
    kind = _CONVERTED.get(mode)
    return array, (f"{path}: {kind} image converted to 8-bit RGB" if kind else None)


class PredictImageDataset(Dataset):
    """Items ``(ImageFile, uint8 [3, H, W] or None, transformed input or None, note or SkippedFile)``.

    Args:
        files: the images (:func:`~mbv3_dense.data.listing.list_images`).
        transform: maps the uint8 ``[3, H, W]`` image to what ``predict_step`` takes as ``inputs`` (``None``:
            the model's own preprocessing runs in ``predict_step``).
        max_pixels: larger images are skipped.
    """

    def __init__(self, files: list[ImageFile], transform: Callable[[Tensor], Tensor] | None = None, *,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> None:
        self.files = files
        self.transform = transform
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[ImageFile, Tensor | None, Tensor | None, str | SkippedFile | None]:
        file = self.files[index]
        try:
            array, note = read_for_prediction(file.path, self.max_pixels)
        except SkipImage as skip:
            return file, None, None, SkippedFile(file.path, skip.reason, skip.message)
        image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
        return file, image, (self.transform(image) if self.transform is not None else None), note


def collate_predict(items: list[tuple]) -> PredictBatch:
    kept = [item for item in items if not isinstance(item[3], SkippedFile)]
    inputs = [item[2] for item in kept if item[2] is not None]
    return PredictBatch(images=[item[1] for item in kept], inputs=torch.stack(inputs) if inputs else None,
                        files=[item[0] for item in kept], notes=[item[3] for item in kept],
                        skipped=[item[3] for item in items if isinstance(item[3], SkippedFile)])


def predict_loader(files: list[ImageFile], *, transform: Callable[[Tensor], Tensor] | None = None,
                   batch_size: int, num_workers: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> DataLoader:
    """The loader of a data module's ``predict_dataloader`` (and of ``scripts/predict.py``), in file order."""
    return DataLoader(PredictImageDataset(files, transform, max_pixels=max_pixels), batch_size=batch_size,
                      shuffle=False, num_workers=num_workers, collate_fn=collate_predict, worker_init_fn=worker_init)


# ---------------------------------------------------------------------------------------------- drawing
def font_for(image_size: tuple[int, int]) -> ImageFont.ImageFont:
    """Pillow's built-in font at a size that stays readable on small and large images."""
    return ImageFont.load_default(size=max(11, min(image_size) // 40))


def draw_text_block(draw: ImageDraw.ImageDraw, xy: tuple[float, float], lines: list[str],
                    font: ImageFont.ImageFont, fill: tuple[int, int, int] = (255, 255, 0)) -> None:
    """Lines of text on a dark box (readable on any background)."""
    text = "\n".join(lines)
    box = draw.multiline_textbbox(xy, text, font=font)
    draw.rectangle((box[0] - 2, box[1] - 2, box[2] + 2, box[3] + 2), fill=(0, 0, 0))
    draw.multiline_text(xy, text, font=font, fill=fill)


def to_pil(image: Tensor) -> Image.Image:
    """uint8 ``[3, H, W]`` -> a PIL RGB image."""
    return Image.fromarray(image.permute(1, 2, 0).cpu().numpy())


# ---------------------------------------------------------------------------------------------- writing
class PredictionWriter(BasePredictionWriter):
    """Writes predictions as each batch comes; the base of the three tasks' writers.

    Under ``lightning predict`` it writes to ``output_dir``, by default
    ``<trainer.default_root_dir>/predictions``, and reads what it needs to name classes from the
    data module (:meth:`configure_from`). A folder that holds an earlier run's results of this
    writer is an error unless ``overwrite`` (then those results are deleted first; other files stay).

    Subclasses set :attr:`outputs` (the files and folders they write under ``output_dir``) and
    implement :meth:`_open`, :meth:`_write_image` and :meth:`_close`.

    Class names (and category ids, colours) come from ``class_info`` when given, else from the module
    (the checkpoint's record, or the network's ``class_names``), else from the data module.

    Args:
        output_dir: where to write (``None``: ``<default_root_dir>/predictions``).
        overwrite: replace an earlier run's results in ``output_dir``.
        pictures: also draw the predictions on the images (off for large runs).
        class_info: what the network's outputs mean (:mod:`mbv3_dense.checkpoints.classes`).
    """

    task = "predict"
    outputs: tuple[str, ...] = ()

    def __init__(self, output_dir: str | Path | None = None, *, overwrite: bool = False, pictures: bool = True,
                 class_info: dict | None = None) -> None:
        super().__init__(write_interval="batch")
        self.class_info = class_info
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.ignored = 0  # files left out of a listed folder because they are not images by extension
        self.overwrite = overwrite
        self.pictures = pictures
        self._is_open = False

    # -------------------------------------------------------------- Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if trainer.world_size > 1:
            # One process writes: several would interleave the shared files (COCO results, JSON lines).
            raise ValueError(f"{type(self).__name__} writes from one process, but the run has {trainer.world_size}; "
                             "predict with --trainer.devices 1 (or list your own writer in trainer.callbacks)")
        if self.output_dir is None:
            self.output_dir = Path(trainer.default_root_dir) / "predictions"
        datamodule = getattr(trainer, "datamodule", None)
        if datamodule is not None:
            self.configure_from(datamodule)
        self.open()

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After the checkpoint is restored: the module knows the classes the weights were trained on.
        if self.class_info is None:
            self.class_info = getattr(pl_module, "class_info", None) or data_class_info(trainer.datamodule)
        self._configure_classes()

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: PredictBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.write(batch, prediction)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._is_open:
            self.close()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._is_open:  # an exception stopped the run: close the files, keep what was written
            self._close()
            self._skipped_file.close()
            self._is_open = False

    def configure_from(self, datamodule: Any) -> None:
        """Take what the data module knows: the count of files left out by extension, and (subclasses)
        class names, category ids."""
        images = getattr(datamodule, "predict_list", None)
        if images is not None:
            self.ignored = len(images.ignored)

    # -------------------------------------------------------------- plain API
    def open(self) -> None:
        """Create ``output_dir`` (checking for an earlier run's results) and open the output files."""
        if self.output_dir is None:
            raise ValueError("output_dir is not set")
        out = self.output_dir
        earlier = [name for name in (*self.outputs, "summary.json", "skipped.jsonl") if (out / name).exists()]
        if earlier:
            if not self.overwrite:
                raise FileExistsError(
                    f"{out}: holds the results of an earlier run ({', '.join(earlier)}); pass overwrite "
                    "(lightning: --writer.overwrite true; scripts/predict.py: --overwrite) or another output folder")
            for name in earlier:
                target = out / name
                shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
        out.mkdir(parents=True, exist_ok=True)
        self.written = 0
        self.skipped: Counter[str] = Counter()
        self.converted = 0
        self._skipped_file = open(out / "skipped.jsonl", "w")  # noqa: SIM115 - closed in close()
        self._start = time.perf_counter()
        self._open()
        self._is_open = True
        log.info("writing %s predictions to %s", self.task, out)

    def write(self, batch: PredictBatch, outputs: list[Any]) -> None:
        """Write one batch: every image's outputs (``outputs[i]`` for ``batch.files[i]``); warn about
        and count every skipped file."""
        for skip in batch.skipped:
            log.warning("skipped %s", skip.message)
            self.skipped[skip.reason] += 1
            self._skipped_file.write(json.dumps({"file": str(skip.path), "reason": skip.reason,
                                                 "message": skip.message}) + "\n")
        if len(outputs) != len(batch.files):
            raise ValueError(f"{len(outputs)} outputs for {len(batch.files)} images")
        for file, image, note, output in zip(batch.files, batch.images, batch.notes, outputs, strict=True):
            if note is not None:
                log.warning("%s", note)
                self.converted += 1
            self._write_image(file, image, output)
            self.written += 1
        self._flush()
        self._skipped_file.flush()

    def close(self) -> dict:
        """Close the files, write ``summary.json`` and print the summary line; returns the summary."""
        self._close()
        self._skipped_file.close()
        self._is_open = False
        seconds = time.perf_counter() - self._start
        summary = {"task": self.task, "output_dir": str(self.output_dir), "written": self.written,
                   "skipped": sum(self.skipped.values()), "skipped_by_reason": dict(self.skipped),
                   "converted": self.converted, "ignored_not_images": self.ignored, "seconds": round(seconds, 3),
                   "images_per_second": round(self.written / seconds, 3) if seconds > 0 else None}
        (self.output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(summary_line(summary), flush=True)
        return summary

    # -------------------------------------------------------------- per task
    def _configure_classes(self) -> None:
        """After :attr:`class_info` is known (from the module or the data): what a task derives from it."""

    def _open(self) -> None:
        raise NotImplementedError

    def _write_image(self, file: ImageFile, image: Tensor, output: Any) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _flush(self) -> None:
        """After each batch: push buffered output to the files (a run that stops keeps what was done)."""

    def _picture_path(self, file: ImageFile, folder: str = "pictures") -> Path:
        path = self.output_dir / folder / f"{file.name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        return path


def data_class_info(datamodule: Any) -> dict | None:
    """The data module's ``class_info``, or None when it has none or its files are not at hand (predicting on
    photos without the training data)."""
    try:
        return getattr(datamodule, "class_info", None)
    except (OSError, ValueError):
        return None


def summary_line(summary: dict) -> str:
    """The closing line: images written, skipped (by reason), converted, left out, images per second."""
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(summary["skipped_by_reason"].items()))
    rate = summary.get("images_per_second")
    return (f"predict ({summary['task']}): {summary['written']} images written to {summary['output_dir']}, "
            f"{summary['skipped']} skipped{f' ({reasons})' if reasons else ''}, {summary['converted']} converted "
            f"(CMYK, 16-bit, ...), {summary.get('ignored_not_images', 0)} other files left out (not images by "
            f"extension){f'; {rate:.2f} images/s' if rate else ''}")
