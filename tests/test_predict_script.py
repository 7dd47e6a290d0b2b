"""``scripts/predict.py``: the same writers as ``lightning predict``, on the deployment backends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from parity_utils import calibrate_and_perturb, label_id_agreement
from PIL import Image

from mbv3_dense.data.image_io import read_image_rgb

ROOT = Path(__file__).resolve().parents[1]


def make_images(folder: Path) -> Path:
    rng = np.random.default_rng(5)
    (folder / "nested").mkdir(parents=True)
    for name, (h, w) in (("one.png", (60, 80)), ("nested/two.jpg", (50, 40)), ("three.png", (70, 70))):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([128 + 90 * np.sin(xx / rng.uniform(4, 12) + c) for c in range(3)], -1)
        img += 20 * np.cos(yy / 7)[..., None]
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / name)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    return folder


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts/predict.py"), *args], cwd=ROOT, capture_output=True,
                          text=True)


def test_classify_onnxruntime_matches_the_model(tmp_path: Path):
    from mbv3_dense import mobilenet_v3_small
    from mbv3_dense.classification.transforms import eval_transform

    images = make_images(tmp_path / "in")
    torch.manual_seed(0)
    net = mobilenet_v3_small(num_classes=6, width_mult=0.5)
    with torch.no_grad():
        calibrate_and_perturb(net, torch.randn(4, 3, 64, 64), seed=4)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    names = tmp_path / "names.txt"
    names.write_text("\n".join(f"class_{i}" for i in range(6)) + "\n")
    out = tmp_path / "out"
    args = ["--task", "classify", "--arch", "small", "--width-mult", "0.5", "--num-classes", "6", "--weights",
            str(tmp_path / "w.pth"), "--images", str(images), "--out", str(out), "--backend", "onnxruntime",
            "--image-size", "64", "--resize-size", "72", "--batch-size", "2", "--class-names", str(names)]
    proc = run(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"3 images written to {out}, 1 skipped (1 not an image)" in proc.stdout
    assert str(images / "broken.png") in proc.stderr
    rows = {r["name"]: r for r in map(json.loads, (out / "classifications.jsonl").read_text().splitlines())}
    assert set(rows) == {"one", "nested/two", "three"}
    transform = eval_transform(resize_size=72, crop_size=64)
    for name, row in rows.items():
        path = next(images.glob(f"{name}.*"))
        with torch.no_grad():
            crop = transform(torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1))[None]
            ref = net(net.normalize(crop.float() / 255)).softmax(1)[0]
        for t in row["top5"]:
            assert abs(ref[t["index"]].item() - t["probability"]) < 1e-4
            assert t["class"] == f"class_{t['index']}"
        np.testing.assert_allclose([t["probability"] for t in row["top5"]], ref.topk(5).values, atol=1e-4)
    assert (out / "pictures/nested/two.jpg").is_file()
    again = run(*args)
    assert again.returncode == 2 and f"{out}: holds the results of an earlier run" in again.stderr


def test_segment_torch_backend_writes_full_size_label_ids(tmp_path: Path):
    from segmentation import lraspp_mobilenet_v3_small

    images = make_images(tmp_path / "in")
    torch.manual_seed(0)
    net = lraspp_mobilenet_v3_small(width_mult=0.5)
    with torch.no_grad():
        calibrate_and_perturb(net, torch.randn(2, 3, 64, 64), seed=5)
    torch.save(net.state_dict(), tmp_path / "w.pth")
    out = tmp_path / "out"
    proc = run("--task", "segment", "--arch", "small", "--width-mult", "0.5", "--weights", str(tmp_path / "w.pth"),
               "--images", str(images), "--out", str(out), "--no-pictures")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "overlays").exists()
    agree = []
    for rel in ("one.png", "nested/two.jpg", "three.png"):
        image = torch.from_numpy(read_image_rgb(images / rel)).permute(2, 0, 1)
        written = np.asarray(Image.open(out / "labelIds" / (rel.rsplit(".", 1)[0] + ".png")))
        assert written.shape == tuple(image.shape[-2:])
        # BN folded into the convs: a pixel may flip where the two best classes nearly tie, and nowhere else.
        agree.append(label_id_agreement(net, image, written, tie=1e-3))
    assert min(agree) > 0.999, agree


def test_empty_folder_names_it(tmp_path: Path):
    (tmp_path / "nothing").mkdir()
    proc = run("--task", "detect", "--weights", "unused.pth", "--images", str(tmp_path / "nothing"), "--out",
               str(tmp_path / "out"))
    assert proc.returncode == 2 and f"{tmp_path / 'nothing'}: no image files to predict on" in proc.stderr
