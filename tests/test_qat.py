"""Quantization-aware training (mbv3_dense.deploy.qat): the PT2E graph is the float network until the
fake quantization bites, BatchNorm keeps its own eps and momentum, the int8 graph and ``.pte`` compute
what the QAT graph computes, checkpoints keep the float layout, and bad input is refused.

torchao's QAT rewrites give every BatchNorm eps 1e-5 and momentum 0.1; MobileNetV3's are 1e-3 and
0.01 (0.03 in SSDLite). A small network with trained-looking statistics shows the difference at once:
the float function of the QAT graph must equal the network's to float rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mbv3_dense import mobilenet_v3_small
from mbv3_dense.deploy import ExecuTorchModel
from mbv3_dense.deploy.qat import (
    STATE_PREFIX,
    export_qat_pte,
    fake_quantizers,
    prepare_qat,
    symmetric_zero_point_channels,
)
from mbv3_dense.training.quantization_aware import QuantizationAwareTraining

SIZE = (32, 32)


def trained_like(seed: int = 0) -> nn.Module:
    """A small classifier whose BatchNorm statistics come from data and differ per channel (as after
    training; random statistics make the output nearly independent of the input), in eval mode."""
    torch.manual_seed(seed)
    net = mobilenet_v3_small(num_classes=4, width_mult=0.5, dropout=0.0)  # train mode compared below
    net.train()
    with torch.no_grad():
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = None  # cumulative: the statistics of the batches below
        for _ in range(3):
            net(torch.randn(8, 3, *SIZE))
        for bn in (m for m in net.modules() if isinstance(m, nn.BatchNorm2d)):
            bn.momentum = 0.01
            bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.02, 1.5))  # some channels near eps
    return net.eval()


def batch(seed: int, n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


def test_the_qat_graph_is_the_float_network_with_its_batchnorm_arguments() -> None:
    net = trained_like()
    reference = copy.deepcopy(net)
    qat = prepare_qat(net, SIZE)
    bn_nodes = [n for n in qat.graph.graph.nodes if n.target == torch.ops.aten.batch_norm.default]
    assert len(bn_nodes) == sum(isinstance(m, nn.BatchNorm2d) for m in reference.modules())
    assert {(n.args[6], n.args[7]) for n in bn_nodes} == {(0.01, 1e-3)}  # torchao would give (0.1, 1e-5)
    for fq in fake_quantizers(qat.graph):
        fq.disable_fake_quant()
    qat.train(False)
    x = batch(1)
    with torch.no_grad():
        expected, got = reference(x), qat(x)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # the output depends on the input
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
    # Training mode: batch statistics, and the running ones move with the layer's own momentum.
    qat.train(True)
    reference.train()
    x = batch(2)
    with torch.no_grad():
        torch.testing.assert_close(qat(x), reference(x), rtol=1e-4, atol=1e-4)
    bn = reference.backbone.features[0][1]
    name = next(n for n, m in reference.named_modules() if m is bn)
    torch.testing.assert_close(qat.graph.get_buffer(f"model.{name}.running_var"), bn.running_var)


def test_observers_and_batchnorm_freeze_and_evaluation_changes_nothing() -> None:
    qat = prepare_qat(trained_like(), SIZE)
    qat.train(True)
    with torch.no_grad():
        qat(batch(3))
    def learned() -> dict[str, torch.Tensor]:  # ranges and statistics (not the flags, not the unused counters)
        return {k: v.clone() for k, v in qat.graph.state_dict().items()
                if not k.endswith(("_enabled", "num_batches_tracked"))}

    state = learned()
    qat.train(False)  # evaluation: neither ranges nor statistics move
    with torch.no_grad():
        qat(batch(4))
    assert all(torch.equal(v, state[k]) for k, v in learned().items())
    qat.training = True  # as Lightning restores the flag after validation: by assignment
    qat.freeze(batchnorm=True, observers=True)
    with torch.no_grad():
        qat(batch(5))
    assert all(torch.equal(v, state[k]) for k, v in learned().items())
    qat.freeze(batchnorm=False, observers=False)
    with torch.no_grad():
        qat(batch(6))
    moved = [k for k, v in learned().items() if not torch.equal(v, state[k])]
    assert any(k.endswith("running_mean") for k in moved) and any("min_val" in k for k in moved)


def conv_bn_net() -> nn.Module:
    """conv-BN-hardswish, depthwise conv-BN-ReLU with MobileNetV3's BatchNorm (eps 1e-3), trained-looking
    statistics, and channels whose variance is far below eps (as MobileNetV3's nearly dead channels)."""
    torch.manual_seed(0)
    norm = dict(eps=1e-3, momentum=0.01)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8, **norm), nn.Hardswish(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8, **norm), nn.ReLU())
    with torch.no_grad():
        net.train()(torch.randn(16, 3, *SIZE))
        for bn in (net[1], net[4]):
            bn.running_var[::2] = 1e-4
    return net.eval()


def test_convert_folds_batchnorm_with_each_layers_eps(monkeypatch) -> None:
    """The int8 graph computes what the QAT graph computes (same folded weights, same scales), because the
    running variances are shifted for torchao's eps-1e-5 folding; without the shift the folded scales of
    the low-variance channels are ~3x off."""
    import mbv3_dense.deploy.qat as qat_module
    from mbv3_dense.deploy.qat import convert_qat

    def difference() -> float:
        qat = prepare_qat(conv_bn_net(), SIZE)
        with torch.no_grad():
            qat.train(True)(batch(30, n=16))  # ranges observed
        converted = convert_qat(qat)
        qat.train(False)
        x = batch(31, n=8)
        with torch.no_grad():
            expected, got = qat(x), converted(x)[0]
        return ((got - expected).abs().max() / expected.abs().max()).item()

    assert difference() <= 1e-6  # the int8 graph computes exactly what QAT trained
    monkeypatch.setattr(qat_module, "TORCHAO_BN_EPS", 1e-3)  # no shift: torchao's fold with eps 1e-5
    assert difference() > 0.2


def test_the_int8_pte_runs_what_the_qat_graph_computes(tmp_path) -> None:
    qat = prepare_qat(conv_bn_net(), SIZE)
    optimizer = torch.optim.SGD(qat.parameters(), lr=1e-2)
    for step in range(3):  # a few QAT steps, so ranges and weights are the trained ones
        loss = qat(batch(10 + step)).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    result, diff = export_qat_pte(qat, tmp_path / "qat.pte", task="segment")
    assert diff <= 1e-6  # mean difference of the int8 graph from the QAT graph, as logged
    assert not result.not_delegated.keys() - result.constant_only.keys()  # all of it runs in XNNPACK
    runtime = ExecuTorchModel(result.path, task="segment", input_size=SIZE, threads=1)
    assert runtime.int8 and runtime.input_shape == (1, 3, *SIZE) and result.meta["outputs"] == {"kind": "tensor"}
    qat.train(False)
    x = batch(20, n=3)
    with torch.no_grad():
        expected = qat(x)
    got = runtime(x)
    # XNNPACK's int8 kernels round (and approximate hardswish) their own way: a few output steps at
    # worst, a small fraction of one on average.
    step = expected.abs().max() / 127
    error = (got - expected).abs()
    assert error.max() <= 8 * step and error.mean() <= 0.25 * step, (error.max() / step, error.mean() / step)
    assert not list(tmp_path.glob("*.partial"))


def test_weight_channels_of_one_sign_run_in_xnnpack_as_converted(tmp_path, monkeypatch) -> None:
    """The fused fake-quantize kernel gives a per-channel weight whose values all have one sign a zero point
    of +-127 (half the symmetric scale); XNNPACK's int8 convolution ignores weight zero points. Deployed with
    the symmetric scale and zero point 0, the .pte runs what the PyTorch int8 graph computes; with the
    kernel's zero points it would not (LR-ASPP lost 2.4 mIoU points that way: docs/benchmark.md)."""
    import mbv3_dense.deploy.qat as qat_module
    from mbv3_dense.deploy.qat import convert_qat

    def prepared() -> qat_module.QATNetwork:
        net = conv_bn_net()
        with torch.no_grad():
            net[0].weight[1].abs_()  # channels whose weights are all positive / all negative
            net[0].weight[2] = -net[0].weight[2].abs()
            net[3].weight[5].abs_()
        qat = prepare_qat(net, SIZE)
        with torch.no_grad():
            qat.train(True)(batch(40, n=8))  # ranges observed
        return qat.train(False)

    def pte_error(qat: qat_module.QATNetwork, name: str) -> float:
        x = batch(41, n=2)
        with torch.no_grad():
            reference = convert_qat(qat)(x)[0]
        result, _ = export_qat_pte(qat, tmp_path / name, task="segment")
        got = ExecuTorchModel(result.path, task="segment", input_size=SIZE, threads=1)(x)
        return ((got - reference).abs().max() / reference.abs().max()).item()

    qat = prepared()
    assert symmetric_zero_point_channels(qat.graph) >= 2  # the kernel's behaviour this guards against
    assert pte_error(qat, "fixed.pte") <= 0.05  # XNNPACK's own rounding: a few int8 steps
    monkeypatch.setattr(qat_module, "_deployed_qparams", qat_module._trained_qparams)
    assert pte_error(prepared(), "kernel.pte") > 0.2


def test_bad_input_is_refused(tmp_path) -> None:
    with pytest.raises(ValueError, match="initial statistics"):
        prepare_qat(mobilenet_v3_small(num_classes=4, width_mult=0.5), SIZE)
    qat = prepare_qat(trained_like(), SIZE)
    with pytest.raises(ValueError, match="exported at 32x32"):
        qat(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="input_size"):
        QuantizationAwareTraining(input_size=(0, 32))
    with pytest.raises(ValueError, match="freeze_batchnorm_step"):
        QuantizationAwareTraining(input_size=SIZE, freeze_batchnorm_step=-1)


def test_checkpoints_hold_the_float_layout_and_restore_the_qat_state() -> None:
    from mbv3_dense.checkpoints.weights import lightning_model_state, load_state_dict_strict
    from mbv3_dense.classification.module import ClassificationModule

    def module() -> tuple[ClassificationModule, QuantizationAwareTraining]:
        m = ClassificationModule(model=trained_like())
        callback = QuantizationAwareTraining(input_size=SIZE)
        callback.setup(None, m, "fit")
        return m, callback

    first, _ = module()
    first.train()
    with torch.no_grad():
        first.model(batch(7))  # ranges observed, statistics moved
    state = first.state_dict()
    float_keys = set(trained_like().state_dict())
    assert {k[len("model."):] for k in state if k.startswith("model.")} == float_keys
    assert any(k.startswith(STATE_PREFIX) and k.endswith("scale") for k in state)
    # Any script reads the float network from it, strictly.
    plain = trained_like(seed=1)
    load_state_dict_strict(plain, lightning_model_state(state), "qat checkpoint")
    # A resumed run gets the QAT state back (ranges included) and computes the same.
    second, _ = module()
    second.load_state_dict(state, strict=True)
    first.eval()
    second.eval()
    x = batch(8)
    with torch.no_grad():
        torch.testing.assert_close(second.model(x), first.model(x), rtol=0, atol=0)
