"""Through the real entry points: `lightning fit` with the user's config, DDP validation, the eval script."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segmentation import lraspp_mobilenet_v3_small

ROOT = Path(__file__).resolve().parent.parent
LIGHTNING = str(Path(sys.executable).parent / "lightning")
SMALL_INPUTS = ["--data.num_workers", "0", "--trainer.accelerator", "cpu",
                "--trainer.callbacks.init_args.input_size", "[64, 128]"]  # the LatencyCallback is listed last


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def test_fit_fast_dev_run_with_the_user_config(tiny_cityscapes, tmp_path):
    run([LIGHTNING, "fit", "-c", str(ROOT / "configs" / "lraspp_cityscapes.yaml"),
         "--data.root", str(tiny_cityscapes), "--trainer.fast_dev_run", "true", "--data.batch_size", "2",
         "--data.crop_size", "[64, 64]", *SMALL_INPUTS], cwd=tmp_path)


def validate_miou(root: Path, workdir: Path, devices: int) -> float:
    logs = workdir / f"logs{devices}"
    extra = ["--trainer.strategy", "ddp", "--trainer.devices", "2"] if devices == 2 else ["--trainer.devices", "1"]
    run([LIGHTNING, "validate", "-c", str(ROOT / "configs" / "lraspp_mobilenet_v3_small_cityscapes.yaml"),
         "--data.root", str(root), "--seed_everything", "0", *SMALL_INPUTS, *extra,
         "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(logs)],
        cwd=workdir)
    rows = list(csv.DictReader(next(logs.glob("**/metrics.csv")).open()))
    return float(next(r["val/miou"] for r in rows if r.get("val/miou")))


def test_ddp_validation_agrees_with_one_process(tiny_cityscapes, tmp_path):
    one = validate_miou(tiny_cityscapes, tmp_path, devices=1)
    two = validate_miou(tiny_cityscapes, tmp_path, devices=2)
    assert 0.0 < one < 1.0
    assert two == pytest.approx(one, abs=1e-6)


def test_eval_script_end_to_end(tiny_cityscapes, tmp_path):
    torch.manual_seed(0)
    model = lraspp_mobilenet_v3_small()
    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "pytorch-lightning_version": "2.6"}, ckpt)
    out = run([sys.executable, str(ROOT / "scripts" / "eval_cityscapes.py"), "--weights", str(ckpt),
               "--arch", "small", "--variant", "paper", "--root", str(tiny_cityscapes), "--split", "val",
               "--export-dir", str(tmp_path / "labelIds"), "--visualize", str(tmp_path / "viz"),
               "--json", str(tmp_path / "eval.json"), "--latency-size", "64", "128", "--latency-runs", "2"],
              cwd=tmp_path)
    summary = json.loads((tmp_path / "eval.json").read_text())
    assert summary["official_miou"] == pytest.approx(summary["metric"], abs=1e-6)
    assert "the two means agree" in out.stdout
    exported = sorted((tmp_path / "labelIds").glob("*_leftImg8bit.png"))
    assert len(exported) == 3 and len(list((tmp_path / "viz").glob("*.png"))) == 3
    from PIL import Image

    with Image.open(exported[0]) as img:
        assert img.mode == "L" and img.size == (128, 64)
    assert summary["params_M"] > 0 and summary["madds_G"] > 0 and summary["latency_ms"] > 0


def test_the_short_config_name_is_the_large_config() -> None:
    configs = ROOT / "configs"
    assert (configs / "lraspp_cityscapes.yaml").read_text() == (
        configs / "lraspp_mobilenet_v3_large_cityscapes.yaml").read_text()
