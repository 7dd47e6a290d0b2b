"""Write the generated demo datasets: ``python scripts/make_demo_data.py <task> --out DIR``.

One subcommand per task. Each task package owns its generator; this script imports it lazily,
so adding a task is one ``add_parser`` block and one small function below.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def classify(args: argparse.Namespace) -> Path:
    from mbv3_dense.classification.synthetic import ImageFolderSpec, generate_imagefolder

    if args.tiny:
        args.train_per_class, args.val_per_class = 6, 3
    spec = ImageFolderSpec(num_classes=args.num_classes, train_per_class=args.train_per_class,
                           val_per_class=args.val_per_class, size=args.size, seed=args.seed)
    counts = generate_imagefolder(args.out, spec)
    print(f"classify: {counts['train']} train / {counts['val']} val images of {spec.size}x{spec.size}, "
          f"{spec.num_classes} classes")
    return args.out


def segment(args: argparse.Namespace) -> Path:
    from segmentation.synthetic import CityscapesSpec, generate_cityscapes

    spec = CityscapesSpec(height=args.height, width=args.width, train_per_city=args.train_per_city,
                         val_per_city=args.val_per_city, seed=args.seed)
    if args.tiny:
        spec = CityscapesSpec(height=64, width=128, train_per_city=2, val_per_city=1, seed=args.seed)
    counts = generate_cityscapes(args.out, spec)
    print(f"segment: {counts['train']} train / {counts['val']} val images of {spec.height}x{spec.width}")
    return args.out


def segment_folders(args: argparse.Namespace) -> Path:
    from segmentation.synthetic import MaskFolderSpec, generate_mask_folders

    spec = MaskFolderSpec(height=args.height, width=args.width, train_images=args.train_images,
                          val_images=args.val_images, seed=args.seed, mask_format=args.mask_format)
    if args.tiny:
        spec = MaskFolderSpec(height=64, width=128, train_images=4, val_images=2, seed=args.seed,
                              mask_format=args.mask_format)
    counts = generate_mask_folders(args.out, spec)
    print(f"segment-folders: {counts['train']} train / {counts['val']} val images of {spec.height}x{spec.width}, "
          f"{args.mask_format} masks, classes {', '.join(spec.classes)} ({spec.classes_file})")
    return args.out


def detect(args: argparse.Namespace) -> Path:
    from detection.synthetic import DetectionSpec, generate_coco

    spec = DetectionSpec(train_images=args.train_images, val_images=args.val_images, seed=args.seed)
    if args.tiny:
        spec = DetectionSpec(train_images=6, val_images=4, min_side=96, max_side=128, min_object=24,
                             max_object=60, empty_fraction=0.2, crowd_fraction=0.3, seed=args.seed)
    counts = generate_coco(args.out, spec)
    print(f"detect: {counts['train']} train / {counts['val']} val images (COCO layout, category ids 1, 3, 18, 44)")
    return args.out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)

    p = tasks.add_parser("classify", help="ImageFolder of shapes and textures (root/{train,val}/<class>/*.jpg)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-classes", type=int, default=6)
    p.add_argument("--train-per-class", type=int, default=1000)
    p.add_argument("--val-per-class", type=int, default=100)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="6 train / 3 val images per class (smoke tests)")
    p.set_defaults(run=classify)

    p = tasks.add_parser("segment", help="Cityscapes tree of street scenes (leftImg8bit/, gtFine/ labelIds)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--train-per-city", type=int, default=100)
    p.add_argument("--val-per-city", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="64x128, 6 train / 3 val images (smoke tests)")
    p.set_defaults(run=segment)

    p = tasks.add_parser("segment-folders", help="image + mask folders with a classes file (your own data's layout)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--train-images", type=int, default=120)
    p.add_argument("--val-images", type=int, default=24)
    p.add_argument("--mask-format", choices=("index", "color"), default="index")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="64x128, 4 train / 2 val images (smoke tests)")
    p.set_defaults(run=segment_folders)

    p = tasks.add_parser("detect", help="COCO tree of shapes (train2017/, val2017/, annotations/instances_*.json)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--train-images", type=int, default=400)
    p.add_argument("--val-images", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="~128 px, 6 train / 4 val images (smoke tests)")
    p.set_defaults(run=detect)

    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = args.run(args)
    print(f"wrote {args.task} data to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
