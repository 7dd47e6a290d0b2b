"""Resume after SIGKILL gives the weights of an uninterrupted run; checkpoint writes are atomic.

The training runs through the real entry point (``python -m mbv3_dense fit``) with the real
ImageNet config, shrunk to a tiny CPU run: 15 generated images, batch 3 (5 steps per epoch),
2 epochs, a step checkpoint every 3 steps, EMA on, AutoAugment and random erasing on (they draw
from the global RNG that the checkpoint must restore), ``num_workers=0``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from mbv3_dense.synthetic import write_imagefolder

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs/mobilenet_v3_small_imagenet.yaml"
CKPT_DIR = "runs/mobilenet_v3_small_imagenet/checkpoints"
STEPS_PER_EPOCH, EVERY_N_STEPS = 5, 3


def tiny_config(data: Path, out: Path, *, throttle: float = 0.0) -> Path:
    """The real config with the sizes of a seconds-long CPU run (the structure is kept)."""
    cfg = yaml.safe_load(CONFIG.read_text())
    cfg["trainer"].update(accelerator="cpu", devices=1, max_epochs=2, deterministic=True, log_every_n_steps=1,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=1)
    steps = [c for c in cfg["trainer"]["callbacks"] if c.get("init_args", {}).get("every_n_train_steps")]
    assert len(steps) == 1, "the config should have one step-interval ModelCheckpoint"
    steps[0]["init_args"]["every_n_train_steps"] = EVERY_N_STEPS
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("LatencyCallback"):
            c["init_args"] = {"input_size": [32, 32], "warmup": 0, "runs": 1}
    if throttle:
        cfg["trainer"]["callbacks"].append({"class_path": "tests.robustness_helpers.Throttle",
                                            "init_args": {"seconds": throttle}})
    model = cfg["model"]["init_args"]
    model["model"]["init_args"].update(num_classes=3, width_mult=0.5)
    model["optimizer"]["init_args"]["lr"] = 0.001
    model["ema_decay"] = 0.9
    cfg["data"]["init_args"].update(root=str(data), batch_size=3, num_workers=0, crop_size=32, val_resize_size=32,
                                    pin_memory=False)
    out.write_text(yaml.safe_dump(cfg))
    return out


def fit_cmd(config: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mbv3_dense", "fit", "-c", str(config), *extra]


# One thread: on a shared, busy CPU, OpenMP spin-waiting makes 2-thread runs several times slower.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def run(cmd: list[str], cwd: Path) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("folder")
    return write_imagefolder(root, num_classes=3, train_per_class=5, val_per_class=2, size=40, seed=1)


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(data: Path, tmp_path: Path) -> None:
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    straight.mkdir()
    broken.mkdir()
    run(fit_cmd(tiny_config(data, straight / "c.yaml")), cwd=straight)
    reference = load(straight / CKPT_DIR / "last.ckpt")
    assert reference["global_step"] == 2 * STEPS_PER_EPOCH

    # Kill -9 right after the first step checkpoint appears (each step then sleeps 0.5 s).
    last = broken / CKPT_DIR / "last.ckpt"
    proc = subprocess.Popen(fit_cmd(tiny_config(data, broken / "slow.yaml", throttle=0.5)), cwd=broken, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert last.exists(), "no step checkpoint was written"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    saved = load(last)
    assert saved["global_step"] == EVERY_N_STEPS  # mid-epoch: 3 of 5 steps of epoch 0
    assert saved["epoch"] == 0 and "rng_states" in saved

    run(fit_cmd(tiny_config(data, broken / "c.yaml"), "--ckpt_path", "last"), cwd=broken)
    resumed = load(last)
    assert resumed["global_step"] == reference["global_step"]
    assert set(resumed["state_dict"]) == set(reference["state_dict"])
    assert any(k.startswith("model_ema.") for k in reference["state_dict"])
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key  # bit-exact on CPU
    ref_opt, res_opt = reference["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    for idx, state in ref_opt.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(res_opt[idx][name]), torch.as_tensor(value)), (idx, name)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]
