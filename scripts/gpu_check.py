"""The GPU check: does training run, converge and measure the same on a GPU as on the CPU?

    bash scripts/gpu_check.sh                    # one GPU, at most ~8 minutes
    bash scripts/gpu_check.sh --device cpu       # dry run: the same steps, a few of each, on the CPU

For each task it generates the demo dataset (real on-disk formats), then runs the task's real
config with the demo overlay through ``python -m mbv3_dense fit`` for ``--steps`` optimizer steps in
mixed precision (``--precision``, bf16 by default on CUDA), and reads the training loss from the
run's ``metrics.csv``: the mean of the first logged fifth against the last fifth. The overlay's
``LatencyCallback`` times the network on the training device (CUDA synchronised before each clock
read) and its ``latency_ms`` is reported beside the loss. Then ``scripts/benchmark_training.py``
measures train-step images/s in fp32 and in the mixed precision, ours against torchvision's models,
and the ratio mixed/fp32 is printed per task.

Everything goes to ``--out`` (``gpu_check.json``, ``gpu_check.md``, the runs' logs). Exit status 1
when a loss did not go down on a GPU run (a CPU dry run is too short to ask that of).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

from _runs import DEMO_CONFIGS, VAL_METRICS, fit_command, last, make_data, read_metrics, run, series

from mbv3_dense.checkpoints.model_record import TASKS, task_list

# A dry run on the CPU: the smallest data and batches that still go through every step.
DRY_RUN = {
    "classify": ["--data.batch_size", "8"],
    "detect": ["--data.batch_size", "2"],
    "segment": ["--data.batch_size", "2", "--data.crop_size", "[64, 64]",
                "--trainer.callbacks.init_args.input_size", "[64, 128]"],
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tasks", type=task_list, default=",".join(TASKS))
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per task (cuda 300, cpu 4)")
    p.add_argument("--precision", default=None,
                   help="the mixed precision to check (cuda: bf16-mixed; cpu: 32-true)")
    p.add_argument("--out", type=Path, default=Path("outputs/gpu_check"))
    p.add_argument("--skip-benchmark", action="store_true", help="only the training runs")
    args = p.parse_args(argv)
    dry = args.device == "cpu"
    args.steps = args.steps or (4 if dry else 300)
    args.precision = args.precision or ("32-true" if dry else "bf16-mixed")
    return args


def loss_trend(rows: list[dict[str, str]]) -> tuple[float, float, int]:
    """(mean loss of the first fifth of the logged steps, of the last fifth, number logged)."""
    losses = [value for _, value in series(rows, "train/loss")]
    if not losses:
        raise SystemExit("no train/loss in metrics.csv")
    k = max(1, len(losses) // 5)
    return sum(losses[:k]) / k, sum(losses[-k:]) / k, len(losses)


def train(task: str, args: argparse.Namespace) -> dict:
    dry = args.device == "cpu"
    data = make_data(task, args.out / "data", dry, log=args.out / f"data_{task}.log", what="gpu check")
    run_dir = args.out / "runs" / task
    cmd = fit_command(
        DEMO_CONFIGS[task], data, run_dir, "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
        "--trainer.devices", "1", "--trainer.precision", args.precision, "--trainer.max_steps", str(args.steps),
        "--trainer.max_epochs", "-1", "--trainer.log_every_n_steps", "1" if dry else "5",
        "--trainer.limit_val_batches", "4", "--checkpoints.every_n_train_steps", "0",
        "--data.num_workers", "0" if dry else str(min(8, os.cpu_count() or 1)),
        # Validate (the metric, and the latency callback's timing) once, at the last step, whatever the epoch length.
        "--trainer.check_val_every_n_epoch", "null", "--trainer.val_check_interval", str(args.steps),
        *(DRY_RUN[task] if dry else []))
    t0 = time.time()
    run(cmd, log=args.out / f"fit_{task}.log", what="gpu check")
    rows = read_metrics(run_dir)
    if not rows:
        raise SystemExit(f"no metrics.csv under {run_dir}")
    first, final, logged = loss_trend(rows)
    return {"task": task, "steps": args.steps, "precision": args.precision, "seconds": round(time.time() - t0, 1),
            "loss_first": first, "loss_last": final, "losses_logged": logged, "loss_went_down": final < first,
            "metric": last(rows, VAL_METRICS[task]), "metric_name": VAL_METRICS[task],
            "latency_ms": last(rows, "latency_ms"), "latency_p90_ms": last(rows, "latency_p90_ms")}


def benchmark(args: argparse.Namespace) -> dict[str, dict]:
    """Train-step images/s in fp32 and in ``args.precision``, ours and torchvision's, per task."""
    dry = args.device == "cpu"
    found: dict[str, dict] = {}
    for precision in dict.fromkeys(("32-true", args.precision)):
        out = args.out / f"benchmark_{precision}.json"
        run([sys.executable, "scripts/benchmark_training.py", "--tasks", ",".join(args.tasks), "--measure", "train",
             "--device", args.device, "--precision", precision, "--steps", "10", "--warmup", "3",
             "--workdir", str(args.out / "benchmark_data"), "--json", str(out), *(["--quick"] if dry else [])],
            log=args.out / f"benchmark_{precision}.log", what="gpu check")
        found[precision] = json.loads(out.read_text())
    return found


def train_step_rows(report: dict) -> dict[tuple[str, str], float]:
    """``{(task, contender): images/s}`` of the train-step rows of a benchmark_training.py report."""
    rows = {}
    for row in report["rows"]:
        if row["what"] == "train step":
            rows[(row["task"], "ours")] = row["ours_img_s"]
            rows[(row["task"], "torchvision")] = row["torchvision_img_s"]
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch sees no CUDA GPU (use --device cpu for the dry run)", file=sys.stderr)
        return 2
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"gpu check on {card}: {', '.join(args.tasks)}, {args.steps} steps, {args.precision}", flush=True)
    summary: dict = {"device": card, "torch": torch.__version__, "training": [], "speedup": []}
    for task in args.tasks:
        result = train(task, args)
        summary["training"].append(result)
        print(f"  {task:9s} loss {result['loss_first']:.4f} -> {result['loss_last']:.4f} "
              f"({result['losses_logged']} logged), latency {result['latency_ms']} ms on {card}, "
              f"{result['seconds']} s", flush=True)
    if not args.skip_benchmark:
        reports = benchmark(args)
        summary["benchmark"] = reports
        fp32, mixed = train_step_rows(reports["32-true"]), train_step_rows(reports[args.precision])
        for key, base in fp32.items():
            if key in mixed and base > 0:
                summary["speedup"].append({"task": key[0], "contender": key[1], "fp32_img_s": base,
                                           "mixed_img_s": mixed[key], "ratio": mixed[key] / base})
    lines = [f"# GPU check: {card}", "", f"{args.steps} steps per task in {args.precision}; torch {torch.__version__}",
             "", "| task | loss first fifth | loss last fifth | metric | latency ms | s |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['task']} | {r['loss_first']:.4f} | {r['loss_last']:.4f} | {r['metric_name']} {r['metric']} | "
              f"{r['latency_ms']} | {r['seconds']} |" for r in summary["training"]]
    if summary["speedup"]:
        lines += ["", f"| task | model | fp32 img/s | {args.precision} img/s | ratio |", "|---|---|---|---|---|"]
        lines += [f"| {s['task']} | {s['contender']} | {s['fp32_img_s']:.1f} | {s['mixed_img_s']:.1f} | "
                  f"{s['ratio']:.2f} |" for s in summary["speedup"]]
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    (args.out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
    print("\n".join(lines))
    bad = [r["task"] for r in summary["training"] if not math.isfinite(r["loss_last"])]
    if args.device == "cuda":
        bad += [r["task"] for r in summary["training"] if not r["loss_went_down"]]
    if bad:
        print(f"FAILED: the loss did not go down (or is not finite) for {', '.join(sorted(set(bad)))}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
