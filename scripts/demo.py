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
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from _runs import DEMO_CONFIGS, ROOT, VAL_METRICS, checkpoint, fit_command, make_data, read_metrics, run, series

TASKS = ("classify", "detect", "segment")


@dataclass
class Task:
    name: str
    model: str
    metric_name: str
    target: float
    metric_key: str = "metric"  # the key of the evaluation script's JSON summary compared with ``target``
    fit_overrides: list[str] = field(default_factory=list)
    quick_overrides: list[str] = field(default_factory=list)

    @property
    def configs(self) -> list[str]:
        return list(DEMO_CONFIGS[self.name])


TASK_SPECS = {
    "classify": Task("classify", "MobileNetV3-Small classifier", "top-1", target=0.90),
    "detect": Task("detect", "SSDLite MobileNetV3-Small", "mAP@0.5", target=0.50, metric_key="map_50",
                   quick_overrides=["--data.batch_size", "2"]),
    "segment": Task("segment", "LR-ASPP MobileNetV3-Large", "mIoU", target=0.60,
                    quick_overrides=["--data.batch_size", "2", "--data.crop_size", "[64, 64]"]),
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


def python() -> str:
    return sys.executable


def fit(spec: Task, data: Path, run_dir: Path, seed: int, quick: bool, extra: list[str] | None = None) -> None:
    options = spec.fit_overrides + (extra or []) + (QUICK_TRAINER + spec.quick_overrides if quick else [])
    run(fit_command(spec.configs, data, run_dir, *options, seed=seed))


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
            if loss_key and (pts := series(rows, loss_key)):
                ax.plot(*zip(*pts, strict=True), color=colour, alpha=0.6, label=f"seed {seed}")
            if pts := series(rows, VAL_METRICS[task]):
                twin.plot(*zip(*pts, strict=True), "o--", color=colour)
                twin.set_ylabel(f"{VAL_METRICS[task]} (dots)")
        if ax.get_legend_handles_labels()[0]:  # no training loss logged (--quick): no legend to draw
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
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
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in TASK_SPECS]
    if unknown:
        parser.error(f"unknown tasks {unknown}; choose from {TASKS}")
    if args.seed < 0:
        parser.error(f"--seed must be non-negative, got {args.seed}")
    args.seeds = args.seeds or [args.seed]
    args.out = args.out.resolve()
    return args


def train_and_evaluate(spec: Task, data: Path, out: Path, seed: int, quick: bool) -> tuple[dict, Path]:
    """One row of the table, and its run's folder: ``spec``'s network trained with ``seed`` and evaluated."""
    print(f"\n===== {spec.name}: {spec.model}, seed {seed} =====", flush=True)
    t0 = time.time()
    run_dir = out / "runs" / spec.name / f"seed{seed}"
    if run_dir.exists():  # a run is a function of its seed: the same seed replaces its earlier run
        shutil.rmtree(run_dir)
    fit(spec, data, run_dir, seed, quick)
    summary = evaluate(spec, data, run_dir, out / "pictures" / spec.name / f"seed{seed}", quick)
    metric = float(summary[spec.metric_key])
    return {
        "task": spec.name, "seed": seed, "model": spec.model, "metric_name": spec.metric_name,
        "metric": metric, "target": spec.target,
        "passed": bool(math.isfinite(metric) and metric >= spec.target),
        "latency_ms": float(summary["latency_ms"]), "latency_input": summary.get("latency_input"),
        "params_M": float(summary["params_M"]), "madds_G": float(summary["madds_G"]),
        "seconds": round(time.time() - t0, 1), "checkpoint": str(checkpoint(run_dir)),
        "details": {k: v for k, v in summary.items() if k not in ("metric",)},
    }, run_dir


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out, seed_list = args.out, args.seeds
    out.mkdir(parents=True, exist_ok=True)
    if args.finetune:
        import demo_finetune

        return demo_finetune.main(out, args.tasks, seed_list[0], args.quick)
    started = time.time()
    results: list[dict] = []
    runs: dict[str, list[tuple[int, Path]]] = {}
    for task in args.tasks:
        data = make_data(task, out / "data", args.quick)
        for seed in seed_list:
            row, run_dir = train_and_evaluate(TASK_SPECS[task], data, out, seed, args.quick)
            results.append(row)
            runs.setdefault(task, []).append((seed, run_dir))
    curves = plot_curves(out, runs) if runs else None
    pareto = None
    if args.pareto:
        first_seed = {task: dict(seeded)[seed_list[0]] for task, seeded in runs.items()}
        pareto = pareto_report(out, args.tasks, seed_list[0], args.quick, first_seed)
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
