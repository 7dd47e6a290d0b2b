"""Training data from LitData's optimized chunks: another source of the same items, read by index.

``scripts/prepare_streaming.py`` writes one folder of chunks per split with LitData's ``optimize`` (one item
per sample of the data module's own dataset, in the dataset's order: the file's encoded bytes and its labels),
and ``--data.streaming DIR_OR_URL`` makes the data modules read those items instead of the files. The item
with index ``i`` holds the bytes of the file the dataset's sample ``i`` reads, so it decodes to the same
pixels, and the sample's augmentation is drawn from ``(seed, epoch, i)`` as for files
(:mod:`mbv3_dense.sampling`): streaming changes where the bytes come from, nothing else.

LitData's own iteration (``StreamingDataset.__iter__``, ``StreamingDataLoader``: chunk-wise shuffling, its
sharding over ranks and workers, its loader state) is not used. It assigns chunks to workers, so the order of
samples, and with it the weights, would depend on the number of workers; and it would be a second sampler
beside :class:`~mbv3_dense.sampling.SeededSampler`. The data modules keep their sampler (order from
``(seed, epoch)``, DDP shards as ``DistributedSampler``'s, the mid-epoch skip on resume from the loop's
progress that the checkpoint holds), and each loader worker reads items by index from
:class:`ChunkReader` (``StreamingDataset[i]``, LitData's reader, over a local folder, mapped in place). A
folder in a bucket (``s3://``, ``gs://``, ``r2://``) is first copied to the node's disk by LitData's storage
clients (:func:`stage_chunks`): a random order over the whole split touches nearly every chunk in an epoch's
first batches, so a node needs all of it from the start (docs/data_pipeline.md, "Streaming", has the figures).

The preparer's record sits in the folder's ``index.json`` beside LitData's ``config`` and ``chunks``, under
:data:`RECORD_KEY` (:class:`ChunkRecord`): the task and dataset layout, the split, the item count, the format
version, and what the data module would have read from the files besides the samples (class names, COCO
categories, the classes file). Opening a folder checks them, and the chunk files' sizes when they are local;
reading an item checks that it is the one asked for. Each problem is a :class:`StreamingDataError` naming
the folder, and the chunk file and item where there is one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import posixpath
import shutil
import tempfile
from bisect import bisect_right
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from mbv3_dense.errors import InputError

# LitData asks PyPI for a newer version of itself whenever a dataset is opened (a 30 s timeout per process on
# machines without internet access, every loader worker included). Set before litdata is imported.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")

log = logging.getLogger(__name__)

#: The version of the item formats below; a folder written with another one is refused (prepare it again).
FORMAT_VERSION = 1
#: Where the preparer's record goes in LitData's ``index.json``.
RECORD_KEY = "mbv3_dense"
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
#: LitData's chunk size the preparer writes by default (the size its documentation recommends).
DEFAULT_CHUNK_BYTES = "64MB"
# LitData serializers an item may use: never "pickle" (reading it would run code from the bucket).
_SAFE_FORMATS = frozenset({"int", "bytes", "numpy", "no_header_numpy", "bool", "float"})


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
    def from_json(cls, data: Any, where: str) -> ChunkRecord:  # noqa: ANN401 - parsed JSON
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


class _Item:
    """``optimize``'s function: index ``i`` -> ``make_item(samples[i])`` with ``i`` first (checked when read)."""

    def __init__(self, samples: Sequence[Any], make_item: Callable[[Any], dict[str, Any]]) -> None:
        self.samples, self.make_item = samples, make_item

    def __call__(self, index: int) -> dict[str, Any]:
        return {"index": index, **self.make_item(self.samples[index])}


def write_chunks(source: ChunkSource, out: str | Path, *, num_workers: int = 1,
                 chunk_bytes: str | int = DEFAULT_CHUNK_BYTES) -> None:
    """Write one item per sample, ``source.make_item(source.samples[i])`` for ``i`` in order, as LitData chunks
    in ``out``, then ``source.record`` into ``index.json``. LitData's ``optimize`` shows its progress bar.

    Args:
        source: the record, the samples and the item function (``record.count == len(samples)``).
        out: an empty or missing local folder.
        num_workers: ``optimize``'s processes; each writes its own run of chunks, in index order.
        chunk_bytes: the most bytes of a chunk.

    Raises:
        StreamingDataError: ``out`` is a URL or a non-empty folder, or fewer items were written than asked.
    """
    from litdata import optimize

    record, samples = source.record, source.samples
    if is_url(out):
        raise StreamingDataError(f"{out}: the preparer writes to a local (or mounted) folder; copy the folder to "
                                 "the bucket afterwards (docs/data_pipeline.md, 'Streaming')")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise StreamingDataError(f"{out}: the folder is not empty (remove it, or pass --overwrite)")
    if record.count != len(samples) or record.count == 0:
        raise StreamingDataError(f"{record.source} ({record.split}): {len(samples)} samples to write, the record "
                                 f"says {record.count}")
    # Ordered: each worker writes a contiguous run of indices, and index.json lists the runs in order. Forked
    # workers inherit the set-up dataset; spawned ones import the project again (40 s a split on a busy 2-core
    # machine, against 0.2 s forked). The items only read files and numpy/PNG codecs, which fork safely.
    start_method = "fork" if "fork" in multiprocessing.get_all_start_methods() else None
    optimize(fn=_Item(samples, source.make_item), inputs=list(range(record.count)), output_dir=str(out),
             chunk_bytes=chunk_bytes, num_workers=max(1, min(num_workers, record.count)), reorder_files=False,
             keep_data_ordered=True, verbose=True, start_method=start_method)
    index_path = out / INDEX_FILE
    index = json.loads(index_path.read_text())
    written = sum(int(chunk["chunk_size"]) for chunk in index["chunks"])
    if written != record.count:
        raise StreamingDataError(f"{out}: LitData wrote {written} items, the dataset has {record.count}")
    index[RECORD_KEY] = record.to_json()
    temporary = index_path.with_name(index_path.name + ".tmp")
    temporary.write_text(json.dumps(index))
    temporary.replace(index_path)


def remove_folder(out: str | Path) -> None:
    """Delete a chunk folder written before (``--overwrite``): only one that holds LitData's ``index.json`` or
    nothing but chunk files, so that a mistyped path does not delete something else."""
    out = Path(out)
    if not out.exists():
        return
    names = [p.name for p in out.iterdir()]
    if names and INDEX_FILE not in names and not all(n.startswith("chunk-") for n in names):
        raise StreamingDataError(f"{out}: not a chunk folder ({', '.join(sorted(names)[:5])}...); not removed")
    shutil.rmtree(out)


def _download(url: str, local: Path) -> None:
    """Copy one object of a LitData URL to ``local``, atomically (a temporary file renamed). ``s3://``, ``gs://``
    and ``r2://`` go through LitData's storage clients (credentials as boto3 / google-cloud-storage find them);
    ``local:<path>`` is LitData's stand-in for a bucket, a file copied.

    Raises:
        StreamingDataError: naming the URL, when the object cannot be fetched.
    """
    partial = local.with_name(f"{local.name}.part-{os.getpid()}")
    try:
        if url.startswith("local:"):
            shutil.copyfile(url[len("local:"):], partial)
        else:
            from litdata.streaming import fs_provider

            providers = {"s3": fs_provider.S3FsProvider, "gs": fs_provider.GCPFsProvider,
                         "r2": fs_provider.R2FsProvider}
            scheme = url.split("://", 1)[0]
            if scheme not in providers:
                raise StreamingDataError(f"{url}: streaming reads local folders and {', '.join(providers)} URLs")
            providers[scheme]().download_file(url, str(partial))
        partial.replace(local)
    except StreamingDataError:
        raise
    except Exception as err:  # each store's client raises its own errors (botocore, google.api_core, OSError)
        partial.unlink(missing_ok=True)
        raise StreamingDataError(f"{url}: cannot be fetched ({type(err).__name__}: {err})") from err


def cache_folder(url: str) -> Path:
    """Where a node keeps its copy of the chunks at ``url``: under ``LITDATA_CACHE_DIR`` (LitData's cache folder,
    ``~/.lightning/chunks`` by default; put it on a local disk), one folder per URL."""
    from litdata.utilities.dataset_utilities import get_default_cache_dir

    root = os.environ.get("LITDATA_CACHE_DIR") or get_default_cache_dir()  # LitData reads it once, at import
    return Path(root) / "mbv3_dense" / hashlib.sha1(url.encode()).hexdigest()[:16]


def stage_chunks(url: str, index_text: str, chunks: Sequence[_Chunk], *, threads: int = 16) -> Path:
    """The node's local copy of the chunk folder at ``url``: the chunks missing (or of another size) are
    downloaded, ``threads`` at a time, under a lock, so that the first process of a node copies and the others
    wait and find the copy done. A copy of another ``index.json`` (the bucket's folder prepared again) is replaced.

    Items are read in the sampler's order, an independent random permutation of the whole split every epoch, so
    an epoch's first few batches already touch nearly every chunk (docs/data_pipeline.md, "Streaming"): a node
    needs the whole split either way, and a copy made once serves every later epoch from the local disk.

    Raises:
        StreamingDataError: not enough free disk, a download that fails or has another size than ``index.json``
            says (naming the object).
    """
    from filelock import FileLock

    from mbv3_dense.progress import progress

    folder = cache_folder(url)
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / ".lock")):
        index = folder / INDEX_FILE
        if not index.is_file() or index.read_text() != index_text:
            for stale in folder.glob("chunk-*"):
                stale.unlink()
            index.unlink(missing_ok=True)
        missing = [c for c in chunks if not (folder / c.filename).is_file()
                   or (folder / c.filename).stat().st_size != c.size]
        needed = sum(c.size for c in missing)
        free = shutil.disk_usage(folder).free
        if needed > free:
            raise StreamingDataError(f"{url}: {needed / 1e9:.1f} GB of chunks to copy, {free / 1e9:.1f} GB free in "
                                     f"{folder}; point LITDATA_CACHE_DIR at a local disk with room for the split")
        if missing:
            log.info("%s: copying %d chunks (%.2f GB) to %s, once per node", url, len(missing), needed / 1e9, folder)

            def fetch(chunk: _Chunk) -> None:
                _download(f"{url.rstrip('/')}/{chunk.filename}", folder / chunk.filename)
                size = (folder / chunk.filename).stat().st_size
                if size != chunk.size:
                    (folder / chunk.filename).unlink()
                    raise StreamingDataError(f"{url.rstrip('/')}/{chunk.filename}: {size} bytes, {INDEX_FILE} says "
                                             f"{chunk.size}: the object is truncated or changed (copy the folder to "
                                             "the bucket again)")

            with ThreadPoolExecutor(max_workers=threads) as pool:
                for _ in progress(pool.map(fetch, missing), desc=f"copying {url}", unit="chunk", total=len(missing)):
                    pass
        index.write_text(index_text)
    return folder


@dataclass(frozen=True)
class _Chunk:
    filename: str
    first: int  # the dataset index of its first item
    count: int
    size: int  # bytes, as index.json says


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

    def _open(self) -> Any:  # noqa: ANN401 - litdata.StreamingDataset
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
                _download(f"{self.location.rstrip('/')}/{INDEX_FILE}", path)
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

    def _list_chunks(self, index: dict[str, Any]) -> list[_Chunk]:
        chunks, first = [], 0
        try:
            for entry in index["chunks"]:
                chunks.append(_Chunk(str(entry["filename"]), first, int(entry["chunk_size"]),
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

