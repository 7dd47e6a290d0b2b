"""Training data from LitData's optimized chunks: another source of the same items, read by index.

``scripts/prepare_streaming.py`` writes one folder of chunks per split with LitData's ``optimize`` (one item
per sample of the data module's own dataset, in the dataset's order: the file's encoded bytes and its labels),
and ``--data.streaming DIR_OR_URL`` makes the data modules read those items instead of the files. The item
with index ``i`` holds the bytes of the file the dataset's sample ``i`` reads, so it decodes to the same
pixels, and the sample's augmentation is drawn from ``(seed, epoch, i)`` as for files
(:mod:`mbv3_dense.data.sampling`): streaming changes where the bytes come from, nothing else.

LitData's own iteration (``StreamingDataset.__iter__``, ``StreamingDataLoader``: chunk-wise shuffling, its sharding
over ranks and workers, its loader state) is not used. It assigns chunks to workers, so the order of samples, and
with it the weights, would depend on the number of workers; and it would be a second sampler beside
:class:`~mbv3_dense.data.sampling.SeededSampler`. The data modules keep their sampler (order from ``(seed, epoch)``, DDP
shards as ``DistributedSampler``'s, the mid-epoch skip on resume from the loop's progress that the checkpoint
holds), and each loader worker reads items by index from :class:`~mbv3_dense.data.streaming.read.ChunkReader`
(``StreamingDataset[i]``, LitData's reader, over a local folder, mapped in place). A folder in a bucket (``s3://``,
``gs://``, ``r2://``) is first copied to the node's disk by LitData's storage clients
(:func:`~mbv3_dense.data.streaming.stage.stage_chunks`): a random order over the whole split touches nearly every chunk
in an epoch's first batches, so a node needs all of it from the start (docs/data_pipeline.md, "Streaming", has the
figures).

The preparer's record sits in the folder's ``index.json`` beside LitData's ``config`` and ``chunks``, under
:data:`~mbv3_dense.data.streaming.record.RECORD_KEY`
(:class:`~mbv3_dense.data.streaming.record.ChunkRecord`): the task and
dataset layout, the split, the item count, the format version, and what the data module would have read from the
files besides the samples (class names, COCO categories, the classes file). Opening a folder checks them, and the
chunk files' sizes when they are local; reading an item checks that it is the one asked for. Each problem is a
:class:`~mbv3_dense.data.streaming.record.StreamingDataError` naming the folder, and the chunk file and item where there
is one.

The modules: :mod:`~mbv3_dense.data.streaming.record` (the preparer's record, the errors, the folder locations),
:mod:`~mbv3_dense.data.streaming.write` (the preparer's writing), :mod:`~mbv3_dense.data.streaming.stage` (a node's copy
of a bucket's folder), :mod:`~mbv3_dense.data.streaming.read` (:class:`~mbv3_dense.data.streaming.read.ChunkReader`, the
items by index).
"""

import os

# LitData asks PyPI for a newer version of itself whenever a dataset is opened (a 30 s timeout per process on
# machines without internet access, every loader worker included). Set before litdata is imported.
os.environ.setdefault("LITDATA_DISABLE_VERSION_CHECK", "1")
