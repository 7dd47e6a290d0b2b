"""What the scripts that drive training runs share (``scripts/demo.py``, ``demo_finetune.py`` through it, and
``gpu_check.py``): a step run from the repository root, the demo data generated once, the ``python -m
mbv3_dense fit`` command of a task's demo configs, and the values a run logged to its ``metrics.csv``."""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each task's demo network: its paper config, then the demo overlay (configs/demo/) for the generated data.
DEMO_CONFIGS = {
    "classify": ("configs/mobilenet_v3_small_imagenet.yaml", "configs/demo/classify.yaml"),
    "detect": ("configs/ssdlite_mobilenet_v3_small_coco.yaml", "configs/demo/detect.yaml"),
    "segment": ("configs/lraspp_cityscapes.yaml", "configs/demo/segment.yaml"),
}
VAL_METRICS = {"classify": "val/top1", "detect": "val/map_50", "segment": "val/miou"}  # each task's logged metric


def run(cmd: list[str], *, log: Path | None = None, what: str = "demo") -> None:
    """Run ``cmd`` from the repository root: its output streamed (progress bars included), or into ``log``,
    whose tail is printed when it fails. A failure ends the script, naming ``what`` step failed."""
    print(("\n" if log is None else "") + f"$ {' '.join(cmd)}", flush=True)  # streamed: a blank line before
    # OpenMP threads that wait by spinning take the core from the thread with work whenever anything else
    # runs on the machine: measured here, 10x slower training on 2 busy cores; sleeping waiters cost little.
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if log is not None or not sys.stdout.isatty():  # a log file: tqdm bars redraw every 30 s, not 10 times a second
        env.setdefault("TQDM_MININTERVAL", "30")
    if log is None:
        code = subprocess.run(cmd, cwd=ROOT, env=env).returncode
    else:
        with log.open("w") as f:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if code == 0:
        return
    if log is None:
        raise SystemExit(f"{what} step failed (exit {code}): {' '.join(cmd)}")
    print(log.read_text()[-4000:], file=sys.stderr)
    raise SystemExit(f"{what} step failed (exit {code}), log: {log}")


def make_data(task: str, data_dir: Path, tiny: bool, *, log: Path | None = None, what: str = "demo") -> Path:
    """``data_dir/<task>``: the task's demo dataset (``scripts/make_demo_data.py``; ``tiny``: its smoke-test
    size), generated once and reused. A folder of the other size is replaced."""
    out = data_dir / task
    marker = out / ".complete"
    kind = "generated --tiny\n" if tiny else "generated\n"
    if marker.exists() and marker.read_text() == kind:
        print(f"[{what}] reusing generated {task} data in {out}", flush=True)
        return out
    if marker.exists():  # the other size: not mixed with this one
        shutil.rmtree(out)
    run([sys.executable, "scripts/make_demo_data.py", task, "--out", str(out), *(["--tiny"] if tiny else [])],
        log=log, what=what)
    marker.write_text(kind)
    return out


def fit_command(configs: Iterable[str], data: Path, run_dir: Path, *options: str,
                seed: int | None = None) -> list[str]:
    """``python -m mbv3_dense fit`` with ``configs`` on ``data`` (and ``--seed_everything seed``), its
    checkpoints in ``run_dir`` and its logs in ``run_dir/logs`` (CSV: :func:`read_metrics`), then ``options``."""
    cmd = [sys.executable, "-m", "mbv3_dense", "fit"]
    for config in configs:
        cmd += ["-c", config]
    if seed is not None:
        cmd += ["--seed_everything", str(seed)]
    return [*cmd, "--data.root", str(data), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
            "--trainer.logger.name", "logs", *options]


def checkpoint(run_dir: Path) -> Path:
    """The newest ``last.ckpt`` under ``run_dir``."""
    found = sorted(run_dir.glob("**/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no last.ckpt under {run_dir}")
    return found[-1]


def read_metrics(run_dir: Path) -> list[dict[str, str]]:
    """The rows of the newest ``metrics.csv`` under ``run_dir`` (none: an empty list)."""
    files = sorted(run_dir.glob("**/metrics.csv"), key=lambda p: p.stat().st_mtime)
    if not files:
        return []
    with open(files[-1], newline="") as f:
        return list(csv.DictReader(f))


def series(rows: list[dict[str, str]], key: str) -> list[tuple[int, float]]:
    """``(step, value)`` of every row that logged ``key``."""
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]


def last(rows: list[dict[str, str]], key: str) -> float | None:
    """The last value logged for ``key`` (None: never logged)."""
    points = series(rows, key)
    return points[-1][1] if points else None
