"""The main job on built-in data: generate datasets in the real formats, train each task through the
real CLI and configs, evaluate with the real evaluation scripts, and report metric + latency.

    python scripts/demo.py [--out outputs/demo] [--tasks classify,detect,segment] [--seed S | --seeds 0,1,2] [--quick]
    python scripts/demo.py --finetune [--tasks ...] [--seed S]   # fine-tuning vs from scratch (demo_finetune.py)
    python scripts/demo.py --pareto [--tasks ...] [--seed S]     # and a Pareto report over three network sizes

Each training run is a function of its seed (``--seed_everything``): the same seed on the same
machine prints the same metrics (latency is measured anew). ``--seeds`` trains each task once per
seed and prints a row per seed. Everything lands in ``--out``: ``data/`` (generated once, reused),
``runs/<task>/seed<S>/`` (Lightning logs and checkpoints; replaced when that seed runs again),
``pictures/``, ``training_curves.png`` and ``demo_results.json``. ``--quick`` shrinks every run to
a smoke test (used by the test suite); its figures mean nothing.

``--pareto`` then trains each task's network in its two other sizes (of MobileNetV3-Large, -Small and
width 0.75: :data:`PARETO_VARIANTS`) with the same configs and seed, in ``pareto/runs/<task>/<size>/``,
and runs ``scripts/pareto.py`` over the three checkpoints per task: ``pareto/pareto.json`` and
``pareto/pareto.png`` (metric against latency on each backend, the front marked). It adds about twice
the demo's training time and 4 evaluations per network; without the flag nothing changes.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shutil
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
# The two other sizes of each task's demo network for the Pareto report (--pareto): name, CLI overrides.
_CLASS = "--model.init_args.model.class_path"
_WIDTH = ["--model.init_args.model.init_args.width_mult", "0.75"]
PARETO_VARIANTS = {
    "classify": [("large", [_CLASS, "mbv3_dense.mobilenet_v3_large"]), ("small075", _WIDTH)],
    "detect": [("large", [_CLASS, "detection.ssdlite_mobilenet_v3_large"]), ("small075", _WIDTH)],
    "segment": [("small", [_CLASS, "segmentation.lraspp_mobilenet_v3_small"]), ("large075", _WIDTH)],
}
PARETO_BACKENDS = "torch,onnxruntime,executorch,executorch-int8"
QUICK_TRAINER = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
                 "--trainer.limit_val_batches", "2", "--trainer.max_steps", "2"]


def run(cmd: list[str], *, log: Path | None = None) -> None:
    """Run ``cmd`` from the repository root, streaming its output (progress bars included)."""
    print(f"\n$ {' '.join(cmd)}", flush=True)
    # OpenMP threads that wait by spinning take the core from the thread with work whenever anything else
    # runs on the machine: measured here, 10x slower training on 2 busy cores; sleeping waiters cost little.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.stdout.isatty():  # a log file: the scripts' tqdm bars redraw every 30 s instead of 10 times a second
        env.setdefault("TQDM_MININTERVAL", "30")
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


def checkpoint(run_dir: Path) -> Path:
    found = sorted(run_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no last.ckpt under {run_dir}")
    return found[-1]


def fit(spec: Task, data: Path, run_dir: Path, seed: int, quick: bool, extra: list[str] | None = None) -> None:
    cmd = [python(), "-m", "mbv3_dense", "fit"]
    for config in spec.configs:
        cmd += ["-c", config]
    cmd += ["--seed_everything", str(seed), "--data.root", str(data), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
            "--trainer.logger.save_dir", str(run_dir), "--trainer.logger.name", "logs"]
    cmd += spec.fit_overrides + (extra or [])
    if quick:
        cmd += QUICK_TRAINER + spec.quick_overrides
    run(cmd)


def evaluate(spec: Task, data: Path, run_dir: Path, pictures: Path, quick: bool) -> dict:
    """Run the task's evaluation script on the last checkpoint (which describes its network) and return its
    JSON summary."""
    ckpt = checkpoint(run_dir)
    summary_path = run_dir / "eval.json"
    if spec.name == "detect":
        run([python(), "scripts/eval_coco.py", "--weights", str(ckpt), "--images", str(data / "val2017"),
             "--annotations", str(data / "annotations" / "instances_val2017.json"),
             "--results", str(run_dir / "coco_results.json"), "--json", str(summary_path),
             "--visualize", str(pictures)] + (["--latency-runs", "3"] if quick else []))
    elif spec.name == "segment":
        run([python(), "scripts/eval_cityscapes.py", "--weights", str(ckpt), "--root", str(data), "--split", "val",
             "--export-dir", str(run_dir / "labelIds"), "--json", str(summary_path),
             "--visualize", str(pictures)] + (["--latency-size", "128", "256"] if quick else []))
    else:
        run([python(), "scripts/eval_classify.py", "--weights", str(ckpt), "--root", str(data), "--image-size", "64",
             "--json", str(summary_path),
             "--visualize", str(pictures)]
            + (["--latency-runs", "3"] if quick else []))
    return json.loads(summary_path.read_text())


def pareto_report(out: Path, tasks: list[str], seed: int, quick: bool, main_runs: dict[str, Path]) -> Path:
    """Train each task's two other network sizes (:data:`PARETO_VARIANTS`, the demo's configs and ``seed``) and
    run ``scripts/pareto.py`` over the demo's checkpoint and theirs; returns the report's folder."""
    report = out / "pareto"
    checkpoints, data = [], []
    for task in tasks:
        spec = TASK_SPECS[task]
        task_data = out / "data" / task
        checkpoints.append(str(checkpoint(main_runs[task])))
        for name, overrides in PARETO_VARIANTS[task]:
            print(f"\n===== Pareto report: {task} {name}, seed {seed} =====", flush=True)
            run_dir = report / "runs" / task / name
            if run_dir.exists():  # a run is a function of its seed: replaced, as the demo's own runs
                shutil.rmtree(run_dir)
            fit(spec, task_data, run_dir, seed, quick, overrides)
            checkpoints.append(str(checkpoint(run_dir)))
        data += ["--data", f"{task}={task_data}"]
    cmd = [python(), "scripts/pareto.py", *checkpoints, *data, "--out", str(report), "--image-size", "64",
           "--backends", "torch" if quick else PARETO_BACKENDS]
    if quick:
        cmd += ["--latency-runs", "3"]
    run(cmd)
    return report


def plot_curves(out: Path, runs: dict[str, list[tuple[int, Path]]]) -> Path | None:
    """Training loss and validation metric per task, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.6), squeeze=False)
    for ax, (task, seeded) in zip(axes[0], runs.items(), strict=True):
        ax.set_title(TASK_SPECS[task].model)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (lines)")
        twin = ax.twinx()
        twin.set_ylim(0, 1)
        for n, (seed, run_dir) in enumerate(seeded):
            rows = read_metrics(run_dir)
            colour = f"C{n}"
            loss_key = next((k for k in (rows[0] if rows else {}) if k.startswith("train/loss")), None)
            if loss_key:
                pts = [(int(r["step"]), float(r[loss_key])) for r in rows if r.get(loss_key)]
                ax.plot(*zip(*pts, strict=True), color=colour, alpha=0.6, label=f"seed {seed}")
            metric_key = next((k for k in (rows[0] if rows else {}) if k in ("val/top1", "val/map_50", "val/miou")),
                              None)
            pts = [(int(r["step"]), float(r[metric_key])) for r in rows if metric_key and r.get(metric_key)]
            if pts:
                twin.plot(*zip(*pts, strict=True), "o--", color=colour)
                twin.set_ylabel(f"{metric_key} (dots)")
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path = out / "training_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(results: list[dict]) -> str:
    header = (f"{'task':<9} {'seed':>4} {'model':<28} {'metric':<8} {'value':>6} {'target':>6} {'latency ms':>10} "
              f"{'at':>9} {'params M':>8} {'MAdds G':>8} {'train s':>7}")
    lines = [header, "-" * len(header)]
    for r in results:
        size = "x".join(str(v) for v in r["latency_input"]) if r.get("latency_input") else "?"
        mark = "" if r["passed"] else "  MISSED"
        lines.append(f"{r['task']:<9} {r['seed']:>4} {r['model']:<28} {r['metric_name']:<8} {r['metric']:>6.3f} "
                     f"{r['target']:>6.2f} {r['latency_ms']:>10.1f} {size:>9} {r['params_M']:>8.2f} "
                     f"{r['madds_G']:>8.3f} {r['seconds']:>7.0f}{mark}")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    seeds = [int(part) for part in text.split(",") if part.strip()]
    if not seeds or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "demo")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of " + ",".join(TASKS))
    seeds = parser.add_mutually_exclusive_group()
    seeds.add_argument("--seed", type=int, default=0, help="the training seed (default 0)")
    seeds.add_argument("--seeds", type=parse_seeds, help="comma-separated seeds: each task is trained once per seed")
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes (for tests): figures mean nothing")
    parser.add_argument("--finetune", action="store_true",
                        help="instead: pretrain on the demo's data, fine-tune on data with other classes, and compare "
                             "with training from scratch (scripts/demo_finetune.py)")
    parser.add_argument("--pareto", action="store_true",
                        help="also train each task's network in its two other sizes (Large, Small, width 0.75) and "
                             "write a Pareto report (metric against latency per backend) to OUT/pareto")
    args = parser.parse_args(argv)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in TASK_SPECS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {TASKS}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    seed_list = args.seeds or [args.seed]
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.finetune:
        import demo_finetune

        return demo_finetune.main(out, tasks, seed_list[0], args.quick)
    started = time.time()
    results: list[dict] = []
    runs: dict[str, list[tuple[int, Path]]] = {}
    for task in tasks:
        spec = TASK_SPECS[task]
        data = make_data(task, out / "data", args.quick)
        for seed in seed_list:
            print(f"\n===== {task}: {spec.model}, seed {seed} =====", flush=True)
            t0 = time.time()
            run_dir = out / "runs" / task / f"seed{seed}"
            if run_dir.exists():  # a run is a function of its seed: the same seed replaces its earlier run
                shutil.rmtree(run_dir)
            fit(spec, data, run_dir, seed, args.quick)
            summary = evaluate(spec, data, run_dir, out / "pictures" / task / f"seed{seed}", args.quick)
            runs.setdefault(task, []).append((seed, run_dir))
            metric = float(summary[spec.metric_key])
            results.append({
                "task": task, "seed": seed, "model": spec.model, "metric_name": spec.metric_name,
                "metric": metric, "target": spec.target,
                "passed": bool(math.isfinite(metric) and metric >= spec.target),
                "latency_ms": float(summary["latency_ms"]), "latency_input": summary.get("latency_input"),
                "params_M": float(summary["params_M"]), "madds_G": float(summary["madds_G"]),
                "seconds": round(time.time() - t0, 1), "checkpoint": str(checkpoint(run_dir)),
                "details": {k: v for k, v in summary.items() if k not in ("metric",)},
            })
    curves = plot_curves(out, runs) if runs else None
    pareto = None
    if args.pareto:
        first_seed = {task: dict(seeded)[seed_list[0]] for task, seeded in runs.items()}
        pareto = pareto_report(out, tasks, seed_list[0], args.quick, first_seed)
    total = time.time() - started
    report = {"results": results, "seeds": seed_list, "seconds": round(total, 1), "quick": args.quick,
              "training_curves": str(curves) if curves else None, "pictures": str(out / "pictures")}
    if pareto is not None:
        report["pareto"] = {"json": str(pareto / "pareto.json"), "png": str(pareto / "pareto.png")}
    (out / "demo_results.json").write_text(json.dumps(report, indent=2))
    print("\n" + table(results))
    print(f"\nheld-out generated validation images; latency: batch 1 on this machine ({os.cpu_count()} cores); "
          "train s: training and evaluation of the row")
    per_seed = total / 60 / len(seed_list)
    print(f"wall time {total / 60:.1f} min for {len(results)} runs ({per_seed:.1f} min per seed)")
    print(f"results:   {out / 'demo_results.json'}")
    print(f"curves:    {curves}")
    print(f"pictures:  {out / 'pictures'}")
    if pareto is not None:
        print(f"pareto:    {pareto / 'pareto.png'} and {pareto / 'pareto.json'}")
    missed = [f"{r['task']} seed {r['seed']}" for r in results if not r["passed"]]
    if missed and not args.quick:
        print(f"MISSED the target: {', '.join(missed)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
