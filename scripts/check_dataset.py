"""Check a dataset before training: the data module's own validation, up front, as a report.

    python scripts/check_dataset.py --task classify --root /data/imagenet [--decode]
    python scripts/check_dataset.py --task detect --root /data/coco [--num-classes 91] [--decode]
    python scripts/check_dataset.py --task segment --root /data/cityscapes [--split train val] [--decode]
    python scripts/check_dataset.py --task segment --layout folders --root /data/mine [--classes-file F]
        [--mask-format index|color] [--on-unknown-value error|ignore] [--decode]

Runs exactly what ``lightning fit`` runs when it sets up the data (``ImageFolderDataModule``,
``CocoDataModule``, ``CityscapesDataModule``, ``MaskFolderDataModule`` and their scanning/loading
functions: the same errors, the same counts in the log lines), then with ``--decode`` reads every
sample through the datasets' own reading code, which finds truncated or corrupt images,
image/annotation size mismatches and Cityscapes labelIds outside the table. For image and mask
folders (``--layout folders``; both of its layouts, split folders or list files) the set-up already
decodes every mask and checks its values against the classes file, as ``lightning fit`` does.
Prints counts and each problem with its file, and exits with 1 when something would stop training
(under the default ``error`` policies), else 0.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

log = logging.getLogger("check_dataset")


class _Counter(logging.Handler):
    """Counts (and keeps the text of) the warnings that the data code logs while decoding."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _decode_all(name: str, count: int, read: Callable[[int], object], describe: Callable[[int], str]) -> list[str]:
    """Read items ``0..count-1``; return one problem line per item that raises."""
    problems = []
    for i in range(count):
        try:
            read(i)
        except (ValueError, OSError) as err:  # ImageReadError, AnnotationError, CityscapesDataError are ValueErrors
            problems.append(f"{name}: {describe(i)}: {err}")
    return problems


def check_classify(root: Path, splits: Iterable[str], decode: bool) -> tuple[dict[str, int], list[str]]:
    from mbv3_dense.classification.data import ImageFolderDataModule
    from mbv3_dense.data.image_io import read_image_rgb

    dm = ImageFolderDataModule(root=root, num_workers=0)
    dm.setup("fit" if "train" in splits else "validate")
    counts = {"classes": len(dm.classes)}
    problems: list[str] = []
    for split, dataset in (("train", dm.train_set), ("val", dm.val_set)):
        if split not in splits or dataset is None:
            continue
        counts[f"{split} images"] = len(dataset)
        if decode:
            samples = dataset.samples
            problems += _decode_all(split, len(samples), lambda i, s=samples: read_image_rgb(s[i][0]),
                                    lambda i, s=samples: f"image {s[i][0]}")
    return counts, problems


def check_detect(root: Path, splits: Iterable[str], decode: bool, num_classes: int) -> tuple[dict[str, int],
                                                                                          list[str]]:
    from detection.annotations import load_coco
    from detection.data import CocoDataModule, CocoEvalDataset

    dm = CocoDataModule(root=str(root), num_classes=num_classes, num_workers=0)
    counts: dict[str, int] = {}
    problems: list[str] = []
    for split in splits:
        images, annotations = dm.paths[split]
        if split == "train":
            dm.setup("fit")  # the training checks: missing images, nothing left to train on, ...
            records = dm.train_set.records
            counts["train images with boxes"] = len(records)
        else:
            dm.setup("validate")
            records = dm.val_set.records
        _, _, stats = load_coco(annotations, images, num_classes, dm.min_box_size)
        counts.update({f"{split} images": stats.images, f"{split} boxes": stats.boxes,
                       f"{split} boxes clamped": stats.clamped, f"{split} boxes dropped": stats.dropped_degenerate})
        if decode:
            dataset = CocoEvalDataset(records)  # decodes and compares the size with the annotation
            problems += _decode_all(split, len(dataset), dataset.__getitem__,
                                    lambda i, r=records: f"image {r[i].path} (id {r[i].image_id})")
    return counts, problems


def check_segment(root: Path, splits: Iterable[str], decode: bool) -> tuple[dict[str, int], list[str]]:
    from segmentation.data import CityscapesSegmentation
    from segmentation.transforms import eval_transform

    counts: dict[str, int] = {}
    problems: list[str] = []
    for split in splits:
        # check_files: the header checks of CityscapesDataModule (missing/colour/16-bit labels, sizes)
        dataset = CityscapesSegmentation(root, split, eval_transform(), check_files=True)
        counts[f"{split} images"] = len(dataset)
        if decode:
            unknown = _Counter()
            logging.getLogger("segmentation.labels").addHandler(unknown)
            try:
                problems += _decode_all(split, len(dataset), dataset.__getitem__,
                                        lambda i, d=dataset: f"pair {d.pairs[i][0].name}")
            finally:
                logging.getLogger("segmentation.labels").removeHandler(unknown)
            counts[f"{split} label files with ids outside the table (mapped to ignore)"] = len(unknown.messages)
    return counts, problems


def check_segment_folders(root: Path, splits: Iterable[str], decode: bool, *, classes_file: str | None,
                          mask_format: str, on_unknown_value: str) -> tuple[dict[str, int], list[str]]:
    from segmentation.folder import MaskFolderDataModule
    from segmentation.transforms import eval_transform

    dm = MaskFolderDataModule(root=str(root), classes_file=classes_file, mask_format=mask_format,
                              on_unknown_value=on_unknown_value, num_workers=0)
    counts: dict[str, int] = {"classes": dm.num_classes}
    problems: list[str] = []
    for split in splits:
        # The set-up of lightning fit: pairing, header checks, every mask decoded against the classes file.
        dataset = dm.split_dataset(split, eval_transform())
        counts[f"{split} image/mask pairs"] = len(dataset)
        if decode:
            problems += _decode_all(split, len(dataset), dataset.__getitem__,
                                    lambda i, d=dataset: f"pair {d.pairs[i].image}")
        if on_unknown_value == "ignore":
            counts[f"{split} masks with values outside the classes file (mapped to ignore)"] = len(
                dataset.decoder.files_with_unknown_values)
    return counts, problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", required=True, choices=("classify", "detect", "segment"))
    p.add_argument("--root", required=True, type=Path)
    p.add_argument("--split", nargs="+", default=["train", "val"], choices=("train", "val"))
    p.add_argument("--num-classes", type=int, default=91, help="detect: the model's classes incl. background")
    p.add_argument("--layout", choices=("cityscapes", "folders"), default="cityscapes",
                   help="segment: the Cityscapes layout, or image and mask folders (segmentation.folder)")
    p.add_argument("--classes-file", default=None,
                   help="segment folders: the classes file, relative to --root (default: root/classes.*)")
    p.add_argument("--mask-format", choices=("index", "color"), default="index",
                   help="segment folders: masks of class indices or of the classes' colours")
    p.add_argument("--on-unknown-value", choices=("error", "ignore"), default="error",
                   help="segment folders: mask values outside the classes file stop (error) or are ignored")
    p.add_argument("--decode", action="store_true", help="decode every image and label (slow on full datasets)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    folders = args.task == "segment" and args.layout == "folders"
    extent = ("decoding every file" if args.decode else
              "file lists, headers and every mask's values" if folders else "headers and file lists only")
    print(f"checking {args.task} data in {args.root} (splits: {', '.join(args.split)}, {extent})")
    try:
        if args.task == "classify":
            counts, problems = check_classify(args.root, args.split, args.decode)
        elif args.task == "detect":
            counts, problems = check_detect(args.root, args.split, args.decode, args.num_classes)
        elif args.layout == "folders":
            counts, problems = check_segment_folders(args.root, args.split, args.decode,
                                                     classes_file=args.classes_file, mask_format=args.mask_format,
                                                     on_unknown_value=args.on_unknown_value)
        else:
            counts, problems = check_segment(args.root, args.split, args.decode)
    except (ValueError, OSError) as err:  # the error training would stop with, naming the file
        print(f"ERROR {type(err).__name__}: {err}")
        print("FAILED: training would stop at data set-up")
        return 1
    for name, value in counts.items():
        print(f"  {name}: {value}")
    for problem in problems:
        print(f"ERROR {problem}")
    if problems:
        print(f"FAILED: {len(problems)} unreadable samples (training stops at the first one under the default "
              "policy; classification's on_bad_image: skip would skip and count them)")
        return 1
    print("OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
