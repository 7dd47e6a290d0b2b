"""``mbv3_dense.checkpoints.resolve``: the network of ``--weights``, from its model record or from the arguments."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchvision

from detection import ssdlite_mobilenet_v3_small
from mbv3_dense import mobilenet_v3_small
from mbv3_dense.checkpoints.model_record import RECORD_KEY
from mbv3_dense.checkpoints.resolve import ResolveError, resolve_model
from mbv3_dense.checkpoints.weights import WeightsError


def lightning_ckpt(path: Path, model: torch.nn.Module, record: dict | None) -> Path:
    """A file shaped like the ``.ckpt`` of ``lightning fit`` (with or without the model record)."""
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                  "pytorch-lightning_version": "2.6"}
    if record is not None:
        checkpoint[RECORD_KEY] = record
    torch.save(checkpoint, path)
    return path


@pytest.fixture
def classifier_ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=4, width_mult=0.5).eval()
    record = {"task": "classify", "builder": "mbv3_dense.mobilenet_v3_small",
              "init_args": {"num_classes": 4, "width_mult": 0.5, "dropout": 0.2, "weights": "/elsewhere/x.pth"}}
    return lightning_ckpt(tmp_path / "run.ckpt", model, record), model


def test_the_record_builds_the_network(classifier_ckpt) -> None:
    path, model = classifier_ckpt
    resolved = resolve_model("classify", path)
    assert resolved.task == "classify" and f"as recorded in {path}" in resolved.description
    assert "/elsewhere" not in resolved.description  # the trained weights replace pretrained-weight paths
    x = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(resolved.model.eval()(x), model(x), rtol=0, atol=0)
    assert resolve_model(None, path).task == "classify"  # the task from the record
    agreeing = resolve_model("classify", path, arch="small", num_classes=4, width_mult=0.5, reduced_tail=False)
    torch.testing.assert_close(agreeing.model.eval()(x), model(x), rtol=0, atol=0)


def test_disagreeing_arguments_and_another_task_name_the_file(classifier_ckpt) -> None:
    path, _ = classifier_ckpt
    name = re.escape(str(path))
    with pytest.raises(ResolveError, match=rf"{name}: the arguments disagree .* --width-mult 1.0 \(the record: 0.5\)"):
        resolve_model("classify", path, width_mult=1.0)
    with pytest.raises(ResolveError, match=r"--arch large \(the record: small\); --num-classes 9 \(the record: 4\)"):
        resolve_model("classify", path, arch="large", num_classes=9)
    with pytest.raises(ResolveError, match=rf"{name}: the checkpoint holds a 'classify' model .* not a 'segment'"):
        resolve_model("segment", path)


def test_a_malformed_record_names_the_file(tmp_path: Path) -> None:
    path = lightning_ckpt(tmp_path / "bad.ckpt", mobilenet_v3_small(num_classes=2),
                          {"task": "classify", "builder": "mbv3_dense.no_such_builder", "init_args": {}})
    with pytest.raises(ResolveError, match=rf"{re.escape(str(path))}: cannot import the network builder"):
        resolve_model("classify", path)


def test_files_without_a_record_are_built_from_the_arguments(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=4, width_mult=0.5).eval()
    old = lightning_ckpt(tmp_path / "old.ckpt", model, None)
    resolved = resolve_model("classify", old, arch="small", width_mult=0.5)
    assert resolved.model.num_classes == 4 and "no model record" in resolved.description  # class count read
    x = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(resolved.model.eval()(x), model(x), rtol=0, atol=0)
    with pytest.raises(ResolveError, match=rf"{re.escape(str(old))}: no model record .* give the task \(--task\)"):
        resolve_model(None, old)
    with pytest.raises(WeightsError, match=r"has no model record, so the network was built from the arguments: "
                                           r"mbv3_dense.mobilenet_v3_large\(.*check --arch, --num-classes"):
        resolve_model("classify", old)  # arch large by default: the tensors do not fit


def test_torchvision_files_give_their_class_count(tmp_path: Path) -> None:
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=7)
    torch.save(tv.state_dict(), tmp_path / "tv_ssdlite.pth")
    assert resolve_model("detect", tmp_path / "tv_ssdlite.pth").model.num_classes == 7
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                   num_classes=21)
    torch.save(tv.state_dict(), tmp_path / "tv_lraspp.pth")
    resolved = resolve_model("segment", tmp_path / "tv_lraspp.pth", variant="torchvision")
    assert resolved.model.num_classes == 21 and "variant='torchvision'" in resolved.description
    ours = ssdlite_mobilenet_v3_small(num_classes=3, width_mult=0.5)
    torch.save(ours.state_dict(), tmp_path / "ours.pth")
    assert resolve_model("detect", tmp_path / "ours.pth", arch="small", width_mult=0.5).model.num_classes == 3


def test_random_weights_need_the_task() -> None:
    resolved = resolve_model("detect", None, arch="small", width_mult=0.5)
    assert resolved.model.num_classes == 91 and "random weights" in resolved.description
    with pytest.raises(ResolveError, match="without weights the task must be given"):
        resolve_model(None, None)
