"""Side-by-side CPU latency: torchvision eager vs ours, eager and on the fast paths, each contender in its own process.

    python scripts/benchmark.py [--tasks classify,detect,segment] [--threads N] [--rounds 3] [--json OUT]

Every contender of a task gets the same weights (torchvision's random initialisation, copied into
ours with the converters of each package) and the same input. The parent process makes the weights
and inputs (saved in the work folder), exports the ONNX and ``.pte`` files once, then times the
contenders in rounds, A B C A B C ...: each timing is a fresh process (``--worker``) that loads only
its own contender, warms it up and times ``--runs`` calls. Timed in one process, the runtimes
disturb each other: after a call, one runtime's threads keep the cores busy and slow down the next
one's call, which moved the ratios 2-3x in either direction on a 2-core machine. ``--in-process``
times them the old way, interleaved in one process (ONNX Runtime with spinning threads off), to
compare. Rows:

- classify: 224x224 input, already normalised (the network only).
- detect: one 480x640 float image in [0, 1], end to end: resize to 320x320, normalise, network,
  decode, score threshold, top-k, batched NMS, boxes scaled back (torchvision's ``model([img])``,
  our ``model.predict([img])``; the ONNX Runtime and ExecuTorch rows run our preprocess, the
  exported network, and our vectorised postprocess).
- segment: 1024x2048 input, logits at full resolution; ours in the torchvision variant (same
  weights) and the paper variant (reduced tail, 49x49 pooling; its own random weights).

ExecuTorch rows (``ours executorch``, ``ours executorch int8``; off with ``--no-executorch``): the
network exported to a ``.pte`` lowered to XNNPACK, batch 1, run by ExecuTorch's runtime with
``--threads`` XNNPACK threads; int8 is PT2E with the XNNPACK quantizer (per-channel weights),
calibrated on ``--calibration`` random inputs (2 at most for segment). Export times are printed
(``#`` lines) but not timed.

``max_diff`` compares each row's output with the torchvision baseline's where they compute the
same function: for classify logits and segment logits (torchvision variant), the largest absolute
difference divided by the baseline's largest magnitude; for detect, the largest box-corner difference
in pixels when both find the same boxes with the same labels. Other rows leave it empty (``null``).

Output: a table (median and p90 ms over all timed calls, the lowest and highest per-round median,
ratio of medians to the torchvision row and its range over the rounds) and one JSON object per row
on stdout (prefixed ``JSON``), also written to ``--json OUT`` one per line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from mbv3_dense.checkpoints.model_record import TASKS, task_list
from mbv3_dense.checkpoints.weights import from_torchvision_classifier, load_state_dict_strict
from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.deploy import (
    ChannelsLast,
    ExecuTorchModel,
    OnnxModel,
    export_executorch,
    export_onnx,
    fold_batchnorm,
    quantize_int8,
    to_channels_last,
)
from mbv3_dense.training.progress import progress

BASELINE = "torchvision eager"
WORKER_TAG = "WORKER "


@dataclass
class Row:
    """One contender.

    ``make()`` builds it in the process that times it and returns the zero-argument call that runs one
    inference; ``export()`` (exported rows) writes its file once, in the parent; ``size()`` gives
    ``(params, madds)``; ``compare(reference_output, output)`` the ``max_diff``.
    """

    task: str
    name: str
    model: str
    make: Callable[[], Callable[[], object]]
    size: Callable[[], tuple[int, int]]
    compare: Callable[[object, object], float | None] | None = None
    export: Callable[[], str] | None = None
    input: str = ""


def max_abs(a: object, b: object) -> float | None:
    """Largest absolute difference relative to the reference's largest magnitude."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        return None
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)


def torch_call(model: torch.nn.Module, x: Tensor) -> Callable[[], object]:
    return lambda: model(x)


def sizes_of(model: torch.nn.Module, example: Tensor, fn: Callable | None = None) -> Callable[[], tuple[int, int]]:
    """``(params of model, MAdds of fn(example))`` (``fn`` defaults to ``model``), computed when asked."""
    return lambda: (count_params(model), count_madds(fn or model, example))


def eager_rows(task: str, name: str, model: torch.nn.Module, x: Tensor, size: Callable[[], tuple[int, int]],
               compare: Callable[[object, object], float | None] | None, channels_last: bool) -> list[Row]:
    """``model`` in PyTorch eager mode as built, with its batch norms folded, and (``channels_last``) folded in
    channels-last memory format."""
    rows = [Row(task, "ours eager", name, lambda: torch_call(model, x), size, compare),
            Row(task, "ours folded", name, lambda: torch_call(fold_batchnorm(model), x), size, compare)]
    if channels_last:
        rows.append(Row(task, "ours folded channels_last", name,
                        lambda: torch_call(ChannelsLast(to_channels_last(fold_batchnorm(model))).eval(), x), size,
                        compare))
    return rows


@contextlib.contextmanager
def quiet_output() -> Iterator[None]:
    """Silence stdout and stderr at the file-descriptor level (the exporter prints from C++)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def onnx_rows(task: str, model: torch.nn.Module, example: Tensor, *, label: str, name: str, work: Path,
              threads: int, int8: bool, calibration: list[Tensor], wrap: Callable[[Callable], Callable],
              size: Callable[[], tuple[int, int]], compare) -> list[Row]:
    """ONNX Runtime fp32 (and int8) rows for ``model`` exported on ``example``."""
    path, q_path = work / f"{task}_{label}.onnx", work / f"{task}_{label}.int8.onnx"

    def export() -> str:
        # the exporter prints the whole TorchScript graph on failure: keep it out of the table
        with quiet_output():
            export_onnx(model, example, path)
        return f"wrote {path.name}"

    def export_int8() -> str:
        start = time.perf_counter()
        quantize_int8(path, q_path, calibration)
        return f"int8 quantization with {len(calibration)} calibration inputs took {time.perf_counter() - start:.1f} s"

    rows = [Row(task, "ours onnxruntime", name, lambda: wrap(OnnxModel(path, threads=threads)), size, compare,
                export)]
    if int8:
        rows.append(Row(task, "ours onnxruntime int8", name, lambda: wrap(OnnxModel(q_path, threads=threads)), size,
                        compare, export_int8))
    return rows


def executorch_rows(task: str, model: torch.nn.Module, example: Tensor, *, label: str, name: str, work: Path,
                    threads: int, int8: bool, calibration: list[Tensor], wrap: Callable[[Callable], Callable],
                    size: Callable[[], tuple[int, int]], compare, reuse: bool = False) -> list[Row]:
    """ExecuTorch XNNPACK fp32 (and int8) rows.

    ``reuse``: run a ``.pte`` already in ``work`` instead of exporting again (each task's weights
    depend only on ``--seed``: the ``max diff`` column shows a mismatch where it applies).
    """
    rows = []
    variants = [("ours executorch", None)] + ([("ours executorch int8", calibration)] if int8 else [])
    for row_name, calib in variants:
        path = work / f"{task}_{label}{'.int8.pte' if calib is not None else '.pte'}"

        def export(path: Path = path, calib: list[Tensor] | None = calib) -> str:
            if reuse and path.is_file():
                return f"reusing {path}"
            with quiet_output():
                result = export_executorch(model, example, path, task=task, int8_calibration=calib)
            return f"export took {result.seconds:.1f} s; {result.delegation_summary()}"

        rows.append(Row(task, row_name, name, lambda path=path: wrap(ExecuTorchModel(path, task=task, threads=threads)),
                        size, compare, export))
    return rows


# ---------------------------------------------------------------------------------------------- tasks
# Each task: ``<task>_state(args)`` draws the weights and inputs (seeded, once, in the parent; the
# workers load them), ``<task>_rows(args, work, state)`` builds the rows from them (models are cheap
# to build; files are only read by ``make``).
def classify_state(args: argparse.Namespace) -> dict:
    size = args.size or (64 if args.quick else 224)
    tv = getattr(torchvision.models, f"mobilenet_v3_{args.arch}")()
    return {"tv": tv.state_dict(), "x": torch.rand(1, 3, size, size),
            "calibration": [torch.rand(1, 3, size, size) for _ in range(args.calibration)]}


def classify_rows(args: argparse.Namespace, work: Path, state: dict) -> list[Row]:
    import mbv3_dense

    x = state["x"]
    tv = getattr(torchvision.models, f"mobilenet_v3_{args.arch}")().eval()
    tv.load_state_dict(state["tv"])
    ours = getattr(mbv3_dense, f"mobilenet_v3_{args.arch}")().eval()
    load_state_dict_strict(ours, from_torchvision_classifier(state["tv"]), "torchvision classifier")
    name = f"mobilenet_v3_{args.arch}"
    size = sizes_of(ours, x)
    rows = [Row("classify", BASELINE, name, lambda: torch_call(tv, x), sizes_of(tv, x), max_abs),
            *eager_rows("classify", name, ours, x, size, max_abs, args.channels_last)]
    common = {"label": name, "name": name, "work": work, "threads": args.threads, "int8": args.int8,
              "calibration": state["calibration"], "wrap": lambda m: (lambda: m(x)), "size": size,
              "compare": max_abs}
    rows += onnx_rows("classify", ours, x, **common)
    if args.executorch:
        rows += executorch_rows("classify", ours, x, **common, reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{x.shape[-2]}x{x.shape[-1]}"
    return rows


def detect_state(args: argparse.Namespace) -> dict:
    if args.arch != "large":
        raise SystemExit("detect: torchvision has only ssdlite320_mobilenet_v3_large; use --arch large")
    h, w = (120, 160) if args.quick else (480, 640)
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    return {"tv": tv.state_dict(), "image": torch.rand(3, h, w),
            "calibration": [torch.rand(3, h, w) for _ in range(args.calibration)]}


def detect_rows(args: argparse.Namespace, work: Path, state: dict) -> list[Row]:
    import detection
    from detection.weights import from_torchvision_ssdlite

    image = state["image"]
    h, w = image.shape[-2:]
    tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None).eval()
    tv.load_state_dict(state["tv"])
    ours = detection.ssdlite_mobilenet_v3_large().eval()
    c4 = ours.backbone.feature_info["c4_expand"].index
    load_state_dict_strict(ours, from_torchvision_ssdlite(state["tv"], c4), "torchvision ssdlite")
    name = "ssdlite320_mobilenet_v3_large"
    net_in = ours.preprocess([image])
    sizes = [(h, w)]
    size = sizes_of(ours, net_in)

    def compare(a: list[dict], b: list[dict]) -> float | None:
        if a[0]["boxes"].shape != b[0]["boxes"].shape or not torch.equal(a[0]["labels"], b[0]["labels"]):
            return None
        return (a[0]["boxes"] - b[0]["boxes"]).abs().max().item() if len(a[0]["boxes"]) else 0.0

    def deployed(raw_fn: Callable[[Tensor], dict]) -> Callable[[], list[dict]]:
        return lambda: ours.postprocess(raw_fn(ours.preprocess([image])), sizes)

    rows = [
        Row("detect", BASELINE, name, lambda: (lambda: tv([image])), sizes_of(tv, image[None], lambda t: tv([t[0]])),
            compare),
        Row("detect", "ours eager", name, lambda: (lambda: ours.predict([image])), size, compare),
        Row("detect", "ours folded", name, lambda: deployed(fold_batchnorm(ours)), size, compare),
    ]
    rows += onnx_rows("detect", ours, net_in, label=name, name=name, work=work, threads=args.threads, int8=False,
                      calibration=[], wrap=deployed, size=size, compare=compare)
    if args.executorch:
        calibration = [ours.preprocess([img]) for img in state["calibration"]]
        rows += executorch_rows("detect", ours, net_in, label=name, name=name, work=work, threads=args.threads,
                                int8=args.int8, calibration=calibration, wrap=deployed, size=size, compare=compare,
                                reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{h}x{w} image"
    return rows


def segment_state(args: argparse.Namespace) -> dict:
    import segmentation

    builder = getattr(torchvision.models.segmentation, f"lraspp_mobilenet_v3_{args.arch}", None)
    if builder is None:
        raise SystemExit("segment: torchvision has only lraspp_mobilenet_v3_large; use --arch large")
    h, w = (128, 256) if args.quick else (1024, 2048)
    tv = builder(weights=None, weights_backbone=None, num_classes=19)
    paper = getattr(segmentation, f"lraspp_mobilenet_v3_{args.arch}")(variant="paper")
    return {"tv": tv.state_dict(), "paper": paper.state_dict(), "x": torch.rand(1, 3, h, w),
            "calibration": [torch.rand(1, 3, h, w) for _ in range(max(1, min(args.calibration, 2)))]}


def segment_rows(args: argparse.Namespace, work: Path, state: dict) -> list[Row]:
    import segmentation
    from segmentation.weights import from_torchvision_lraspp

    x = state["x"]
    tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                   num_classes=19).eval()
    tv.load_state_dict(state["tv"])
    build = getattr(segmentation, f"lraspp_mobilenet_v3_{args.arch}")
    ours_tv = build(variant="torchvision").eval()
    load_state_dict_strict(ours_tv, from_torchvision_lraspp(state["tv"]), "torchvision lraspp")
    paper = build(variant="paper").eval()
    paper.load_state_dict(state["paper"])
    tv_name, tv_variant, paper_name = (f"lraspp_mobilenet_v3_{args.arch}", "ours torchvision variant",
                                       "ours paper variant (reduced tail)")
    tv_size, p_size = sizes_of(ours_tv, x), sizes_of(paper, x)
    rows = [
        Row("segment", BASELINE, tv_name, lambda: (lambda: tv(x)["out"]), sizes_of(tv, x), max_abs),
        Row("segment", "ours eager", tv_variant, lambda: torch_call(ours_tv, x), tv_size, max_abs),
        *eager_rows("segment", paper_name, paper, x, p_size, None, args.channels_last),
    ]
    wrap = lambda m: (lambda: m(x))  # noqa: E731
    rows += onnx_rows("segment", ours_tv, x, label="torchvision_variant", name=tv_variant, work=work,
                      threads=args.threads, int8=False, calibration=[], wrap=wrap, size=tv_size, compare=max_abs)
    rows += onnx_rows("segment", paper, x, label="paper", name=paper_name, work=work, threads=args.threads,
                      int8=args.int8, calibration=state["calibration"], wrap=wrap, size=p_size, compare=None)
    if args.executorch:
        rows += executorch_rows("segment", paper, x, label="paper", name=paper_name, work=work,
                                threads=args.threads, int8=args.int8, calibration=state["calibration"], wrap=wrap,
                                size=p_size, compare=None, reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{x.shape[-2]}x{x.shape[-1]}"
    return rows


STATES = {"classify": classify_state, "detect": detect_state, "segment": segment_state}
BUILDERS = {"classify": classify_rows, "detect": detect_rows, "segment": segment_rows}


# ---------------------------------------------------------------------------------------------- timing
def time_calls(call: Callable[[], object], *, warmup: int, runs: int) -> list[float]:
    """Wall time in milliseconds of ``runs`` calls after ``warmup`` untimed ones."""
    with torch.inference_mode():
        for _ in range(warmup):
            call()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1000.0)
    return times


def state_path(work: Path, task: str) -> Path:
    return work / f"{task}.state.pt"


def output_path(work: Path, task: str, index: int) -> Path:
    return work / f"{task}.{index}.output.pt"


def worker(args: argparse.Namespace) -> int:
    """One timing in this process: the contender ``--worker TASK:INDEX`` alone."""
    task, _, index = args.worker.partition(":")
    state = torch.load(state_path(args.work, task), weights_only=True)
    with torch.inference_mode():
        row = BUILDERS[task](args, args.work, state)[int(index)]
        call = row.make()
        times = time_calls(call, warmup=args.warmup_now, runs=args.runs_now)
        if args.save_output:
            torch.save(call(), output_path(args.work, task, int(index)))
    print(WORKER_TAG + json.dumps({"times": times}), flush=True)
    return 0


def worker_command(args: argparse.Namespace, task: str, index: int, *, runs: int, warmup: int,
                   save_output: bool) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{task}:{index}", "--work", str(args.work),
           "--threads", str(args.threads), "--arch", args.arch, "--seed", str(args.seed),
           "--runs-now", str(runs), "--warmup-now", str(warmup)]
    for flag, on in (("--quick", args.quick), ("--no-int8", not args.int8), ("--channels-last", args.channels_last),
                     ("--no-executorch", not args.executorch), ("--save-output", save_output)):
        if on:
            cmd.append(flag)
    if args.size is not None:
        cmd += ["--size", str(args.size)]
    return cmd


def run_worker(cmd: list[str]) -> list[float]:
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(WORKER_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"timing process failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(WORKER_TAG):])["times"]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_task(task: str, args: argparse.Namespace) -> list[dict]:
    # Seeded per task: a task's random weights do not depend on the task list.
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        state = STATES[task](args)
    torch.save(state, state_path(args.work, task))
    with torch.inference_mode():
        rows = BUILDERS[task](args, args.work, state)
    indices = []
    for i, row in enumerate(rows):
        if row.export is not None:
            try:
                with torch.inference_mode():
                    note = row.export()
            except Exception as err:
                print(f"# SKIPPED {task} {row.model} {row.name}: export failed: {type(err).__name__}: "
                      f"{str(err).splitlines()[0][:300] if str(err) else ''}", flush=True)
                continue
            print(f"# {task} {row.model} {row.name}: {note}", flush=True)
        indices.append(i)
    if rows[0].export is not None or 0 not in indices:
        raise SystemExit(f"{task}: the baseline row could not be built")
    runs = args.runs if task != "segment" else args.segment_runs
    warmup = args.warmup if task != "segment" else min(args.warmup, 1)
    times: dict[int, list[list[float]]] = {i: [] for i in indices}
    outputs: dict[int, object] = {}
    if args.in_process:
        with torch.inference_mode():
            calls = {i: rows[i].make() for i in indices}
            for _ in range(warmup):
                for i in indices:
                    calls[i]()
            for _ in range(args.rounds):
                per_round: dict[int, list[float]] = {i: [] for i in indices}
                for _ in range(runs):
                    for i in indices:  # A B C A B C ... call by call
                        per_round[i] += time_calls(calls[i], warmup=0, runs=1)
                for i in indices:
                    times[i].append(per_round[i])
            outputs = {i: calls[i]() for i in indices}
    else:
        steps = [(r, i) for r in range(args.rounds) for i in indices]
        for r, i in progress(steps, desc=f"{task}: {len(indices)} contenders x {args.rounds} rounds", unit="process"):
            cmd = worker_command(args, task, i, runs=runs, warmup=warmup, save_output=r == 0)
            times[i].append(run_worker(cmd))
        outputs = {i: torch.load(output_path(args.work, task, i), weights_only=True) for i in indices}
    base = indices[0]
    results = []
    for i in indices:
        row = rows[i]
        flat = [t for per_round in times[i] for t in per_round]
        medians = [statistics.median(t) for t in times[i]]
        round_ratios = [m / b for m, b in zip(medians, (statistics.median(t) for t in times[base]), strict=True)]
        diff = row.compare(outputs[base], outputs[i]) if row.compare is not None and i != base else None
        params, madds = row.size()
        results.append({
            "task": task, "row": row.name, "model": row.model, "input": row.input,
            "median_ms": round(statistics.median(flat), 3), "p90_ms": round(_percentile(flat, 0.9), 3),
            "round_medians_ms": [round(m, 3) for m in medians], "runs": runs, "rounds": args.rounds,
            "threads": args.threads, "device": device_name(),
            "timing": "one process, interleaved" if args.in_process else "own process per contender and round",
            "params_M": round(params / 1e6, 3), "madds_G": round(madds / 1e9, 3), "max_diff": diff,
            "ratio_min": round(min(round_ratios), 3), "ratio_max": round(max(round_ratios), 3)})
    for r in results:
        r["ratio"] = round(r["median_ms"] / results[0]["median_ms"], 3)
    return results


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def print_table(results: list[dict]) -> None:
    header = (f"{'task':9} {'row':26} {'model':34} {'input':13} {'median ms':>10} {'p90 ms':>8} "
              f"{'rounds min-max':>16} {'ratio':>6} {'ratio range':>12} {'MAdds G':>8} {'max diff':>9}")
    print(header)
    print("-" * len(header))
    for r in results:
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        spread = f"{min(r['round_medians_ms']):.2f}-{max(r['round_medians_ms']):.2f}"
        ratio_range = f"{r['ratio_min']:.2f}-{r['ratio_max']:.2f}"
        print(f"{r['task']:9} {r['row']:26} {r['model'][:34]:34} {r['input']:13} {r['median_ms']:10.2f} "
              f"{r['p90_ms']:8.2f} {spread:>16} {r['ratio']:6.2f} {ratio_range:>12} {r['madds_G']:8.3f} {diff:>9}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=task_list, default=",".join(TASKS),
                        help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--arch", choices=("large", "small"), default="large")
    parser.add_argument("--threads", type=int, default=None, help="torch, ONNX Runtime and XNNPACK threads "
                        "(default: torch's)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of timing, each contender once per round "
                        "(A B C A B C ...)")
    parser.add_argument("--runs", type=int, default=20, help="timed calls per contender and round (classify, detect)")
    parser.add_argument("--segment-runs", type=int, default=5, help="timed calls per contender and round at 1024x2048")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first, in each timing")
    parser.add_argument("--in-process", action="store_true",
                        help="time every contender in this one process, interleaved (the old way, to compare)")
    parser.add_argument("--size", type=int, default=None, help="classify input side (default 224)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 rows")
    parser.add_argument("--channels-last", action="store_true", help="add folded + channels-last rows")
    parser.add_argument("--no-executorch", dest="executorch", action="store_false",
                        help="skip the ExecuTorch (XNNPACK) rows")
    parser.add_argument("--calibration", type=int, default=8, help="int8 calibration inputs (2 at most for segment)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny inputs, 2 rounds of 3 runs (a smoke test; the figures mean nothing)")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON object per row here")
    parser.add_argument("--keep-onnx", type=Path, default=None,
                        help="keep the exported .onnx and .pte files (and the weights) in this folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every task's random weights and inputs")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="with --keep-onnx: run .pte files already there instead of exporting again")
    # The timing processes' own options (set by the parent).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--runs-now", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-now", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--save-output", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reuse_exports and args.keep_onnx is None:
        parser.error("--reuse-exports needs --keep-onnx DIR")
    for name in ("rounds", "runs", "segment_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        parser.error("--warmup must be >= 0 and --threads >= 1")
    if args.worker is not None and (args.work is None or args.runs_now is None or args.warmup_now is None):
        parser.error("--worker is the benchmark's own timing process")
    if args.quick:
        args.runs, args.segment_runs, args.warmup, args.calibration = 3, 2, 1, 2
        args.rounds = min(args.rounds, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    try:
        from importlib.metadata import version

        version("executorch")
    except Exception:
        args.executorch = False
    if args.worker is not None:
        return worker(args)
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    et_version = "not installed"
    if args.executorch:
        from importlib.metadata import version

        et_version = version("executorch")
    timing = ("one process, interleaved" if args.in_process
              else f"each contender in its own process, {args.rounds} rounds (A B C A B C ...)")
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  {device_name()}  "
          f"threads {args.threads}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
          f"onnxruntime {ort_version}  executorch {et_version}  batch 1  timing: {timing}")
    print(f"# command: python {' '.join(sys.argv)}")
    results: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        args.work = args.keep_onnx or Path(tmp)
        args.work.mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            results += run_task(task, args)
    print_table(results)
    lines = [json.dumps(r) for r in results]
    for line in lines:
        print("JSON " + line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        partial = args.json.with_name(args.json.name + ".partial")
        partial.write_text("\n".join(lines) + "\n")
        os.replace(partial, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
