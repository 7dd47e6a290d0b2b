"""The three generators of built-in data have one call shape: ``generate_<format>(root, spec)`` returns
the number of images written per split, and those are the files on disk in the real layout."""

from __future__ import annotations

from pathlib import Path

from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.classification.synthetic import ImageFolderSpec, generate_imagefolder, write_imagefolder
from segmentation.synthetic import CityscapesSpec, generate_cityscapes


def test_one_call_shape_and_counts_that_match_the_files(tmp_path: Path) -> None:
    runs = {
        "imagefolder": (generate_imagefolder(tmp_path / "c", ImageFolderSpec(num_classes=2, train_per_class=3,
                                                                              val_per_class=1, size=32)),
                        lambda split: list((tmp_path / "c" / split).glob("*/*.jpg"))),
        "coco": (generate_coco(tmp_path / "d", DetectionSpec(train_images=3, val_images=2, min_side=96,
                                                             max_side=128)),
                 lambda split: list((tmp_path / "d" / f"{split}2017").glob("*.jpg"))),
        "cityscapes": (generate_cityscapes(tmp_path / "s", CityscapesSpec(height=64, width=128, train_per_city=1,
                                                                         val_per_city=1)),
                       lambda split: list((tmp_path / "s" / "leftImg8bit" / split).glob("*/*_leftImg8bit.png"))),
    }
    for name, (counts, files) in runs.items():
        assert set(counts) == {"train", "val"}, name
        for split, n in counts.items():
            assert n > 0 and len(files(split)) == n, (name, split, n)


def test_keyword_form_writes_the_same_files(tmp_path: Path) -> None:
    spec = ImageFolderSpec(num_classes=2, train_per_class=2, val_per_class=1, size=32, seed=4)
    generate_imagefolder(tmp_path / "a", spec)
    write_imagefolder(tmp_path / "b", num_classes=2, train_per_class=2, val_per_class=1, size=32, seed=4)
    a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*.jpg"))
    assert all((tmp_path / "a" / p).read_bytes() == (tmp_path / "b" / p).read_bytes() for p in a)
