"""scripts/benchmark.py and scripts/export.py through their command lines, on one tiny case each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_benchmark_quick_classify_writes_table_and_json(tmp_path):
    out = tmp_path / "bench.jsonl"
    proc = run("scripts/benchmark.py", "--quick", "--tasks", "classify", "--arch", "small", "--no-int8",
               "--threads", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    names = [r["row"] for r in rows]
    skipped = [line for line in proc.stdout.splitlines() if "SKIPPED" in line]
    assert names == ["torchvision eager", "ours eager", "ours folded", "ours onnxruntime", "ours executorch"], skipped
    assert rows[0]["ratio"] == 1.0
    for r in rows:
        assert r["threads"] == 1 and r["runs"] == 3 and r["median_ms"] > 0 and r["p90_ms"] >= r["median_ms"]
        assert r["input"] == "64x64" and r["params_M"] > 2.5
    # same weights: our rows (ONNX Runtime and ExecuTorch included) compute torchvision's logits
    assert all(r["max_diff"] is not None and r["max_diff"] < 1e-3 for r in rows[1:])
    assert "ratio" in proc.stdout and proc.stdout.count("JSON {") == len(rows)


def test_export_classifier_checks_parity(tmp_path):
    out = tmp_path / "cls.onnx"
    proc = run("scripts/export.py", "--task", "classify", "--arch", "small", "--size", "64", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert out.is_file()
    assert "logits: max abs error" in proc.stdout and "OK" in proc.stdout and "tolerance 1e-03" in proc.stdout
    assert "FAILED" not in proc.stdout and "top-1 classes:" in proc.stdout


def test_export_int8_needs_calibration_images(tmp_path):
    proc = run("scripts/export.py", "--task", "classify", "--out", str(tmp_path / "x.onnx"), "--int8")
    assert proc.returncode == 2 and "--calibration-images" in proc.stderr


def test_calibration_on_fewer_than_four_images_is_warned(tmp_path, caplog):
    """One calibration image cost the demo classifier up to 12.7 points of int8 top-1: the export says so."""
    import logging

    from PIL import Image

    from mbv3_dense.deploy.options import MIN_CALIBRATION_IMAGES, calibration_files

    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(4):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.png")
    with caplog.at_level(logging.WARNING, logger="mbv3_dense.deploy.options"):
        chosen = calibration_files(tmp_path, 1)
    assert len(chosen) == 1 and "int8 calibration on 1 image(s)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mbv3_dense.deploy.options"):
        chosen = calibration_files(tmp_path, MIN_CALIBRATION_IMAGES)
    assert [p.parent.name for p in chosen] == ["a", "a", "b", "b"] and caplog.text == ""
