"""Metric against latency, for each checkpoint on each backend: the paper's Figure 1 from your own runs.

    python scripts/pareto.py RUN.ckpt [RUN.ckpt ...] --data DIR [--out pareto/]
    python scripts/pareto.py cls_*.ckpt det_*.ckpt --data classify=DIR --data detect=DIR2 --out pareto/
        [--backends torch,onnxruntime,executorch,executorch-int8] [--threads 2] [--image-size 224]
        [--latency-size H W] [--calibration-count 16] [--latency-runs 20]

Each checkpoint is a ``.ckpt`` of ``lightning fit`` (it names its task and network). For every
checkpoint and backend the task's evaluation script runs in a process of its own -
``scripts/eval_classify.py``, ``eval_coco.py`` (pycocotools) or ``eval_cityscapes.py`` (cityscapesscripts),
with ``--backend`` and ``--json`` - so the metric is the script's and the latency is measured with one
runtime in the process (batch 1, ``--threads`` threads; SSDLite end to end). Backends: ``torch``
(eager), ``onnxruntime``, ``executorch`` (XNNPACK fp32) and ``executorch-int8`` (PT2E, XNNPACK quantizer,
calibrated on ``--calibration-count`` training images); ``onnxruntime-int8`` on request.

``--data`` is the dataset root as the task's data module reads it (an ImageFolder with ``train/`` and
``val/``; a COCO tree with ``train2017/``, ``val2017/``, ``annotations/``; a Cityscapes tree); ``TASK=DIR``
when the checkpoints are of several tasks. Outputs in ``--out``: ``pareto.json`` (a point per checkpoint
and backend: metric, latency median and p90, the network's MAdds, and whether no other point of the
task is both faster and better), ``pareto.png`` (a panel per task, a curve per backend, the points
named by their network) and ``runs/`` (each evaluation's summary and log). A failed evaluation is
reported and left out; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mbv3_dense.checkpoints.model_record import TASKS, read_model_record
from mbv3_dense.checkpoints.weights import WeightsError, read_checkpoint
from mbv3_dense.training.progress import progress

ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("torch", "onnxruntime", "onnxruntime-int8", "executorch", "executorch-int8")
DEFAULT_BACKENDS = ("torch", "onnxruntime", "executorch", "executorch-int8")
SCRIPTS = {"classify": "eval_classify.py", "detect": "eval_coco.py", "segment": "eval_cityscapes.py"}
# Where each task's data keeps its training images (int8 calibration).
CALIBRATION = {"classify": "train", "detect": "train2017", "segment": "leftImg8bit/train"}
METRIC_NAMES = {"classify": "top-1", "detect": "mAP@[.5:.95]", "segment": "mIoU"}


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    task: str
    label: str
    description: str


def describe(path: Path) -> Checkpoint:
    """The task and a short name of the network a ``lightning fit`` checkpoint records."""
    try:
        record = read_model_record(read_checkpoint(path), path)
    except (WeightsError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    if record is None:
        raise SystemExit(f"error: {path}: no model record: pareto.py takes checkpoints written by `lightning fit`")
    builder, init_args = record["builder"], record["init_args"]
    arch = builder.rpartition(".")[2].rpartition("_")[2].capitalize()  # mobilenet_v3_large -> Large
    label = f"{arch} {float(init_args.get('width_mult', 1.0)):g}x"
    if init_args.get("reduced_tail"):
        label += " RT"
    args = ", ".join(f"{k}={v}" for k, v in sorted(init_args.items()) if k not in ("weights", "weights_backbone"))
    return Checkpoint(path, record["task"], label, f"{builder}({args})")


def parse_data(values: list[str], tasks: set[str]) -> dict[str, Path]:
    plain = [v for v in values if "=" not in v]
    data: dict[str, Path] = {}
    for value in values:
        if "=" in value:
            task, _, folder = value.partition("=")
            if task not in TASKS:
                raise SystemExit(f"error: --data {value}: unknown task {task!r} (choose from {', '.join(TASKS)})")
            data[task] = Path(folder)
    if plain:
        if len(plain) > 1 or len(tasks) > 1:
            raise SystemExit(f"error: the checkpoints are of {len(tasks)} tasks ({', '.join(sorted(tasks))}): give "
                             "--data TASK=DIR for each" if len(tasks) > 1 else "error: --data DIR is given twice")
        data[next(iter(tasks))] = Path(plain[0])
    for task in sorted(tasks):
        folder = data.get(task)
        if folder is None:
            raise SystemExit(f"error: no --data for the {task} checkpoints (--data {task}=DIR)")
        if not folder.is_dir():
            raise SystemExit(f"error: --data {folder}: not a folder")
    return data


def segment_size(root: Path) -> tuple[int, int]:
    """``(H, W)`` of the first validation image of a Cityscapes tree."""
    from PIL import Image

    images = sorted((root / "leftImg8bit" / "val").rglob("*.png"))
    if not images:
        raise SystemExit(f"error: {root}/leftImg8bit/val: no validation images")
    with Image.open(images[0]) as image:
        return image.height, image.width


def eval_command(ckpt: Checkpoint, backend: str, data: Path, work: Path, args: argparse.Namespace) -> list[str]:
    """The evaluation script's command line for one point; its summary goes to ``work/summary.json``."""
    task = ckpt.task
    cmd = [sys.executable, str(ROOT / "scripts" / SCRIPTS[task]), "--weights", str(ckpt.path),
           "--json", str(work / "summary.json"), "--latency-runs", str(args.latency_runs)]
    if task == "classify":
        cmd += ["--root", str(data), "--image-size", str(args.image_size)]
    elif task == "detect":
        cmd += ["--images", str(data / "val2017"), "--annotations", str(data / "annotations/instances_val2017.json"),
                "--results", str(work / "detections.json"), "--workers", "0"]
    else:
        h, w = args.latency_size or segment_size(data)
        cmd += ["--root", str(data), "--split", "val", "--export-dir", str(work / "labelIds"),
                "--latency-size", str(h), str(w)]
    runtime, _, int8 = backend.partition("-")
    cmd += ["--backend", runtime]
    if runtime != "torch":
        cmd += ["--threads", str(args.threads)]
    if int8:
        cmd += ["--int8", "--calibration-images", str(data / CALIBRATION[task]),
                "--calibration-count", str(args.calibration_count)]
    return cmd


def evaluate(ckpt: Checkpoint, backend: str, data: Path, work: Path, args: argparse.Namespace) -> dict | None:
    work.mkdir(parents=True, exist_ok=True)
    cmd = eval_command(ckpt, backend, data, work, args)
    # One thread count for every runtime: torch's own (OMP) and the exported runtimes' (--threads).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    (work / "log.txt").write_text(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}")
    summary = work / "summary.json"
    if proc.returncode != 0 or not summary.is_file():
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        print(f"FAILED {ckpt.path} on {backend} (exit {proc.returncode}): {tail}; log: {work / 'log.txt'}", flush=True)
        return None
    result = json.loads(summary.read_text())
    metric = float(result["metric"])
    return {"task": ckpt.task, "checkpoint": str(ckpt.path), "label": ckpt.label, "network": ckpt.description,
            "backend": backend, "metric_name": METRIC_NAMES[ckpt.task], "metric": metric,
            "latency_ms": float(result["latency_ms"]), "latency_p90_ms": float(result["latency_p90_ms"]),
            "latency_input": result.get("latency_input"), "threads": args.threads,
            "madds_G": result.get("madds_G"), "params_M": result.get("params_M"), "summary": str(summary)}


def mark_front(points: list[dict]) -> None:
    """``pareto_optimal``: no other point of the task is at least as fast and as good, and better in one."""
    for p in points:
        p["pareto_optimal"] = not any(
            q is not p and q["task"] == p["task"] and q["latency_ms"] <= p["latency_ms"] and q["metric"] >= p["metric"]
            and (q["latency_ms"] < p["latency_ms"] or q["metric"] > p["metric"]) for q in points)


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    tasks = [t for t in TASKS if any(p["task"] == t for p in points)]
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.6 * len(tasks), 4.4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        mine = [p for p in points if p["task"] == task]
        # As in the paper's Figure 1: a backend's curve joins its networks from the least compute to the most, and
        # each network keeps one marker across the curves.
        by_compute = sorted({p["label"]: p.get("madds_G") or 0.0 for p in mine}.items(), key=lambda kv: (kv[1], kv[0]))
        order = {label: i for i, (label, _) in enumerate(by_compute)}
        markers = {label: "os^Dvp<>"[i % 8] for label, i in order.items()}
        for n, backend in enumerate(b for b in BACKENDS if any(p["backend"] == b for p in mine)):
            curve = sorted((p for p in mine if p["backend"] == backend), key=lambda p: order[p["label"]])
            ax.plot([p["latency_ms"] for p in curve], [p["metric"] for p in curve], "-", color=f"C{n}", label=backend)
            for p in curve:
                ax.plot(p["latency_ms"], p["metric"], markers[p["label"]], color=f"C{n}", ms=6)
        for label, marker in markers.items():
            ax.add_line(Line2D([], [], ls="", marker=marker, color="0.3", label=label))
        front = sorted((p for p in mine if p["pareto_optimal"]), key=lambda p: p["latency_ms"])
        ax.plot([p["latency_ms"] for p in front], [p["metric"] for p in front], "k:", lw=1, label="Pareto front")
        size = mine[0].get("latency_input")
        at = f" at {size[0]}x{size[1]}" if size else ""
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(subs=(1, 2, 5)))
        ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel(f"latency, ms (batch 1{at}, {mine[0]['threads']} threads{', end to end' * (task == 'detect')})")
        ax.set_ylabel(mine[0]["metric_name"])
        ax.set_title(f"{task}: metric vs latency")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    partial = path.with_name(path.stem + ".partial.png")
    fig.savefig(partial, dpi=110)
    plt.close(fig)
    os.replace(partial, path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("checkpoints", type=Path, nargs="+", help=".ckpt files of lightning fit")
    parser.add_argument("--data", action="append", required=True, metavar="DIR | TASK=DIR",
                        help="the evaluation data (its val split) and training images (int8 calibration)")
    parser.add_argument("--out", type=Path, default=Path("pareto"))
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"comma-separated, of {', '.join(BACKENDS)}")
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime (torch included)")
    parser.add_argument("--image-size", type=int, default=224, help="classify: the evaluation crop")
    parser.add_argument("--latency-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="segment: the timed input (default: the validation images' size)")
    parser.add_argument("--calibration-count", type=int, default=16)
    parser.add_argument("--latency-runs", type=int, default=20)
    args = parser.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown or not backends:
        parser.error(f"unknown backends {unknown}; choose from {', '.join(BACKENDS)}")
    if args.threads < 1 or args.calibration_count < 1 or args.latency_runs < 1 or args.image_size < 8:
        parser.error("--threads, --calibration-count and --latency-runs must be at least 1, --image-size at least 8")
    missing = [str(p) for p in args.checkpoints if not p.is_file()]
    if missing:
        parser.error(f"no such checkpoint: {', '.join(missing)}")
    checkpoints = [describe(p) for p in args.checkpoints]
    seen: dict[tuple[str, str], int] = {}
    for i, c in enumerate(checkpoints):  # two runs of one network: tell them apart by their folder
        key = (c.task, c.label)
        if key in seen:
            checkpoints[i] = Checkpoint(c.path, c.task, f"{c.label} ({c.path.parent.parent.name})", c.description)
        seen[key] = i
    data = parse_data(args.data, {c.task for c in checkpoints})

    args.out.mkdir(parents=True, exist_ok=True)
    points, failed = [], 0
    jobs = [(i, c, b) for i, c in enumerate(checkpoints) for b in backends]
    for i, ckpt, backend in progress(jobs, desc="evaluations", unit="run"):
        print(f"{ckpt.task} {ckpt.label} on {backend}: {ckpt.path}", flush=True)
        point = evaluate(ckpt, backend, data[ckpt.task], args.out / "runs" / f"{i:02d}_{ckpt.task}_{backend}", args)
        if point is None:
            failed += 1
            continue
        print(f"  {point['metric_name']} {point['metric']:.4f}, latency {point['latency_ms']:.2f} ms", flush=True)
        points.append(point)
    if not points:
        print("no evaluation succeeded: nothing to plot", file=sys.stderr)
        return 1
    mark_front(points)
    table = args.out / "pareto.json"
    partial = table.with_name(table.name + ".partial")
    partial.write_text(json.dumps({"points": points, "backends": backends, "threads": args.threads}, indent=2))
    os.replace(partial, table)
    picture = args.out / "pareto.png"
    plot(points, picture)
    header = f"{'task':9} {'network':18} {'backend':17} {'metric':>13} {'latency ms':>11} {'front':>6}"
    print("\n" + header + "\n" + "-" * len(header))
    for p in sorted(points, key=lambda p: (p["task"], p["latency_ms"])):
        print(f"{p['task']:9} {p['label'][:18]:18} {p['backend']:17} {p['metric']:13.4f} {p['latency_ms']:11.2f} "
              f"{'*' if p['pareto_optimal'] else '':>6}")
    print(f"\n{len(points)} points ({failed} failed): {table}, {picture}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
