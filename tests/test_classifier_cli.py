"""The pretraining command through the real entry point, on a tiny generated ImageFolder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"
SMALL = str(REPO / "configs/mobilenet_v3_small_imagenet.yaml")
LARGE = str(REPO / "configs/mobilenet_v3_large_imagenet.yaml")
DEMO = str(REPO / "configs/demo/classify.yaml")
# Shrinks the demo run to seconds: 3 classes, 32 px, a narrow network, no worker processes.
TINY = ["--model.init_args.model.init_args.num_classes", "3", "--model.init_args.model.init_args.width_mult",
        "0.5", "--data.num_workers", "0", "--data.batch_size", "4", "--data.crop_size", "32",
        "--data.val_resize_size", "32", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false"]


def test_print_config_carries_the_recipe(tmp_path: Path, lightning) -> None:
    out = lightning("fit", "-c", LARGE, "--data.root", "/data/imagenet", "--print_config", cwd=tmp_path).stdout
    for expected in ("torch.optim.RMSprop", "lr: 0.064", "alpha: 0.9", "eps: 0.0316", "momentum: 0.9",
                     "weight_decay: 1.0e-05", "torch.optim.lr_scheduler.StepLR", "step_size: 2", "gamma: 0.973",
                     "max_epochs: 600", "auto_augment: true", "random_erase: 0.2", "dropout: 0.2",
                     "ema_decay: 0.9999", "weight_decay_norm_bias: false", "root: /data/imagenet",
                     "mbv3_dense.training.latency.LatencyCallback", "every_n_train_steps: 500",
                     "safety_callbacks: true"):
        assert expected in out, expected


def test_small_config_is_the_large_recipe_with_the_small_model() -> None:
    large = Path(LARGE).read_text().replace("mobilenet_v3_large", "X").replace("MobileNetV3-Large", "X")
    small = Path(SMALL).read_text().replace("mobilenet_v3_small", "X").replace("MobileNetV3-Small", "X")
    assert large == small


def test_fast_dev_run(tiny_imagefolder: Path, tmp_path: Path, lightning) -> None:
    result = lightning("fit", "-c", SMALL, "-c", DEMO, "--data.root", str(tiny_imagefolder),
                       "--trainer.fast_dev_run", "2", *TINY, cwd=tmp_path)
    assert "latency" in result.stderr


def test_fit_validate_and_resume(tiny_imagefolder: Path, tmp_path: Path, lightning) -> None:
    # The user's config as it is (its checkpoint folder, step and epoch checkpoints), shrunk to seconds.
    common = ["-c", SMALL, "--data.root", str(tiny_imagefolder), *TINY, "--trainer.devices", "1",
              "--trainer.accelerator", "cpu",
              "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
              "--trainer.num_sanity_val_steps", "0", "--model.init_args.ema_decay", "0.9"]
    lightning("fit", *common, "--trainer.max_epochs", "1", cwd=tmp_path)
    last = tmp_path / "runs/mobilenet_v3_small_imagenet/checkpoints/last.ckpt"
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    assert any(k.startswith("model_ema.") for k in ckpt["state_dict"])

    result = lightning("validate", *common, "--ckpt_path", str(last), cwd=tmp_path)
    assert "val/top1" in result.stdout

    result = lightning("fit", *common, "--trainer.max_epochs", "2", "--ckpt_path", "last", cwd=tmp_path)
    assert "Restored all states from the checkpoint" in result.stdout + result.stderr
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4  # continued: the second epoch's two steps on top of the first's
    before, after = ckpt["state_dict"], resumed["state_dict"]
    key = "model_ema.classifier.3.weight"
    assert not torch.equal(before[key], after[key])


def test_wrong_class_count_is_explained(tiny_imagefolder: Path) -> None:
    import lightning as L

    import mbv3_dense
    from mbv3_dense.classification.data import ImageFolderDataModule
    from mbv3_dense.classification.module import ClassificationModule

    module = ClassificationModule(model=mbv3_dense.mobilenet_v3_small(num_classes=5, width_mult=0.5))
    dm = ImageFolderDataModule(root=tiny_imagefolder, batch_size=2, num_workers=0, crop_size=32, val_resize_size=32)
    trainer = L.Trainer(fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match="the data has 3 classes"):
        trainer.fit(module, datamodule=dm)


def test_progress_comes_as_lines_when_output_is_not_a_terminal(tiny_imagefolder: Path, tmp_path: Path,
                                                                 lightning) -> None:
    """Piped output (CI, ``> log``) gets periodic lines instead of carriage-return redraws of a bar."""
    at = TINY.index("--trainer.enable_progress_bar")
    args = TINY[:at] + TINY[at + 2:]
    result = lightning("fit", "-c", SMALL, "-c", DEMO, "--data.root", str(tiny_imagefolder),
                       "--trainer.max_epochs", "2", *args, cwd=tmp_path)
    assert "\r" not in result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert [line.split(" done")[0] for line in lines if line.startswith("[train]")] == [
        "[train] epoch 0/1", "[train] epoch 1/1"]
    assert sum(line.startswith("[val] epoch") and "val/top1" in line for line in lines) == 2
