"""Cityscapes labels, the data module's error cases, transforms and the generated tree."""

from __future__ import annotations

import logging
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbv3_dense.data.image_io import ImageReadError
from segmentation.data import CityscapesDataError, CityscapesDataModule, CityscapesSegmentation
from segmentation.labels import CLASS_NAMES, label_ids_to_train_ids, train_ids_to_label_ids
from segmentation.synthetic import CityscapesSpec, generate_cityscapes
from segmentation.transforms import eval_transform, train_transform


def write_pair(root: Path, split: str, city: str, stem: str, label: np.ndarray, *, size=None) -> tuple[Path, Path]:
    h, w = size or label.shape[:2]
    image_dir, label_dir = root / "leftImg8bit" / split / city, root / "gtFine" / split / city
    image_dir.mkdir(parents=True, exist_ok=True)
    label_dir.mkdir(parents=True, exist_ok=True)
    image = image_dir / f"{stem}_leftImg8bit.png"
    Image.fromarray(np.full((h, w, 3), 100, np.uint8)).save(image)
    path = label_dir / f"{stem}_gtFine_labelIds.png"
    Image.fromarray(label).save(path)
    return image, path


def test_label_mapping_uses_the_official_table():
    ids = np.array([[7, 8, 11, 23], [24, 26, 33, 0], [1, 6, 9, 3]], np.uint8)
    train = label_ids_to_train_ids(ids)
    assert train.tolist() == [[0, 1, 2, 10], [11, 13, 18, 255], [255, 255, 255, 255]]
    assert CLASS_NAMES[0] == "road" and CLASS_NAMES[18] == "bicycle" and len(CLASS_NAMES) == 19
    assert train_ids_to_label_ids(np.arange(19)).tolist() == [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25,
                                                               26, 27, 28, 31, 32, 33]


def test_unknown_label_ids_become_ignore_with_a_warning_naming_the_file(tmp_path, caplog):
    _, label = write_pair(tmp_path, "val", "x", "x_000000_000001", np.array([[7, 40], [200, 26]], np.uint8))
    ds = CityscapesSegmentation(tmp_path, "val", eval_transform())
    with caplog.at_level(logging.WARNING):
        _, mask = ds[0]
    assert mask.tolist() == [[0, 255], [255, 13]]
    assert str(label) in caplog.text and "40" in caplog.text and "200" in caplog.text


def test_missing_label_names_both_files(tmp_path):
    image, label = write_pair(tmp_path, "train", "x", "x_000000_000001", np.zeros((4, 6), np.uint8))
    label.unlink()
    with pytest.raises(CityscapesDataError) as err:
        CityscapesSegmentation(tmp_path, "train", eval_transform())
    assert str(image) in str(err.value) and str(label) in str(err.value)


def test_size_mismatch_names_both_files(tmp_path):
    image, label = write_pair(tmp_path, "val", "x", "x_000000_000001", np.zeros((4, 6), np.uint8), size=(8, 12))
    ds = CityscapesSegmentation(tmp_path, "val", eval_transform())
    with pytest.raises(CityscapesDataError) as err:
        ds[0]
    assert str(image) in str(err.value) and str(label) in str(err.value)


def test_rgb_label_is_refused_naming_the_file(tmp_path):
    _, label = write_pair(tmp_path, "val", "x", "x_000000_000001", np.zeros((4, 6, 3), np.uint8))
    ds = CityscapesSegmentation(tmp_path, "val", eval_transform())
    with pytest.raises(ImageReadError, match=str(label)):
        ds[0]


def test_16_bit_label_is_refused_naming_the_file(tmp_path):
    _, label = write_pair(tmp_path, "val", "x", "x_000000_000001", np.full((4, 6), 26001, np.uint16))
    ds = CityscapesSegmentation(tmp_path, "val", eval_transform())
    with pytest.raises(CityscapesDataError, match="16") as err:
        ds[0]
    assert str(label) in str(err.value)


def test_empty_or_missing_split_folder(tmp_path):
    (tmp_path / "leftImg8bit" / "val" / "x").mkdir(parents=True)
    with pytest.raises(CityscapesDataError, match="holds no"):
        CityscapesSegmentation(tmp_path, "val", eval_transform())
    with pytest.raises(CityscapesDataError, match="no such split folder"):
        CityscapesSegmentation(tmp_path, "train", eval_transform())


def test_train_crop_pads_masks_with_ignore():
    transform = train_transform(crop_size=(64, 64), scale_range=(1.0, 1.0), hflip=False)
    image, mask = transform(np.full((20, 30, 3), 200, np.uint8), np.zeros((20, 30), np.uint8), random.Random(0))
    mask = torch.as_tensor(mask)
    assert image.shape == (3, 64, 64) and image.dtype == torch.uint8 and mask.shape == (64, 64)
    assert (image == 200).sum() == 3 * 20 * 30 and (image == 0).sum() == 3 * (64 * 64 - 20 * 30)
    assert (mask == 0).sum() == 20 * 30 and (mask == 255).sum() == 64 * 64 - 20 * 30


def test_generated_tree_and_datamodule(tmp_path):
    counts = generate_cityscapes(tmp_path, CityscapesSpec(height=64, width=128, train_per_city=1, val_per_city=1))
    assert counts == {"train": 3, "val": 3}
    names = sorted(p.name for p in (tmp_path / "gtFine" / "val").glob("*/*"))
    assert names[0].endswith("_000000_000019_gtFine_labelIds.png")
    dm = CityscapesDataModule(root=str(tmp_path), batch_size=2, num_workers=0, crop_size=(32, 48))
    dm.setup("fit")
    images, masks = next(iter(dm.train_dataloader()))
    assert images.shape == (2, 3, 32, 48) and images.dtype == torch.uint8
    assert masks.shape == (2, 32, 48) and masks.dtype == torch.uint8  # int64 on the device
    images, masks = next(iter(dm.val_dataloader()))
    assert images.shape == (1, 3, 64, 128)  # full resolution
    present = set(torch.unique(masks).tolist()) - {255}
    assert present <= set(range(19)) and len(present) >= 4
