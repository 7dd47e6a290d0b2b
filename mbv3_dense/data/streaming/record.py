"""The preparer's record of a split's chunks, the error every streaming problem raises, and folder locations."""

from __future__ import annotations

import posixpath
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mbv3_dense.errors import InputError

#: The version of the item formats below; a folder written with another one is refused (prepare it again).
FORMAT_VERSION = 1
#: Where the preparer's record goes in LitData's ``index.json``.
RECORD_KEY = "mbv3_dense"
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
#: LitData's chunk size the preparer writes by default (the size its documentation recommends).
DEFAULT_CHUNK_BYTES = "64MB"


class StreamingDataError(InputError, ValueError):
    """A chunk folder or item that cannot be used; the message names the folder (and chunk, item) and the cause."""


@dataclass(frozen=True)
class ChunkRecord:
    """What the preparer records about one split's chunks (``index.json``, key :data:`RECORD_KEY`).

    Attributes:
        task: ``"classify"``, ``"detect"`` or ``"segment"``.
        layout: the data module's layout: ``"imagefolder"``, ``"coco"``, ``"cityscapes"`` or ``"folders"``.
        split: ``"train"`` or ``"val"``.
        count: the number of items, the dataset's length.
        format_version: :data:`FORMAT_VERSION` of the preparer that wrote them.
        info: what the data module knows from the files besides the samples (class names, categories, ...).
        source: the dataset root the items were read from (for messages).
        fields: the keys of an item.
    """

    task: str
    layout: str
    split: str
    count: int
    info: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    fields: tuple[str, ...] = ()
    format_version: int = FORMAT_VERSION

    @property
    def kind(self) -> str:
        return f"{self.task} ({self.layout})"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "fields": list(self.fields)}

    @classmethod
    def from_json(cls, data: Any, where: str) -> ChunkRecord:
        try:
            return cls(task=str(data["task"]), layout=str(data["layout"]), split=str(data["split"]),
                       count=int(data["count"]), info=dict(data.get("info") or {}), source=str(data.get("source", "")),
                       fields=tuple(data.get("fields") or ()), format_version=int(data["format_version"]))
        except (KeyError, TypeError, ValueError) as err:
            raise StreamingDataError(f"{where}: the preparer's record in {INDEX_FILE} is malformed "
                                     f"({type(err).__name__}: {err}); prepare the chunks again") from err


class ChunkSource(NamedTuple):
    """What the preparer writes for one split: the record, the dataset's samples in index order, and the function
    that makes a sample's item: a flat dict of ints, bytes and numpy arrays, picklable with the samples (LitData's
    ``optimize`` runs it in worker processes), with ``name`` (what messages call the sample: its file) as UTF-8
    bytes. Not as ``str``: LitData stores a string that names an existing file as that file's decoded content.
    Data modules give it (``chunk_source(split)``)."""

    record: ChunkRecord
    samples: Sequence[Any]
    make_item: Callable[[Any], dict[str, Any]]


def is_url(location: str | Path) -> bool:
    """A LitData URL (``s3://``, ``gs://``, ``r2://``, ``local:``...) rather than a local path."""
    text = str(location)
    return "://" in text or text.startswith("local:")


def split_location(streaming: str | Path, split: str) -> str:
    """The chunk folder of ``split`` under the ``--data.streaming`` root (a path or a URL)."""
    text = str(streaming)
    if is_url(text):
        return posixpath.join(text.rstrip("/"), split)
    return str(Path(text).expanduser() / split)
