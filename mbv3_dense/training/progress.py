"""Progress as periodic lines, for output that is not a terminal (CI logs, ``> log``, a pipe).

Lightning's tqdm bar redraws itself with carriage returns many times a second; in a file that is
thousands of lines of redraws. :class:`LineProgressBar` prints one plain line every
``every_n_seconds`` and one at the end of each epoch and validation, with the step, the rate, the
remaining time and the progress-bar metrics. :func:`progress_bar_for` picks it when standard output
is not a terminal; in a terminal the tqdm bar stays. :func:`progress` does the same for the loops of
the scripts (evaluation, export, data generation).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
from lightning.pytorch.callbacks import ProgressBar
from tqdm import tqdm

T = TypeVar("T")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


def _metrics(values: dict[str, Any]) -> str:
    parts = []
    for name, value in values.items():
        if name == "v_num":
            continue
        parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
    return "  ".join(parts)


class LineProgressBar(ProgressBar):
    """One line of progress every ``every_n_seconds`` and at the end of each epoch and validation.

    Args:
        every_n_seconds: the longest gap between two lines during an epoch.
    """

    def __init__(self, every_n_seconds: float = 30.0) -> None:
        super().__init__()
        self.every_n_seconds = every_n_seconds
        self._enabled = True
        self._epoch_start = 0.0
        self._last_line = 0.0
        self._epoch_total: float = 0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _print(self, text: str) -> None:
        if self._enabled and self.trainer.is_global_zero:
            print(text, file=sys.stdout, flush=True)

    def _epoch_label(self, trainer: L.Trainer) -> str:
        last = trainer.max_epochs - 1 if trainer.max_epochs and trainer.max_epochs > 0 else None
        return f"epoch {trainer.current_epoch}" + (f"/{last}" if last is not None else "")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._epoch_start = self._last_line = time.monotonic()
        # Read once: with max_steps, Lightning's figure is the remaining steps, which shrinks as the epoch goes.
        self._epoch_total = self.total_train_batches

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds:
            return
        self._last_line = now
        done, total = batch_idx + 1, self._epoch_total
        rate = done / max(now - self._epoch_start, 1e-9)
        share = f"{done}/{int(total)} ({100 * done / total:.0f}%)" if total not in (None, float("inf")) else f"{done}"
        eta = f"  eta {_clock((total - done) / rate)}" if total not in (None, float("inf")) else ""
        self._print(f"[train] {self._epoch_label(trainer)}  batch {share}  step {trainer.global_step}  "
                    f"{rate:.2f} it/s{eta}  {_metrics(self.get_metrics(trainer, pl_module))}".rstrip())

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        seconds = time.monotonic() - self._epoch_start
        self._print(f"[train] {self._epoch_label(trainer)} done in {_clock(seconds)}  step {trainer.global_step}  "
                    f"{_metrics(self.get_metrics(trainer, pl_module))}".rstrip())

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._validation_start = time.monotonic()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.monotonic() - self._validation_start
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        self._print(f"[val] {self._epoch_label(trainer)}  step {trainer.global_step}  done in {_clock(seconds)}  "
                    f"{_metrics(metrics)}".rstrip())


    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._predict_start = self._last_line = time.monotonic()

    def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        now = time.monotonic()
        if now - self._last_line < self.every_n_seconds:
            return
        self._last_line = now
        # Lightning's total_predict_batches_current_dataloader is set by its own batch-start hook, which this
        # bar does not run: read the count for this dataloader directly.
        total = trainer.num_predict_batches[dataloader_idx]
        done = batch_idx + 1
        share = f"{done}/{int(total)} ({100 * done / total:.0f}%)" if total not in (None, float("inf")) else f"{done}"
        self._print(f"[predict] batch {share}  {done / max(now - self._predict_start, 1e-9):.2f} it/s")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._print(f"[predict] done in {_clock(time.monotonic() - self._predict_start)}")


def progress_bar_for(stream: Any = None) -> ProgressBar | None:
    """:class:`LineProgressBar` when ``stream`` (standard output by default) is not a terminal, else ``None``
    (Lightning's own tqdm bar)."""
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return None if isatty is not None and isatty() else LineProgressBar()


def progress(iterable: Iterable[T], *, desc: str, unit: str = "it", total: int | None = None,
             every_n_seconds: float = 30.0, stream: Any = None) -> Iterator[T]:
    """``iterable`` with progress: a tqdm bar on a terminal, else a line every ``every_n_seconds`` and one at the end.

    Args:
        iterable: what to loop over.
        desc: what the loop does (the line's prefix).
        unit: what one item is.
        total: the number of items (``len(iterable)`` when it has one).
        every_n_seconds: the longest gap between two lines when the output is not a terminal.
        stream: where progress goes (standard error by default, as tqdm's).
    """
    stream = sys.stderr if stream is None else stream
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        yield from tqdm(iterable, desc=desc, unit=unit, total=total, file=stream)
        return
    start = last = time.monotonic()
    done = 0

    def line(final: bool) -> str:
        elapsed = max(time.monotonic() - start, 1e-9)
        share = f"{done}/{total} ({100 * done / total:.0f}%)" if total else f"{done}"
        eta = f"  eta {_clock((total - done) * elapsed / done)}" if total and done and not final else ""
        return f"[{desc}] {share} {unit}  {done / elapsed:.2f} {unit}/s  {_clock(elapsed)}{eta}"

    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every_n_seconds:
            last = now
            print(line(False), file=stream, flush=True)
    print(line(True), file=stream, flush=True)
