"""The main job on built-in data: generate datasets in the real formats, train each task through the
real CLI and configs, evaluate with the real evaluation scripts, and report metric + latency.

    python scripts/demo.py [--out outputs/demo] [--tasks classify,detect,segment] [--quick]

Everything lands in ``--out``: ``data/`` (generated once, reused), ``runs/<task>/`` (Lightning logs
and checkpoints), ``pictures/``, ``training_curves.png`` and ``demo_results.json``. ``--quick``
shrinks every run to a smoke test (used by the test suite); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TASKS = ("classify", "detect", "segment")


@dataclass
class Task:
    name: str
    model: str
    metric_name: str
    target: float
    configs: list[str]
    metric_key: str = "metric"  # the key of the evaluation script's JSON summary compared with ``target``
    fit_overrides: list[str] = field(default_factory=list)
    quick_overrides: list[str] = field(default_factory=list)


TASK_SPECS = {
    "classify": Task(
        name="classify",
        model="MobileNetV3-Small classifier",
        metric_name="top-1",
        target=0.90,
        configs=["configs/mobilenet_v3_small_imagenet.yaml", "configs/demo/classify.yaml"],
    ),
    "detect": Task(
        name="detect",
        model="SSDLite MobileNetV3-Small",
        metric_name="mAP@0.5",
        target=0.50,
        metric_key="map_50",
        configs=["configs/ssdlite_mobilenet_v3_small_coco.yaml", "configs/demo/detect.yaml"],
        quick_overrides=["--data.batch_size", "2"],
    ),
    "segment": Task(
        name="segment",
        model="LR-ASPP MobileNetV3-Large",
        metric_name="mIoU",
        target=0.60,
        configs=["configs/lraspp_cityscapes.yaml", "configs/demo/segment.yaml"],
        quick_overrides=["--data.batch_size", "2", "--data.crop_size", "[64, 64]"],
    ),
}
QUICK_TRAINER = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "2", "--trainer.max_steps", "2"]


def run(cmd: list[str], *, log: Path | None = None) -> None:
    """Run ``cmd`` from the repository root, streaming its output (progress bars included)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(cmd, cwd=ROOT, env=env)
    if result.returncode != 0:
        raise SystemExit(f"demo step failed (exit {result.returncode}): {' '.join(cmd)}")


def python() -> str:
    return sys.executable


def make_data(task: str, data_dir: Path, quick: bool) -> Path:
    out = data_dir / task
    if (out / ".complete").exists():
        print(f"[demo] reusing generated {task} data in {out}")
        return out
    cmd = [python(), "scripts/make_demo_data.py", task, "--out", str(out)]
    if quick:
        cmd.append("--tiny")
    run(cmd)
    (out / ".complete").write_text("generated\n")
    return out


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    files = sorted(run_dir.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with open(files[-1], newline="") as f:
        return list(csv.DictReader(f))


def last_value(rows: list[dict[str, str]], key: str) -> float | None:
    for row in reversed(rows):
        if row.get(key) not in (None, ""):
            return float(row[key])
    return None


def checkpoint(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no last.ckpt under {run_dir}")
    return found[-1]


def fit(spec: Task, data: Path, run_dir: Path, quick: bool) -> None:
    cmd = [python(), "-m", "mbv3_dense", "fit"]
    for config in spec.configs:
        cmd += ["-c", config]
    cmd += ["--data.root", str(data), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(run_dir), "--trainer.logger.name", "logs"]
    cmd += spec.fit_overrides
    if quick:
        cmd += QUICK_TRAINER + spec.quick_overrides
    run(cmd)


def evaluate(spec: Task, data: Path, run_dir: Path, out: Path, quick: bool) -> dict:
    """Run the task's evaluation (script or CLI) and return its JSON summary."""
    ckpt = checkpoint(run_dir)
    summary_path = run_dir / "eval.json"
    pictures = out / "pictures" / spec.name
    if spec.name == "detect":
        run([python(), "scripts/eval_coco.py", "--weights", str(ckpt), "--arch", "small",
             "--num-classes", "5", "--images", str(data / "val2017"),
             "--annotations", str(data / "annotations" / "instances_val2017.json"),
             "--results", str(run_dir / "coco_results.json"), "--json", str(summary_path),
             "--visualize", str(pictures)] + (["--latency-runs", "3"] if quick else []))
    elif spec.name == "segment":
        run([python(), "scripts/eval_cityscapes.py", "--weights", str(ckpt), "--arch", "large",
             "--variant", "paper", "--root", str(data), "--split", "val",
             "--export-dir", str(run_dir / "labelIds"), "--json", str(summary_path),
             "--visualize", str(pictures)] + (["--latency-size", "128", "256"] if quick else []))
    else:
        run([python(), "scripts/eval_classify.py", "--weights", str(ckpt), "--arch", "small",
             "--root", str(data), "--image-size", "64", "--json", str(summary_path),
             "--visualize", str(pictures)]
            + (["--latency-runs", "3"] if quick else []))
    return json.loads(summary_path.read_text())


def plot_curves(out: Path, runs: dict[str, Path]) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (task, run_dir) in zip(axes[0], runs.items(), strict=True):
        rows = read_metrics(run_dir)
        ax.set_title(TASK_SPECS[task].model)
        ax.set_xlabel("step")
        loss_key = next((k for k in (rows[0] if rows else {}) if k.startswith("train/loss")), None)
        if loss_key:
            pts = [(int(r["step"]), float(r[loss_key])) for r in rows if r.get(loss_key)]
            ax.plot(*zip(*pts, strict=True), label=loss_key, color="tab:blue")
            ax.set_ylabel("training loss")
        twin = ax.twinx()
        metric_keys = [k for k in (rows[0] if rows else {}) if k in ("val/top1", "val/map_50", "val/miou")]
        for key in metric_keys:
            pts = [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]
            if pts:
                twin.plot(*zip(*pts, strict=True), "o-", label=key, color="tab:red")
                twin.set_ylabel(key)
                twin.set_ylim(0, 1)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(results: list[dict]) -> str:
    header = (f"{'task':<9} {'model':<28} {'metric':<8} {'value':>6} {'target':>6} {'latency ms':>10} "
              f"{'at':>9} {'params M':>8} {'MAdds G':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        size = "x".join(str(v) for v in r["latency_input"]) if r.get("latency_input") else "?"
        lines.append(f"{r['task']:<9} {r['model']:<28} {r['metric_name']:<8} {r['metric']:>6.3f} "
                     f"{r['target']:>6.2f} {r['latency_ms']:>10.1f} {size:>9} {r['params_M']:>8.2f} "
                     f"{r['madds_G']:>8.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (for tests): figures mean nothing")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {TASKS}")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results, runs = [], {}
    for task in tasks:
        spec = TASK_SPECS[task]
        print(f"\n===== {task}: {spec.model} =====", flush=True)
        t0 = time.time()
        data = make_data(task, out / "data", args.quick)
        run_dir = out / "runs" / task
        fit(spec, data, run_dir, args.quick)
        summary = evaluate(spec, data, run_dir, out, args.quick)
        runs[task] = run_dir
        results.append({
            "task": task, "model": spec.model, "metric_name": spec.metric_name,
            "metric": float(summary[spec.metric_key]), "target": spec.target,
            "passed": bool(summary[spec.metric_key] >= spec.target),
            "latency_ms": float(summary["latency_ms"]), "latency_input": summary.get("latency_input"),
            "params_M": float(summary["params_M"]), "madds_G": float(summary["madds_G"]),
            "seconds": round(time.time() - t0, 1), "checkpoint": str(checkpoint(run_dir)),
            "details": {k: v for k, v in summary.items() if k not in ("metric",)},
        })
    curves = plot_curves(out, runs) if runs else None
    total = time.time() - started
    report = {"results": results, "seconds": round(total, 1), "quick": args.quick,
              "training_curves": str(curves) if curves else None,
              "pictures": str(out / "pictures")}
    (out / "demo_results.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(results))
    print(f"\nheld-out generated validation images; latency: batch 1 on this machine ({os.cpu_count()} cores)")
    print(f"total {total / 60:.1f} min")
    print(f"results:   {out / 'demo_results.json'}")
    print(f"curves:    {curves}")
    print(f"pictures:  {out / 'pictures'}")
    return 0 if args.quick or all(r["passed"] and math.isfinite(r["metric"]) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
