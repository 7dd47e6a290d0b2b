"""Bad input, before training starts: COCO, Cityscapes and ImageFolder cases that tests/test_*_data.py do not
cover, and scripts/check_dataset.py on good and bad tiny data."""

from __future__ import annotations

import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from detection.annotations import AnnotationError, load_coco
from detection.data import CocoDataModule
from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.classification.synthetic import write_imagefolder
from segmentation.data import CityscapesDataError, CityscapesDataModule
from segmentation.synthetic import CityscapesSpec, generate_cityscapes

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts/check_dataset.py"


def check_dataset():
    spec = importlib.util.spec_from_file_location("check_dataset", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


# ---------------------------------------------------------------- COCO
@pytest.fixture()
def coco(tmp_path: Path) -> Path:
    generate_coco(tmp_path, DetectionSpec(train_images=4, val_images=3, min_side=64, max_side=80, min_object=16,
                                          max_object=40, empty_fraction=0.0, crowd_fraction=0.0, seed=0))
    return tmp_path


def edit(root: Path, fn, split: str = "train") -> Path:
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))
    return path


def load(root: Path, split: str = "train"):
    return load_coco(root / f"annotations/instances_{split}2017.json", root / f"{split}2017", 5)


def test_coco_malformed_json_is_named(coco: Path) -> None:
    path = coco / "annotations/instances_train2017.json"
    path.write_text(path.read_text()[:-20])
    with pytest.raises(AnnotationError, match=r"instances_train2017.json: not valid JSON"):
        load(coco)


@pytest.mark.parametrize(("change", "expected"), [
    (lambda d: d.pop("annotations"), "missing or non-list top-level key 'annotations'"),
    (lambda d: d["images"][1].pop("height"), r"image \d+ has no height"),
    (lambda d: d["annotations"][2].pop("bbox"), r"annotation \d+ has no bbox"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), r"annotation \d+ of image \d+: bbox \[1, 2, 3\]"),
    (lambda d: d["images"].append(dict(d["images"][0])), r"duplicate image id \d+"),
    (lambda d: d["annotations"][0].update(image_id=999), r"1 annotations refer to images that are not in 'images' "
                                                         r"\(annotation \d+ -> image 999\)"),
])
def test_coco_structural_errors_name_file_and_entry(coco: Path, change, expected: str) -> None:
    edit(coco, change)
    with pytest.raises(AnnotationError, match=expected) as err:
        load(coco)
    assert "instances_train2017.json" in str(err.value)


def test_coco_negative_size_box_is_dropped_and_counted(coco: Path) -> None:
    def change(d: dict) -> None:
        d["annotations"][0]["bbox"] = [30, 30, -10, 12]  # negative width
        d["annotations"][1]["bbox"] = [5, 5, 10, 0]  # zero height
    edit(coco, change)
    _, _, stats = load(coco)
    assert stats.dropped_degenerate == 2


def test_coco_empty_annotation_list_stops_training_but_not_evaluation(coco: Path) -> None:
    edit(coco, lambda d: d.update(annotations=[]))
    dm = CocoDataModule(root=str(coco), num_classes=5, num_workers=0)
    with pytest.raises(AnnotationError, match="nothing to train on"):
        dm.setup("fit")
    edit(coco, lambda d: d.update(annotations=[]), split="val")
    dm = CocoDataModule(root=str(coco), num_classes=5, num_workers=0)
    dm.setup("validate")
    assert len(dm.val_set) == 3


def test_coco_missing_image_file_stops_setup(coco: Path) -> None:
    victim = sorted((coco / "train2017").iterdir())[1]
    victim.unlink()
    with pytest.raises(AnnotationError, match=f"1 of 4 listed images are missing.*{victim.name}"):
        CocoDataModule(root=str(coco), num_classes=5, num_workers=0).setup("fit")


# ---------------------------------------------------------------- Cityscapes
@pytest.fixture()
def cityscapes(tmp_path: Path) -> Path:
    generate_cityscapes(tmp_path, CityscapesSpec(height=32, width=64, train_per_city=1, val_per_city=1))
    return tmp_path


def first_label(root: Path, split: str = "train") -> Path:
    return sorted((root / "gtFine" / split).glob("*/*_gtFine_labelIds.png"))[0]


@pytest.mark.parametrize(("label", "expected"), [
    (np.zeros((16, 64), np.uint8), "is 64x32 \\(WxH\\) but its label"),
    (np.zeros((32, 64, 3), np.uint8), "colour label image \\(mode RGB\\)"),
    (np.full((32, 64), 26001, np.uint16), "16/32-bit label image"),
])
def test_cityscapes_bad_labels_stop_setup_before_training(cityscapes: Path, label, expected: str) -> None:
    path = first_label(cityscapes)
    Image.fromarray(label).save(path)
    dm = CityscapesDataModule(root=str(cityscapes), num_workers=0, crop_size=(32, 32))
    with pytest.raises(CityscapesDataError, match=expected) as err:
        dm.setup("fit")
    assert str(path) in str(err.value)


# ---------------------------------------------------------------- check_dataset.py
def test_check_dataset_classify(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = write_imagefolder(tmp_path / "folder", num_classes=2, train_per_class=3, val_per_class=1, size=32, seed=0)
    main = check_dataset()
    assert main(["--task", "classify", "--root", str(root), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train images: 6" in out and "val images: 2" in out and out.rstrip().endswith("OK")

    good = io.BytesIO()
    Image.new("RGB", (32, 32), (9, 9, 9)).save(good, format="JPEG")
    broken = next((root / "train").glob("*/")) / "truncated.jpg"
    broken.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    assert main(["--task", "classify", "--root", str(root)]) == 0  # found only by decoding
    assert main(["--task", "classify", "--root", str(root), "--decode"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR train: image {broken}" in out and "truncated" in out and "FAILED: 1 unreadable" in out

    (root / "train" / "empty_class").mkdir()
    assert main(["--task", "classify", "--root", str(root)]) == 1
    assert "class folders without any image file" in capsys.readouterr().out


def test_check_dataset_detect(coco: Path, capsys: pytest.CaptureFixture) -> None:
    main = check_dataset()
    assert main(["--task", "detect", "--root", str(coco), "--num-classes", "5", "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train images: 4" in out and "val images: 3" in out and "OK" in out

    victim = sorted((coco / "val2017").iterdir())[0]
    Image.new("RGB", (7, 5)).save(victim)  # a different size from the annotation's
    assert main(["--task", "detect", "--root", str(coco), "--num-classes", "5", "--decode"]) == 1
    out = capsys.readouterr().out
    assert f"ERROR val: image {victim}" in out and "but the annotation file says" in out

    edit(coco, lambda d: d["annotations"][0].update(category_id=77))
    assert main(["--task", "detect", "--root", str(coco), "--num-classes", "5"]) == 1
    assert "unknown category_id 77" in capsys.readouterr().out


def test_check_dataset_segment(cityscapes: Path, capsys: pytest.CaptureFixture) -> None:
    main = check_dataset()
    label = first_label(cityscapes, "val")
    ids = np.asarray(Image.open(label)).copy()
    ids[0, :4] = 200  # not a labelId: mapped to ignore with a warning, not an error
    Image.fromarray(ids).save(label)
    assert main(["--task", "segment", "--root", str(cityscapes), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train images: 3" in out and "val label files with ids outside the table (mapped to ignore): 1" in out

    Image.fromarray(np.zeros((8, 8), np.uint8)).save(first_label(cityscapes, "train"))
    assert main(["--task", "segment", "--root", str(cityscapes), "--split", "train"]) == 1
    assert "but its label" in capsys.readouterr().out


def test_check_dataset_command_exit_status(cityscapes: Path) -> None:
    """Through the real command line: an empty split folder is an error with exit status 1."""
    for folder in (cityscapes / "leftImg8bit" / "val").iterdir():
        for f in folder.iterdir():
            f.unlink()
    proc = subprocess.run([sys.executable, str(SCRIPT), "--task", "segment", "--root", str(cityscapes)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "holds no <city>/*_leftImg8bit.png images" in proc.stdout and "FAILED" in proc.stdout
