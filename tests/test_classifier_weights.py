"""Checkpoint formats: torchvision, mmpretrain, timm and our Lightning .ckpt give the same network.

The mmpretrain and timm files are written here from a torchvision model by mappings built from
those projects' documented module names, independently of ``mbv3_dense.checkpoints.weights``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import lightning as L
import pytest
import torch
import torchvision
from parity_utils import assert_input_dependent, calibrate_and_perturb
from torch import nn
from torchvision.ops.misc import Conv2dNormActivation, SqueezeExcitation

import mbv3_dense
from mbv3_dense.backbone import MobileNetV3
from mbv3_dense.checkpoints.weights import WeightsError, load_backbone_weights, read_checkpoint

NUM_CLASSES = 7


def reference(arch: str, *, bn_eps: float | None = None) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(torchvision.models, f"mobilenet_v3_{arch}")(num_classes=NUM_CLASSES)
    if bn_eps is not None:
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eps = bn_eps
    return calibrate_and_perturb(model, torch.randn(6, 3, 64, 64), seed=3)


def inputs() -> torch.Tensor:
    return torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(5))


def assert_same_outputs(ours: nn.Module, ref: nn.Module) -> None:
    x = inputs()
    with torch.no_grad():
        expected, got = ref.eval()(x), ours.eval()(x)
    assert_input_dependent(expected[0], expected[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def block_roles(block: nn.Module) -> dict[str, nn.Module]:
    """torchvision InvertedResidual children by role: expand / depthwise / se / project."""
    roles: dict[str, nn.Module] = {}
    seen_depthwise = False
    for child in block.block:
        if isinstance(child, SqueezeExcitation):
            roles["se"] = child
        elif isinstance(child, Conv2dNormActivation) and child[0].groups > 1:
            roles["depthwise"], seen_depthwise = child, True
        else:
            roles["project" if seen_depthwise else "expand"] = child
    return roles


def prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v.clone() for k, v in module.state_dict().items()}


def to_mmpretrain(ref: nn.Module) -> dict:
    """mmpretrain's ImageClassifier(MobileNetV3 + StackedLinearClsHead) names, in an mmengine checkpoint."""
    state: dict[str, torch.Tensor] = {}
    features = ref.features
    for i, layer in enumerate(features):
        if i == 0 or i == len(features) - 1:  # stem and last 1x1 conv: ConvModule(conv, bn)
            state |= prefixed(f"backbone.layer{i}.conv", layer[0]) | prefixed(f"backbone.layer{i}.bn", layer[1])
            continue
        names = {"expand": "expand_conv", "depthwise": "depthwise_conv", "project": "linear_conv"}
        for role, child in block_roles(layer).items():
            if role == "se":
                state |= prefixed(f"backbone.layer{i}.se.conv1.conv", child.fc1)
                state |= prefixed(f"backbone.layer{i}.se.conv2.conv", child.fc2)
            else:
                state |= prefixed(f"backbone.layer{i}.{names[role]}.conv", child[0])
                state |= prefixed(f"backbone.layer{i}.{names[role]}.bn", child[1])
    state |= prefixed("head.layers.0.fc", ref.classifier[0]) | prefixed("head.layers.1.fc", ref.classifier[3])
    return {"meta": {"mmpretrain_version": "1.2.0", "epoch": 600}, "state_dict": state}


TIMM_STAGES = {"large": [1, 2, 3, 4, 2, 3, 1], "small": [1, 2, 3, 2, 3, 1]}


def to_timm(ref: nn.Module, arch: str) -> dict[str, torch.Tensor]:
    """timm ``mobilenetv3_{large,small}_100`` names: conv_stem/bn1, blocks.S.J, conv_head, classifier."""
    state = prefixed("conv_stem", ref.features[0][0]) | prefixed("bn1", ref.features[0][1])
    slots = [(s, j) for s, n in enumerate(TIMM_STAGES[arch]) for j in range(n)]
    bottlenecks = list(ref.features)[1:]
    assert len(slots) == len(bottlenecks)
    for (s, j), layer in zip(slots, bottlenecks, strict=True):
        p = f"blocks.{s}.{j}"
        if isinstance(layer, Conv2dNormActivation):  # final ConvBnAct
            state |= prefixed(f"{p}.conv", layer[0]) | prefixed(f"{p}.bn1", layer[1])
            continue
        roles = block_roles(layer)
        if "expand" in roles:  # InvertedResidual
            state |= prefixed(f"{p}.conv_pw", roles["expand"][0]) | prefixed(f"{p}.bn1", roles["expand"][1])
            state |= prefixed(f"{p}.conv_dw", roles["depthwise"][0]) | prefixed(f"{p}.bn2", roles["depthwise"][1])
            state |= prefixed(f"{p}.conv_pwl", roles["project"][0]) | prefixed(f"{p}.bn3", roles["project"][1])
        else:  # DepthwiseSeparableConv
            state |= prefixed(f"{p}.conv_dw", roles["depthwise"][0]) | prefixed(f"{p}.bn1", roles["depthwise"][1])
            state |= prefixed(f"{p}.conv_pw", roles["project"][0]) | prefixed(f"{p}.bn2", roles["project"][1])
        if "se" in roles:
            state |= prefixed(f"{p}.se.conv_reduce", roles["se"].fc1) | prefixed(f"{p}.se.conv_expand", roles["se"].fc2)
    head = ref.classifier[0]
    state["conv_head.weight"] = head.weight.detach().clone()[:, :, None, None]
    state["conv_head.bias"] = head.bias.detach().clone()
    state |= prefixed("classifier", ref.classifier[3])
    return state


def build(arch: str, weights: Path | None = None) -> nn.Module:
    return getattr(mbv3_dense, f"mobilenet_v3_{arch}")(num_classes=NUM_CLASSES, weights=weights)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_torchvision_state_dict_file(arch: str, tmp_path: Path) -> None:
    ref = reference(arch)
    torch.save(ref.state_dict(), tmp_path / "tv.pth")
    assert_same_outputs(build(arch, tmp_path / "tv.pth"), ref)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_mmpretrain_checkpoint(arch: str, tmp_path: Path) -> None:
    ref = reference(arch)
    ckpt = to_mmpretrain(ref)
    last = 16 if arch == "large" else 12
    assert f"backbone.layer{last}.conv.weight" in ckpt["state_dict"]
    assert "backbone.layer1.expand_conv.conv.weight" not in ckpt["state_dict"]  # first block: no expansion
    torch.save(ckpt, tmp_path / "mm.pth")
    assert_same_outputs(build(arch, tmp_path / "mm.pth"), ref)


@pytest.mark.parametrize("arch", ["large", "small"])
def test_timm_state_dict(arch: str, tmp_path: Path) -> None:
    ref = reference(arch, bn_eps=1e-5)  # timm's BatchNorm eps
    torch.save(to_timm(ref, arch), tmp_path / "timm.pth")
    ours = build(arch, tmp_path / "timm.pth")
    assert all(m.eps == 1e-5 for m in ours.modules() if isinstance(m, nn.BatchNorm2d))
    assert_same_outputs(ours, ref)


def test_lightning_checkpoint_prefers_the_weight_average(tmp_path: Path) -> None:
    from mbv3_dense.classification.data import ImageFolderDataModule
    from mbv3_dense.classification.module import ClassificationModule
    from mbv3_dense.classification.synthetic import write_imagefolder

    write_imagefolder(tmp_path / "data", num_classes=3, train_per_class=4, val_per_class=2, size=32, seed=1)
    data = ImageFolderDataModule(root=tmp_path / "data", batch_size=4, num_workers=0, crop_size=32,
                              val_resize_size=32, auto_augment=False, random_erase=0.0)
    net = mbv3_dense.mobilenet_v3_small(num_classes=3, width_mult=0.5)
    module = ClassificationModule(model=net, ema_decay=0.5,
                                  optimizer=lambda p: torch.optim.SGD(p, lr=0.5, momentum=0.9))
    trainer = L.Trainer(fast_dev_run=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, datamodule=data)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    loaded = mbv3_dense.mobilenet_v3_small(num_classes=3, width_mult=0.5, weights=tmp_path / "run.ckpt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ema_out, model_out, got = module.model_ema.eval()(x), module.model.eval()(x), loaded.eval()(x)
    torch.testing.assert_close(got, ema_out)
    assert not torch.allclose(ema_out, model_out)  # the average is not the trained network


def test_missing_and_misshaped_keys_are_named(tmp_path: Path) -> None:
    state = reference("small").state_dict()
    del state["features.3.block.0.1.running_var"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(WeightsError, match=r"missing keys.*backbone\.features\.3\.block\.0\.1\.running_var"):
        build("small", tmp_path / "missing.pth")
    # Another class count is a new head (tests/test_transfer.py); any other shape stays an error.
    state = reference("small").state_dict()
    state["classifier.0.weight"] = state["classifier.0.weight"][:, :-1]
    torch.save(state, tmp_path / "misshaped.pth")
    with pytest.raises(WeightsError, match=r"wrongly shaped keys.*classifier\.0\.weight"):
        mbv3_dense.mobilenet_v3_small(num_classes=10, weights=tmp_path / "misshaped.pth")


def test_unexpected_keys_are_named(tmp_path: Path) -> None:
    state = reference("small").state_dict()
    state["features.99.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(WeightsError, match=r"unexpected keys.*features\.99\.weight"):
        build("small", tmp_path / "extra.pth")


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    torch.save({"state_dict": _RunsCode(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        build("small", tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refused"):
        read_checkpoint(tmp_path / "evil.pth")
    assert not marker.exists()


def test_garbage_file_is_named(tmp_path: Path) -> None:
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="junk.pth"):
        build("small", tmp_path / "junk.pth")


def test_backbone_loading_drops_the_head_with_a_note(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ref = reference("small")
    torch.save(to_mmpretrain(ref), tmp_path / "mm.pth")
    backbone = MobileNetV3(arch="small")
    with caplog.at_level(logging.INFO, logger="mbv3_dense.checkpoints.weights"):
        assert load_backbone_weights(backbone, tmp_path / "mm.pth") == "mmpretrain"
    assert "dropping" in caplog.text and "classifier.3.weight" in caplog.text
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(backbone.eval()(x)["c5"], ref.features(x), rtol=1e-5, atol=1e-5)
