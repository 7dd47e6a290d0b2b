"""Evaluation never double counts under DDP: detection mAP of 2 gloo processes over an odd number of images
equals one process's (through `lightning validate`); classification validation uses an unpadded sampler."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from parity_utils import calibrate_and_perturb

from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.classification.data import ImageFolderDataModule
from mbv3_dense.classification.synthetic import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = str(Path(sys.executable).parent / "lightning")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def validate_map(root: Path, ckpt: Path, workdir: Path, devices: int) -> dict[str, float]:
    logs = workdir / f"logs{devices}"
    extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if devices == 2 else ["--trainer.devices", "1"]
    proc = subprocess.run(
        [LIGHTNING, "validate", "-c", str(REPO / "configs/ssdlite_mobilenet_v3_small_coco.yaml"),
         "--data.root", str(root), "--data.num_classes", "5", "--data.num_workers", "0", "--data.val_batch_size", "2",
         "--model.model.init_args.num_classes", "5", "--model.model.init_args.width_mult", "0.5",
         "--trainer.accelerator", "cpu", *extra, "--ckpt_path", str(ckpt),
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs)],
        cwd=workdir, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    rows = list(csv.DictReader(next(logs.glob("**/metrics.csv")).open()))
    row = next(r for r in rows if r.get("val/map"))
    return {k: float(row[k]) for k in ("val/map", "val/map_50", "val/map_small", "val/loss", "val/cls_loss")}


def test_detection_ddp_validation_counts_each_image_once(tmp_path: Path) -> None:
    generate_coco(tmp_path / "coco", DetectionSpec(train_images=2, val_images=5, min_side=96, max_side=128,
                                                   min_object=40, max_object=90, max_objects=2, empty_fraction=0.0,
                                                   crowd_fraction=0.0, seed=3))  # 5 images: padding repeats one
    from detection import ssdlite_mobilenet_v3_small

    torch.manual_seed(0)
    model = ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5)
    # An input-dependent network with distinct scores: a default-initialised one scores every image alike (ties
    # make mAP depend on the image order) and its zero class head gives every box the same score.
    calibrate_and_perturb(model, torch.rand(4, 3, 320, 320) * 2 - 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith("cls_head"):
                param.normal_(0.0, 0.02)
    ckpt = tmp_path / "model.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "pytorch-lightning_version": "2.6.6"}, ckpt)
    one = validate_map(tmp_path / "coco", ckpt, tmp_path, devices=1)
    two = validate_map(tmp_path / "coco", ckpt, tmp_path, devices=2)
    assert one["val/map_50"] > 0, one  # an untrained network still matches a few boxes: the comparison means something
    for key in ("val/map", "val/map_50", "val/map_small"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), (key, one, two)
    # The SSD loss is normalised by the positive anchors of a batch, so it depends (slightly) on how the images
    # are grouped into batches, which differs between one and two processes.
    for key in ("val/loss", "val/cls_loss"):
        assert two[key] == pytest.approx(one[key], rel=1e-3), (key, one, two)


def test_classification_validation_sampler_is_unpadded(tmp_path: Path) -> None:
    root = write_imagefolder(tmp_path, num_classes=2, train_per_class=2, val_per_class=3, size=32, seed=0)
    dm = ImageFolderDataModule(root=root, batch_size=2, num_workers=0, crop_size=32, val_resize_size=32)
    dm.setup("validate")
    shards = []
    for rank in range(4):  # 6 images over 4 ranks: a padded sampler would hand out 8
        dm.trainer = SimpleNamespace(world_size=4, global_rank=rank)
        shards.append(list(dm.val_dataloader().sampler))
    assert sorted(i for s in shards for i in s) == list(range(6))
