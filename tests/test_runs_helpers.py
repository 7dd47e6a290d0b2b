"""scripts/_runs.py, what the demo and the GPU check share: the fit command, the generated data kept once per
size, and the values read back from a run's metrics.csv (no training: milliseconds)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import _runs  # noqa: E402


def test_fit_command_puts_the_seed_and_folders_before_the_options(tmp_path: Path) -> None:
    cmd = _runs.fit_command(_runs.DEMO_CONFIGS["detect"], tmp_path / "data", tmp_path / "run",
                            "--data.batch_size", "2", seed=3)
    assert cmd[:4] == [sys.executable, "-m", "mbv3_dense", "fit"]
    assert cmd[4:8] == ["-c", "configs/ssdlite_mobilenet_v3_small_coco.yaml", "-c", "configs/demo/detect.yaml"]
    assert cmd[8:12] == ["--seed_everything", "3", "--data.root", str(tmp_path / "data")]
    assert cmd[-2:] == ["--data.batch_size", "2"]
    logger = cmd.index("--trainer.logger")
    assert cmd[logger + 1:logger + 6] == ["lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
                                          str(tmp_path / "run"), "--trainer.logger.name", "logs"]
    assert "--seed_everything" not in _runs.fit_command(["a.yaml"], tmp_path, tmp_path)
    assert all((ROOT / config).is_file() for configs in _runs.DEMO_CONFIGS.values() for config in configs)


def test_metrics_come_from_the_newest_csv_and_skip_empty_cells(tmp_path: Path) -> None:
    assert _runs.read_metrics(tmp_path) == []
    old, new = tmp_path / "logs" / "version_9" / "metrics.csv", tmp_path / "logs" / "version_10" / "metrics.csv"
    for path, text in ((old, "step,train/loss\n0,9.0\n"),
                       (new, "epoch,step,train/loss,val/top1\n0,0,2.5,\n0,1,1.5,\n0,1,,0.75\n")):
        path.parent.mkdir(parents=True)
        path.write_text(text)
    os.utime(old, (1, 1))
    rows = _runs.read_metrics(tmp_path)
    assert _runs.series(rows, "train/loss") == [(0, 2.5), (1, 1.5)]
    assert _runs.last(rows, "val/top1") == 0.75
    assert _runs.last(rows, "latency_ms") is None


def test_generated_data_is_reused_at_its_size_and_replaced_at_the_other(tmp_path: Path, monkeypatch,
                                                                          capsys: pytest.CaptureFixture) -> None:
    made: list[list[str]] = []

    def generate(cmd: list[str], **kwargs: object) -> None:
        made.append(cmd)
        out = Path(cmd[cmd.index("--out") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / ("tiny.txt" if "--tiny" in cmd else "full.txt")).write_text("x")

    monkeypatch.setattr(_runs, "run", generate)
    data = _runs.make_data("classify", tmp_path, tiny=True)
    assert data == tmp_path / "classify" and len(made) == 1 and made[0][-1] == "--tiny"
    assert _runs.make_data("classify", tmp_path, tiny=True) == data and len(made) == 1
    assert "reusing generated classify data" in capsys.readouterr().out
    _runs.make_data("classify", tmp_path, tiny=False)  # the other size: generated anew, not mixed
    assert len(made) == 2 and sorted(p.name for p in data.iterdir()) == [".complete", "full.txt"]
