"""The accuracy gate of an export and its report: the task metric three ways, what each form costs.

``scripts/export.py --gate DIR`` reads held-out data (one function per layout, in its task's package:
``mbv3_dense.classification.gate``, ``detection.gate``, ``segmentation.gate``) into a :class:`GateData`,
whose ``evaluate(network)`` scores any callable with the model's forward contract; :func:`check_gate_sizes`
checks the program takes its images' sizes. :func:`run_gate` scores the eager model, the fp32 ``.pte`` and
the int8 ``.pte``; :func:`gate_verdict` compares int8 with eager; :func:`write_report` writes the report beside
the ``.pte`` as JSON and Markdown (each written beside and renamed into place), the costs of each program measured by
:func:`report_forms`.
"""

from __future__ import annotations

import json
import logging
import os
import platform
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from mbv3_dense.deploy.measure import measure_program

if TYPE_CHECKING:
    from mbv3_dense.deploy.dynamic import SizeRange
    from mbv3_dense.deploy.executorch_export import ExecuTorchExport

log = logging.getLogger(__name__)

# Allowed loss of int8 against eager, in points of the task's headline metric (top-1, mAP, mIoU, in %).
DEFAULT_MAX_DROP = {"classify": 1.0, "detect": 2.0, "segment": 1.0}
FORMS = ("eager", "fp32", "int8")


class GateDataError(ValueError):
    """Held-out data that cannot gate this export (empty, another task's layout, unreadable); names the folder."""


@dataclass(frozen=True)
class GateData:
    """Held-out data of one layout, ready to score a network.

    Attributes:
        task: the task whose metric it computes.
        layout: the on-disk layout read (``"image folder"``, ``"COCO"``, ``"Cityscapes"``).
        root: the folder given.
        metric: the key of the headline metric in what ``evaluate`` returns.
        items: number of images.
        evaluate: ``evaluate(network, description)`` -> metrics in points (percent); ``network`` is called
            like the model (classify and segment: normalised ``[1, 3, H, W]`` -> logits; detect: see the script).
        sizes: the distinct ``(H, W)`` of the images the network sees (segment runs each at its own size).
    """

    task: str
    layout: str
    root: Path
    metric: str
    items: int
    evaluate: Callable[[Callable, str], dict[str, float]]
    sizes: tuple[tuple[int, int], ...] = ()


def run_gate(data: GateData, forms: Mapping[str, Callable]) -> dict[str, dict[str, float]]:
    """Metrics of every form (``{"eager": model, "fp32": program, "int8": program}``) on the held-out data."""
    return {name: data.evaluate(network, f"gate {data.task} ({name})") for name, network in forms.items()}


def gate_verdict(metrics: Mapping[str, Mapping[str, float]], metric: str, max_drop: float) -> dict:
    """int8 against eager on the headline metric: ``{"drop", "max_drop", "passed", "fp32_minus_eager"}``."""
    if max_drop < 0:
        raise ValueError(f"max drop must be at least 0, got {max_drop}")
    drop = metrics["eager"][metric] - metrics["int8"][metric]
    verdict = {"metric": metric, "eager": metrics["eager"][metric], "int8": metrics["int8"][metric],
               "drop": drop, "max_drop": max_drop, "passed": drop <= max_drop + 1e-9}
    if "fp32" in metrics:
        verdict["fp32_minus_eager"] = metrics["fp32"][metric] - metrics["eager"][metric]
    return verdict


def check_gate_sizes(gate: GateData, size: tuple[int, int], dynamic: SizeRange | None) -> None:
    """Segmentation runs each gate image at its own size: the program (exported at ``size``, or taking
    ``dynamic``) must take them all.

    Raises:
        GateDataError: naming the folder and a size the program does not take.
    """
    if gate.task != "segment":
        return
    if dynamic is not None:
        outside = [s for s in gate.sizes if not dynamic.contains(*s)]
        if outside:
            raise GateDataError(f"--gate {gate.root}: images of {outside[0][0]}x{outside[0][1]} are outside "
                                f"--dynamic-size {dynamic}")
    elif any(s != tuple(size) for s in gate.sizes):
        shown = ", ".join(f"{h}x{w}" for h, w in gate.sizes[:4])
        raise GateDataError(f"--gate {gate.root}: images of {shown}, but the program is exported at {size[0]}x"
                            f"{size[1]}: give --size H W of the images, or --dynamic-size MIN:MAX")


def report_forms(metrics: Mapping[str, Mapping[str, float]], exports: Mapping[str, ExecuTorchExport], *,
                 size: tuple[int, int], runs: int) -> dict[str, dict]:
    """The report's ``forms``: the metric of each form, and per program its size, load time, latency at 1 thread
    and at all threads, peak memory and XNNPACK coverage (each program timed in a process of its own)."""
    all_threads = len(os.sched_getaffinity(0))
    forms: dict[str, dict] = {"eager": {"file": None, "metrics": metrics["eager"]}}
    for name, exported in exports.items():
        threads = sorted({1, all_threads})
        log.info("timing %s at %s thread(s), %d runs, in a process of its own", exported.path.name,
                 " and ".join(map(str, threads)), runs)
        timing = measure_program(exported.path, threads=threads, size=size, runs=runs, warmup=min(5, runs))
        forms[name] = {"file": exported.path.name, "metrics": metrics[name],
                       "size_mb": exported.path.stat().st_size / 1e6, "load_ms": timing["load_ms"],
                       "latency": timing["latency"],
                       "memory": {k: timing[k] for k in ("peak_rss_mb", "baseline_rss_mb", "peak_over_baseline_mb")},
                       "delegation": exported.delegation.as_dict(), "export_seconds": round(exported.seconds, 1)}
    return forms


def environment() -> dict:
    """Versions and machine, for the report."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "torchvision", "executorch", "torchao"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {"created": datetime.now(UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "machine": platform.processor() or platform.machine(), "cpus": len(os.sched_getaffinity(0)),
            "versions": versions}


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    partial.replace(path)


def report_paths(pte: str | Path) -> tuple[Path, Path]:
    """``(model.report.json, model.report.md)`` beside ``model.pte``."""
    pte = Path(pte)
    return pte.with_name(pte.stem + ".report.json"), pte.with_name(pte.stem + ".report.md")


def write_report(pte: str | Path, report: dict) -> tuple[Path, Path]:
    """Write ``report`` beside the fp32 ``.pte`` as JSON and as a Markdown page; returns both paths."""
    json_path, md_path = report_paths(pte)
    _write_atomic(json_path, json.dumps(report, indent=2) + "\n")
    _write_atomic(md_path, report_markdown(report))
    return json_path, md_path


def _cell(value: object, fmt: str = "{:.2f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value) if isinstance(value, float) else str(value)


def report_markdown(report: dict) -> str:
    """The report as a Markdown page: metrics, costs, delegation, verdict."""
    forms = report["forms"]
    gate = report.get("gate")
    metric_names: list[str] = []
    for form in forms.values():
        for key in form.get("metrics", {}):
            if key not in metric_names:
                metric_names.append(key)
    threads = sorted({t for form in forms.values() for t in form.get("latency", {})}, key=int)
    put = report["input"]
    size = "x".join(map(str, put["size"]))
    shape = (f"any H, W in {put['dynamic_size'][0]}..{put['dynamic_size'][1]} (timed at {size})"
             if put.get("dynamic_size") else size)
    if put.get("takes_image"):
        shape += ", the image in [0, 1] with the model's resize inside"
    lines = [f"# Export report: {report['model']}", "",
             f"Task `{report['task']}`, input {shape}, created {report['environment']['created']} on "
             f"{report['environment']['machine']} ({report['environment']['cpus']} CPUs); versions "
             + ", ".join(f"{k} {v}" for k, v in report["environment"]["versions"].items() if v) + ".", ""]
    if gate:
        lines += [f"Held-out data: `{gate['data']}` ({gate['layout']}, {gate['items']} images).", ""]
    head = ["form", "file", *metric_names, "size MB", "load ms"]
    head += [f"{t} thr median / p90 ms" for t in threads]
    head += ["peak RSS MB (over runtime)", "XNNPACK coverage"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, form in forms.items():
        delegation = form.get("delegation")
        coverage = (f"{delegation['delegated']}/{delegation['total']} ({delegation['coverage']:.1%})"
                    if delegation else "-")
        memory = form.get("memory")
        row = [name, f"`{form['file']}`" if form.get("file") else "-",
               *[_cell(form.get("metrics", {}).get(m)) for m in metric_names],
               _cell(form.get("size_mb")), _cell(form.get("load_ms"))]
        for t in threads:
            lat = form.get("latency", {}).get(t)
            row.append(f"{lat['median_ms']:.2f} / {lat['p90_ms']:.2f}" if lat else "-")
        row.append(f"{memory['peak_rss_mb']:.0f} ({memory['peak_over_baseline_mb']:.0f})" if memory else "-")
        row.append(coverage)
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for name, form in forms.items():
        delegation = form.get("delegation")
        if delegation and (delegation["outside"] or delegation["constant_only"]):
            outside = ", ".join(f"{k} x{v}" for k, v in sorted(delegation["outside"].items())) or "none"
            const = ", ".join(f"{k} x{v}" for k, v in sorted(delegation["constant_only"].items())) or "none"
            lines.append(f"- {name}: compute nodes outside XNNPACK: {outside}; not counted (on constants only): "
                         f"{const}.")
    if gate:
        verdict = "PASSED" if gate["passed"] else "FAILED"
        lines += ["", f"**Gate {verdict}**: int8 {gate['metric']} {gate['int8']:.2f} against eager "
                      f"{gate['eager']:.2f}, a drop of {gate['drop']:.2f} points (allowed {gate['max_drop']:g}); "
                      f"fp32 minus eager {gate.get('fp32_minus_eager', 0.0):+.2f}."]
    lines += ["", "Latency: batch 1, each program timed in a process of its own after warm-up; peak RSS of that "
                  "process (in brackets: above the runtime's baseline before loading).", ""]
    return "\n".join(lines)
