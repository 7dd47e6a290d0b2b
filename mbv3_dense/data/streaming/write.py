"""Writing a split's chunks: one LitData item per sample of the data module's dataset, in index order, and the
preparer's record in ``index.json`` (``scripts/prepare_streaming.py``)."""

from __future__ import annotations

import json
import multiprocessing
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mbv3_dense.data.streaming.record import (
    DEFAULT_CHUNK_BYTES,
    INDEX_FILE,
    RECORD_KEY,
    ChunkSource,
    StreamingDataError,
    is_url,
)


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
