"""The ImageFolder data module: file discovery, bad files, image modes, transforms, generated data."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbv3_dense.classification.data import (
    ImageFolderDataModule,
    collate_skipping,
    eval_transform,
    train_transform,
)
from mbv3_dense.classification.synthetic import write_imagefolder
from mbv3_dense.data.image_io import ImageReadError, read_image_rgb


def _module(root: Path, **kwargs) -> ImageFolderDataModule:
    return ImageFolderDataModule(root=root, batch_size=4, num_workers=0, crop_size=32, val_resize_size=36,
                              auto_augment=False, random_erase=0.0, **kwargs)


def _jpeg(path: Path, size: int = 40, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, format="JPEG")
    return path


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for split, n in (("train", 3), ("val", 2)):
        for cls in ("ant", "bee"):
            for i in range(n):
                _jpeg(tmp_path / split / cls / f"{i}.JPEG")
    return tmp_path


def test_discovery_extensions_and_ignored_files(tree: Path, caplog: pytest.LogCaptureFixture) -> None:
    _jpeg(tree / "train/ant/upper.JpG")
    Image.new("RGB", (40, 40)).save(tree / "train/bee/x.png")
    (tree / "train/bee/notes.txt").write_text("not an image")
    (tree / "train/bee/sub").mkdir()
    _jpeg(tree / "train/bee/sub/nested.jpeg")
    dm = _module(tree)
    with caplog.at_level(logging.INFO, logger="mbv3_dense.classification.data"):
        dm.setup("fit")
    assert dm.classes == ["ant", "bee"] and dm.num_classes == 2
    assert len(dm.train_set) == 3 + 1 + 3 + 1 + 1
    assert "ignored 1 files" in caplog.text
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (4, 3, 32, 32) and batch.images.dtype == torch.uint8
    assert batch.labels.dtype == torch.long and batch.skipped.item() == 0
    val = next(iter(dm.val_dataloader()))
    assert val.images.shape[1:] == (3, 32, 32)


def test_empty_training_class_is_an_error(tree: Path) -> None:
    (tree / "train/cat").mkdir()
    (tree / "train/cat/readme.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="cat"):
        _module(tree).setup("fit")


def test_unknown_validation_class_is_an_error(tree: Path) -> None:
    _jpeg(tree / "val/cow/0.jpg")
    with pytest.raises(ValueError, match="cow"):
        _module(tree).setup("fit")


def test_missing_split_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="train"):
        _module(tmp_path).setup("fit")


def _corrupt(tree: Path) -> tuple[Path, Path]:
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(good, format="JPEG")
    truncated = tree / "train/ant/truncated.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    garbage = tree / "train/bee/garbage.jpg"
    garbage.write_bytes(b"\x00\x01 this is not a jpeg" * 10)
    return truncated, garbage


def test_bad_image_error_policy_names_the_file(tree: Path) -> None:
    truncated, garbage = _corrupt(tree)
    dm = _module(tree)
    dm.setup("fit")
    names = [p.name for p, _ in dm.train_set.samples]
    for path in (truncated, garbage):
        with pytest.raises(ImageReadError, match=path.name):
            dm.train_set[names.index(path.name)]


def test_bad_image_skip_policy_warns_and_counts(tree: Path) -> None:
    truncated, garbage = _corrupt(tree)
    dm = _module(tree, on_bad_image="skip")
    dm.setup("fit")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        items = [dm.train_set[i] for i in range(len(dm.train_set))]
    messages = " ".join(str(w.message) for w in caught)
    assert truncated.name in messages and garbage.name in messages
    batch = collate_skipping(items)
    assert batch.skipped.item() == 2 and batch.images.shape[0] == len(items) - 2
    assert collate_skipping([None, None]).labels.numel() == 0


def test_bad_policy_value_is_rejected(tree: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_image"):
        _module(tree, on_bad_image="ignore")


def test_image_modes_are_read_as_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((20, 30, 3), np.uint8)
    rgb[:, :10] = 255  # a white band on black
    Image.fromarray(rgb[..., 0]).save(tmp_path / "gray.png")
    rgba = np.dstack([rgb, np.full((20, 30), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.gif")
    for name in ("gray.png", "rgba.png", "cmyk.jpg", "palette.gif"):
        out = read_image_rgb(tmp_path / name)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
        assert out[:, :10].mean() > 200 and out[:, 20:].mean() < 30, name


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    stored = np.zeros((20, 40, 3), np.uint8)  # stored landscape, left half white
    stored[:, :20] = 255
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display": the image is portrait when shown
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif.tobytes())
    out = read_image_rgb(tmp_path / "rotated.jpg")
    assert out.shape == (40, 20, 3)
    assert out[:18].mean() > 200 and out[22:].mean() < 50  # the white half is now on top


def test_transforms_shapes() -> None:
    image = torch.randint(0, 256, (3, 50, 70), dtype=torch.uint8)
    torch.manual_seed(0)
    out = train_transform(crop_size=48, auto_augment=True, random_erase=1.0)(image)
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8  # normalised on the device, not here
    out = eval_transform(resize_size=56, crop_size=48)(image)
    assert out.shape == (3, 48, 48) and out.dtype == torch.uint8


def test_generated_data_is_deterministic_and_distinct(tmp_path: Path) -> None:
    a = write_imagefolder(tmp_path / "a", num_classes=3, train_per_class=3, val_per_class=2, size=32, seed=7)
    b = write_imagefolder(tmp_path / "b", num_classes=3, train_per_class=3, val_per_class=2, size=32, seed=7)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert len(files) == 3 * 5 and files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    pixels = [read_image_rgb(a / f).tobytes() for f in files]
    assert len(set(pixels)) == len(pixels)  # no two images alike, train and val included


def test_package_names_are_the_modules() -> None:
    """``mbv3_dense.classification`` names (loaded on first use) are the classes of its modules."""
    from mbv3_dense.classification import ClassificationModule, ImageFolderDataModule
    from mbv3_dense.classification.data import ImageFolderDataModule as Folder
    from mbv3_dense.classification.module import ClassificationModule as Module

    assert ImageFolderDataModule is Folder and ClassificationModule is Module
