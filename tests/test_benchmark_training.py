"""scripts/benchmark_training.py as a user runs it: --quick on the CPU, every row in the JSON."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TASKS = ("classify", "detect", "segment")
WHAT = ("train step", "data pipeline, 1 worker")


def test_quick_run_writes_every_row(tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, "scripts/benchmark_training.py", "--quick", "--tasks", ",".join(TASKS), "--device", "cpu",
         "--workdir", str(tmp_path / "data"), "--json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["task"], r["what"]): r for r in result["rows"]}
    assert set(rows) == {(task, what) for task in TASKS for what in WHAT}
    for key, row in rows.items():
        for field in ("ours_img_s", "torchvision_img_s", "ratio"):
            assert math.isfinite(row[field]) and row[field] > 0, (key, field, row[field])
        assert math.isclose(row["ratio"], row["ours_img_s"] / row["torchvision_img_s"], rel_tol=1e-9), key
        assert row["meets_target"] == (row["ratio"] >= row["target"]), key
    assert rows[("segment", "train step")]["batch"] == 2  # --quick's batch
    meta = result["meta"]
    assert meta["quick"] and meta["precision"] == "32-true" and meta["device"].startswith("cpu")
    # The generated files are the real on-disk layouts.
    data = tmp_path / "data"
    assert list((data / "imagenet" / "train").glob("*/*.JPEG"))
    assert (data / "coco" / "annotations" / "instances_train2017.json").is_file()
    assert list((data / "cityscapes" / "gtFine" / "train").glob("*/*_gtFine_labelIds.png"))
    # The table is printed with the ratios.
    assert "ratio" in proc.stdout and "segment" in proc.stdout


def test_rejects_unknown_task() -> None:
    proc = subprocess.run([sys.executable, "scripts/benchmark_training.py", "--tasks", "pose"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown tasks" in proc.stderr
