"""Loss and metric with ignore pixels, agreement with the official evaluator, per-iteration poly LR."""

from __future__ import annotations

import importlib.util
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from segmentation import lraspp_mobilenet_v3_small
from segmentation.labels import train_ids_to_label_ids
from segmentation.module import SegmentationModule, miou_metric, segmentation_loss

ROOT = Path(__file__).resolve().parent.parent


def load_eval_script():
    spec = importlib.util.spec_from_file_location("eval_cityscapes", ROOT / "scripts" / "eval_cityscapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_loss_ignores_255():
    torch.manual_seed(0)
    logits = torch.randn(2, 19, 4, 5, requires_grad=True)
    target = torch.randint(0, 19, (2, 4, 5))
    target[0, :2] = 255
    keep = target != 255
    expected = F.cross_entropy(logits.permute(0, 2, 3, 1)[keep], target[keep])
    torch.testing.assert_close(segmentation_loss(logits, target), expected)
    all_ignored = segmentation_loss(logits, torch.full_like(target, 255))
    assert all_ignored.item() == 0.0
    all_ignored.backward()  # a graph, not NaN
    assert torch.isfinite(logits.grad).all()


def test_metric_ignores_255_and_absent_classes():
    target = torch.tensor([[[0, 0, 1, 1, 255, 255]]])
    preds = torch.tensor([[[0, 0, 1, 0, 5, 7]]])  # predictions on ignore pixels do not count
    metric = miou_metric()
    metric.update(preds, target)
    # road: tp 2, fp 1 -> 2/3; sidewalk: tp 1, fn 1 -> 1/2; the other 17 classes are absent.
    assert metric.compute().item() == pytest.approx((2 / 3 + 1 / 2) / 2)


def test_official_evaluator_agrees_with_torchmetrics(tmp_path):
    script = load_eval_script()
    rng = np.random.default_rng(0)
    preds, gts, metric = [], [], miou_metric()
    for i in range(3):
        target = rng.choice([0, 1, 2, 10, 13, 255], size=(12, 20)).astype(np.uint8)
        pred = np.where(rng.random((12, 20)) < 0.7, np.where(target == 255, 5, target), rng.integers(0, 19, (12, 20)))
        pred = pred.astype(np.uint8)
        metric.update(torch.as_tensor(pred)[None].long(), torch.as_tensor(target)[None].long())
        label_ids = np.where(target == 255, 0, train_ids_to_label_ids(np.where(target == 255, 0, target)))
        gt_path, pred_path = tmp_path / f"c_{i:06d}_000019_gtFine_labelIds.png", tmp_path / f"pred{i}.png"
        Image.fromarray(label_ids.astype(np.uint8)).save(gt_path)
        Image.fromarray(train_ids_to_label_ids(pred)).save(pred_path)
        preds.append(pred_path)
        gts.append(gt_path)
    result = script.official_evaluation(preds, gts, tmp_path / "result.json", quiet=True)
    assert result["averageScoreClasses"] == pytest.approx(metric.compute().item(), abs=1e-6)


def test_official_evaluator_errors_become_exceptions(tmp_path):
    script = load_eval_script()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(tmp_path / "gt.png")
    Image.fromarray(np.zeros((4, 5), np.uint8)).save(tmp_path / "pred.png")
    with pytest.raises(script.OfficialEvaluationError, match="not equal"):
        script.official_evaluation([tmp_path / "pred.png"], [tmp_path / "gt.png"], tmp_path / "r.json", quiet=True)


def test_poly_lr_steps_every_iteration():
    module = SegmentationModule(
        model=lraspp_mobilenet_v3_small(),
        optimizer=partial(torch.optim.SGD, lr=0.01),
        scheduler=partial(torch.optim.lr_scheduler.PolynomialLR, total_iters=10, power=0.9),
    )
    config = module.configure_optimizers()
    assert config["lr_scheduler"]["interval"] == "step"
    scheduler = config["lr_scheduler"]["scheduler"]
    for _ in range(5):
        config["optimizer"].step()
        scheduler.step()
    assert config["optimizer"].param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 5 / 10) ** 0.9)


def test_training_and_validation_steps():
    torch.manual_seed(0)
    module = SegmentationModule(model=lraspp_mobilenet_v3_small())
    images, masks = torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))
    masks[:, :8] = 255
    module.log = lambda *a, **k: None
    loss = module.training_step((images, masks), 0)
    loss.backward()
    assert torch.isfinite(loss)
    module.eval()
    with torch.no_grad():
        module.validation_step((images, masks), 0)
    assert 0.0 <= module.val_miou.compute().item() <= 1.0
    assert module.example_input(32, 64).shape == (1, 3, 32, 64)
