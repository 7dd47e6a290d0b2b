"""Your own segmentation data: image and mask folders with a classes file (segmentation.folder).

Through the data module a user configures (``MaskFolderDataModule(...).setup(...)``): both layouts, both
mask formats, the three classes-file forms. Then the class info of both data modules, the module's metrics
named by the data's classes, the writer's label PNGs and overlays for any class info, the generator, and
``scripts/check_dataset.py --layout folders``. Bad input stopping set-up: tests/test_segmentation_folder_errors.py.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mbv3_dense.checkpoints.classes import ClassInfoError, check_class_info
from mbv3_dense.data.listing import ImageFile
from mbv3_dense.data.predict import PredictBatch
from segmentation.folder import MaskFolderDataModule
from segmentation.labels import CLASS_NAMES, PALETTE, TRAIN_TO_LABEL_ID
from segmentation.mask_classes import distinct_palette, read_classes_file
from segmentation.synthetic import MaskFolderSpec, folder_class_color, generate_mask_folders

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("road", "grass", "water", "sky", "car")


def make(root: Path, **spec) -> Path:
    """A tiny generated dataset (32x64, 3 train, 2 val) in the requested form."""
    generate_mask_folders(root, MaskFolderSpec(**{"height": 32, "width": 64, "train_images": 3, "val_images": 2,
                                                  "classes": CLASSES, "seed": 5, **spec}))
    return root


def module(root: Path, **options) -> MaskFolderDataModule:
    return MaskFolderDataModule(root=str(root), num_workers=0, crop_size=(32, 32), **options)


def set_up(root: Path, stage: str = "fit", **options) -> MaskFolderDataModule:
    dm = module(root, **options)
    dm.setup(stage)
    return dm


def first_mask(root: Path, split: str = "train") -> Path:
    return sorted((root / "masks" / split).glob("*.png"))[0]


def write_png(path: Path, array: np.ndarray) -> None:
    Image.fromarray(array).save(path)


def edit_mask(root: Path, change) -> Path:
    """Rewrite the first training mask as ``change(values)`` gives it; returns its path."""
    mask = first_mask(root)
    with Image.open(mask) as png:
        values = np.asarray(png).copy()  # [H, W] indices or [H, W, 3] colours
    write_png(mask, change(values))
    return mask


def set_corner(values: np.ndarray, value) -> np.ndarray:
    """``values`` with its top-left 2x2 pixels set to ``value``."""
    values[:2, :2] = value
    return values


# ---------------------------------------------------------------------------------------------- good data
@pytest.mark.parametrize("form", [
    {"mask_format": "index", "image_format": "jpg", "layout": "folders"},
    {"mask_format": "color", "image_format": "png", "layout": "lists", "classes_file": "classes.json"},
])
def test_both_layouts_and_mask_formats_give_the_same_class_indices(tmp_path: Path, form: dict) -> None:
    root = make(tmp_path / "data", **form)
    dm = set_up(root, mask_format=form["mask_format"])
    assert dm.num_classes == len(CLASSES) and dm.class_names == list(CLASSES)
    assert len(dm.train_set) == 3 and len(dm.val_set) == 2
    image, mask = dm.val_set[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 64)
    assert mask.dtype == torch.uint8 and mask.shape == (32, 64)
    # The same scene as an index mask: the colour decoding gives exactly the indices.
    reference = make(tmp_path / "index", mask_format="index", layout="folders")
    with Image.open(reference / "masks" / "val" / "scene_0000.png") as png:
        expected = np.asarray(png)
    assert np.array_equal(mask.numpy(), expected)
    assert set(np.unique(expected)) - {255} <= set(range(len(CLASSES))) and len(np.unique(expected)) > 3
    crop, target = dm.train_set[0]
    assert crop.shape == (3, 32, 32) and target.shape == (32, 32)


def test_palette_masks_read_as_indices_and_nested_paths_pair(tmp_path: Path) -> None:
    """Pascal VOC's form: mode P, the value is the palette index (not the colour); subfolders pair by path."""
    root = make(tmp_path / "data")
    for split in ("train", "val"):
        for kind, suffix in (("images", ".jpg"), ("masks", ".png")):
            folder = root / kind / split
            (folder / "street" / "a").mkdir(parents=True)
            for f in sorted(folder.glob(f"*{suffix}")):
                f.rename(folder / "street" / "a" / f.name)
    mask_path = root / "masks" / "val" / "street" / "a" / "scene_0001.png"
    with Image.open(mask_path) as png:
        indices = np.asarray(png)
    palette_mask = Image.fromarray(indices)
    palette_mask.putpalette(distinct_palette(256).ravel().tolist())  # colours unrelated to the classes file
    palette_mask.save(mask_path)
    dm = set_up(root)
    assert [p.name for p in dm.val_set.pairs] == ["street/a/scene_0000", "street/a/scene_0001"]
    assert np.array_equal(dm.val_set[1][1].numpy(), indices)


def test_list_files_take_stems_or_paths_and_configurable_names(tmp_path: Path) -> None:
    root = make(tmp_path / "data", layout="lists", image_format="png")
    (root / "train.txt").unlink()
    (root / "val.txt").rename(root / "holdout.lst")
    (root / "mine.txt").write_text("# comment\ntrain_0000\n\ntrain_0001.png\n")
    dm = set_up(root, train_list="mine.txt", val_list="holdout.lst")
    assert [p.name for p in dm.train_set.pairs] == ["train_0000", "train_0001"]
    assert [p.name for p in dm.val_set.pairs] == ["val_0000", "val_0001"]
    assert dm.resolved_layout() == "lists"


def test_classes_file_forms(tmp_path: Path) -> None:
    txt = tmp_path / "classes.txt"
    txt.write_text("# index order\nroad\n\ntraffic light\n")
    classes = read_classes_file(txt)
    assert classes.names == ("road", "traffic light") and classes.colors is None and classes.ignore_index == 255
    yml = tmp_path / "c.yaml"
    yml.write_text("classes:\n  - name: road\n    color: [1, 2, 3]\n  - name: sea\n    color: [4, 5, 6]\n"
                   "ignore_index: 7\nignore_colors: [[0, 0, 0]]\n")
    classes = read_classes_file(yml)
    assert classes.colors == ((1, 2, 3), (4, 5, 6)) and classes.ignore_index == 7
    assert classes.ignore_colors == ((0, 0, 0),)
    info = classes.class_info()
    assert info == {"names": ["road", "sea"], "label_ids": [0, 1], "colors": [[1, 2, 3], [4, 5, 6]],
                    "ignore_index": 7}
    bare = tmp_path / "c.json"
    bare.write_text(json.dumps({"classes": ["a", "b", "c"]}))
    assert read_classes_file(bare).names == ("a", "b", "c")


def test_class_info_of_both_data_modules_is_cheap_and_valid(tmp_path: Path) -> None:
    from segmentation.data import CityscapesDataModule

    city = CityscapesDataModule(root=str(tmp_path / "nowhere"))  # no files read
    info = city.class_info
    assert city.num_classes == 19 and city.class_names == list(CLASS_NAMES)
    assert info["label_ids"] == TRAIN_TO_LABEL_ID.tolist() and info["colors"] == PALETTE.tolist()
    assert info["ignore_index"] == 255 and check_class_info(info, "x", 19) == info

    root = make(tmp_path / "data")
    for path in (root / "images").rglob("*.jpg"):
        path.unlink()  # the properties read the classes file only
    dm = module(root)
    assert dm.num_classes == 5 and dm.class_names == list(CLASSES)
    assert dm.class_info == {"names": list(CLASSES), "label_ids": [0, 1, 2, 3, 4], "ignore_index": 255,
                             "colors": [list(folder_class_color(n)) for n in CLASSES]}


def test_unknown_values_policy_ignore_maps_counts_and_names_them(tmp_path: Path, caplog) -> None:
    root = make(tmp_path / "data")
    mask = first_mask(root)
    values = np.asarray(Image.open(mask)).copy()
    values[0, :3] = 9  # 5 classes: 9 is neither a class nor 255
    Image.fromarray(values).save(mask)
    with caplog.at_level(logging.WARNING):
        dm = set_up(root, on_unknown_value="ignore")
    assert f"{mask}: mask values 9 (3 pixels) are not in the classes file" in caplog.text
    assert "1 of 3 masks hold values outside the classes file, mapped to 255" in caplog.text
    index = [p.mask for p in dm.train_set.pairs].index(mask)
    full = dm.split_dataset("train", transform=lambda image, m, rng: (torch.from_numpy(image), m))
    assert (full[index][1][0, :3] == 255).all()


# ---------------------------------------------------------------------------------------------- module and writer
def test_module_names_ious_by_the_data_and_takes_its_ignore_value() -> None:
    from segmentation import lraspp_mobilenet_v3_small
    from segmentation.module import SegmentationModule

    torch.manual_seed(0)
    module_ = SegmentationModule(model=lraspp_mobilenet_v3_small(num_classes=3, width_mult=0.5))
    with pytest.raises(ClassInfoError, match="MyData: the data has 2 classes .* the network outputs 3"):
        module_.use_class_info({"names": ["a", "b"]}, "MyData")
    module_.use_class_info({"names": ["sea", "sand", "sky"], "ignore_index": 9}, "MyData")
    masks = torch.randint(0, 3, (2, 32, 32))
    masks[:, :4] = 9
    images = torch.randn(2, 3, 32, 32)
    logged = {}
    module_.log = lambda *a, **k: None
    module_.log_dict = lambda d, **k: logged.update(d)
    loss = module_.training_step((images, masks), 0)  # 9 is ignored: no out-of-range target
    assert torch.isfinite(loss)
    module_.eval()
    with torch.no_grad():
        module_.validation_step((images, masks), 0)
    module_.on_validation_epoch_end()
    assert {k for k in logged if k.startswith("val/iou/")} == {"val/iou/sea", "val/iou/sand", "val/iou/sky"}

    bare = SegmentationModule(model=lraspp_mobilenet_v3_small(num_classes=2, width_mult=0.5))
    bare.use_class_info(None)
    assert bare.class_names is None and bare.ignore_index == 255  # -> val/iou/0, val/iou/1


def _write_predictions(out: Path, class_info: dict | None, classes: np.ndarray) -> None:
    from segmentation.predict import SegmentationWriter

    image = torch.full((3, *classes.shape), 200, dtype=torch.uint8)
    writer = SegmentationWriter(out, class_info=class_info)
    writer.open()
    writer.write(PredictBatch(images=[image], inputs=None, files=[ImageFile(out / "x.png", "sub/x", 1)],
                              notes=[None], skipped=[]), [torch.from_numpy(classes)])
    writer.close()


def test_writer_label_pngs_and_overlays_for_any_class_info(tmp_path: Path) -> None:
    classes = np.zeros((16, 24), dtype=np.uint8)
    classes[:, 8:16], classes[:, 16:] = 1, 2
    # A classes file with colours: palette PNG of the label values, overlays in the file's colours.
    info = {"names": ["road", "grass", "water"], "label_ids": [0, 1, 2], "colors": [[10, 20, 30], [40, 50, 60],
                                                                                    [70, 80, 90]]}
    _write_predictions(tmp_path / "a", info, classes)
    with Image.open(tmp_path / "a/labels/sub/x.png") as png:
        assert png.mode == "P" and np.array_equal(np.asarray(png), classes)
        assert png.getpalette()[:9] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    overlay = np.asarray(Image.open(tmp_path / "a/overlays/sub/x.jpg")).astype(int)
    assert abs(overlay[8, 3] - (np.array([200, 200, 200]) + [10, 20, 30]) / 2).max() <= 4  # JPEG rounding
    assert not (tmp_path / "a/labelIds").exists()
    # No colours: a generated palette, all classes distinct.
    _write_predictions(tmp_path / "b", {"names": ["a", "b", "c"]}, classes)
    with Image.open(tmp_path / "b/labels/sub/x.png") as png:
        assert png.getpalette()[:9] == distinct_palette(3).ravel().tolist()
    # Cityscapes (the default): labelIds in labelIds/, 8-bit greyscale, as before.
    _write_predictions(tmp_path / "c", None, classes)
    with Image.open(tmp_path / "c/labelIds/sub/x.png") as png:
        assert png.mode == "L" and np.array_equal(np.asarray(png), TRAIN_TO_LABEL_ID[classes])
    # A prediction the class info cannot name.
    with pytest.raises(ValueError, match="predicted class 2 but the class info names 2 classes"):
        _write_predictions(tmp_path / "d", {"names": ["a", "b"]}, classes)


def test_distinct_palette_is_pascal_voc_and_all_different() -> None:
    palette = distinct_palette(256)
    assert palette[:4].tolist() == [[0, 0, 0], [128, 0, 0], [0, 128, 0], [128, 128, 0]]
    assert palette[15].tolist() == [192, 128, 128]  # VOC's "person"
    assert len({tuple(c) for c in palette.tolist()}) == 256


# ---------------------------------------------------------------------------------------------- generator, checker
def test_generator_is_deterministic_by_seed_and_holds_out_val(tmp_path: Path) -> None:
    def files(root: Path) -> dict[str, bytes]:
        return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    spec = {"mask_format": "color", "layout": "lists", "image_format": "png"}
    counts = generate_mask_folders(tmp_path / "a", MaskFolderSpec(height=32, width=64, train_images=3, val_images=2,
                                                                  classes=CLASSES, seed=5, **spec))
    assert counts == {"train": 3, "val": 2}  # generate_cityscapes' call shape: images per split
    make(tmp_path / "b", **spec)
    a, b = files(tmp_path / "a"), files(tmp_path / "b")
    assert a == b
    make(tmp_path / "c", seed=6, **spec)
    assert files(tmp_path / "c") != a
    images = [v for k, v in a.items() if k.startswith("images")]
    assert len(set(images)) == len(images) == 5  # val is not a copy of train
    with pytest.raises(ValueError, match="classes_file"):
        make(tmp_path / "d", mask_format="color", classes_file="classes.txt")
    with pytest.raises(ValueError, match="distinct names from"):
        make(tmp_path / "e", classes=("road", "lava"))


def check_dataset():
    spec = importlib.util.spec_from_file_location("check_dataset", ROOT / "scripts" / "check_dataset.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script.main


def test_check_dataset_folders(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main = check_dataset()
    root = make(tmp_path / "data", mask_format="color")
    args = ["--task", "segment", "--layout", "folders", "--root", str(root), "--mask-format", "color"]
    assert main([*args, "--decode"]) == 0
    out = capsys.readouterr().out
    assert "classes: 5" in out and "train image/mask pairs: 3" in out and "OK" in out
    mask = edit_mask(root, lambda v: set_corner(v, (9, 9, 9)))
    assert main(args) == 1
    out = capsys.readouterr().out
    assert f"{mask}: mask colours [9, 9, 9]" in out and "FAILED" in out
    assert main([*args, "--on-unknown-value", "ignore"]) == 0
    assert "train masks with values outside the classes file (mapped to ignore): 1" in capsys.readouterr().out
    image = sorted((root / "images/val").glob("*"))[0]
    image.write_bytes(image.read_bytes()[:-300])
    assert main([*args, "--on-unknown-value", "ignore", "--decode"]) == 1
    assert f"ERROR val: pair {image}" in capsys.readouterr().out
    shutil.rmtree(root / "masks" / "val")
    assert main([*args, "--on-unknown-value", "ignore"]) == 1
    assert "no such folder" in capsys.readouterr().out
