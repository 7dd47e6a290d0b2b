"""The built-in data generators and the main job (``scripts/demo.py``) through the user's command."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.classification.synthetic import write_imagefolder
from segmentation.synthetic import CityscapesSpec, generate_cityscapes

ROOT = Path(__file__).resolve().parent.parent


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_generators_are_deterministic_by_seed(tmp_path):
    for name, make in {
        "classify": lambda out, seed: write_imagefolder(out, num_classes=3, train_per_class=2, val_per_class=1,
                                                        size=32, seed=seed),
        "detect": lambda out, seed: generate_coco(out, DetectionSpec(train_images=3, val_images=2, min_side=96,
                                                                     max_side=128, min_object=24, max_object=60,
                                                                     seed=seed)),
        "segment": lambda out, seed: generate_cityscapes(out, CityscapesSpec(height=64, width=128, train_per_city=1,
                                                                            val_per_city=1, seed=seed)),
    }.items():
        make(tmp_path / f"{name}_a", 0)
        make(tmp_path / f"{name}_b", 0)
        make(tmp_path / f"{name}_c", 1)
        a, b, c = (digest(tmp_path / f"{name}_{x}") for x in "abc")
        assert a == b, f"{name}: same seed, different files"
        assert a != c, f"{name}: another seed wrote the same files"
        images = [v for k, v in a.items() if k.endswith((".jpg", ".png")) and "gtFine" not in k]
        assert len(set(images)) == len(images), f"{name}: two generated images are identical"


def test_generated_coco_reads_with_pycocotools(tmp_path):
    from pycocotools.coco import COCO

    generate_coco(tmp_path, DetectionSpec(train_images=4, val_images=3, min_side=96, max_side=128, min_object=24,
                                          max_object=60, seed=3))
    for split in ("train2017", "val2017"):
        coco = COCO(str(tmp_path / "annotations" / f"instances_{split}.json"))
        assert coco.getImgIds() and coco.getCatIds()
        for img in coco.loadImgs(coco.getImgIds()):
            with Image.open(tmp_path / split / img["file_name"]) as im:
                assert im.size == (img["width"], img["height"])
        for ann in coco.loadAnns(coco.getAnnIds()):
            x, y, w, h = ann["bbox"]
            assert w > 0 and h > 0 and ann["category_id"] in coco.getCatIds()
            assert abs(ann["area"] - w * h) < 1e-3 * w * h + 1e-6 or ann["iscrowd"]


def test_generated_cityscapes_uses_real_label_ids(tmp_path):
    from cityscapesscripts.helpers.labels import id2label

    generate_cityscapes(tmp_path, CityscapesSpec(height=64, width=128, train_per_city=1, val_per_city=1, seed=0))
    labels = sorted((tmp_path / "gtFine").rglob("*_gtFine_labelIds.png"))
    images = sorted((tmp_path / "leftImg8bit").rglob("*_leftImg8bit.png"))
    assert labels and len(labels) == len(images)
    for image, label in zip(images, labels, strict=True):
        assert image.name.replace("_leftImg8bit.png", "") == label.name.replace("_gtFine_labelIds.png", "")
        with Image.open(label) as lab:
            assert lab.mode == "L"
            ids = np.unique(np.asarray(lab))
        assert all(int(i) in id2label for i in ids)
        assert any(id2label[int(i)].trainId not in (255, -1) for i in ids)


def quick_demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "scripts/demo.py", "--quick", "--out", str(out), *args], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_quick_demo_runs_every_task_per_seed_and_a_seed_repeats_exactly(tmp_path):
    result = quick_demo(tmp_path / "demo", "--seeds", "0,1")
    report = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    assert [(r["task"], r["seed"]) for r in report["results"]] == [
        (task, seed) for task in ("classify", "detect", "segment") for seed in (0, 1)]
    for row in report["results"]:
        assert 0.0 <= row["metric"] <= 1.0
        assert row["latency_ms"] > 0 and row["params_M"] > 0 and row["madds_G"] > 0
        assert Path(row["checkpoint"]).is_file()
    assert Path(report["training_curves"]).is_file()
    assert list((tmp_path / "demo" / "pictures").rglob("*.png")), "no pictures were saved"
    assert "task" in result.stdout and "latency ms" in result.stdout and "wall time" in result.stdout
    assert "\r" not in result.stdout, "progress redraws in a piped log"

    quick_demo(tmp_path / "again", "--seed", "1")  # data generated anew, same seed: the same run
    repeat = json.loads((tmp_path / "again" / "demo_results.json").read_text())["results"]
    first = {r["task"]: r for r in report["results"] if r["seed"] == 1}
    assert [r["seed"] for r in repeat] == [1, 1, 1]
    for row in repeat:
        assert row["metric"] == first[row["task"]]["metric"], row["task"]
        a = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(first[row["task"]]["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.equal(a[k], b[k]) for k in b), row["task"]
    zero = {r["task"]: r for r in report["results"] if r["seed"] == 0}
    for task, row in first.items():
        a = torch.load(row["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        b = torch.load(zero[task]["checkpoint"], map_location="cpu", weights_only=True)["state_dict"]
        assert not all(torch.equal(a[k], b[k]) for k in b), f"{task}: seeds 0 and 1 trained the same weights"


def test_quick_finetune_demo_compares_fine_tuning_with_scratch(tmp_path):
    """`scripts/demo.py --finetune`: pretrain on A, then B from scratch and from A, for every task (smoke sizes)."""
    result = quick_demo(tmp_path / "demo", "--finetune")
    report = json.loads((tmp_path / "demo" / "finetune" / "finetune_results.json").read_text())
    starts = [(r["task"], r["start"]) for r in report["rows"]]
    assert starts == [("classify", "scratch"), ("classify", "A, class rows matched by name"),
                      ("classify", "A, fresh class head"), ("detect", "scratch"),
                      ("detect", "A, class rows matched by name"), ("detect", "A, fresh class head"),
                      ("segment", "scratch"), ("segment", "A, class rows matched by name")]
    assert all(0.0 <= r["final"] <= 1.0 and r["steps"] == 2 for r in report["rows"])
    assert (tmp_path / "demo" / "finetune" / "finetune_curves.png").is_file()
    assert "reaches scratch final at" in result.stdout and "wall time" in result.stdout
    # The fine-tuned runs started from the demo's runs on A, with the rows of the names A and B share.
    log = result.stdout + result.stderr
    assert "class rows kept from the checkpoint (2): circle (0 -> 1), triangle (5 -> 3); starting fresh (2): " \
           "checker, stripes" in log  # class folders in sorted order: A's circle 0, triangle 5; B's circle 1, ...
    assert "class rows kept from the checkpoint (3): __background__ (0 -> 0), person (1 -> 2), dog (3 -> 3); " \
           "starting fresh (1): kite" in log
    assert "class rows kept from the checkpoint (5): road (0 -> 0), building (2 -> 3), vegetation (8 -> 4), " \
           "sky (10 -> 5), car (13 -> 6); starting fresh (2): grass, water" in log
    assert "class rows kept from the checkpoint (0)" in log  # the fresh-head runs
    assert all((tmp_path / "demo" / "runs" / task / "seed0" / "pretrained.done").is_file()
               for task in ("classify", "detect", "segment"))


def test_quick_pareto_demo_reports_three_network_sizes_per_task(tmp_path):
    """`scripts/demo.py --pareto`: the task's demo network and its two other sizes, one Pareto report (smoke sizes)."""
    result = quick_demo(tmp_path / "demo", "--pareto", "--tasks", "classify")
    report = json.loads((tmp_path / "demo" / "demo_results.json").read_text())
    pareto = json.loads(Path(report["pareto"]["json"]).read_text())
    assert Path(report["pareto"]["png"]).is_file()
    points = pareto["points"]
    assert len(points) == 3 and {p["task"] for p in points} == {"classify"}
    assert len({p["label"] for p in points}) == 3, [p["label"] for p in points]  # Small, Large, Small 0.75
    assert all((tmp_path / "demo" / "pareto" / "runs" / "classify" / name / "checkpoints" / "last.ckpt").is_file()
               for name in ("large", "small075"))
    assert "pareto:" in result.stdout
