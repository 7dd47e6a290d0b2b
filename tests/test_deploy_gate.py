"""``scripts/export.py --gate``: the metric three ways, the report, the verdict; dynamic-size programs of LR-ASPP
and SSDLite, their XNNPACK coverage, and their use by predict and evaluation; bad input.

Every export here goes through the script as a user runs it. Exports are the slow part (tens of seconds
each on 2 cores), so each program is exported once per module and read by several tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from parity_utils import calibrate_and_perturb
from PIL import Image

from mbv3_dense.deploy.executorch_export import REQUIRED_KINDS

pytest.importorskip("executorch")

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_xnnpack_runs(delegation: dict, allowed_outside: tuple[str, ...] = ()) -> None:
    """Every convolution, linear, hardswish, hardsigmoid, pooling, add and mul is inside XNNPACK; a failure
    names the kinds and operators left outside."""
    outside = {kind: n for kind, n in delegation["kinds_outside"].items() if kind not in allowed_outside}
    assert not outside, f"outside XNNPACK: {outside} (operators {delegation['outside']})"
    assert not set(delegation["kinds_outside"]) & set(REQUIRED_KINDS), delegation["kinds_outside"]


def saved_weights(model: torch.nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def gate_report(gate: tuple[subprocess.CompletedProcess, Path]) -> dict:
    """The report of an export that passed its gate (``<name>.report.json`` beside the ``.pte``)."""
    proc, out = gate
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.with_name(f"{out.stem}.report.json").read_text())


def export_dynamic(task: str, weights: Path, data: Path, calibration: Path, size_range: str, out: Path,
                   *model_args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """``scripts/export.py`` of a small network to a ``.pte`` taking ``size_range``, gated on ``data``."""
    return run("scripts/export.py", "--task", task, "--arch", "small", *model_args, "--weights", weights, "--format",
               "executorch", "--dynamic-size", size_range, "--gate", data, "--calibration-images", calibration,
               "--calibration-count", "3", "--threads", "1", "--latency-runs", "2", "--out", out), out


# ---------------------------------------------------------------------------------------------- classify
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    """A seeded MobileNetV3-Small (3 classes, 64x64), held-out images labelled by the model itself (only images
    it decides by a wide margin, so that a sound int8 keeps every label), training-like calibration images,
    and blank ones."""
    from mbv3_dense import mobilenet_v3_small
    from mbv3_dense.classification.synthetic import KINDS, draw_image
    from mbv3_dense.classification.transforms import eval_transform

    work = tmp_path_factory.mktemp("gate_cls")
    transform = eval_transform(resize_size=round(64 * 256 / 224), crop_size=64)
    kinds, rng = list(KINDS), np.random.default_rng(0)

    def drawn(count: int) -> list[tuple[Image.Image, torch.Tensor]]:
        images = [draw_image(kinds[i % len(kinds)], 64, rng) for i in range(count)]
        return [(im, transform(torch.from_numpy(np.array(im)).permute(2, 0, 1))[None].float() / 255) for im in images]

    torch.manual_seed(0)
    model = mobilenet_v3_small(num_classes=3)
    # BN statistics of "training" images (then perturbed), the calibration images: as a trained network's BN
    # holds its training set's statistics and int8 is calibrated on training images.
    training = drawn(16)
    model = calibrate_and_perturb(model, model.normalize(torch.cat([x for _, x in training])), seed=0)
    (work / "calib").mkdir()
    for i, (_, x) in enumerate(training):  # as the network saw them (cropped), lossless
        Image.fromarray((x[0] * 255).round().byte().permute(1, 2, 0).numpy()).save(work / "calib" / f"{i:03d}.png")
    weights = saved_weights(model, work / "cls.pth")
    for c in range(3):
        (work / "gate" / f"class{c}").mkdir(parents=True)
    kept = 0
    for i, (image, x) in enumerate(drawn(60)):
        with torch.no_grad():
            logits = model(model.normalize(x))[0]
        top2 = logits.topk(2).values
        if top2[0] - top2[1] > 0.4 * logits.abs().max():
            image.save(work / "gate" / f"class{int(logits.argmax())}" / f"{i:03d}.png")
            kept += 1
    assert kept >= 8, f"only {kept} decided images"
    (work / "blank").mkdir()
    for i in range(8):
        Image.new("RGB", (64, 64)).save(work / "blank" / f"{i}.png")
    return work, weights


def export_classifier(work: Path, weights: Path, *extra: object) -> subprocess.CompletedProcess:
    return run("scripts/export.py", "--task", "classify", "--arch", "small", "--num-classes", "3", "--size", "64", "64",
               "--weights", weights, "--format", "executorch", "--threads", "1", "--latency-runs", "2",
               "--calibration-count", "16", *extra)


@pytest.fixture(scope="module")
def good_gate(classifier):
    work, weights = classifier
    out = work / "good" / "cls.pte"
    return export_classifier(work, weights, "--out", out, "--gate", work / "gate", "--calibration-images",
                             work / "calib"), out


def test_gate_passes_a_sound_int8_export_and_writes_the_report(good_gate):
    proc, out = good_gate
    report = gate_report(good_gate)
    assert "gate: int8 top1" in proc.stdout and "PASSED" in proc.stdout
    forms = report["forms"]
    assert list(forms) == ["eager", "fp32", "int8"]
    assert forms["eager"]["metrics"]["top1"] == 100.0  # the held-out labels are the model's own decisions
    assert forms["fp32"]["metrics"]["top1"] == 100.0
    assert report["gate"]["passed"] and report["gate"]["max_drop"] == 1.0 and report["gate"]["metric"] == "top1"
    assert report["gate"]["drop"] <= 1.0 and report["gate"]["items"] >= 8
    for name in ("fp32", "int8"):
        form = forms[name]
        assert (out.parent / form["file"]).is_file() and form["size_mb"] > 0 and form["load_ms"] > 0
        assert "1" in form["latency"] and all(v["median_ms"] > 0 and v["p90_ms"] >= v["median_ms"]
                                              for v in form["latency"].values())
        assert form["memory"]["peak_rss_mb"] >= form["memory"]["baseline_rss_mb"] > 0
        delegation = form["delegation"]
        assert delegation["coverage"] == 1.0 and delegation["delegated"] == delegation["total"] > 0
        assert_xnnpack_runs(delegation)
        assert set(REQUIRED_KINDS) <= set(delegation["kinds_inside"]), delegation["kinds_inside"]
    assert forms["int8"]["size_mb"] < forms["fp32"]["size_mb"] / 2
    markdown = out.with_name("cls.report.md").read_text()
    assert "Gate PASSED" in markdown and "| int8 | `cls.int8.pte` |" in markdown and "thr median / p90 ms" in markdown


def test_gate_fails_an_int8_export_calibrated_on_blank_images(classifier):
    work, weights = classifier
    out = work / "broken" / "cls.pte"
    proc = export_classifier(work, weights, "--out", out, "--gate", work / "gate", "--calibration-images",
                             work / "blank")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "FAILED" in proc.stdout
    report = json.loads(out.with_name("cls.report.json").read_text())
    assert not report["gate"]["passed"] and report["gate"]["drop"] > 1.0
    assert report["forms"]["fp32"]["metrics"]["top1"] == 100.0  # the fp32 program is not what broke


@pytest.mark.parametrize("case", ["other task", "empty", "negative drop", "onnx", "dynamic classifier"])
def test_gate_bad_input_is_a_clear_error_and_writes_nothing(case, classifier, tiny_coco, tmp_path):
    work, weights = classifier
    out = tmp_path / "cls.pte"
    args = ["--out", out, "--gate", work / "gate", "--calibration-images", work / "calib"]
    expected = {"other task": "a COCO tree (root/annotations", "empty": "empty folder",
                "negative drop": "--max-drop -1: must be at least 0", "onnx": "--gate compares the fp32 and int8",
                "dynamic classifier": "a classifier is exported at its crop size"}[case]
    if case == "other task":
        args[3] = tiny_coco
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args[3] = tmp_path / "empty"
    elif case == "negative drop":
        args += ["--max-drop", "-1"]
    elif case == "onnx":
        args = [*args[:-2], "--calibration-images", work / "calib", "--format", "onnx"]
    else:
        args += ["--dynamic-size", "32:96"]
    proc = export_classifier(work, weights, *args)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert expected in proc.stderr, proc.stderr[-2000:]
    if case == "other task":
        assert "a classify model is gated on this layout: image folder" in proc.stderr
    assert not any(tmp_path.glob("*.pte")) and not any(tmp_path.glob(".*partial")) and not any(tmp_path.glob("*.json"))


# ---------------------------------------------------------------------------------------------- segment
@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    import segmentation

    work = tmp_path_factory.mktemp("gate_seg")
    torch.manual_seed(0)
    model = calibrate_and_perturb(segmentation.lraspp_mobilenet_v3_small(num_classes=19),
                                  torch.randn(2, 3, 96, 128), seed=0)
    return work, saved_weights(model, work / "seg.pth"), model


@pytest.fixture(scope="module")
def segment_gate(segmenter, tiny_cityscapes):
    work, weights, _ = segmenter
    return export_dynamic("segment", weights, tiny_cityscapes, tiny_cityscapes / "leftImg8bit" / "train", "48:160",
                          work / "seg.pte")


def test_segment_gate_with_a_dynamic_program(segment_gate):
    report = gate_report(segment_gate)
    assert report["input"]["dynamic_size"] == [48, 160] and report["gate"]["metric"] == "miou"
    assert report["forms"]["fp32"]["metrics"]["miou"] == pytest.approx(report["forms"]["eager"]["metrics"]["miou"],
                                                                       abs=0.5)
    for name in ("fp32", "int8"):
        delegation = report["forms"][name]["delegation"]
        # The resizes to a symbolic size have no XNNPACK kernel: the one kind left outside, by design.
        assert_xnnpack_runs(delegation, allowed_outside=("upsample",))
        assert set(delegation["outside"]) <= {"upsample_bilinear2d.vec"}, delegation["outside"]
        assert {"convolution", "hardswish", "hardsigmoid", "pooling", "mul", "add"} <= set(delegation["kinds_inside"])


@torch.no_grad()
def test_dynamic_segment_program_equals_eager_at_three_sizes(segment_gate, segmenter):
    from mbv3_dense.deploy import ExecuTorchModel
    from mbv3_dense.deploy.parity import decision_check, output_check

    _, out = segment_gate
    model = segmenter[2]
    program = ExecuTorchModel(out, task="segment", threads=1)
    assert program.dynamic_size == (48, 160) and not program.takes_image
    gen = torch.Generator().manual_seed(5)
    for h, w in [(48, 160), (160, 48), (97, 131)]:
        x = model.normalize(torch.rand(1, 3, h, w, generator=gen))
        reference, got = model(x), program(x)
        assert output_check("logits", reference, got).ok, output_check("logits", reference, got)
        assert decision_check(reference, got, what="pixels").ok
    with pytest.raises(ValueError, match=r"seg.pte: input of shape \(1, 3, 40, 64\).*H, W in 48:160"):
        program(torch.zeros(1, 3, 40, 64))


def test_predict_script_runs_the_dynamic_program_at_each_image_size(segment_gate, segmenter, tmp_path):
    from mbv3_dense.data.image_io import read_label_png
    from segmentation.labels import label_ids_to_train_ids

    _, out = segment_gate
    work, weights, model = segmenter
    rng = np.random.default_rng(1)
    images = tmp_path / "images"
    images.mkdir()
    for name, (h, w) in {"a": (64, 128), "b": (150, 90)}.items():
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(images / f"{name}.png")
    proc = run("scripts/predict.py", "--task", "segment", "--arch", "small", "--weights", weights, "--images", images,
               "--out", tmp_path / "pred", "--backend", "executorch", "--pte", out, "--threads", "1", "--no-pictures")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "building" not in proc.stderr  # one program for both sizes, no export per size
    for name in ("a", "b"):
        x = torch.from_numpy(np.array(Image.open(images / f"{name}.png"))).permute(2, 0, 1)[None].float() / 255
        with torch.no_grad():
            logits = model(model.normalize(x))[0]
        label_ids = read_label_png(tmp_path / "pred" / "labelIds" / f"{name}.png")
        written = torch.from_numpy(label_ids_to_train_ids(label_ids, name).astype(np.int64))
        top2 = logits.topk(2, dim=0).values
        decided = top2[0] - top2[1] > 1e-3
        assert written.shape == logits.shape[1:]
        assert torch.equal(written[decided], logits.argmax(0)[decided])


def test_dynamic_range_the_network_cannot_take_is_refused_before_writing(segmenter, tmp_path):
    _, weights, _ = segmenter
    out = tmp_path / "seg.pte"
    # The paper variant's 49x49 window is clamped to the stride-16 map: 512..1024 px gives maps of 32..64, across 49.
    proc = run("scripts/export.py", "--task", "segment", "--arch", "small", "--weights", weights, "--format",
               "executorch", "--dynamic-size", "512:1024", "--out", out)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "pools a window of 49 on the height" in proc.stderr and "512:1024" in proc.stderr
    assert not any(tmp_path.iterdir())
    proc = run("scripts/export.py", "--task", "segment", "--arch", "small", "--format", "executorch",
               "--dynamic-size", "200:100", "--out", out)
    assert proc.returncode == 2 and "MIN <= MAX" in proc.stderr


# ---------------------------------------------------------------------------------------------- detect
@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    import detection

    work = tmp_path_factory.mktemp("gate_det")
    torch.manual_seed(0)
    model = detection.ssdlite_mobilenet_v3_small(num_classes=5, width_mult=0.5)
    model = calibrate_and_perturb(model, torch.rand(4, 3, 320, 320), seed=0)
    return work, saved_weights(model, work / "det.pth"), model


@pytest.fixture(scope="module")
def detect_gate(detector, tiny_coco):
    work, weights, _ = detector
    return export_dynamic("detect", weights, tiny_coco, tiny_coco / "train2017", "64:512", work / "det.pte",
                          "--width-mult", "0.5", "--num-classes", "5")


def test_detect_gate_with_a_program_that_takes_the_image_at_its_size(detect_gate):
    report = gate_report(detect_gate)
    assert report["input"]["takes_image"] and report["gate"]["metric"] == "map"
    assert set(report["forms"]["eager"]["metrics"]) == {"map", "map_50"}
    for name in ("fp32", "int8"):
        delegation = report["forms"][name]["delegation"]
        assert delegation["coverage"] == 1.0, delegation  # the resize to 320x320 has a fixed output: delegated
        assert_xnnpack_runs(delegation)


@torch.no_grad()
def test_dynamic_detect_program_gives_eager_detections_at_three_sizes(detect_gate, detector):
    from mbv3_dense.deploy import ExecuTorchModel
    from mbv3_dense.deploy.dynamic import SizeRange
    from mbv3_dense.deploy.parity import check_inputs, check_program

    _, out = detect_gate
    model = detector[2]
    program = ExecuTorchModel(out, task="detect", threads=1)
    assert program.takes_image and program.dynamic_size == (64, 512)
    images = check_inputs("detect", model, (320, 320), SizeRange(64, 512), seed=7)
    assert [tuple(i.shape[-2:]) for i in images] == [(64, 64), (512, 512), (289, 363)]
    for checks in check_program("detect", model, program, images):
        assert all(c.ok for c in checks), [str(c) for c in checks]
    assert sum(len(d["boxes"]) for d in [model.predict([i])[0] for i in images]) > 0


def test_eval_coco_runs_the_dynamic_program(detect_gate, detector, tiny_coco, tmp_path):
    _, out = detect_gate
    _, weights, _ = detector
    common = ["scripts/eval_coco.py", "--weights", weights, "--arch", "small", "--width-mult", "0.5", "--num-classes",
              "5", "--images", tiny_coco / "val2017", "--annotations", tiny_coco / "annotations" /
              "instances_val2017.json", "--workers", "0", "--latency-runs", "2"]
    torch_run = run(*common, "--results", tmp_path / "t.json", "--json", tmp_path / "t_summary.json")
    et_run = run(*common, "--results", tmp_path / "e.json", "--json", tmp_path / "e_summary.json", "--backend",
                 "executorch", "--pte", out, "--threads", "1")
    assert torch_run.returncode == 0 and et_run.returncode == 0, et_run.stderr[-3000:]
    eager, program = (json.loads((tmp_path / f"{k}_summary.json").read_text()) for k in ("t", "e"))
    # The same detections up to rounding; near-tied scores may rank either way on another CPU.
    assert program["backend"] == "executorch" and program["stats"]["AP"] == pytest.approx(eager["stats"]["AP"],
                                                                                           abs=0.01)


def test_a_pte_without_its_description_is_refused_naming_the_file(detector, tmp_path):
    from executorch.exir import to_edge_transform_and_lower

    plain = tmp_path / "plain.pte"
    program = torch.export.export(torch.nn.Conv2d(3, 4, 1), (torch.rand(1, 3, 8, 8),))
    plain.write_bytes(to_edge_transform_and_lower(program).to_executorch().buffer)
    Image.new("RGB", (40, 30)).save(tmp_path / "photo.png")
    _, weights, _ = detector
    proc = run("scripts/predict.py", "--task", "detect", "--arch", "small", "--width-mult", "0.5", "--num-classes",
               "5", "--weights", weights, "--images", tmp_path, "--out", tmp_path / "out", "--backend",
               "executorch", "--pte", plain)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "plain.pte: an ExecuTorch program, but not one written by mbv3_dense" in proc.stderr
