"""Bad image and mask folders stop :class:`~segmentation.folder.MaskFolderDataModule`'s set-up with an error that
names the file and the value (segmentation.folder, segmentation.folder_pairs, segmentation.mask_decoder).

Each case edits a generated dataset (:func:`tests.test_segmentation_folder.make`) in one way: a mask of the wrong
kind, size or values, a missing or extra file, a bad list entry or classes file; then the set-up checks on
full-frame validation sizes and EXIF rotation, a truncated image named when read, and the options.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mbv3_dense.checkpoints.classes import ClassInfoError
from mbv3_dense.data.image_io import ImageReadError
from segmentation.folder import MaskFolderDataModule
from segmentation.folder_pairs import MaskFolderError
from segmentation.mask_classes import ClassesFileError
from segmentation.mask_decoder import MaskValueError
from tests.test_segmentation_folder import edit_mask, first_mask, make, set_corner, set_up, write_png

# ---------------------------------------------------------------------------------------------- bad input
BAD_DATA = {
    # name: (dataset form, change -> the path the error names, the text it must contain, error type)
    "index value beyond the classes": ({}, lambda r: edit_mask(r, lambda v: set_corner(v, 7)),
                                       "mask values 7 (4 pixels) are not in the classes file", MaskFolderError),
    "colour not in the classes file": ({"mask_format": "color"},
                                       lambda r: edit_mask(r, lambda v: set_corner(v, (1, 2, 3))),
                                       "mask colours [1, 2, 3] (4 pixels) are not in the classes file",
                                       MaskFolderError),
    "colour mask read as index": ({"mask_format": "color", "_read_as": "index"}, first_mask,
                                  "mask has mode RGB; index masks are single-channel PNGs", MaskFolderError),
    "index mask read as colour": ({"_read_as": "color"}, first_mask,
                                  "mask has mode L; colour masks are RGB PNGs", MaskFolderError),
    "size mismatch": ({}, lambda r: edit_mask(r, lambda v: v[:, :40]), "is 64x32 (WxH) but its mask",
                      MaskFolderError),
    "image without mask": ({}, lambda r: (first_mask(r).unlink(), sorted((r / "images/train").glob("*"))[0])[1],
                           ": no mask (expected", MaskFolderError),
    "mask without image": ({}, lambda r: (sorted((r / "images/train").glob("*"))[0].unlink(), first_mask(r))[1],
                           ": mask without an image", MaskFolderError),
    "JPEG mask": ({}, lambda r: (Image.open(first_mask(r)).save(first_mask(r).with_suffix(".jpg")),
                                 first_mask(r).with_suffix(".jpg"))[1], "masks must be PNG", MaskFolderError),
    "corrupt mask": ({}, lambda r: (first_mask(r).write_bytes(b"not a png"), first_mask(r))[1],
                     "not a readable mask", MaskFolderError),
    "truncated mask": ({}, lambda r: (first_mask(r).write_bytes(first_mask(r).read_bytes()[:-30]),
                                      first_mask(r))[1], "corrupt or truncated label image", MaskFolderError),
    "corrupt image": ({}, lambda r: (sorted((r / "images/train").glob("*"))[0].write_bytes(b"junk"),
                                     sorted((r / "images/train").glob("*"))[0])[1],
                      "not a readable image", MaskFolderError),
    "list entry without image": ({"layout": "lists"}, lambda r: (r / "train.txt").write_text("train_0000\nnope\n")
                                 and r / "train.txt", ":2: 'nope' names no image", MaskFolderError),
    "list entry twice": ({"layout": "lists"}, lambda r: (r / "train.txt").write_text("train_0000\ntrain_0000.jpg\n")
                         and r / "train.txt", ":2: 'train_0000.jpg' is listed twice (first at line 1)",
                         MaskFolderError),
    "no classes file": ({}, lambda r: (r / "classes.yaml").unlink() or r, "no classes file", ClassesFileError),
    "duplicated class names": ({}, lambda r: (r / "classes.yaml").write_text("classes: [road, Road, sky]\n")
                               and r / "classes.yaml", "class names occur more than once: 'road'", ClassInfoError),
    "colour masks without colours": ({"mask_format": "color"},
                                     lambda r: (r / "classes.yaml").write_text(
                                         "classes: [road, grass, water, sky, car]\n") and r / "classes.yaml",
                                     "mask_format is 'color' but the classes file gives no colours", MaskValueError),
    "unknown key": ({}, lambda r: (r / "classes.yaml").write_text("classes: [a]\nignore_value: 0\n")
                    and r / "classes.yaml", "unknown keys ['ignore_value']", ClassesFileError),
    "ignore value is a class": ({}, lambda r: (r / "classes.yaml").write_text("classes: [a, b]\nignore_index: 1\n")
                                and r / "classes.yaml", "ignore_index 1 is the index of class 'b'",
                                ClassesFileError),
    "malformed colour": ({}, lambda r: (r / "classes.yaml").write_text(
        "classes:\n  - {name: a, color: [1, 2]}\n") and r / "classes.yaml", "class 0 ('a'): a colour is [r, g, b]",
                         ClassesFileError),
    "one colour for two classes": ({}, lambda r: (r / "classes.yaml").write_text(
        "classes:\n  - {name: a, color: [1, 2, 3]}\n  - {name: b, color: [1, 2, 3]}\n") and r / "classes.yaml",
                                   "classes 'a' and 'b' have the same colour", ClassesFileError),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_input_stops_set_up_naming_the_file_and_value(tmp_path: Path, case: str) -> None:
    form, change, text, error = BAD_DATA[case]
    form = dict(form)
    read_as = form.pop("_read_as", form.get("mask_format", "index"))
    root = make(tmp_path / "data", **form)
    named = change(root)
    with pytest.raises(error) as info:
        set_up(root, mask_format=read_as)
    message = str(info.value)
    assert str(named) in message and text in message, message


def test_val_batches_of_different_sizes_stop_set_up_naming_two_files(tmp_path: Path) -> None:
    root = make(tmp_path / "data")
    image, mask = sorted((root / "images/val").glob("*"))[1], sorted((root / "masks/val").glob("*"))[1]
    write_png(image, np.zeros((30, 60, 3), np.uint8))
    write_png(mask, np.zeros((30, 60), np.uint8))
    set_up(root, "validate")  # one image a batch: any sizes
    with pytest.raises(MaskFolderError, match=f"{image} is 60x30.*set val_batch_size: 1"):
        set_up(root, "validate", val_batch_size=2)


def test_a_truncated_image_is_named_when_read(tmp_path: Path) -> None:
    """Pixel data is decoded when a sample is read (as for Cityscapes): the error names the image."""
    root = make(tmp_path / "data")
    image = sorted((root / "images/val").glob("*"))[0]
    image.write_bytes(image.read_bytes()[:-200])
    dm = set_up(root, "validate")
    with pytest.raises(ImageReadError, match=str(image)):
        dm.val_set[0]


def test_size_check_sees_images_as_read_after_exif_rotation(tmp_path: Path) -> None:
    """A phone JPEG stored 64x32 with EXIF "rotate 90" is a 32x64 image: its 32x64 mask pairs, a 64x32 one not."""
    root = make(tmp_path / "data")
    image, mask = sorted((root / "images/val").glob("*"))[0], sorted((root / "masks/val").glob("*"))[0]
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    Image.fromarray(np.zeros((32, 64, 3), np.uint8)).save(image, exif=exif.tobytes())
    write_png(mask, np.zeros((64, 32), np.uint8))
    dm = set_up(root, "validate")
    assert tuple(dm.val_set[0][0].shape) == (3, 64, 32) and tuple(dm.val_set[0][1].shape) == (64, 32)
    write_png(mask, np.zeros((32, 64), np.uint8))
    with pytest.raises(MaskFolderError, match=f"{image} is 32x64 \\(WxH\\) but its mask {mask} is 64x32"):
        set_up(root, "validate")


def test_options_are_checked() -> None:
    for option, value in (("mask_format", "rgb"), ("on_unknown_value", "skip"), ("layout", "flat")):
        with pytest.raises(ValueError, match=option):
            MaskFolderDataModule(root="x", **{option: value})
