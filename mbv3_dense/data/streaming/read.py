"""Reading a split's chunks: items by index, checked against the preparer's record (:class:`ChunkReader`)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from bisect import bisect_right
from pathlib import Path
from typing import Any

from mbv3_dense.data.streaming.record import (
    FORMAT_VERSION,
    INDEX_FILE,
    RECORD_KEY,
    ChunkRecord,
    StreamingDataError,
    is_url,
    split_location,
)
from mbv3_dense.data.streaming.stage import Chunk, download, stage_chunks

log = logging.getLogger(__name__)

# LitData serializers an item may use: never "pickle" (reading it would run code from the bucket).
_SAFE_FORMATS = frozenset({"int", "bytes", "numpy", "no_header_numpy", "bool", "float"})


class ChunkReader:
    """One split's chunks, item by index, checked against the preparer's record.

    Picklable: each process (loader worker) opens its own LitData ``StreamingDataset`` on first use.

    Args:
        location: the split's chunk folder: a local path or a URL LitData reads (``s3://bucket/x/train``).
        task: the task the data module trains (:attr:`ChunkRecord.task`).
        layout: the data module's layout (:attr:`ChunkRecord.layout`).
        split: ``"train"`` or ``"val"``.

    Raises:
        StreamingDataError: no such folder or no ``index.json``; a folder the preparer did not write; chunks of
            another task, layout, split or format version; fewer items than the record says; a local chunk file
            that is missing or of another size than ``index.json`` says (truncated); serializers that would
            unpickle.
    """

    def __init__(self, location: str | Path, *, task: str, layout: str, split: str) -> None:
        self.location = str(location)
        self._dataset: Any = None
        self._pid: int | None = None
        self._index_text = ""
        index = self._read_index()
        self.record = self._check_record(index, task, layout, split)
        self.chunks = self._list_chunks(index)
        self._starts = [chunk.first for chunk in self.chunks]
        formats = {str(f).split(":")[0] for f in index.get("config", {}).get("data_format") or []}
        if formats - _SAFE_FORMATS:
            raise StreamingDataError(f"{self.location}: items use LitData's serializers "
                                     f"{sorted(formats - _SAFE_FORMATS)}; the preparer's hold only ints, bytes and "
                                     "numpy arrays (no pickles, no files decoded by LitData): prepare them again")
        if not is_url(self.location):
            self._check_chunk_files()

    # ------------------------------------------------------------------ opening
    def open(self) -> ChunkReader:
        """Open LitData's reader in this process now (from a URL: after making the node's copy, with progress),
        rather than at the first item read, in a loader worker. Datasets over chunks call it when built."""
        self._open()
        return self

    def _open(self) -> Any:
        """This process's ``StreamingDataset`` over the local folder (a forked or spawned worker opens its own);
        from a URL, the node's copy (:func:`stage_chunks`), made by the first process that needs it."""
        if self._dataset is None or self._pid != os.getpid():
            from litdata import StreamingDataset

            folder = stage_chunks(self.location, self._index_text, self.chunks) if is_url(self.location) \
                else Path(self.location)
            try:
                # batch_decode=0: one item deserialized per read. LitData's "auto" deserializes a window of up to
                # 256 neighbours for each read (made for reading in chunk order): 250 reads/s of 64 px JPEG items
                # in random order here, against 41,000 with 0.
                dataset = StreamingDataset(str(folder), batch_decode=0)
            except (FileNotFoundError, ValueError) as err:
                raise StreamingDataError(f"{folder}: not a chunk folder LitData can open ({err}); write one "
                                         "with scripts/prepare_streaming.py") from err
            self._dataset, self._pid = dataset, os.getpid()
        return self._dataset

    def _read_index(self) -> dict[str, Any]:
        if is_url(self.location):
            with tempfile.TemporaryDirectory() as folder:
                path = Path(folder) / INDEX_FILE
                download(f"{self.location.rstrip('/')}/{INDEX_FILE}", path)
                self._index_text = path.read_text()
        else:
            folder = Path(self.location)
            if not folder.is_dir():
                raise StreamingDataError(f"{folder}: no such chunk folder (scripts/prepare_streaming.py writes "
                                         f"<out>/train and <out>/val; --data.streaming takes <out>)")
            path = folder / INDEX_FILE
            if not path.is_file():
                raise StreamingDataError(f"{folder}: no {INDEX_FILE}: not a folder of LitData chunks (write one with "
                                         "scripts/prepare_streaming.py)")
        try:
            if not is_url(self.location):
                self._index_text = path.read_text()
            return json.loads(self._index_text)
        except (OSError, ValueError) as err:
            raise StreamingDataError(f"{self.location}: cannot read {INDEX_FILE} ({err})") from err

    def _check_record(self, index: dict[str, Any], task: str, layout: str, split: str) -> ChunkRecord:
        where = self.location
        if RECORD_KEY not in index:
            raise StreamingDataError(f"{where}: LitData chunks without the preparer's record ({RECORD_KEY!r} in "
                                     f"{INDEX_FILE}): not written by scripts/prepare_streaming.py")
        raw = index[RECORD_KEY]
        version = raw.get("format_version") if isinstance(raw, dict) else None
        if version != FORMAT_VERSION:
            raise StreamingDataError(f"{where}: chunks written by format version {version} of "
                                     f"scripts/prepare_streaming.py; this code reads version {FORMAT_VERSION}: "
                                     "prepare them again with this version")
        record = ChunkRecord.from_json(raw, where)
        wanted = f"{task} ({layout})"
        if (record.task, record.layout) != (task, layout):
            raise StreamingDataError(f"{where}: holds {record.kind} chunks (prepared from {record.source}); this "
                                     f"data module reads {wanted} chunks (prepare them with --task {task})")
        if record.split != split:
            raise StreamingDataError(f"{where}: holds the {record.split!r} split where the {split!r} split was "
                                     f"expected")
        return record

    def _list_chunks(self, index: dict[str, Any]) -> list[Chunk]:
        chunks, first = [], 0
        try:
            for entry in index["chunks"]:
                chunks.append(Chunk(str(entry["filename"]), first, int(entry["chunk_size"]),
                                     int(entry["chunk_bytes"])))
                first += chunks[-1].count
        except (KeyError, TypeError, ValueError) as err:
            raise StreamingDataError(f"{self.location}: {INDEX_FILE} has no valid 'chunks' list ({err})") from err
        if first != self.record.count:
            raise StreamingDataError(f"{self.location}: {INDEX_FILE} lists {first} items in {len(chunks)} chunks, the "
                                     f"preparer wrote {self.record.count}: an incomplete folder (prepare or copy it "
                                     "again)")
        return chunks

    def _check_chunk_files(self) -> None:
        folder = Path(self.location)
        for chunk in self.chunks:
            path, items = folder / chunk.filename, f"items {chunk.first}..{chunk.first + chunk.count - 1}"
            if not path.is_file():
                raise StreamingDataError(f"{path}: chunk file missing ({items} of {self.location}); copy the folder "
                                         "again")
            size = path.stat().st_size
            if size != chunk.size:
                raise StreamingDataError(f"{path}: chunk file is {size} bytes, {INDEX_FILE} says {chunk.size}: "
                                         f"{'truncated' if size < chunk.size else 'changed'} ({items}); copy or "
                                         "prepare the folder again")

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_dataset": None, "_pid": None}

    # ------------------------------------------------------------------ items
    @property
    def info(self) -> dict[str, Any]:
        """The record's task-specific part (class names, categories, ...)."""
        return self.record.info

    def __len__(self) -> int:
        return self.record.count

    def where(self, index: int, name: str | None = None) -> str:
        """``<location>/<chunk file> item <index> (<name>)``: what messages call an item."""
        chunk = self.chunks[bisect_right(self._starts, index) - 1] if 0 <= index < self.record.count else None
        place = f"{self.location}/{chunk.filename}" if chunk is not None else self.location
        return f"{place} item {index}" + (f" ({name})" if name else "")

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Item ``index`` as written (``bytes`` for encoded files, numpy arrays, ints); ``name`` and ``*_name``
        (UTF-8 bytes in the chunk) as ``str``.

        Raises:
            StreamingDataError: the index is out of range, the chunk cannot be read (missing, truncated or not
                downloadable), or it holds another item.
        """
        index = int(index)
        if not 0 <= index < self.record.count:
            raise StreamingDataError(f"{self.location}: item {index} out of range (0..{self.record.count - 1})")
        dataset = self._open()
        try:
            item = dataset[index]
        except Exception as err:  # LitData's errors for a missing, truncated or unreachable chunk vary by store
            raise StreamingDataError(f"{self.where(index)}: cannot be read ({type(err).__name__}: {err}); the chunk "
                                     "may be missing, truncated or unreachable") from err
        if not isinstance(item, dict) or item.get("index") != index:
            held = item.get("index") if isinstance(item, dict) else type(item).__name__
            raise StreamingDataError(f"{self.where(index)}: holds item {held}: the chunks are not in the preparer's "
                                     "order (prepare them again)")
        missing = [key for key in self.record.fields if key not in item]
        if missing:
            raise StreamingDataError(f"{self.where(index)}: has no {', '.join(missing)}")
        item = {key: bytes(value) if isinstance(value, memoryview) else value for key, value in item.items()}
        for key in [k for k in item if k == "name" or k.endswith("_name")]:
            item[key] = item[key].decode("utf-8", errors="replace") if isinstance(item[key], bytes) else item[key]
        return item


def open_split(streaming: str | Path, split: str, *, task: str, layout: str) -> ChunkReader:
    """The :class:`ChunkReader` of ``split`` under ``streaming`` (``<streaming>/<split>``), logged."""
    reader = ChunkReader(split_location(streaming, split), task=task, layout=layout, split=split)
    size = sum(chunk.size for chunk in reader.chunks)
    log.info("streaming %s: %d items in %d chunks (%.1f MB), %s, prepared from %s", reader.location, len(reader),
             len(reader.chunks), size / 1e6, reader.record.kind, reader.record.source)
    return reader

