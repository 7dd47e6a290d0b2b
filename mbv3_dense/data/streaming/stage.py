"""A node's local copy of a chunk folder in a bucket (``s3://``, ``gs://``, ``r2://``, ``local:``), made once a
node."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from mbv3_dense.data.streaming.record import INDEX_FILE, StreamingDataError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Chunk:
    """One chunk file as ``index.json`` lists it."""

    filename: str
    first: int  # the dataset index of its first item
    count: int
    size: int  # bytes, as index.json says


def download(url: str, local: Path) -> None:
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


def stage_chunks(url: str, index_text: str, chunks: Sequence[Chunk], *, threads: int = 16) -> Path:
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

    from mbv3_dense.training.progress import progress

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

            def fetch(chunk: Chunk) -> None:
                download(f"{url.rstrip('/')}/{chunk.filename}", folder / chunk.filename)
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
