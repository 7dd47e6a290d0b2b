"""Fine-tuning against training from scratch, on generated data: ``bash scripts/demo.sh --finetune``.

For each task, through the real CLI and configs:

1. pretrain on the demo's data A: the main demo's own run of the task and seed (``<out>/runs/<task>/seed<S>``),
   reused when ``bash scripts/demo.sh`` made it, else trained now exactly as the demo trains it;
2. generate a dataset B whose classes differ from A's, some sharing A's names (classify: circle and triangle
   from A, stripes and checker new; detect: person and dog from A under other category ids, kite new;
   segment: image + mask folders with road, building, vegetation, sky and car from Cityscapes, grass and
   water new);
3. train on B at one budget of steps, with the demo's optimizer and schedule: from scratch, from A's weights
   with the class rows of names both know and the fine-tuning controls of ``configs/finetune/<task>.yaml``
   (frozen backbone epochs, backbone learning rate, BatchNorm statistics), and, for classify and detect,
   from A's weights with a fresh class head (``keep_class_rows: false``).

Validation after every epoch (segment: every few steps) gives the curves; the table gives each run's metric
after its first epoch, at half and at all of the budget, and the step at which it first reaches the
from-scratch run's final metric. Outputs in ``<out>/finetune/``: ``finetune_results.json``,
``finetune_curves.png``, runs and data B.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import demo
from demo import checkpoint, python, read_metrics, run


@dataclass
class FinetuneSpec:
    """One task of the comparison.

    Attributes:
        model: shown in the plot.
        configs: the model config and the demo's overlay (the from-scratch recipe; the main demo's).
        metric: the validation metric logged (``val/top1``, ...); ``metric_name`` its name in the table.
        budget: overrides of every run on B (the same steps and sizes for all).
        fresh_head: also run from A's weights with a fresh class head.
    """

    model: str
    configs: list[str]
    metric: str
    metric_name: str
    budget: list[str]
    fresh_head: bool = True


SPECS = {
    "classify": FinetuneSpec(
        model="MobileNetV3-Small classifier", metric="val/top1", metric_name="top-1",
        configs=["configs/mobilenet_v3_small_imagenet.yaml", "configs/demo/classify.yaml"],
        budget=["--trainer.max_epochs", "8", "--data.batch_size", "32"]),
    "detect": FinetuneSpec(
        model="SSDLite MobileNetV3-Small", metric="val/map_50", metric_name="mAP@0.5",
        configs=["configs/ssdlite_mobilenet_v3_small_coco.yaml", "configs/demo/detect.yaml"],
        budget=["--trainer.max_epochs", "8", "--trainer.check_val_every_n_epoch", "1", "--data.batch_size", "16",
                "--data.num_classes", "null"]),
    "segment": FinetuneSpec(
        model="LR-ASPP MobileNetV3-Large", metric="val/miou", metric_name="mIoU",
        configs=["configs/lraspp_cityscapes.yaml", "configs/demo/segment.yaml"],
        budget=["--data", "segmentation.folder.MaskFolderDataModule", "--data.crop_size", "[256, 256]",
                "--data.batch_size", "8", "--data.val_batch_size", "4", "--data.num_workers", "1",
                "--trainer.max_steps", "48", "--trainer.val_check_interval", "8"],
        fresh_head=False),
}


def generate_b(task: str, root: Path, tiny: bool = False) -> Path:
    """Data B of ``task`` (other classes, some of A's names) under ``root``, generated once and reused;
    ``tiny``: a few small images (smoke tests)."""
    if (root / ".complete").exists():
        return root
    n = (lambda count, small: small if tiny else count)  # noqa: E731 - the image counts, or the tiny ones
    if task == "classify":
        from mbv3_dense.classification.synthetic import ImageFolderSpec, generate_imagefolder

        generate_imagefolder(root, ImageFolderSpec(classes=("circle", "triangle", "stripes", "checker"),
                                                   size=n(64, 32), train_per_class=n(60, 4),
                                                   val_per_class=n(40, 2), seed=11))
    elif task == "detect":
        from detection.synthetic import DetectionSpec, generate_coco

        sizes = {"min_side": 96, "max_side": 128, "min_object": 24, "max_object": 60} if tiny else {}
        generate_coco(root, DetectionSpec(train_images=n(112, 4), val_images=n(40, 2), seed=11, **sizes,
                                          categories=((11, "person", "circle"), (250, "dog", "triangle"),
                                                      (7, "kite", "hexagon"))))
    else:
        from segmentation.synthetic import MaskFolderSpec, generate_mask_folders

        generate_mask_folders(root, MaskFolderSpec(height=n(256, 64), width=n(512, 128), train_images=n(64, 4),
                                                   val_images=n(16, 2), seed=11))
    (root / ".complete").write_text("generated\n")
    return root


def pretrained_on_a(task: str, out: Path, seed: int, quick: bool) -> Path:
    """The main demo's checkpoint of ``task`` and ``seed``: reused when the demo made it (its evaluation
    summary marks a finished run), else trained now as the demo trains it (the same run: a function of
    its seed)."""
    run_dir = out / "runs" / task / f"seed{seed}"
    if (run_dir / "eval.json").is_file() or (run_dir / "pretrained.done").is_file():
        print(f"[demo] reusing the demo's {task} run on A: {run_dir}", flush=True)
        return checkpoint(run_dir)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    demo.fit(demo.TASK_SPECS[task], demo.make_data(task, out / "data", quick), run_dir, seed, quick)
    (run_dir / "pretrained.done").write_text("trained by demo_finetune\n")
    return checkpoint(run_dir)


def fit(configs: list[str], data: Path, run_dir: Path, seed: int, extra: list[str]) -> None:
    if run_dir.exists():  # a run is a function of its seed: the same seed replaces its earlier run
        shutil.rmtree(run_dir)
    cmd = [python(), "-m", "mbv3_dense", "fit"]
    for config in configs:
        cmd += ["-c", config]
    # The extra options first: one may choose another data module, whose root follows.
    cmd += [*extra, "--seed_everything", str(seed), "--data.root", str(data), "--trainer.default_root_dir",
            str(run_dir), "--checkpoints.best", "false", "--val_pictures", "0"]
    run(cmd)


def curve(run_dir: Path, metric: str) -> list[tuple[int, float]]:
    """``(optimizer steps done, metric)`` at every validation of a run."""
    return [(int(r["step"]) + 1, float(r[metric])) for r in read_metrics(run_dir) if r.get(metric)]


def at_fraction(points: list[tuple[int, float]], total: int, fraction: float) -> float | None:
    """The metric of the last validation at or before ``fraction`` of the budget."""
    seen = [m for s, m in points if s <= fraction * total + 1e-9]
    return seen[-1] if seen else None


# --quick (tests): two steps a run, validation after each, tiny inputs; the figures mean nothing.
QUICK = ["--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.val_check_interval", "1",
         "--trainer.check_val_every_n_epoch", "null", "--data.num_workers", "0"]
QUICK_TASK = {"classify": ["--data.crop_size", "32", "--data.val_resize_size", "36", "--data.batch_size", "4"],
              "detect": ["--data.batch_size", "2", "--data.val_batch_size", "2"],
              "segment": ["--data.batch_size", "2", "--data.crop_size", "[64, 64]", "--data.val_batch_size", "1"]}


def compare(task: str, out: Path, seed: int, quick: bool = False) -> dict:
    """A's checkpoint, then the runs on B; returns the task's rows and curves."""
    spec = SPECS[task]
    weights = ["--model.init_args.model.init_args.weights", str(pretrained_on_a(task, out.parent, seed, quick))]
    data_b = generate_b(task, out / "data" / f"{task}_b", quick)
    small = [*QUICK, *QUICK_TASK[task]] if quick else []
    # The fine-tuning overlay goes before the demo's, whose optimizer and schedule then apply to every run:
    # the runs differ by their starting weights and the fine-tuning controls, not by the learning rate.
    overlay = [spec.configs[0], f"configs/finetune/{task}.yaml", *spec.configs[1:]]
    variants = [("scratch", "scratch", spec.configs, []), ("A, class rows matched by name", "from_a", overlay, weights)]
    if spec.fresh_head:
        variants.append(("A, fresh class head", "from_a_fresh_head", overlay,
                         [*weights, "--model.init_args.model.init_args.keep_class_rows", "false"]))
    curves = {}
    for name, folder, configs, options in variants:
        run_dir = out / "runs" / task / folder
        fit(configs, data_b, run_dir, seed, [*options, *spec.budget, *small])
        curves[name] = curve(run_dir, spec.metric)
    total = max(s for points in curves.values() for s, _ in points)
    target = curves["scratch"][-1][1]
    rows = []
    for name, points in curves.items():
        reached = next((s for s, m in points if m >= target), None) if name != "scratch" else None
        rows.append({"task": task, "start": name, "metric_name": spec.metric_name, "first_step": points[0][0],
                     "first": points[0][1], "half": at_fraction(points, total, 0.5), "final": points[-1][1],
                     "steps": total, "reaches_scratch_final_at": reached})
    return {"rows": rows, "curves": curves, "metric_name": spec.metric_name, "model": spec.model}


def plot(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5 * len(results), 3.6), squeeze=False)
    for ax, (task, result) in zip(axes[0], results.items(), strict=True):
        for name, points in result["curves"].items():
            ax.plot(*zip(*points, strict=True), "o-", label=name, markersize=3)
        ax.set_title(f"{task}: {result['model']}")
        ax.set_xlabel("optimizer steps on B")
        ax.set_ylabel(result["metric_name"])
        ax.set_ylim(0, 1)
        ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def table(rows: list[dict]) -> str:
    def shown(v: float | None) -> str:
        return f"{v:.3f}" if v is not None else "-"

    header = (f"{'task':<9} {'start':<30} {'metric':<8} {'1st val':>7} {'@50%':>6} {'@100%':>6} "
              f"{'reaches scratch final at':>26}")
    lines = [header, "-" * len(header)]
    for r in rows:
        reached = r["reaches_scratch_final_at"]
        when = "(the target)" if r["start"] == "scratch" else (
            f"step {reached} of {r['steps']} ({reached / r['steps']:.0%})" if reached else "not reached")
        lines.append(f"{r['task']:<9} {r['start']:<30} {r['metric_name']:<8} {shown(r['first']):>7} "
                     f"{shown(r['half']):>6} {shown(r['final']):>6} {when:>26}")
    first_steps = sorted({r["first_step"] for r in rows})
    lines.append(f"(1st val: after step {', '.join(map(str, first_steps))}, the first epoch)")
    return "\n".join(lines)


def main(out: Path, tasks: list[str], seed: int, quick: bool = False) -> int:
    """The comparison for ``tasks`` (those with a spec); prints the table, writes JSON and the plot."""
    out = out / "finetune"
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    results = {}
    for task in [t for t in tasks if t in SPECS]:
        print(f"\n===== fine-tuning {task}: pretrain on A, then B from scratch and from A =====", flush=True)
        results[task] = compare(task, out, seed, quick)
    rows = [r for result in results.values() for r in result["rows"]]
    curves = plot(results, out / "finetune_curves.png")
    (out / "finetune_results.json").write_text(json.dumps({"rows": rows, "seed": seed, "seconds": round(
        time.time() - started, 1), "curves": {t: r["curves"] for t, r in results.items()}}, indent=2))
    print("\n" + table(rows))
    print(f"\nwall time {(time.time() - started) / 60:.1f} min; curves: {curves}")
    missed = [r for r in rows if "matched" in r["start"] and (
        r["reaches_scratch_final_at"] is None or r["reaches_scratch_final_at"] > r["steps"] / 2)]
    for r in missed:
        print(f"fine-tuning {r['task']} did not reach the from-scratch final metric within half the steps")
    return 0
