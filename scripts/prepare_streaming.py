"""Write a dataset as LitData chunks for ``--data.streaming``: one folder per split, one item per sample.

    python scripts/prepare_streaming.py --task classify --root /data/imagenet --out /data/imagenet_chunks
    python scripts/prepare_streaming.py --task detect --root /data/coco --out /data/coco_chunks
    python scripts/prepare_streaming.py --task segment --root /data/cityscapes --out /data/cityscapes_chunks
    python scripts/prepare_streaming.py --task segment --layout folders --root my_scenes --out my_chunks \\
        [--classes-file F] [--mask-format index|color] [--on-unknown-value error|ignore]

then ``lightning fit -c <config> --data.streaming /data/imagenet_chunks`` (or the folder copied to a bucket,
``--data.streaming s3://bucket/imagenet_chunks``).

It sets the data module up as ``lightning fit`` does (the same checks and errors), then writes ``OUT/train``
and ``OUT/val`` with LitData's ``optimize``, in the dataset's order: item ``i`` holds what sample ``i`` reads
from the files (the encoded image's bytes as they are; the label, COCO boxes with their category ids, or the
label PNG's bytes; docs/data_pipeline.md, "Streaming"). The folder's ``index.json`` records the task, the split,
the item count, the format version and the classes or categories. Prints, per split, the items, the chunks,
the bytes and the time taken. Exit status 2 (``error: ...``) when the dataset or the output folder is unusable.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from mbv3_dense.data.streaming.record import DEFAULT_CHUNK_BYTES, SPLITS, StreamingDataError, is_url
from mbv3_dense.data.streaming.write import remove_folder, write_chunks
from mbv3_dense.errors import InputError


def data_module(args: argparse.Namespace):
    """The task's data module over ``--root``, as training would build it (no loader workers)."""
    if args.task == "classify":
        from mbv3_dense.classification.data import ImageFolderDataModule

        return ImageFolderDataModule(root=args.root, num_workers=0)
    if args.task == "detect":
        from detection.data import CocoDataModule

        return CocoDataModule(root=str(args.root), num_classes=None, min_box_size=args.min_box_size, num_workers=0)
    if args.layout == "folders":
        from segmentation.folder import MaskFolderDataModule

        return MaskFolderDataModule(root=str(args.root), classes_file=args.classes_file, mask_format=args.mask_format,
                                    on_unknown_value=args.on_unknown_value, num_workers=0)
    from segmentation.data import CityscapesDataModule

    return CityscapesDataModule(root=str(args.root), num_workers=0)


def prepare(args: argparse.Namespace) -> list[dict]:
    """Set the data module up and write each split; a row per split (items, chunks, bytes, seconds)."""
    if is_url(args.out):
        raise StreamingDataError(f"{args.out}: the preparer writes to a local (or mounted) folder; copy it to the "
                                 "bucket afterwards (docs/data_pipeline.md, 'Streaming')")
    dm = data_module(args)
    start = time.perf_counter()
    dm.setup("fit")
    print(f"{args.task}: set up {args.root} in {time.perf_counter() - start:.1f} s", flush=True)
    rows = []
    for split in args.split:
        out = Path(args.out) / split
        if args.overwrite:
            remove_folder(out)
        source = dm.chunk_source(split)
        start = time.perf_counter()
        write_chunks(source, out, num_workers=args.num_workers, chunk_bytes=args.chunk_bytes)
        seconds = time.perf_counter() - start
        files = sorted(out.glob("chunk-*.bin"))
        size = sum(f.stat().st_size for f in files)
        rows.append({"split": split, "items": source.record.count, "chunks": len(files), "bytes": size,
                     "seconds": seconds})
        print(f"{args.task} {split}: {source.record.count} items in {len(files)} chunks ({size / 1e6:.1f} MB) -> "
              f"{out} in {seconds:.1f} s ({source.record.count / seconds:.0f} items/s, {args.num_workers} workers)",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", required=True, choices=("classify", "detect", "segment"))
    parser.add_argument("--root", required=True, type=Path, help="the dataset, in the layout training reads")
    parser.add_argument("--out", required=True, help="a local folder: OUT/train and OUT/val are written")
    parser.add_argument("--split", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--layout", choices=("cityscapes", "folders"), default="cityscapes",
                        help="segment: a Cityscapes tree, or image and mask folders with a classes file")
    parser.add_argument("--min-box-size", type=float, default=1.0,
                        help="detect: boxes smaller (pixels, after clamping) are dropped, as data.min_box_size does; "
                             "training must use the same value")
    parser.add_argument("--classes-file", default=None, help="segment folders: the classes file (default: found)")
    parser.add_argument("--mask-format", choices=("index", "color"), default="index", help="segment folders")
    parser.add_argument("--on-unknown-value", choices=("error", "ignore"), default="error", help="segment folders")
    parser.add_argument("--num-workers", type=int, default=os.cpu_count() or 1,
                        help="LitData optimize's processes (default: the machine's cores)")
    parser.add_argument("--chunk-bytes", default=DEFAULT_CHUNK_BYTES, help="the most bytes of a chunk")
    parser.add_argument("--overwrite", action="store_true", help="replace chunk folders written before")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    start = time.perf_counter()
    try:
        prepare(args)
    except (InputError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
