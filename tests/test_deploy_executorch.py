"""ExecuTorch with XNNPACK: export parity (fp32, int8), file checks, make_backend, and the scripts' CLI.

Lowering to XNNPACK takes seconds per graph even for small ones, so the unit tests use a tiny network
with the layer kinds of MobileNetV3 (conv-BN-hardswish, depthwise, SE-style gate, bilinear upsampling,
linear head) and the script tests export one real (small, 64x64) classifier once.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_utils import assert_input_dependent, calibrate_and_perturb
from PIL import Image
from torch import nn

from mbv3_dense.deploy import ExecuTorchFileError, ExecuTorchModel, export_executorch, make_backend

pytest.importorskip("executorch")

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32


class TinyDense(nn.Module):
    """Dict output like SSDLite's, MobileNetV3's layer kinds, a few hundred parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1, bias=False), nn.BatchNorm2d(8), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, 1, 1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(8, 8, 1), nn.Hardsigmoid())
        self.seg = nn.Conv2d(8, 3, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        f = self.dw(self.stem(x))
        f = f * self.gate(f)
        seg = nn.functional.interpolate(self.seg(f), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return {"logits": self.fc(f.mean((2, 3), keepdim=True).flatten(1)), "seg": seg}


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return calibrate_and_perturb(TinyDense(), torch.randn(8, 3, SIZE, SIZE))


@pytest.fixture(scope="module")
def inputs() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def fp32_pte(tiny, inputs, tmp_path_factory):
    return export_executorch(tiny, inputs[:1], tmp_path_factory.mktemp("pte") / "tiny.pte", task="segment")


@torch.no_grad()
def test_fp32_pte_equals_pytorch_with_the_same_output_structure(tiny, inputs, fp32_pte):
    runtime = ExecuTorchModel(fp32_pte.path, task="segment", input_size=(SIZE, SIZE), threads=1)
    assert not runtime.int8 and runtime.input_shape == (1, 3, SIZE, SIZE)
    reference = tiny(inputs)
    assert_input_dependent(reference["logits"][0], reference["logits"][1])
    got = runtime(inputs)  # batch 3 through a batch-1 program: one item at a time
    assert list(got) == ["logits", "seg"]
    for key in reference:
        torch.testing.assert_close(got[key], reference[key], rtol=1e-4, atol=1e-4)
    # XNNPACK takes every operator that depends on the input; what is left acts on constants only.
    assert fp32_pte.delegated > 0 and fp32_pte.delegation.coverage == 1.0, fp32_pte.delegation_summary()
    assert fp32_pte.not_delegated == fp32_pte.constant_only, fp32_pte.delegation_summary()


@torch.no_grad()
def test_int8_pte_is_quantized_and_stays_close(tiny, inputs, tmp_path):
    gen = torch.Generator().manual_seed(2)
    calibration = [torch.randn(1, 3, SIZE, SIZE, generator=gen) for _ in range(8)]
    state = torch.get_rng_state()
    result = export_executorch(tiny, inputs[:1], tmp_path / "tiny.int8.pte", task="segment",
                               int8_calibration=calibration)
    assert torch.equal(torch.get_rng_state(), state), "exporting moved the global random stream"
    assert result.meta["int8"] and result.path.stat().st_size > 0
    runtime = ExecuTorchModel(result.path, threads=1)
    assert runtime.int8
    reference, got = tiny(inputs), runtime(inputs)
    for key in reference:
        scale = reference[key].abs().max().item()
        error = (got[key] - reference[key]).abs().max().item()
        assert error < 0.15 * scale, f"{key}: int8 error {error:.3g} vs output scale {scale:.3g}"
        assert error > 0, "an int8 program that reproduces float exactly was not quantized"


def test_bad_pte_files_are_refused_naming_the_file(fp32_pte, tmp_path):
    missing = tmp_path / "missing.pte"
    with pytest.raises(FileNotFoundError, match="missing.pte"):
        ExecuTorchModel(missing)
    corrupt = tmp_path / "corrupt.pte"
    corrupt.write_bytes(b"not a flatbuffer at all" * 4)
    with pytest.raises(ExecuTorchFileError, match="corrupt.pte.*not a loadable ExecuTorch program"):
        ExecuTorchModel(corrupt)
    truncated = tmp_path / "truncated.pte"
    truncated.write_bytes(fp32_pte.path.read_bytes()[:2000])
    with pytest.raises(ExecuTorchFileError, match="truncated.pte"):
        ExecuTorchModel(truncated)
    with pytest.raises(ExecuTorchFileError, match=r"tiny.pte: exported for task 'segment', not 'detect'"):
        ExecuTorchModel(fp32_pte.path, task="detect")
    with pytest.raises(ExecuTorchFileError, match=r"tiny.pte: exported for input size 32x32, not 64x64"):
        ExecuTorchModel(fp32_pte.path, input_size=(64, 64))
    with pytest.raises(ValueError, match=r"tiny.pte: input of shape \(1, 3, 16, 16\)"):
        ExecuTorchModel(fp32_pte.path)(torch.zeros(1, 3, 16, 16))


@torch.no_grad()
def test_make_backend_runs_a_ready_pte_and_checks_it(tiny, inputs, fp32_pte):
    backend = make_backend("executorch", tiny, inputs[:1], pte_file=fp32_pte.path, task="segment", threads=1)
    torch.testing.assert_close(backend(inputs)["seg"], tiny(inputs)["seg"], rtol=1e-4, atol=1e-4)
    # As in an evaluation loop that exports on first use, on an image permuted from HWC (channels-last
    # strides): the program must still take ordinary NCHW tensors.
    with torch.inference_mode():
        example = inputs[:1].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
        assert not example.is_contiguous()
        exported = make_backend("executorch", tiny, example, task="segment", threads=1)
        torch.testing.assert_close(exported(inputs)["seg"], tiny(inputs)["seg"], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(exported(example)["seg"], tiny(example)["seg"], rtol=1e-4, atol=1e-4)
    with pytest.raises(ExecuTorchFileError, match="tiny.pte: exported for input size"):
        make_backend("executorch", tiny, torch.zeros(1, 3, 48, 48), pte_file=fp32_pte.path, task="segment")


def test_exports_a_model_built_under_inference_mode(tiny, inputs, tmp_path):
    """Weights made under ``torch.inference_mode`` (as scripts/benchmark.py builds its contenders) are
    inference tensors, which tracing cannot save for autograd: the export works on normal copies."""
    with torch.inference_mode():
        built = copy_of(tiny).eval()
        built.load_state_dict({k: v.clone() for k, v in tiny.state_dict().items()})
        assert next(built.parameters()).is_inference()
        result = export_executorch(built, inputs[:1], tmp_path / "built.pte", task="segment")
        assert next(built.parameters()).is_inference() and not built.training
        got = ExecuTorchModel(result.path, task="segment", threads=1)(inputs)
        torch.testing.assert_close(got["seg"], tiny(inputs)["seg"], rtol=1e-4, atol=1e-4)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"_script_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def classifier_pte(tmp_path_factory):
    """A small classifier (3 classes, 64x64) saved as a state dict and exported by the script."""
    from mbv3_dense import mobilenet_v3_small

    work = tmp_path_factory.mktemp("cls")
    torch.manual_seed(0)
    weights = work / "cls.pth"
    torch.save(mobilenet_v3_small(num_classes=3).state_dict(), weights)
    out = work / "cls.pte"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = _script("export").main(["--task", "classify", "--arch", "small", "--num-classes", "3", "--size", "64",
                                       "64", "--weights", str(weights), "--format", "executorch", "--out", str(out),
                                       "--threads", "1"])
    return code, weights, out, printed.getvalue()


def test_export_script_writes_a_checked_pte(classifier_pte):
    code, _, out, printed = classifier_pte
    assert code == 0 and out.is_file()
    assert "ExecuTorch (XNNPACK) vs PyTorch" in printed and ": OK" in printed and "FAILED" not in printed
    assert "top-1 classes: 1 of 1 equal" in printed
    assert "XNNPACK delegation:" in printed and "compute nodes delegated to XNNPACK (100.0%)" in printed


def test_eval_classify_through_the_pte_and_refusing_a_wrong_one(classifier_pte, fp32_pte, tmp_path):
    _, weights, pte, _ = classifier_pte
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b", "c"):
            folder = tmp_path / "data" / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 255, (72, 72, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    evaluate = _script("eval_classify").main
    common = ["--weights", str(weights), "--arch", "small", "--root", str(tmp_path / "data"), "--image-size", "64",
              "--latency-runs", "2"]
    assert evaluate([*common, "--json", str(tmp_path / "torch.json")]) == 0
    assert evaluate([*common, "--backend", "executorch", "--pte", str(pte), "--threads", "1",
                     "--json", str(tmp_path / "et.json")]) == 0
    torch_summary = json.loads((tmp_path / "torch.json").read_text())
    et_summary = json.loads((tmp_path / "et.json").read_text())
    assert et_summary["backend"] == "executorch" and et_summary["pte"] == str(pte) and not et_summary["int8"]
    assert et_summary["top1"] == torch_summary["top1"] and et_summary["images"] == 6
    with pytest.raises(ExecuTorchFileError, match=r"tiny.pte: exported for task 'segment', not 'classify'"):
        evaluate([*common, "--backend", "executorch", "--pte", str(fp32_pte.path)])
    with pytest.raises(SystemExit):  # argparse: --pte without --backend executorch
        evaluate([*common, "--pte", str(pte)])


def _tiny_lightning_module(model: nn.Module):
    import lightning as L

    class TinyModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model
            self.logged: dict[str, float] = {}

        def forward(self, x: torch.Tensor):
            return self.model(x)

        def example_input(self, height: int, width: int) -> torch.Tensor:
            return torch.randn(1, 3, height, width)  # global RNG on purpose: the callback must not let it move

        def log_dict(self, metrics, **kwargs) -> None:
            self.logged.update(metrics)

    return TinyModule()


@pytest.mark.parametrize("backend", ["executorch", "onnxruntime"])
def test_latency_callback_exports_current_weights_and_changes_nothing(tiny, backend):
    import random
    from types import SimpleNamespace

    from mbv3_dense.training.latency import LatencyCallback

    module = _tiny_lightning_module(copy_of(tiny))
    module.train()
    module.model.stem.eval()  # a submodule in eval mode while the rest trains: must stay so
    callback = LatencyCallback(input_size=(SIZE, SIZE), warmup=1, runs=2, backend=backend, threads=1)
    assert callback.key == f"latency_{backend}_ms"
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    states = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
    with torch.inference_mode():  # as Lightning runs validation hooks
        callback.on_validation_epoch_end(SimpleNamespace(sanity_checking=False, global_rank=0), module)
    assert torch.equal(torch.get_rng_state(), states[0])
    assert np.array_equal(np.random.get_state()[1], states[1]) and random.getstate() == states[2]
    assert module.training and module.model.dw.training and not module.model.stem.training
    assert next(module.parameters()).device.type == "cpu"
    assert module.logged[f"latency_{backend}_ms"] > 0 and module.logged[f"latency_{backend}_p90_ms"] > 0
    assert module.logged["params_M"] > 0 and callback.last.device == f"cpu ({backend})"


def test_latency_callback_schedule_survives_a_resume_and_runs_exports_on_rank_zero(tiny, monkeypatch):
    """every_n_validations=3 measures at the 3rd, 6th, ... validation; the count is in the checkpoint
    (so a resumed run measures where the uninterrupted one would), and other ranks never export."""
    from types import SimpleNamespace

    from mbv3_dense.training.latency import Latency, LatencyCallback

    def fake_measure(self, pl_module, example):
        calls.append(self.key)
        return Latency(1.0, 1.0, 1, "cpu (executorch)", 1)

    calls: list[str] = []
    monkeypatch.setattr(LatencyCallback, "_measure", fake_measure)
    module = _tiny_lightning_module(copy_of(tiny))
    rank0, rank1 = SimpleNamespace(sanity_checking=False, global_rank=0), SimpleNamespace(sanity_checking=False,
                                                                                          global_rank=1)
    first = LatencyCallback(input_size=(SIZE, SIZE), backend="executorch", int8=True, every_n_validations=3)
    torch_cb = LatencyCallback(input_size=(SIZE, SIZE))
    assert first.state_key != torch_cb.state_key
    for _ in range(4):
        first.on_validation_epoch_end(rank0, module)
    assert calls == ["latency_executorch_int8_ms"]  # the 3rd validation only
    resumed = LatencyCallback(input_size=(SIZE, SIZE), backend="executorch", int8=True, every_n_validations=3)
    resumed.load_state_dict(first.state_dict())
    for _ in range(2):
        resumed.on_validation_epoch_end(rank0, module)
    assert len(calls) == 2  # the 6th
    other = LatencyCallback(input_size=(SIZE, SIZE), backend="executorch", every_n_validations=1)
    other.on_validation_epoch_end(rank1, module)
    assert len(calls) == 2
    torch_cb.on_validation_epoch_end(rank1, module)  # the training-device latency is timed on every rank
    assert calls[-1] == "latency_ms"


@pytest.mark.parametrize("config", ["mobilenet_v3_large_imagenet", "ssdlite_mobilenet_v3_large_coco",
                                    "lraspp_cityscapes"])
def test_task_configs_log_xnnpack_int8_latency_beside_the_metric(config, tmp_path):
    """Each task config measures the deployment latency (ExecuTorch int8) besides the training device's."""
    import subprocess
    import sys

    import yaml

    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "fit", "-c", str(ROOT / "configs" / f"{config}.yaml"),
                           "--print_config"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    callbacks = yaml.safe_load(proc.stdout)["trainer"]["callbacks"]
    latency = [c["init_args"] for c in callbacks if c["class_path"] == "mbv3_dense.training.latency.LatencyCallback"]
    backends = sorted((c["backend"], c["int8"]) for c in latency)
    assert backends == [("executorch", True), ("torch", False)]
    exported = next(c for c in latency if c["backend"] == "executorch")
    assert exported["every_n_validations"] > 1 and exported["threads"] == 1


def test_latency_callback_rejects_int8_on_torch():
    from mbv3_dense.training.latency import LatencyCallback

    with pytest.raises(ValueError, match="int8 needs backend"):
        LatencyCallback(backend="torch", int8=True)
    assert LatencyCallback(backend="executorch", int8=True).key == "latency_executorch_int8_ms"


def copy_of(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)
