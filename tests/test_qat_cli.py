"""Quantization-aware training through ``lightning fit`` with the ``configs/qat/`` overlay, and the Pareto
report through ``scripts/pareto.py``, on the checkpoint of a tiny real run (tests/test_determinism).

The QAT run starts from the float checkpoint (given to the network's builder), writes the PTQ
baseline and its own int8 ``.pte``, and its checkpoint is read by the evaluation scripts as the float
network; the ``.pte`` runs through ``--pte``. The Pareto report evaluates both checkpoints on two
backends, each evaluation in its own process, and draws them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from test_scripts_from_checkpoint import Run

from mbv3_dense.deploy import ExecuTorchModel
from mbv3_dense.deploy.qat import QAT_KEY, STATE_PREFIX

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


def python(*args: str | Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=900)


class QATRun:
    """The tiny float run, then QAT from its checkpoint with the real overlay, shrunk to 5 steps."""

    def __init__(self, work: Path) -> None:
        (work / "float").mkdir()
        self.float = Run("classify", work / "float")
        overlay = yaml.safe_load((REPO / "configs/qat/classify.yaml").read_text())
        qat = overlay["trainer"]["callbacks"][0]["init_args"]
        qat.update(input_size=[32, 32], freeze_batchnorm_step=2, freeze_observers_step=3, calibration_batches=1)
        overlay["trainer"].update(max_epochs=1, enable_progress_bar=False, num_sanity_val_steps=0)
        (work / "qat.yaml").write_text(yaml.safe_dump(overlay))
        self.dir = work / "qat"
        config = next((work / "float" / "run").glob("c.yaml"))
        self.proc = ok(python("-m", "mbv3_dense", "fit", "-c", config, "-c", work / "qat.yaml",
                              "--model.init_args.model.init_args.weights", self.float.ckpt,
                              "--trainer.default_root_dir", self.dir))
        self.ckpt = self.dir / "checkpoints" / "last.ckpt"


@pytest.fixture(scope="module")
def qat_run(tmp_path_factory: pytest.TempPathFactory) -> QATRun:
    return QATRun(tmp_path_factory.mktemp("qat"))


def test_qat_fit_writes_both_int8_files_and_a_float_layout_checkpoint(qat_run: QATRun) -> None:
    log = qat_run.proc.stdout + qat_run.proc.stderr
    assert "BatchNorm layers folded with their own eps/momentum" in log
    assert "QAT at step 2: BatchNorm statistics frozen, quantization ranges updating" in log
    assert "QAT at step 3: BatchNorm statistics frozen, quantization ranges frozen" in log
    for name in ("qat_int8.pte", "ptq_int8.pte"):
        runtime = ExecuTorchModel(qat_run.dir / name, task="classify", input_size=(32, 32), threads=1)
        assert runtime.int8
    qat = torch.load(qat_run.ckpt, map_location="cpu", weights_only=True)
    start = torch.load(qat_run.float.ckpt, map_location="cpu", weights_only=True)
    model_keys = {k for k in qat["state_dict"] if k.startswith("model.")}
    assert model_keys == {k for k in start["state_dict"] if k.startswith("model.")}
    assert any(k.startswith(STATE_PREFIX) for k in qat["state_dict"])
    assert qat[QAT_KEY]["pte"] == str(qat_run.dir / "qat_int8.pte") and qat[QAT_KEY]["per_channel"] is True
    moved = [k for k in model_keys if k.endswith("weight") and not torch.equal(qat["state_dict"][k],
                                                                               start["state_dict"][k.replace(
                                                                                   "model.", "model_ema.", 1)])]
    assert moved  # fine-tuned from the starting (averaged) weights


def test_the_qat_checkpoint_and_its_pte_go_through_the_evaluation_script(qat_run: QATRun, tmp_path: Path) -> None:
    float_json, int8_json = tmp_path / "float.json", tmp_path / "int8.json"
    ok(qat_run.float.evaluate(qat_run.ckpt, float_json))  # read as the float network
    ok(qat_run.float.evaluate(qat_run.ckpt, int8_json, "--backend", "executorch", "--pte",
                              str(qat_run.dir / "qat_int8.pte")))
    a, b = json.loads(float_json.read_text()), json.loads(int8_json.read_text())
    assert a["int8"] is False and b["int8"] is True and b["backend"] == "executorch"
    assert a["images"] == b["images"] == 3 and 0.0 <= b["metric"] <= 1.0


def test_pareto_report_of_the_float_and_qat_checkpoints(qat_run: QATRun, tmp_path: Path) -> None:
    out = tmp_path / "pareto"
    proc = ok(python("scripts/pareto.py", qat_run.float.ckpt, qat_run.ckpt, "--data", qat_run.float.data,
                     "--backends", "torch,executorch-int8", "--image-size", "32", "--threads", "1",
                     "--latency-runs", "2", "--calibration-count", "2", "--out", out))
    report = json.loads((out / "pareto.json").read_text())
    points = report["points"]
    assert len(points) == 4 and {p["backend"] for p in points} == {"torch", "executorch-int8"}
    assert len({p["label"] for p in points}) == 2 and all(p["label"].startswith("Small 0.5x") for p in points)
    assert all(p["task"] == "classify" and 0 <= p["metric"] <= 1 and p["latency_ms"] > 0 for p in points)
    assert any(p["pareto_optimal"] for p in points)
    assert (out / "pareto.png").stat().st_size > 10_000 and "4 points (0 failed)" in proc.stdout
    for p in points:  # each point is the evaluation script's own summary
        summary = json.loads(Path(p["summary"]).read_text())
        assert summary["metric"] == p["metric"] and summary["backend"] == p["backend"].split("-")[0]


def test_pareto_refuses_bad_input_without_writing(qat_run: QATRun, tmp_path: Path) -> None:
    out = tmp_path / "pareto"
    cases = [
        ([tmp_path / "missing.ckpt", "--data", qat_run.float.data], "no such checkpoint"),
        ([qat_run.float.old, "--data", qat_run.float.data], "no model record"),
        ([qat_run.float.ckpt, "--data", tmp_path / "nowhere"], "not a folder"),
        ([qat_run.float.ckpt, "--data", f"detect={qat_run.float.data}"], "no --data for the classify checkpoints"),
        ([qat_run.float.ckpt, "--data", qat_run.float.data, "--backends", "tflite"], "unknown backends"),
    ]
    for args, message in cases:
        proc = python("scripts/pareto.py", *args, "--out", out)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-1000:])
    assert not out.exists()
