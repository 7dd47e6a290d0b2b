"""Image and mask folders through the entry points a user runs: ``lightning fit`` and ``lightning predict``
with the Cityscapes config and ``--data segmentation.folder.MaskFolderDataModule``, and the one-seed-one-run
guarantees of tests/test_determinism.py for the folder module (0 vs 2 workers, SIGKILL and resume)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image
from test_determinism import Case, assert_resumes_after_sigkill, assert_same_training_state, final_state, tiny_config

from mbv3_dense.checkpoints.model_record import build_from_record, read_model_record
from mbv3_dense.data.image_io import read_image_rgb
from segmentation.synthetic import MaskFolderSpec, folder_class_color, generate_mask_folders

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("road", "grass", "water", "building", "sky", "car")
FOLDERS = "segmentation.folder.MaskFolderDataModule"


def test_fit_validate_and_predict_with_a_classes_file(lightning, tmp_path: Path) -> None:
    data = tmp_path / "data"
    generate_mask_folders(data, MaskFolderSpec(height=64, width=128, train_images=4, val_images=2, classes=CLASSES,
                                               seed=1))
    run, logs = tmp_path / "run", tmp_path / "logs"
    lightning("fit", "-c", str(ROOT / "configs/lraspp_cityscapes.yaml"), "-c", str(ROOT / "configs/demo/segment.yaml"),
              "--data", FOLDERS, "--data.root", str(data), "--data.crop_size", "[64, 64]", "--data.batch_size", "2",
              "--data.val_batch_size", "2", "--data.num_workers", "0", "--trainer.max_steps", "4",
              "--trainer.val_check_interval", "2", "--trainer.callbacks.init_args.input_size", "[64, 128]",
              "--trainer.default_root_dir", str(run), "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
              "--trainer.logger.save_dir", str(logs), cwd=tmp_path)
    rows = list(csv.DictReader(next(logs.glob("**/metrics.csv")).open()))
    columns = {c for row in rows for c, v in row.items() if v}
    assert {c for c in columns if c.startswith("val/iou/")} == {f"val/iou/{name}" for name in CLASSES}
    assert 0.0 < float(next(r["val/miou"] for r in rows if r.get("val/miou"))) <= 1.0

    ckpt = run / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    record = read_model_record(saved, ckpt)
    assert record["init_args"]["num_classes"] == len(CLASSES)  # the network follows the classes file

    lightning("predict", "-c", str(ROOT / "configs/lraspp_cityscapes.yaml"), "--data", FOLDERS,
              "--data.root", str(data), "--data.predict_images", str(data / "images" / "val"),
              "--data.num_workers", "0", "--trainer.accelerator", "cpu", "--ckpt_path", str(ckpt),
              "--trainer.default_root_dir", str(run), cwd=tmp_path)
    out = run / "predictions"
    assert not (out / "labelIds").exists()
    net = build_from_record(record, ckpt)
    net.load_state_dict({k[len("model."):]: v for k, v in saved["state_dict"].items() if k.startswith("model.")})
    net.eval()
    colors = [c for name in CLASSES for c in folder_class_color(name)]
    for image_path in sorted((data / "images" / "val").glob("*.jpg")):
        with Image.open(out / "labels" / f"{image_path.stem}.png") as png:
            assert png.mode == "P" and png.getpalette()[:len(colors)] == colors  # the classes file's colours
            written = np.asarray(png)
        image = torch.from_numpy(read_image_rgb(image_path)).permute(2, 0, 1)
        with torch.no_grad():
            logits = net(net.normalize(image.float() / 255)[None])[0]
        # Equal to the network's argmax, except where its two best classes tie to 1e-4 (sums in another order).
        top2 = logits.topk(2, dim=0)
        near_tie = (top2.values[0] - top2.values[1] < 1e-4).numpy()
        assert ((written == top2.indices[0].numpy()) | (near_tie & (written == top2.indices[1].numpy()))).all()
        with Image.open(out / "overlays" / f"{image_path.stem}.jpg") as overlay:
            assert overlay.size == (128, 64)


# ---------------------------------------------------------------------------------------------- one seed, one run
def _folder_data(root: Path) -> Path:
    generate_mask_folders(root, MaskFolderSpec(height=64, width=128, train_images=8, val_images=1, seed=3,
                                               classes=CLASSES, mask_format="color", layout="lists"))
    return root


def _folder(cfg: dict) -> None:
    cfg["trainer"].update(max_steps=-1, check_val_every_n_epoch=1)
    cfg["data"] = {"class_path": FOLDERS, "init_args": {
        "mask_format": "color", "batch_size": 2, "val_batch_size": 1, "crop_size": [64, 64],
        "scale_range": [0.5, 2.0], "hflip": True}}


FOLDER_CASE = Case("configs/lraspp_mobilenet_v3_small_cityscapes.yaml", _folder_data, _folder, steps_per_epoch=4)


def test_one_seed_one_run_any_workers_and_after_sigkill(tmp_path: Path) -> None:
    """The folder module's augmentation is drawn from (seed, epoch, index) as Cityscapes': 0 and 2 workers give
    bit-identical weights, and a run killed mid-epoch and resumed ends where the uninterrupted one does."""
    case = FOLDER_CASE
    data = case.make_data(tmp_path / "data")
    config = tiny_config(case, data, tmp_path / "c.yaml", workers=0)
    assert yaml.safe_load(config.read_text())["data"]["class_path"] == FOLDERS
    finals = {workers: final_state(case, data, tmp_path / f"workers{workers}", workers=workers) for workers in (0, 2)}
    reference = finals[2]
    assert reference["global_step"] == 2 * case.steps_per_epoch
    assert reference["state_dict"]["model.head.low_classifier.weight"].shape[0] == len(CLASSES)
    assert_same_training_state(finals[0], reference, "0 workers vs 2")
    assert_resumes_after_sigkill(case, data, tmp_path / "killed", reference, "resumed after SIGKILL vs uninterrupted")
