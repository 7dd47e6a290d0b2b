"""Transforms and the COCO data module: valid boxes, crowd/empty/degenerate policies, clear errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from detection.annotations import AnnotationError, CategoryMap, load_coco
from detection.data import CocoDataModule
from detection.synthetic import DetectionSpec, generate_coco
from detection.transforms import RandomIoUCrop, ZoomOut, train_transform
from mbv3_dense.data.image_io import ImageReadError


def _check_boxes(out: dict, size: int) -> None:
    b = np.asarray(out["bboxes"], dtype=np.float32).reshape(-1, 4)
    assert len(b) == len(out["labels"])
    assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert b.min(initial=0) >= 0 and b.max(initial=0) <= size


def test_transforms_keep_boxes_valid():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (120, 160, 3), dtype=np.uint8)
    boxes = np.array([[5, 5, 60, 70], [100, 20, 160, 120], [0, 0, 0, 30], [150, 110, 170, 125]], dtype=np.float32)
    t = train_transform(image_size=64, zoom_out_p=0.7, photometric_p=0.5)
    for _ in range(100):
        out = t(image=img, bboxes=np.clip(boxes, 0, [160, 120, 160, 120]), labels=[1, 2, 3, 4])
        assert out["image"].shape == (64, 64, 3)
        _check_boxes(out, 64)
    out = t(image=img, bboxes=np.zeros((0, 4)), labels=[])
    assert out["image"].shape == (64, 64, 3) and len(out["bboxes"]) == 0


def test_iou_crop_drops_boxes_with_centre_outside():
    import albumentations as A

    crop = A.Compose([RandomIoUCrop(p=1.0)], bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"],
                                                                        clip=True, filter_invalid_bboxes=True))
    img = np.zeros((100, 100, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 30, 30], [60, 60, 100, 100]], dtype=np.float32)
    for seed in range(30):
        crop.set_random_seed(seed)
        out = crop(image=img, bboxes=boxes, labels=[1, 2])
        h, w = out["image"].shape[:2]
        assert len(out["bboxes"]) >= 1
        _check_boxes(out, max(h, w))


def test_zoom_out_moves_boxes_with_the_image():
    import albumentations as A

    zoom = A.Compose([ZoomOut(side_range=(2.0, 2.0), p=1.0)],
                     bbox_params=A.BboxParams(format="pascal_voc", label_fields=["labels"]))
    img = np.full((50, 40, 3), 255, dtype=np.uint8)
    out = zoom(image=img, bboxes=np.array([[0, 0, 40, 50]], dtype=np.float32), labels=[1])
    assert out["image"].shape == (100, 80, 3)
    x0, y0, x1, y1 = (int(round(v)) for v in out["bboxes"][0])
    assert (x1 - x0, y1 - y0) == (40, 50)
    assert (out["image"][y0:y1, x0:x1] == 255).all()


@pytest.fixture()
def coco_root(tmp_path: Path) -> Path:
    generate_coco(tmp_path, DetectionSpec(train_images=6, val_images=3, min_side=96, max_side=128, min_object=24,
                                          max_object=60, empty_fraction=0.0, crowd_fraction=0.0, seed=0))
    return tmp_path


def _edit(root: Path, split: str, fn) -> None:
    path = root / "annotations" / f"instances_{split}2017.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_category_map_layouts():
    contiguous = CategoryMap([44, 1, 18, 3], 5)
    assert contiguous.to_label(18) == 3
    assert contiguous.to_category_ids(torch.tensor([1, 2, 3, 4])).tolist() == [1, 3, 18, 44]
    assert CategoryMap([1, 3, 90], 91).to_label(90) == 90
    with pytest.raises(AnnotationError, match="unknown category_id 7"):
        contiguous.to_label(7, "annotation 12")
    with pytest.raises(AnnotationError, match="num_classes"):
        CategoryMap([1, 3, 90], 10)


def test_datamodule_policies(coco_root: Path, caplog):
    def edit(data: dict) -> None:
        img0, img1, img2 = (im["id"] for im in data["images"][:3])
        data["annotations"] = [a for a in data["annotations"] if a["image_id"] not in (img1, img2)]
        next_id = max(a["id"] for a in data["annotations"]) + 1
        data["annotations"] += [
            # img1: only a crowd box -> no training target, dropped from training
            {"id": next_id, "image_id": img1, "category_id": 3, "bbox": [10, 10, 30, 30], "area": 900, "iscrowd": 1},
            # img0: degenerate (zero width) and fully outside -> dropped; partly outside -> clamped
            {"id": next_id + 1, "image_id": img0, "category_id": 1, "bbox": [10, 10, 0, 20], "area": 0, "iscrowd": 0},
            {"id": next_id + 2, "image_id": img0, "category_id": 1, "bbox": [500, 500, 20, 20], "area": 400,
             "iscrowd": 0},
            {"id": next_id + 3, "image_id": img0, "category_id": 18, "bbox": [-10, 5, 40, 30], "area": 1200,
             "iscrowd": 0},
        ]  # img2 has no annotation at all
    _edit(coco_root, "train", edit)
    _edit(coco_root, "val", edit)
    dm = CocoDataModule(root=str(coco_root), num_classes=5, image_size=64, batch_size=2, num_workers=0)
    with caplog.at_level(logging.INFO, logger="detection.data"):
        dm.setup("fit")
    text = caplog.text
    assert "1 boxes clamped" in text and "2 degenerate or outside boxes dropped" in text
    assert "2 images without a non-crowd box dropped from training" in text
    assert len(dm.train_set) == 4 and len(dm.val_set) == 3
    images, targets = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 64, 64) and images.dtype == torch.uint8
    for t in targets:
        assert t["boxes"].shape[1] == 4 and ((t["labels"] >= 1) & (t["labels"] <= 4)).all()
    by_id = {int(t["image_id"]): t for _, t in dm.val_set}
    ids = sorted(by_id)
    assert by_id[ids[1]]["iscrowd"].tolist() == [True]  # crowd kept in evaluation ground truth
    assert len(by_id[ids[2]]["boxes"]) == 0  # image without annotations kept for evaluation
    clamped = by_id[ids[0]]["boxes"][-1]
    assert clamped[0] == 0 and by_id[ids[0]]["labels"][-1] == 3


def test_unknown_category_is_named(coco_root: Path):
    def edit(data: dict) -> None:
        data["annotations"][0]["category_id"] = 77
    _edit(coco_root, "train", edit)
    with pytest.raises(AnnotationError, match="unknown category_id 77"):
        load_coco(coco_root / "annotations/instances_train2017.json", coco_root / "train2017", 5)


def test_corrupt_image_is_named(coco_root: Path):
    records, _, _ = load_coco(coco_root / "annotations/instances_val2017.json", coco_root / "val2017", 5)
    records[0].path.write_bytes(b"not a jpeg")
    dm = CocoDataModule(root=str(coco_root), num_classes=5, num_workers=0)
    dm.setup("validate")
    with pytest.raises(ImageReadError, match=records[0].path.name):
        dm.val_set[0]


def test_validation_sampler_never_repeats_an_image():
    """The evaluation sampler every task uses: under DDP each image goes to exactly one process."""
    from types import SimpleNamespace

    from mbv3_dense.data.sampling import evaluation_sampler

    data = list(range(10))
    assert evaluation_sampler(data, SimpleNamespace(world_size=1, global_rank=0)) is None
    shards = [list(evaluation_sampler(data, SimpleNamespace(world_size=3, global_rank=r))) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data
    assert [len(evaluation_sampler(data, SimpleNamespace(world_size=3, global_rank=r))) for r in range(3)] == [4, 3, 3]
