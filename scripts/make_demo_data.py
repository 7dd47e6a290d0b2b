"""Write the generated demo datasets: ``python scripts/make_demo_data.py <task> --out DIR``.

One subcommand per task. Each task package owns its generator; this script imports it lazily,
so adding a task is one entry of ``SUBCOMMANDS`` and one small function below.
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


# subcommand: (generator, help, --tiny's help, its options after --out: a default (an integer option) or
# add_argument's keywords); --seed and --tiny follow.
SUBCOMMANDS = {
    "classify": (classify, "ImageFolder of shapes and textures (root/{train,val}/<class>/*.jpg)",
                 "6 train / 3 val images per class (smoke tests)",
                 {"num_classes": 6, "train_per_class": 1000, "val_per_class": 100, "size": 64}),
    "segment": (segment, "Cityscapes tree of street scenes (leftImg8bit/, gtFine/ labelIds)",
                "64x128, 6 train / 3 val images (smoke tests)",
                {"height": 256, "width": 512, "train_per_city": 100, "val_per_city": 8}),
    "segment-folders": (segment_folders, "image + mask folders with a classes file (your own data's layout)",
                        "64x128, 4 train / 2 val images (smoke tests)",
                        {"height": 256, "width": 512, "train_images": 120, "val_images": 24,
                         "mask_format": {"choices": ("index", "color"), "default": "index"}}),
    "detect": (detect, "COCO tree of shapes (train2017/, val2017/, annotations/instances_*.json)",
               "~128 px, 6 train / 4 val images (smoke tests)", {"train_images": 400, "val_images": 60}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    tasks = parser.add_subparsers(dest="task", required=True)
    for name, (generate, help_text, tiny_help, options) in SUBCOMMANDS.items():
        p = tasks.add_parser(name, help=help_text)
        p.add_argument("--out", type=Path, required=True)
        for key, option in options.items():
            kwargs = option if isinstance(option, dict) else {"type": int, "default": option}
            p.add_argument("--" + key.replace("_", "-"), **kwargs)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--tiny", action="store_true", help=tiny_help)
        p.set_defaults(run=generate)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = args.run(args)
    print(f"wrote {args.task} data to {out} in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
