"""``lightning predict`` end to end, through the real entry point, for the three tasks.

One folder of generated images in mixed formats (RGB PNG, JPEG in a subfolder, grayscale PNG, CMYK
JPEG, 16-bit PNG) plus files that must be skipped and named (garbage with an image extension, a
truncated JPEG, an image above ``predict_max_pixels``) and one that is left out (a ``.txt``). The
written files must equal what the model gives for the same images and weights.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import lightning
import numpy as np
import pytest
import torch
from parity_utils import assert_input_dependent, assert_same_detections, calibrate_and_perturb, label_id_agreement
from PIL import Image

from mbv3_dense.data.image_io import read_image_rgb

ROOT = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"
GOOD = {"a": "a.png", "sub/b": "sub/b.jpg", "gray": "gray.png", "cmyk": "cmyk.jpg", "deep": "deep.png"}
SKIPPED = {"bad.jpg": "not an image", "trunc.jpg": "truncated or corrupt", "big.png": "too large"}
MAX_PIXELS = 40_000  # big.png (240 x 200) is above it, every good image below


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    (folder / "sub").mkdir()
    rng = np.random.default_rng(0)

    def scene(h: int, w: int) -> np.ndarray:  # smooth blobs: conv features differ between images
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 100 * np.sin(xx / rng.uniform(5, 20) + c) * np.cos(yy / rng.uniform(5, 20))
                        for c in range(3)], axis=-1)
        return np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8)

    Image.fromarray(scene(120, 160)).save(folder / "a.png")
    Image.fromarray(scene(90, 70)).save(folder / "sub/b.jpg", quality=95)
    Image.fromarray(scene(64, 96)[..., 0]).save(folder / "gray.png")
    Image.fromarray(scene(80, 80)).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(scene(72, 100)[..., 1].astype(np.uint16) * 257).save(folder / "deep.png")
    (folder / "bad.jpg").write_bytes(b"this is not an image")
    data = (folder / "sub/b.jpg").read_bytes()
    (folder / "trunc.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(scene(200, 240)).save(folder / "big.png")
    (folder / "notes.txt").write_text("not an image\n")
    assert Image.open(folder / "deep.png").mode.startswith("I;16")
    return folder


def save_ckpt(module: lightning.LightningModule, path: Path) -> Path:
    torch.save({"state_dict": module.state_dict(), "pytorch-lightning_version": lightning.__version__}, path)
    return path


def predict(config: str, ckpt: Path, images: Path, cwd: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(LIGHTNING), "predict", "-c", str(ROOT / "configs" / config), "--ckpt_path", str(ckpt),
           "--data.predict_images", str(images), "--data.predict_max_pixels", str(MAX_PIXELS),
           "--data.num_workers", "0", "--trainer.accelerator", "cpu",  # devices as the config says
           "--trainer.default_root_dir", str(cwd / "run"), *extra]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def check_common(proc: subprocess.CompletedProcess, out: Path, images: Path) -> dict:
    """Summary line and file, skipped files named with their reasons, the left-out file counted."""
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["written"] == len(GOOD) and summary["skipped"] == len(SKIPPED), summary
    assert summary["skipped_by_reason"] == {"not an image": 1, "truncated or corrupt": 1, "too large": 1}
    assert summary["converted"] == 2 and summary["ignored_not_images"] == 1  # CMYK, 16-bit; notes.txt
    assert f"{len(GOOD)} images written to {out}, {len(SKIPPED)} skipped" in text
    for name in SKIPPED:
        assert str(images / name) in text  # each skip is a warning naming the file
    for name in ("cmyk.jpg", "deep.png"):
        assert f"{images / name}: " in text and "converted" in text
    rows = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    skipped = {Path(r["file"]).name: r["reason"] for r in rows}
    assert skipped == SKIPPED
    return summary


def reference_image(images: Path, rel: str) -> torch.Tensor:
    return torch.from_numpy(read_image_rgb(images / rel)).permute(2, 0, 1).contiguous()


# ---------------------------------------------------------------------------------------------- classify
def test_classify(images: Path, tmp_path: Path):
    from mbv3_dense import mobilenet_v3_small
    from mbv3_dense.classification.data import eval_transform
    from mbv3_dense.classification.module import ClassificationModule

    torch.manual_seed(0)
    net = mobilenet_v3_small(num_classes=7, width_mult=0.5)
    with torch.no_grad():
        calibrate_and_perturb(net, torch.randn(6, 3, 64, 64), seed=1)
    module = ClassificationModule(model=net, ema_decay=0.99)  # the config keeps an average: predict uses it
    with torch.no_grad():
        for p in module.model_ema.parameters():
            p.mul_(1.1)
    ckpt = save_ckpt(module, tmp_path / "cls.ckpt")
    root = tmp_path / "data"  # class names from the training folders
    names = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu"]
    for name in names:
        (root / "train" / name).mkdir(parents=True)
    proc = predict("mobilenet_v3_small_imagenet.yaml", ckpt, images, tmp_path,
                   "--model.model.init_args.num_classes", "7", "--model.model.init_args.width_mult", "0.5",
                   "--data.root", str(root), "--data.batch_size", "2", "--data.crop_size", "64",
                   "--data.val_resize_size", "72")
    out = tmp_path / "run/predictions"
    check_common(proc, out, images)
    assert "predict: one device (the config asks for devices=auto" in proc.stderr  # one process writes
    assert "[predict] done in" in proc.stdout and "\r" not in proc.stdout  # piped: progress as lines

    rows = {r["name"]: r for r in map(json.loads, (out / "classifications.jsonl").read_text().splitlines())}
    assert set(rows) == set(GOOD)
    transform = eval_transform(resize_size=72, crop_size=64)
    model = module.model_ema.eval()
    refs = {}
    for name, rel in GOOD.items():
        with torch.no_grad():
            crop = transform(reference_image(images, rel))[None]  # uint8: the model normalises
            refs[name] = model(model.normalize(crop.float() / 255)).softmax(1)[0]
        row = rows[name]
        assert (row["width"], row["height"]) == Image.open(images / rel).size
        top = row["top5"]
        assert len(top) == 5
        ref_top = refs[name].topk(5).values
        np.testing.assert_allclose([t["probability"] for t in top], ref_top, atol=2e-5)
        for t in top:  # tie-proof: each named class has the reference's probability
            assert abs(refs[name][t["index"]].item() - t["probability"]) < 2e-5
            assert t["class"] == names[t["index"]]
        assert (out / "pictures" / f"{name}.jpg").is_file()
        with Image.open(out / "pictures" / f"{name}.jpg") as pic:
            assert pic.size == Image.open(images / rel).size
    assert_input_dependent(refs["a"], refs["gray"], min_diff=1e-4)

    # A second run over the same output refuses, naming the folder; overwrite replaces.
    again = predict("mobilenet_v3_small_imagenet.yaml", ckpt, images, tmp_path,
                    "--model.model.init_args.num_classes", "7", "--model.model.init_args.width_mult", "0.5",
                    "--data.root", str(root), "--data.crop_size", "64", "--data.val_resize_size", "72",
                    "--writer.pictures", "false")
    assert again.returncode != 0 and f"{out}: holds the results of an earlier run" in again.stderr
    assert len(list((out / "pictures").glob("*.jpg"))) == 4  # untouched (a, gray, cmyk, deep; sub/b below)


# ---------------------------------------------------------------------------------------------- detect
def test_detect(images: Path, tmp_path: Path):
    from detection import ssdlite_mobilenet_v3_small
    from detection.module import DetectionModule

    torch.manual_seed(0)
    net = ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5, detections_per_img=50)
    with torch.no_grad():
        calibrate_and_perturb(net, net.normalize(torch.rand(4, 3, 320, 320)), seed=2)
    ckpt = save_ckpt(DetectionModule(model=net), tmp_path / "det.ckpt")
    root = tmp_path / "coco"  # categories of the training annotations: ids 1, 3, 18, 44 (contiguous labels)
    (root / "annotations").mkdir(parents=True)
    categories = [{"id": i, "name": n} for i, n in ((1, "disc"), (3, "square"), (18, "triangle"), (44, "ring"))]
    (root / "annotations/instances_val2017.json").write_text(
        json.dumps({"images": [], "annotations": [], "categories": categories}))
    proc = predict("ssdlite_mobilenet_v3_small_coco.yaml", ckpt, images, tmp_path,
                   "--model.model.init_args.num_classes", "5", "--model.model.init_args.width_mult", "0.5",
                   "--model.model.init_args.detections_per_img", "50", "--data.num_classes", "5",
                   "--data.root", str(root), "--data.val_batch_size", "1")
    out = tmp_path / "run/predictions"
    check_common(proc, out, images)

    label_to_id = {1: 1, 2: 3, 3: 18, 4: 44}
    names = {c["id"]: c["name"] for c in categories}
    results = json.loads((out / "coco_results.json").read_text())
    by_image: dict[int, list] = {}
    for r in results:
        by_image.setdefault(r["image_id"], []).append(r)
    net.eval()
    total = 0
    for name, rel in GOOD.items():
        record = json.loads((out / "detections" / f"{name}.json").read_text())
        assert record["file"] == str(images / rel)
        assert (record["width"], record["height"]) == Image.open(images / rel).size
        with torch.no_grad():
            ref = net.predict([reference_image(images, rel).float() / 255])[0]
        dets = record["detections"]
        assert len(dets) > 0
        got = {"boxes": torch.tensor([d["box_xyxy"] for d in dets]).reshape(-1, 4),
               "scores": torch.tensor([d["score"] for d in dets]), "labels": torch.tensor([d["label"] for d in dets])}
        assert_same_detections(got, ref, box_atol=2e-3, score_atol=2e-5)
        assert all(d["category_id"] == label_to_id[d["label"]] and d["class"] == names[d["category_id"]]
                   for d in dets)
        # The COCO results hold the same detections: XYWH, category ids, this image's id.
        coco = by_image[record["image_id"]]
        got_coco = {"boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h in (r["bbox"] for r in coco)]),
                    "scores": torch.tensor([r["score"] for r in coco]),
                    "labels": torch.tensor([[k for k, v in label_to_id.items() if v == r["category_id"]][0]
                                            for r in coco])}
        assert_same_detections(got_coco, ref, box_atol=2e-3, score_atol=2e-5)
        total += len(dets)
        assert (out / "pictures" / f"{name}.jpg").is_file()
    assert len(results) == total and len(by_image) == len(GOOD)


# ---------------------------------------------------------------------------------------------- segment
def test_segment(images: Path, tmp_path: Path):
    from segmentation import lraspp_mobilenet_v3_small
    from segmentation.module import SegmentationModule

    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_small(width_mult=0.5)
    with torch.no_grad():
        calibrate_and_perturb(net, torch.randn(2, 3, 96, 128), seed=3)
    ckpt = save_ckpt(SegmentationModule(model=net), tmp_path / "seg.ckpt")
    proc = predict("lraspp_mobilenet_v3_small_cityscapes.yaml", ckpt, images, tmp_path,
                   "--model.model.init_args.width_mult", "0.5", "--data.root", str(tmp_path / "none"),
                   "--data.val_batch_size", "2")
    out = tmp_path / "run/predictions"
    check_common(proc, out, images)

    net.eval()
    seen = set()
    for name, rel in GOOD.items():
        with Image.open(out / "labelIds" / f"{name}.png") as png:
            assert png.mode == "L"
            written = np.asarray(png)
        image = reference_image(images, rel)
        assert written.shape == tuple(image.shape[-2:])  # full size
        # Equal, except where the two best classes tie to 1e-4 (e.g. another thread count's sums).
        assert label_id_agreement(net, image, written, tie=1e-4) > 0.999
        seen |= set(np.unique(written).tolist())
        with Image.open(out / "overlays" / f"{name}.jpg") as overlay:
            assert overlay.size == (image.shape[-1], image.shape[-2])
    assert len(seen) > 1  # the comparison would prove little on a constant map


def test_segmentation_eval_transform_keeps_the_pixels():
    from segmentation import lraspp_mobilenet_v3_small
    from segmentation.transforms import eval_transform

    image = np.random.default_rng(1).integers(0, 256, (33, 47, 3), dtype=np.uint8)
    frame, _ = eval_transform()(image, image[..., 0], random.Random(0))  # uint8, normalised on the device
    net = lraspp_mobilenet_v3_small()
    ref = net.normalize(frame.float() / 255)
    got = net.normalize(torch.from_numpy(image).permute(2, 0, 1).float() / 255)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)


def test_empty_folder_is_an_error_naming_it(tmp_path: Path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no images here")
    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "predict", "-c",
                           str(ROOT / "configs/lraspp_mobilenet_v3_small_cityscapes.yaml"),
                           "--data.root", str(tmp_path),
                           "--data.predict_images", str(empty), "--trainer.accelerator", "cpu",
                           "--trainer.devices", "1", "--trainer.default_root_dir", str(tmp_path / "run")],
                          cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode != 0
    assert f"{empty}: no image files to predict on" in proc.stderr
