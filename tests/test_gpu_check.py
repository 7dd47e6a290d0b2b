"""The GPU check script, as a user without a GPU runs it: ``bash scripts/gpu_check.sh --device cpu``
(the dry run: every step of the GPU check, a few steps of each task on the CPU)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_on_cpu_goes_through_every_step(tmp_path: Path) -> None:
    out = tmp_path / "check"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--steps", "3", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "gpu_check.json").read_text())
    assert summary["device"] == "cpu"
    assert [r["task"] for r in summary["training"]] == ["classify", "detect", "segment"]
    for row in summary["training"]:
        assert row["steps"] == 3 and row["precision"] == "32-true"
        assert math.isfinite(row["loss_first"]) and math.isfinite(row["loss_last"]) and row["losses_logged"] >= 3
        assert row["latency_ms"] is not None and row["latency_ms"] > 0  # the latency callback ran on the device
        ckpt = out / "runs" / row["task"] / "checkpoints" / "last.ckpt"
        assert ckpt.is_file()
    assert {s["task"] for s in summary["speedup"]} == {"classify", "detect", "segment"}
    assert all(s["fp32_img_s"] > 0 and s["ratio"] > 0 for s in summary["speedup"])
    assert "| classify |" in (out / "gpu_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the check would run for minutes")
def test_cuda_without_a_gpu_says_so(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "scripts/gpu_check.py", "--out", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA GPU" in proc.stderr
