"""Pretrained weights for your own classes (mbv3_dense.checkpoints.transfer), through the command line as a user
runs it.

The checkpoints are torchvision's layouts written by torchvision's own builders (random weights, BN statistics
from a forward pass); the runs train one step with learning rate 0 and frozen BN statistics, so the written
checkpoint holds exactly what was loaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torchvision.models import _meta

from mbv3_dense.checkpoints.model_record import read_model_record

REPO = Path(__file__).resolve().parents[1]
LR_ZERO = ["--model.init_args.optimizer", "torch.optim.AdamW", "--model.init_args.optimizer.init_args.lr", "0.0",
           "--model.init_args.freeze_bn_statistics", "true", "--trainer.limit_train_batches", "1",
           "--trainer.max_epochs", "1",
           "--trainer.limit_val_batches", "1", "--trainer.callbacks", "[]", "--data.num_workers", "0",
           "--val_pictures", "1"]


def _calibrated(model: torch.nn.Module, *inputs: torch.Tensor) -> torch.nn.Module:
    """BN statistics from a train-mode forward pass (random ones make outputs ignore the input)."""
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        model(*inputs)
    return model.eval()


def _network_state(ckpt_path: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    return {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def imagenet_named_folder(tiny_imagefolder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny image folder with two classes renamed to ImageNet classes (sorted: goldfish, tench, widget)."""
    root = tmp_path_factory.mktemp("named")
    for split in ("train", "val"):
        for old, new in (("circle", "tench"), ("square", "goldfish"), ("triangle", "my_widget")):
            shutil.copytree(tiny_imagefolder / split / old, root / split / new)
    return root


def test_classifier_from_torchvision_imagenet_keeps_named_rows(imagenet_named_folder: Path, tmp_path: Path,
                                                                lightning) -> None:
    tv = _calibrated(torchvision.models.mobilenet_v3_small(), torch.rand(4, 3, 64, 64))
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    result = lightning("fit", "-c", str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"),
                       "-c", str(REPO / "configs/finetune/classify.yaml"),
                       "--data.root", str(imagenet_named_folder), "--data.batch_size", "4", "--data.crop_size", "32",
                       "--data.val_resize_size", "32", "--model.init_args.model.init_args.weights",
                       str(tmp_path / "tv.pth"), "--trainer.default_root_dir", str(tmp_path / "run"), *LR_ZERO,
                       cwd=tmp_path)
    log = result.stderr
    assert "class layers re-initialised (classifier.3.weight, classifier.3.bias), because the checkpoint has " \
           "1000 classes and the network 3" in log
    assert "class rows kept from the checkpoint (2): goldfish (1 -> 0), tench (0 -> 2); starting fresh (1): " \
           "my_widget" in log
    state = _network_state(tmp_path / "run/checkpoints/last.ckpt")
    file = {("backbone." + k if k.startswith("features.") else k): v for k, v in tv.state_dict().items()}
    head = {"classifier.3.weight", "classifier.3.bias"}
    assert set(state) == set(file)
    for key in set(file) - head:  # loaded: every tensor of the file but the class layer, unchanged
        assert torch.equal(state[key], file[key]), key
    for key in head:  # name-matched rows are the file's rows; the new class's row is new
        assert torch.equal(state[key][0], file[key][1]) and torch.equal(state[key][2], file[key][0])
    assert not any(torch.equal(state["classifier.3.weight"][1], row) for row in file["classifier.3.weight"])
    record = read_model_record(torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=True))
    assert record["classes"] == {"names": ["goldfish", "my_widget", "tench"]}
    assert (tmp_path / "run/lightning_logs/version_0/val_pictures/0.png").is_file()
    assert list((tmp_path / "run/lightning_logs/version_0").glob("events.out.tfevents.*"))  # TensorBoard


def _coco_with_own_categories(root: Path) -> Path:
    from detection.synthetic import DetectionSpec, generate_coco

    generate_coco(root, DetectionSpec(train_images=4, val_images=2, min_side=96, max_side=128, min_object=24,
                                      max_object=60, empty_fraction=0.0, crowd_fraction=0.0, seed=5,
                                      categories=((250, "dog", "triangle"), (11, "person", "circle"),
                                                  (7, "unicorn", "hexagon"))))
    return root


def test_detector_from_torchvision_coco_to_three_own_categories(tmp_path: Path, lightning) -> None:
    """A COCO JSON with 3 arbitrary category ids: trains from torchvision's 91-class SSDLite with the rows of
    the categories COCO names too, and predicts with their names and ids from the checkpoint alone."""
    data = _coco_with_own_categories(tmp_path / "coco")
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    torch.manual_seed(0)
    tv.train()
    with torch.no_grad():
        tv.backbone(torch.rand(2, 3, 320, 320))  # BN statistics of the backbone from a forward pass
    torch.save(tv.state_dict(), tmp_path / "tv_ssd.pth")
    result = lightning("fit", "-c", str(REPO / "configs/ssdlite_mobilenet_v3_large_coco.yaml"),
                       "-c", str(REPO / "configs/finetune/detect.yaml"), "--data.root", str(data),
                       "--data.batch_size", "2", "--data.val_batch_size", "2",
                       "--model.init_args.model.init_args.weights", str(tmp_path / "tv_ssd.pth"),
                       "--trainer.default_root_dir", str(tmp_path / "run"), *LR_ZERO, cwd=tmp_path)
    # Contiguous labels by category id: unicorn (7) 1, person (11) 2, dog (250) 3.
    assert "the data has 4 classes" in result.stderr
    assert "class rows kept from the checkpoint (3): __background__ (0 -> 0), person (1 -> 2), dog (18 -> 3); " \
           "starting fresh (1): unicorn" in result.stderr
    ckpt_path = tmp_path / "run/checkpoints/last.ckpt"
    state = _network_state(ckpt_path)
    file = tv.state_dict()
    for i in range(6):
        ours, theirs = f"cls_head.{i}.1.weight", f"head.classification_head.module_list.{i}.1.weight"
        rows, old = state[ours].view(-1, 4, *state[ours].shape[1:]), file[theirs].view(-1, 91,
                                                                                         *file[theirs].shape[1:])
        for new, was in ((0, 0), (2, 1), (3, 18)):
            assert torch.equal(rows[:, new], old[:, was]), (ours, new)
        assert torch.equal(state[f"box_head.{i}.1.weight"], file[f"head.regression_head.module_list.{i}.1.weight"])
    assert torch.equal(state["extra.0.0.0.weight"], file["backbone.extra.0.0.0.weight"])
    classes = read_model_record(torch.load(ckpt_path, weights_only=True))["classes"]
    assert classes == {"names": ["__background__", "unicorn", "person", "dog"], "category_ids": [0, 7, 11, 250]}

    # Predictions from the checkpoint alone name what they found, with the file's category ids.
    images = tmp_path / "photos"
    shutil.copytree(data / "val2017", images)
    subprocess.run([sys.executable, str(REPO / "scripts/predict.py"), "--weights", str(ckpt_path), "--images",
                    str(images), "--out", str(tmp_path / "pred"), "--no-pictures"], check=True, cwd=tmp_path,
                   capture_output=True)
    dets = [d for f in (tmp_path / "pred/detections").glob("*.json") for d in json.loads(f.read_text())["detections"]]
    assert dets and {(d["class"], d["category_id"]) for d in dets} <= {("unicorn", 7), ("person", 11), ("dog", 250)}
    results = json.loads((tmp_path / "pred/coco_results.json").read_text())
    assert {r["category_id"] for r in results} <= {7, 11, 250}


def test_lightning_predict_takes_the_network_and_names_from_the_checkpoint(imagenet_named_folder: Path,
                                                                          tmp_path: Path, lightning) -> None:
    """`lightning predict --ckpt_path` on photos, with no training data at hand: the record says what the
    network is (3 classes, their names)."""
    lightning("fit", "-c", str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"), "--data.root",
              str(imagenet_named_folder), "--data.batch_size", "4", "--data.crop_size", "32",
              "--data.val_resize_size", "32", "--trainer.default_root_dir", str(tmp_path / "run"), *LR_ZERO,
              cwd=tmp_path)
    photos = tmp_path / "photos"
    shutil.copytree(imagenet_named_folder / "val" / "tench", photos)
    result = lightning("predict", "-c", str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"), "--data.root",
                       str(tmp_path / "nowhere"), "--data.predict_images", str(photos), "--data.crop_size", "32",
                       "--data.val_resize_size", "32", "--ckpt_path", str(tmp_path / "run/checkpoints/last.ckpt"),
                       "--trainer.default_root_dir", str(tmp_path / "run"), "--writer.pictures", "false",
                       cwd=tmp_path)
    assert "network from the checkpoint's record" in result.stderr
    rows = [json.loads(line) for line in (tmp_path / "run/predictions/classifications.jsonl").read_text().splitlines()]
    assert rows and {t["class"] for row in rows for t in row["top5"]} == {"goldfish", "my_widget", "tench"}


def test_segmenter_from_torchvision_voc_keeps_named_rows(tmp_path: Path) -> None:
    from segmentation import lraspp_mobilenet_v3_large

    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None)
    _calibrated(tv, torch.rand(2, 3, 64, 64))
    torch.save(tv.state_dict(), tmp_path / "tv.pth")
    names = ["road", "person", "car"]
    model = lraspp_mobilenet_v3_large(num_classes=3, variant="torchvision", class_names=names,
                                      weights=str(tmp_path / "tv.pth"))
    voc = _meta._VOC_CATEGORIES
    for ours, theirs in (("head.low_classifier", "classifier.low_classifier"),
                         ("head.high_classifier", "classifier.high_classifier")):
        for new, name in ((1, "person"), (2, "car")):
            assert torch.equal(model.get_parameter(f"{ours}.weight")[new], tv.get_parameter(f"{theirs}.weight")[
                voc.index(name)])
    fresh = lraspp_mobilenet_v3_large(num_classes=3, variant="torchvision", class_names=names, keep_class_rows=False,
                                      weights=str(tmp_path / "tv.pth"))
    row = fresh.get_parameter("head.low_classifier.weight")[1]
    assert not any(torch.equal(row, r) for r in tv.get_parameter("classifier.low_classifier.weight"))
    assert torch.equal(fresh.get_parameter("head.cbr.0.weight"), tv.get_parameter("classifier.cbr.0.weight"))


def test_wrong_checkpoints_are_refused_naming_them(tmp_path: Path) -> None:
    from detection import ssdlite_mobilenet_v3_small
    from mbv3_dense import mobilenet_v3_large, mobilenet_v3_small
    from mbv3_dense.checkpoints.classes import ClassInfoError
    from mbv3_dense.checkpoints.model_record import RECORD_KEY
    from mbv3_dense.checkpoints.weights import WeightsError

    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "large.pth")
    with pytest.raises(WeightsError, match=r"large.pth: holds a MobileNetV3-Large network, and this one is "
                                           r"MobileNetV3-Small"):
        mobilenet_v3_small(num_classes=3, weights=tmp_path / "large.pth")
    tv_ssd = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    torch.save(tv_ssd.state_dict(), tmp_path / "ssd.pth")
    with pytest.raises(WeightsError, match=r"ssd.pth: not a MobileNetV3 classifier checkpoint: it holds "
                                           r"torchvision's SSDLite detector"):
        mobilenet_v3_large(weights=tmp_path / "ssd.pth")
    detector = ssdlite_mobilenet_v3_small(num_classes=3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in detector.state_dict().items()},
                "pytorch-lightning_version": "2.6",
                RECORD_KEY: {"task": "detect", "builder": "detection.ssdlite_mobilenet_v3_small",
                             "init_args": {"num_classes": 3}}}, tmp_path / "det.ckpt")
    with pytest.raises(WeightsError, match=r"det.ckpt: holds a 'detect' network \(detection.ssdlite_mobilenet_v3_small"
                                           r"\), not a 'classify' one"):
        mobilenet_v3_small(weights=tmp_path / "det.ckpt")
    with pytest.raises(ClassInfoError, match=r"class names occur more than once: 'cat'"):
        mobilenet_v3_small(num_classes=3, class_names=["cat", "dog", "Cat"])
    with pytest.raises(ClassInfoError, match=r"2 class names for a network of 3 classes"):
        mobilenet_v3_small(num_classes=3, class_names=["cat", "dog"])


def test_cli_shows_a_build_error_as_its_first_line(tiny_imagefolder: Path, tmp_path: Path) -> None:
    torch.save(torchvision.models.mobilenet_v3_large().state_dict(), tmp_path / "large.pth")
    result = subprocess.run([str(Path(sys.executable).parent / "lightning"), "fit", "-c",
                             str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"), "--data.root",
                             str(tiny_imagefolder), "--model.init_args.model.init_args.weights",
                             str(tmp_path / "large.pth")], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if not line.startswith(("INFO", "WARNING", "Seed set"))]
    assert errors[0].startswith("error: ") and "holds a MobileNetV3-Large network" in errors[0], result.stderr[-2000:]
    assert "Does not validate against any of the Union subtypes" not in result.stderr


def test_coco_file_with_more_categories_than_the_model_holds(tmp_path: Path) -> None:
    from detection.annotations import AnnotationError
    from detection.data import CocoDataModule

    data = _coco_with_own_categories(tmp_path / "coco")
    with pytest.raises(AnnotationError, match=r"instances_val2017.json: 3 categories \(ids up to 250\) are more "
                                              r"than a model of num_classes=3 can hold"):
        CocoDataModule(root=str(data), num_classes=3).setup("fit")
    assert CocoDataModule(root=str(data), num_classes=None).num_classes == 4


def test_frozen_backbone_then_released_resumes_bit_identical(tmp_path: Path) -> None:
    """Fine-tuning controls in a real run: the backbone takes no update in the frozen epoch, then trains at a
    tenth of the learning rate; killed in the frozen epoch and resumed, the run ends as the uninterrupted one."""
    import yaml

    from tests.test_determinism import (
        CASES,
        assert_same_optimizer_and_schedule,
        assert_same_training_state,
        fit,
        kill_after_first_step_checkpoint,
        last_ckpt,
        load,
        tiny_config,
    )

    case = CASES["classify"]
    data = case.make_data(tmp_path / "data")
    tv = _calibrated(torchvision.models.mobilenet_v3_small(width_mult=0.5), torch.rand(4, 3, 32, 32))
    torch.save(tv.state_dict(), tmp_path / "tv.pth")

    def config(workdir: Path, **extra: float) -> Path:
        path = tiny_config(case, data, workdir / "c.yaml", workers=2, **extra)
        cfg = yaml.safe_load(path.read_text())
        cfg["model"]["init_args"].update(freeze_backbone_epochs=1, backbone_lr_multiplier=0.1)
        cfg["model"]["init_args"]["model"]["init_args"]["weights"] = str(tmp_path / "tv.pth")
        path.write_text(yaml.safe_dump(cfg))
        return path

    straight = tmp_path / "straight"
    straight.mkdir()
    fit(config(straight), straight)
    reference = load(last_ckpt(straight))
    groups = reference["optimizer_states"][0]["param_groups"]
    lrs = {g["name"]: g["initial_lr"] for g in groups}
    assert lrs["backbone"] == pytest.approx(0.1 * lrs["head"]) and lrs["backbone_no_decay"] == lrs["backbone"]

    broken = tmp_path / "killed"
    broken.mkdir()
    saved = load(kill_after_first_step_checkpoint(config(broken, throttle=0.5), broken))
    assert saved["epoch"] == 0
    file = {"model.backbone." + k: v for k, v in tv.state_dict().items() if k.startswith("features.")}
    for key, value in file.items():  # frozen: weights and BN statistics as loaded
        assert torch.equal(saved["state_dict"][key], value), key
    assert not torch.equal(saved["state_dict"]["model.classifier.0.weight"], tv.state_dict()["classifier.0.weight"])
    released = [k for k in file if k.endswith(".weight") and not torch.equal(reference["state_dict"][k], file[k])]
    assert released, "the backbone never trained after its release"
    fit(config(broken), broken, "--ckpt_path", "last")
    resumed = load(last_ckpt(broken))
    assert_same_training_state(resumed, reference, "resumed after SIGKILL vs uninterrupted")
    assert_same_optimizer_and_schedule(resumed, reference)
