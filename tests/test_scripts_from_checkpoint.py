"""The evaluation, export and prediction scripts on the ``.ckpt`` of a real ``python -m mbv3_dense fit``.

Each task's real config is shrunk to a seconds-long CPU run (``test_determinism.tiny_config``). Its
checkpoint names its network (:mod:`mbv3_dense.checkpoints.model_record`), so every script takes ``--weights
run.ckpt`` alone, and gives the figures that the same weights give without the record (an older
``.ckpt``) built from the explicit arguments. Arguments that disagree with the record, and a
checkpoint of another task, stop the script with a message naming the file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_determinism import CASES, tiny_config

from mbv3_dense.checkpoints.model_record import RECORD_KEY

REPO = Path(__file__).resolve().parents[1]
# One thread: the two evaluations compared below then compute in the same order.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
# What a user types for the tiny runs' networks when the file does not say it (see test_determinism).
EXPLICIT = {
    "classify": ["--arch", "small", "--width-mult", "0.5", "--num-classes", "3"],
    "detect": ["--arch", "small", "--width-mult", "0.5"],  # the class count read from the file
    "segment": ["--arch", "small", "--variant", "paper"],
}
SUMMARY_KEYS = {"task", "metric_name", "metric", "latency_ms", "latency_p90_ms", "latency_input", "device",
                "threads", "backend", "int8", "weights", "model"}


def script(name: str, *args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=600)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-4000:]
    return proc


class Run:
    """A finished tiny run: its data, its last checkpoint, and the same weights without the record."""

    def __init__(self, task: str, work: Path) -> None:
        case = CASES[task]
        self.task = task
        self.data = case.make_data(work / "data")
        run_dir = work / "run"
        run_dir.mkdir()
        config = tiny_config(case, self.data, run_dir / "c.yaml", workers=0)
        proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "fit", "-c", str(config),
                               "--trainer.default_root_dir", str(run_dir)], cwd=run_dir, env=ENV,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        found = sorted(run_dir.glob("**/last.ckpt"))
        assert len(found) == 1, found
        self.ckpt = found[0]
        checkpoint = torch.load(self.ckpt, map_location="cpu", weights_only=True)
        assert checkpoint[RECORD_KEY]["task"] == task
        del checkpoint[RECORD_KEY]
        self.old = work / "older.ckpt"
        torch.save(checkpoint, self.old)

    def evaluate(self, weights: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
        """The task's evaluation script on the tiny data, its summary written to ``out``."""
        if self.task == "classify":
            return script("eval_classify.py", "--weights", weights, *extra, "--root", self.data, "--image-size", "32",
                          "--latency-runs", "2", "--json", out)
        if self.task == "detect":
            return script("eval_coco.py", "--weights", weights, *extra, "--images", self.data / "val2017",
                          "--annotations", self.data / "annotations/instances_val2017.json",
                          "--results", out.with_suffix(".results.json"), "--workers", "0", "--latency-runs", "2",
                          "--json", out)
        return script("eval_cityscapes.py", "--weights", weights, *extra, "--root", self.data, "--split", "val",
                      "--export-dir", out.with_suffix(".labelIds"), "--latency-size", "64", "128",
                      "--latency-runs", "2", "--json", out)


_RUNS: dict[str, Run] = {}


def finished_run(task: str, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The tiny run of ``task``, trained once for all the tests of this file."""
    if task not in _RUNS:
        _RUNS[task] = Run(task, tmp_path_factory.mktemp(task))
    return _RUNS[task]


@pytest.fixture(params=sorted(CASES))
def run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return finished_run(request.param, tmp_path_factory)


def test_eval_with_the_checkpoint_alone_equals_the_explicit_arguments(run: Run, tmp_path: Path) -> None:
    alone, explicit = tmp_path / "alone.json", tmp_path / "explicit.json"
    printed = ok(run.evaluate(run.ckpt, alone)).stdout
    assert f"as recorded in {run.ckpt}" in printed
    ok(run.evaluate(run.old, explicit, *EXPLICIT[run.task]))
    a, b = json.loads(alone.read_text()), json.loads(explicit.read_text())
    assert set(a) >= SUMMARY_KEYS and set(b) >= SUMMARY_KEYS
    assert a["task"] == b["task"] == run.task
    assert a["metric_name"] == b["metric_name"] == {"classify": "top1", "detect": "mAP", "segment": "mIoU"}[run.task]
    assert a["metric"] == b["metric"] and a["images"] == b["images"] > 0
    assert a["params_M"] == b["params_M"] and a["madds_G"] == b["madds_G"]
    assert "no model record" in b["model"] and "as recorded in" in a["model"]
    assert a["latency_ms"] > 0 and a["latency_p90_ms"] >= a["latency_ms"] and a["backend"] == "torch"


def test_export_with_the_checkpoint_alone_is_the_explicitly_built_network(run: Run, tmp_path: Path) -> None:
    from detection import ssdlite_mobilenet_v3_small
    from mbv3_dense import mobilenet_v3_small
    from mbv3_dense.deploy import OnnxModel
    from segmentation import lraspp_mobilenet_v3_small

    out = tmp_path / "model.onnx"
    size = {"classify": ["--size", "32", "32"], "detect": [], "segment": ["--size", "64", "128"]}[run.task]
    printed = ok(script("export.py", "--weights", run.ckpt, "--out", out, *size, "--threads", "1")).stdout
    assert f"model ({run.task}):" in printed and ": OK" in printed
    # The builder called by hand with the tiny run's arguments, on the weights without the record.
    if run.task == "classify":
        reference = mobilenet_v3_small(num_classes=3, width_mult=0.5, weights=run.old)
    elif run.task == "detect":
        reference = ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5, weights=run.old)
    else:
        reference = lraspp_mobilenet_v3_small(weights=str(run.old))
    reference.eval()
    height, width = reference.image_size if run.task == "detect" else (int(size[1]), int(size[2]))
    x = reference.normalize(torch.rand(2, 3, height, width, generator=torch.Generator().manual_seed(3)))
    with torch.inference_mode():
        expected = reference(x)
    got = OnnxModel(out, threads=1)(x)
    expected, got = (expected, got) if isinstance(expected, dict) else ({"out": expected}, {"out": got})
    for key, value in expected.items():
        torch.testing.assert_close(torch.as_tensor(got[key]), value, rtol=1e-4, atol=1e-4)


def test_arguments_that_disagree_with_the_record_are_named(run: Run, tmp_path: Path) -> None:
    wrong = {"classify": ["--arch", "large", "--num-classes", "7"],
             "detect": ["--width-mult", "1.0", "--num-classes", "91"],
             "segment": ["--variant", "torchvision"]}[run.task]
    proc = run.evaluate(run.ckpt, tmp_path / "x.json", *wrong)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{run.ckpt}: the arguments disagree with the checkpoint's model record" in proc.stderr
    for option, value in zip(wrong[::2], wrong[1::2], strict=True):
        assert f"{option} {value} (the record: " in proc.stderr
    assert not (tmp_path / "x.json").exists()
    # Values that agree are accepted.
    ok(run.evaluate(run.ckpt, tmp_path / "agree.json", *EXPLICIT[run.task]))


def test_a_checkpoint_of_another_task_is_refused(run: Run, tmp_path: Path) -> None:
    wants = {"classify": "detect", "detect": "segment", "segment": "classify"}[run.task]
    other, *data = {  # the script of another task, with the data arguments it requires (never read)
        "detect": ["eval_coco.py", "--images", tmp_path, "--annotations", tmp_path / "a.json",
                   "--results", tmp_path / "r.json"],
        "segment": ["eval_cityscapes.py", "--root", tmp_path, "--export-dir", tmp_path / "labelIds"],
        "classify": ["eval_classify.py", "--root", tmp_path],
    }[wants]
    proc = script(other, "--weights", run.ckpt, *data)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert f"{run.ckpt}: the checkpoint holds a '{run.task}' model" in proc.stderr
    assert f"not a '{wants}' model" in proc.stderr
    proc = script("export.py", "--task", wants, "--weights", run.ckpt, "--out", tmp_path / "x.onnx")
    assert proc.returncode == 2 and f"{run.ckpt}: the checkpoint holds a '{run.task}' model" in proc.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_predict_with_the_checkpoint_alone(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    run = finished_run("classify", tmp_path_factory)  # one task: predict.py resolves every task's network alike
    out = tmp_path / "out"
    proc = ok(script("predict.py", "--weights", run.ckpt, "--images", run.data / "val", "--out", out,
                     "--image-size", "32", "--class-names", run.data / "train", "--no-pictures"))
    assert "3 images written" in proc.stdout
    rows = [json.loads(line) for line in (out / "classifications.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["top5"]) == 3 for r in rows)
    assert {t["class"] for r in rows for t in r["top5"]} == {p.name for p in (run.data / "train").iterdir()}
