"""What the data modules of the three tasks share: their loaders, the images ``lightning predict`` runs on, and
the chunks of a split under ``streaming``.

:class:`TaskDataModule` is the base of :class:`~mbv3_dense.classification.data.ImageFolderDataModule`,
:class:`~detection.data.CocoDataModule`, :class:`~segmentation.data.CityscapesDataModule` and
:class:`~segmentation.folder.MaskFolderDataModule`. Each keeps its own ``__init__`` signature (the command line
reads it) and its ``setup``, which fills :attr:`~TaskDataModule.train_set` and :attr:`~TaskDataModule.val_set`;
the loaders built here draw training samples with :func:`~mbv3_dense.data.sampling.train_loader`'s seeded order
and per-sample augmentation seeds, and give each worker one thread (:mod:`mbv3_dense.data.sampling`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import lightning as L
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from mbv3_dense.data.listing import ImageList, predict_images_for
from mbv3_dense.data.predict import predict_loader
from mbv3_dense.data.sampling import eval_loader, train_loader
from mbv3_dense.data.streaming.read import ChunkReader, open_split
from mbv3_dense.data.streaming.record import StreamingDataError


class TaskDataModule(L.LightningDataModule):
    """Base of the task data modules.

    Subclasses name their chunks (:attr:`chunk_kind`), fill ``train_set`` / ``val_set`` in ``setup`` (and
    :attr:`predict_list` with :meth:`setup_predict`), and add what their loaders need (:meth:`loader_options`).

    Args:
        batch_size: training batch size per process.
        val_batch_size: validation and prediction batch size per process.
        num_workers: loader workers.
        predict_images: what ``lightning predict`` runs on (:func:`~mbv3_dense.data.listing.predict_images_for`).
        predict_max_pixels: images with more pixels are skipped with a warning naming them.
        streaming: the folder or URL of ``scripts/prepare_streaming.py``'s chunks (``<streaming>/<split>``).
    """

    #: ``(task, layout)`` the chunks must have been prepared for (:func:`~mbv3_dense.data.streaming.read.open_split`).
    chunk_kind: ClassVar[tuple[str, str]]
    #: The chunks' ``info`` entries both splits must agree on (one dataset prepared both), and what prepared them.
    same_in_both_splits: ClassVar[tuple[str, ...]] = ()
    prepared_from: ClassVar[str] = "datasets"

    def __init__(self, *, batch_size: int, val_batch_size: int, num_workers: int, predict_images: str | None,
                 predict_max_pixels: int, streaming: str | None) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size
        self.num_workers = num_workers
        self.predict_images = predict_images
        self.predict_max_pixels = predict_max_pixels
        self.streaming = streaming
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.predict_list: ImageList | None = None
        #: What prediction images go through before batching (None: each at its own size).
        self.predict_transform: Callable[[Tensor], Tensor] | None = None
        self._chunks: dict[str, ChunkReader] = {}

    # ------------------------------------------------------------------ streaming
    def chunks(self, split: str) -> ChunkReader:
        """The chunks of ``split`` under ``streaming``, opened once and checked (:meth:`check_chunks`)."""
        if split not in self._chunks:
            task, layout = self.chunk_kind
            chunks = open_split(self.streaming, split, task=task, layout=layout)
            self.check_chunks(chunks)
            self._chunks[split] = chunks
        return self._chunks[split]

    def check_chunks(self, chunks: ChunkReader) -> None:
        """Raise :class:`~mbv3_dense.data.streaming.record.StreamingDataError` when a split's chunks do not fit
        this module or the other split's (:attr:`same_in_both_splits`); subclasses add their own checks."""
        if not self._chunks:
            return
        other = next(iter(self._chunks.values()))
        for key in self.same_in_both_splits:
            if chunks.info[key] != other.info[key]:
                raise StreamingDataError(f"{chunks.location}: its {key.replace('_', ' ')} differ from those of "
                                         f"{other.location} (prepared from different {self.prepared_from})")

    def split_set(self, split: str) -> Dataset:
        """The training (``"train"``) or validation dataset (after ``setup("fit")``)."""
        return self.train_set if split == "train" else self.val_set

    # ------------------------------------------------------------------ loaders
    def setup_predict(self) -> None:
        """``setup("predict")``: the images ``lightning predict`` runs on."""
        self.predict_list = predict_images_for(self.predict_images)

    def loader_options(self, split: str) -> dict[str, Any]:
        """What the ``"train"`` or ``"val"`` loader passes to :func:`~mbv3_dense.data.sampling.train_loader` /
        :func:`~mbv3_dense.data.sampling.eval_loader` beyond the dataset, batch size and workers (collate
        function, ``drop_last``, ``pin_memory``); nothing by default."""
        return {}

    def train_dataloader(self) -> DataLoader:
        return train_loader(self.train_set, trainer=self.trainer, batch_size=self.batch_size,
                            num_workers=self.num_workers, **self.loader_options("train"))

    def val_dataloader(self) -> DataLoader:
        return eval_loader(self.val_set, trainer=self.trainer, batch_size=self.val_batch_size,
                           num_workers=self.num_workers, **self.loader_options("val"))

    def predict_dataloader(self) -> DataLoader:
        return predict_loader(self.predict_list.files, transform=self.predict_transform,
                              batch_size=self.val_batch_size, num_workers=self.num_workers,
                              max_pixels=self.predict_max_pixels)
