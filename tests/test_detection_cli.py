"""End to end: the generated COCO data, ``lightning fit`` through the real entry point, the evaluation script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def test_fit_fast_dev_run(tiny_coco: Path, tmp_path: Path):
    cmd = [str(BIN / "lightning"), "fit", "-c", str(ROOT / "configs/ssdlite_mobilenet_v3_small_coco.yaml"),
           "--data.root", str(tiny_coco), "--data.num_classes", "5", "--data.batch_size", "2",
           "--data.val_batch_size", "2", "--data.num_workers", "0",
           "--model.model.init_args.num_classes", "5",
           "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.fast_dev_run", "1",
           "--trainer.default_root_dir", str(tmp_path)]
    # cwd: the config's checkpoint folder is relative to it (Lightning writes last.ckpt at the end even in fast_dev_run)
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "val/map_50" in proc.stdout + proc.stderr


def test_eval_script_matches_pycocotools(tiny_coco: Path, tmp_path: Path):
    from detection import ssdlite_mobilenet_v3_small

    torch.manual_seed(0)
    weights = tmp_path / "model.pth"
    torch.save(ssdlite_mobilenet_v3_small(num_classes=5).state_dict(), weights)
    results, summary = tmp_path / "results.json", tmp_path / "summary.json"
    ann = tiny_coco / "annotations/instances_val2017.json"
    cmd = [sys.executable, "scripts/eval_coco.py", "--weights", str(weights), "--arch", "small", "--num-classes", "5",
           "--images", str(tiny_coco / "val2017"), "--annotations", str(ann), "--results", str(results),
           "--batch-size", "2", "--workers", "0", "--visualize", str(tmp_path / "vis"), "--num-visualize", "2",
           "--json", str(summary)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Average Precision  (AP) @[ IoU=0.50:0.95" in proc.stdout and "latency" in proc.stdout
    dets = json.loads(results.read_text())
    assert dets and {d["category_id"] for d in dets} <= {1, 3, 18, 44}
    assert all(len(d["bbox"]) == 4 and d["bbox"][2] >= 0 for d in dets)
    gt = COCO(str(ann))
    ev = COCOeval(gt, gt.loadRes(str(results)), "bbox")
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    figures = json.loads(summary.read_text())
    assert np.isclose(figures["metric"], ev.stats[0]) and np.isclose(figures["map_50"], ev.stats[1])
    assert figures["params_M"] > 0 and figures["madds_G"] > 0 and figures["latency_ms"] > 0
    assert len(list((tmp_path / "vis").glob("*.png"))) == 2


def test_no_detections_report_zeros(tiny_coco: Path, tmp_path: Path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from eval_coco import coco_evaluate

    empty = tmp_path / "empty.json"
    empty.write_text("[]")
    stats = coco_evaluate(tiny_coco / "annotations/instances_val2017.json", empty)
    assert stats.shape == (12,) and (stats == 0).all()
