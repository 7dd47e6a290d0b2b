"""The throughput pipeline: Cityscapes' crop-before-resize against resize-then-crop, the decoders against
PIL, uint8 batches normalised after transfer, and the loaders' worker threads."""

from __future__ import annotations

import io
import random
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import mbv3_dense
from mbv3_dense.classification.data import ClassificationBatch
from mbv3_dense.classification.module import ClassificationModule
from mbv3_dense.classification.transforms import ERASE_FILL
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.data.image_io import ImageReadError, read_image_rgb, read_label_png
from mbv3_dense.data.sampling import train_loader, worker_init
from segmentation.transforms import CropDraw, ScaleCropFlip


# ---------------------------------------------------------------------------------------------- crop before resize
def resize_first(crop_size: tuple[int, int], scale_range: tuple[float, float], hflip: bool) -> A.Compose:
    """The pipeline ScaleCropFlip replaces: the whole frame resized, padded, cropped, flipped."""
    low, high = scale_range
    return A.Compose([
        A.RandomScale(scale_limit=(low - 1.0, high - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_size[0], min_width=crop_size[1], position="random",
                      border_mode=cv2.BORDER_CONSTANT, fill=0, fill_mask=255),
        A.RandomCrop(height=crop_size[0], width=crop_size[1]),
        A.HorizontalFlip(p=0.5 if hflip else 0.0),
    ], save_applied_params=True)


def street(height: int, width: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A smooth image with edges and noise, and a blocky mask of 19 ids."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    image = cv2.resize(small, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image = np.clip(image + rng.integers(-20, 21, image.shape), 0, 255).astype(np.uint8)
    mask = cv2.resize(rng.integers(0, 19, (height // 8, width // 8), dtype=np.uint8), (width, height),
                      interpolation=cv2.INTER_NEAREST)
    return image, mask


def paired_generators(seed: int) -> tuple[random.Random, random.Random]:
    """The same stream twice; the first is the old pipeline's, whose Compose draws once before its transforms."""
    old, new = random.Random(seed), random.Random(seed)
    new.random()
    return old, new


def old_draw(result: dict) -> CropDraw:
    """The draw the resize-first pipeline made, from the parameters it applied."""
    params = {name: p for name, p in result["applied_transforms"]}
    pad = params["PadIfNeeded"]
    x_min, y_min = params["RandomCrop"]["crop_coords"][:2]
    return CropDraw(params["RandomScale"]["scale"], y_min - pad["pad_top"], x_min - pad["pad_left"],
                    "HorizontalFlip" in params)


@pytest.mark.parametrize(("height", "width", "crop", "scales", "hflip"), [
    (96, 160, (61, 61), (0.5, 2.0), True),
    (40, 200, (64, 48), (0.25, 3.0), True),  # padding in height, crops in width
    (96, 160, (61, 77), (0.5, 2.0), False),
])
def test_every_draw_is_the_resize_first_pipelines_draw(height, width, crop, scales, hflip):
    """Fed the same random stream, both pipelines draw the same scale, padding, crop and flip, and leave
    the stream in the same state: the distributions are the same because every draw is."""
    old, new = resize_first(crop, scales, hflip), ScaleCropFlip(crop_size=crop, scale_range=scales, hflip=hflip)
    image, mask = street(height, width)
    flips = 0
    for seed in range(300):
        old_rng, new_rng = paired_generators(seed)
        old.set_random_state(np.random.default_rng(seed), old_rng)
        expected = old_draw(old(image=image, mask=mask))
        draw = new.draw(height, width, new_rng)
        assert draw == expected, seed
        assert old_rng.random() == new_rng.random()
        flips += draw.flip
    assert (flips == 0) if not hflip else 100 < flips < 200


def test_scale_and_position_distributions_match_the_protocol():
    """Many draws at Cityscapes' size: scales uniform in [0.5, 2], crops anywhere in the (padded) frame.

    A Kolmogorov-Smirnov bound on the scales and the crop's relative position against uniform.
    """
    transform = ScaleCropFlip()
    rng = random.Random(0)
    draws = [transform.draw(1024, 2048, rng) for _ in range(4000)]
    scales = np.sort([d.scale for d in draws])
    ks = np.abs(scales - (0.5 + 1.5 * np.arange(1, len(scales) + 1) / len(scales))).max()
    assert ks < 1.63 * 1.5 / np.sqrt(len(scales))  # 1% level, in scale units
    # Where the scaled frame is wider than the crop, the crop's left edge is uniform over the free room.
    position = np.sort([d.left / (int(2048 * d.scale) - 769) for d in draws if int(2048 * d.scale) > 769])
    ks = np.abs(position - np.arange(1, len(position) + 1) / len(position)).max()
    assert ks < 1.63 / np.sqrt(len(position))


@pytest.mark.parametrize(("height", "width", "crop", "seeds"), [(96, 160, (61, 61), range(60)),
                                                                 (1024, 2048, (769, 769), range(3))])
def test_output_is_resize_then_crop(height, width, crop, seeds):
    """For the same draw, the image matches resize-whole-then-crop to within OpenCV's fixed-point rounding
    (one grey level) and the mask exactly, padding included."""
    old, new = resize_first(crop, (0.5, 2.0), True), ScaleCropFlip(crop_size=crop, scale_range=(0.5, 2.0))
    image, mask = street(height, width, seed=1)
    for seed in seeds:
        old_rng, new_rng = paired_generators(seed)
        old.set_random_state(np.random.default_rng(seed), old_rng)
        expected = old(image=image, mask=mask)
        out_image, out_mask = new(image, mask, new_rng)
        assert out_image.dtype == torch.uint8 and out_image.shape == (3, *crop)
        difference = np.abs(out_image.permute(1, 2, 0).numpy().astype(np.int16) - expected["image"])
        assert difference.max() <= 1 and difference.mean() < 0.3, seed
        assert np.array_equal(out_mask, expected["mask"]), seed


def test_padding_holds_fill_values_where_the_crop_leaves_the_frame():
    transform = ScaleCropFlip(crop_size=(50, 60), fill_mask=7)
    image, mask = np.full((20, 30, 3), 200, np.uint8), np.full((20, 30), 3, np.uint8)
    out_image, out_mask = transform.apply(image, mask, CropDraw(1.0, -10, -5, flip=False))
    assert (out_image[:, 10:30, 5:35] == 200).all() and out_image.sum() == 200 * 3 * 20 * 30
    assert (out_mask[10:30, 5:35] == 3).all() and (out_mask == 7).sum() == 50 * 60 - 20 * 30
    flipped = transform.apply(image, mask, CropDraw(1.0, -10, -5, flip=True))[1]
    assert np.array_equal(flipped, out_mask[:, ::-1])


# ---------------------------------------------------------------------------------------------- decoders
def _encode(array: np.ndarray, fmt: str, mode: str | None = None, **options) -> bytes:
    buffer = io.BytesIO()
    image = Image.fromarray(array)
    (image.convert(mode) if mode else image).save(buffer, fmt, **options)
    return buffer.getvalue()


def _pil_reference(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        img.load()
        return np.asarray(ImageOps.exif_transpose(img).convert("RGB"))


@pytest.mark.parametrize(("name", "fmt", "mode"), [
    ("rgb.jpg", "JPEG", None), ("grey.jpg", "JPEG", "L"), ("cmyk.jpg", "JPEG", "CMYK"), ("rgb.png", "PNG", None),
    ("grey.png", "PNG", "L"), ("rgba.png", "PNG", "RGBA"), ("palette.png", "PNG", "P"), ("la.png", "PNG", "LA"),
    ("rgb.webp", "WEBP", None), ("rgb.bmp", "BMP", None),
])
def test_fast_decoder_gives_pils_pixels(tmp_path: Path, name: str, fmt: str, mode: str | None) -> None:
    image, _ = street(48, 64)
    path = tmp_path / name
    path.write_bytes(_encode(image, fmt, mode, **({"quality": 90} if fmt == "JPEG" else {})))
    assert np.array_equal(read_image_rgb(path), _pil_reference(path))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied_by_both_decoders(tmp_path: Path, fmt: str) -> None:
    image, _ = street(32, 48)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"rotated.{fmt.lower()}"
    path.write_bytes(_encode(image, fmt, exif=exif.tobytes()))
    out = read_image_rgb(path)
    assert out.shape == (48, 32, 3) and np.array_equal(out, _pil_reference(path))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("cut", [0.5, 0.9, 0.99])
def test_truncated_files_raise_naming_the_file(tmp_path: Path, fmt: str, cut: float) -> None:
    image, _ = street(64, 96)
    data = _encode(image, fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[:int(len(data) * cut)])
    with pytest.raises(ImageReadError, match=str(path)):
        read_image_rgb(path)


def test_label_png_fast_path_and_refusals(tmp_path: Path) -> None:
    ids = (np.arange(24 * 40) % 34).astype(np.uint8).reshape(24, 40)
    Image.fromarray(ids).save(tmp_path / "ids.png")
    assert np.array_equal(read_label_png(tmp_path / "ids.png"), ids)
    data = (tmp_path / "ids.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageReadError, match="cut.png"):
        read_label_png(tmp_path / "cut.png")
    Image.fromarray(np.zeros((4, 6, 3), np.uint8)).save(tmp_path / "colour.png")
    with pytest.raises(ImageReadError, match="colour.png"):
        read_label_png(tmp_path / "colour.png")


# ---------------------------------------------------------------------------------------------- uint8 batches
def test_batches_are_normalised_after_transfer_with_the_networks_normalize():
    module = ClassificationModule(model=mbv3_dense.mobilenet_v3_small(num_classes=3, width_mult=0.5))
    images = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    batch = module.on_after_batch_transfer(ClassificationBatch(images, torch.tensor([0, 1]), torch.tensor(0)), 0)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert isinstance(batch, ClassificationBatch) and batch.images.dtype == torch.float32
    torch.testing.assert_close(batch.images, (images.float() / 255 - mean) / std)
    floats = torch.randn(2, 3, 8, 8)  # already the network's input: left alone
    assert module.on_after_batch_transfer(ClassificationBatch(floats, batch.labels, batch.skipped), 0).images is floats


def test_erasing_fill_is_the_normalised_zero():
    fill = (torch.tensor(ERASE_FILL, dtype=torch.float32) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(
        IMAGENET_STD)
    assert fill.abs().max() < 0.5 / 255 / min(IMAGENET_STD)


def test_workers_run_one_thread_each():

    class Probe(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, key) -> torch.Tensor:
            return torch.tensor([torch.get_num_threads(), cv2.getNumThreads()])

    before = (torch.get_num_threads(), cv2.getNumThreads())
    loader = train_loader(Probe(), trainer=None, batch_size=2, num_workers=1)
    assert loader.worker_init_fn is worker_init
    batch = next(iter(loader))
    assert batch[:, 0].tolist() == [1, 1] and batch[:, 1].tolist() == [1, 1]  # cv2 reports 1 with no pool
    assert (torch.get_num_threads(), cv2.getNumThreads()) == before  # the main process keeps its threads
