"""Non-finite losses through each task's LightningModule in a real Trainer: stop names the step and the
loss parts and leaves no NaN checkpoint; skip skips the update and counts it."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

import mbv3_dense
from detection import ssdlite_mobilenet_v3_small
from detection.module import DetectionModule
from mbv3_dense.classification.data import ClassificationBatch
from mbv3_dense.classification.module import ClassificationModule
from mbv3_dense.training.guards import FiniteCheckpointGuard, NonFiniteLossError
from segmentation import lraspp_mobilenet_v3_small
from segmentation.module import SegmentationModule


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: on a shared, busy CPU, OpenMP spin-waiting makes 2-thread steps several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BAD_STEP = 2  # the third batch is the bad one
SGD = partial(torch.optim.SGD, lr=0.01)


def fit(module: L.LightningModule, batches: list, tmp_path: Path) -> Path:
    trainer = L.Trainer(accelerator="cpu", max_steps=len(batches), logger=False, enable_progress_bar=False,
                        default_root_dir=tmp_path,
                        enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=1, save_top_k=0,
                                                   save_last=True), FiniteCheckpointGuard()])
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None))
    return tmp_path / "last.ckpt"


def all_finite(path: Path) -> bool:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def classification_case() -> tuple[L.LightningModule, list]:
    torch.manual_seed(0)
    module = ClassificationModule(model=mbv3_dense.mobilenet_v3_small(num_classes=3, width_mult=0.5), optimizer=SGD,
                                  ema_decay=0.5)
    batches = [ClassificationBatch(torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]), torch.tensor(0))
               for _ in range(4)]
    return module, batches


def detection_case() -> tuple[L.LightningModule, list]:
    torch.manual_seed(0)
    module = DetectionModule(model=ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5), optimizer=SGD,
                           warmup_steps=0)
    target = {"boxes": torch.tensor([[10.0, 15.0, 100.0, 110.0]]), "labels": torch.tensor([2])}
    batches = [(torch.rand(2, 3, 128, 128), [target, target]) for _ in range(4)]
    return module, batches


def segmentation_case() -> tuple[L.LightningModule, list]:
    torch.manual_seed(0)
    module = SegmentationModule(model=lraspp_mobilenet_v3_small(), optimizer=SGD)
    batches = [(torch.randn(2, 3, 64, 64), torch.randint(0, 19, (2, 64, 64))) for _ in range(4)]
    return module, batches


def nan_loss_at(module: L.LightningModule, attribute: str, step: int) -> None:
    """Make the module's loss NaN at one global step (activations and BN statistics stay finite)."""
    original = getattr(module, attribute)

    def patched(*args, **kwargs):
        out = original(*args, **kwargs)
        if module.trainer.global_step != step:
            return out
        if isinstance(out, dict):  # SSDLoss: {"loss", "box_loss", "cls_loss"}
            return {**out, "loss": out["loss"] * float("nan"), "box_loss": out["box_loss"] * float("nan")}
        return out * float("nan")

    object.__setattr__(module, attribute, patched) if isinstance(original, torch.nn.Module) else setattr(
        module, attribute, patched)


CASES = {"classify": (classification_case, "criterion", "cross_entropy=nan"),
         "detect": (detection_case, "loss", "box_loss=nan"),
         "segment": (segmentation_case, None, "cross_entropy=nan")}


def _prepare(task: str, monkeypatch: pytest.MonkeyPatch, policy: str) -> tuple[L.LightningModule, list, str]:
    build, attribute, part = CASES[task]
    module, batches = build()
    module.nonfinite_loss = policy
    if attribute is None:  # segmentation computes its loss with a module-level function
        import segmentation.module as seg

        original = seg.segmentation_loss
        monkeypatch.setattr(seg, "segmentation_loss", lambda logits, target, *rest: original(logits, target, *rest) * (
            float("nan") if module.trainer.global_step == BAD_STEP else 1.0))
    else:
        nan_loss_at(module, attribute, BAD_STEP)
    return module, batches, part


@pytest.mark.parametrize("task", sorted(CASES))
def test_stop_names_step_and_parts_and_keeps_the_last_good_checkpoint(task, tmp_path, monkeypatch):
    module, batches, part = _prepare(task, monkeypatch, "stop")
    with pytest.raises(NonFiniteLossError) as err:
        fit(module, batches, tmp_path)
    message = str(err.value)
    assert f"global step {BAD_STEP}" in message and part in message and "last.ckpt" in message
    saved = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    assert saved["global_step"] == BAD_STEP and all_finite(tmp_path / "last.ckpt")


@pytest.mark.parametrize("task", sorted(CASES))
def test_skip_skips_the_update_and_counts(task, tmp_path, monkeypatch):
    module, batches, _ = _prepare(task, monkeypatch, "skip")
    seen = {}
    original_step = module.optimizer_step

    def watched() -> list[torch.Tensor]:  # the weights and the EMA copy (BN statistics move in any forward pass)
        ema = getattr(module, "model_ema", None)
        return [*module.model.parameters(), *(ema.state_dict().values() if ema is not None else ())]

    def spy(epoch, batch_idx, optimizer, optimizer_closure=None):
        before = [t.detach().clone() for t in watched()]
        original_step(epoch, batch_idx, optimizer, optimizer_closure)
        seen[batch_idx] = any(not torch.equal(a, t) for a, t in zip(before, watched(), strict=True)
                              if a.is_floating_point())

    module.optimizer_step = spy
    last = fit(module, batches, tmp_path)
    assert module.skipped_nonfinite == 1
    assert seen == {0: True, 1: True, BAD_STEP: False, 3: True}  # the bad batch changed no weight
    assert all_finite(last)


def test_nan_input_cannot_be_skipped_because_batchnorm_saw_it(tmp_path):
    module, batches = classification_case()
    module.nonfinite_loss = "skip"
    batches[BAD_STEP] = batches[BAD_STEP]._replace(images=torch.full_like(batches[BAD_STEP].images, float("nan")))
    with pytest.raises(NonFiniteLossError, match="cannot be skipped.*running_mean"):
        fit(module, batches, tmp_path)
    assert all_finite(tmp_path / "last.ckpt")


def test_guard_refuses_a_nan_checkpoint(tmp_path):
    module, batches = classification_case()
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
                        callbacks=[FiniteCheckpointGuard()])
    trainer.fit(module, train_dataloaders=DataLoader(batches[:1], batch_size=None))
    with torch.no_grad():
        module.model.classifier[3].weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteLossError, match="classifier.3.weight"):
        trainer.save_checkpoint(tmp_path / "bad.ckpt")
    assert not (tmp_path / "bad.ckpt").exists()


def test_policy_value_is_checked():
    with pytest.raises(ValueError, match="nonfinite_loss"):
        SegmentationModule(model=lraspp_mobilenet_v3_small(), nonfinite_loss="ignore")
