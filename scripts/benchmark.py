"""Side-by-side CPU latency: torchvision eager vs ours eager vs ours on the fast paths, in one process.

    python scripts/benchmark.py [--tasks classify,detect,segment] [--threads N] [--json OUT]

Every contender of a task gets the same weights (torchvision's random initialisation, copied into
ours with the converters of each package) and the same input, and all are timed in turns
(A B C A B C ...) after a warm-up, so the ratios are measured under the same machine load. ONNX
Runtime runs with spinning threads off (they would slow down whatever runs next). Rows:

- classify: 224x224 input, already normalised (the network only).
- detect: one 480x640 float image in [0, 1], end to end: resize to 320x320, normalise, network,
  decode, score threshold, top-k, batched NMS, boxes scaled back (torchvision's ``model([img])``,
  our ``model.predict([img])``; the ONNX Runtime row runs our preprocess, the exported network,
  and our vectorised postprocess).
- segment: 1024x2048 input, logits at full resolution; ours in the torchvision variant (same
  weights) and the paper variant (reduced tail, 49x49 pooling; its own random weights).

ExecuTorch rows (``ours executorch``, ``ours executorch int8``; off with ``--no-executorch``): the
network exported to a ``.pte`` lowered to XNNPACK, batch 1, run by ExecuTorch's runtime with
``--threads`` XNNPACK threads; int8 is PT2E with the XNNPACK quantizer (per-channel weights),
calibrated on ``--calibration`` random inputs (2 at most for segment). For detect they run our
preprocess, the ``.pte`` and our postprocess, end to end like the other rows. Export time is printed
(``#`` lines) but not timed.

``max_diff`` compares each row's output with the torchvision baseline's where they compute the
same function: for classify logits and segment logits (torchvision variant), the largest absolute
difference divided by the baseline's largest magnitude; for detect, the largest box-corner difference
in pixels when both find the same boxes with the same labels. Other rows leave it empty (``null``).

Output: a table (median and p90 ms, ratio of medians to the torchvision row) and one JSON object
per row on stdout (prefixed ``JSON``), also written to ``--json OUT`` one per line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torchvision
from torch import Tensor

from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.deploy import (
    ChannelsLast,
    ExecuTorchModel,
    OnnxModel,
    export_executorch,
    export_onnx,
    fold_batchnorm,
    interleaved_latency,
    quantize_int8,
    to_channels_last,
)
from mbv3_dense.model_record import TASKS, task_list
from mbv3_dense.weights import from_torchvision_classifier, load_state_dict_strict

BASELINE = "torchvision eager"


@dataclass
class Row:
    """One contender: ``call()`` runs one inference; ``output()`` is what is compared with the baseline."""

    task: str
    name: str
    model: str
    input: str
    call: Callable[[], object]
    params: int
    madds: int
    compare: Callable[[object, object], float | None] | None = None
    result: dict = field(default_factory=dict)


def max_abs(a: object, b: object) -> float | None:
    """Largest absolute difference relative to the reference's largest magnitude."""
    a, b = torch.as_tensor(a).float(), torch.as_tensor(b).float()
    if a.shape != b.shape:
        return None
    return (a - b).abs().max().item() / max(a.abs().max().item(), 1e-30)


def torch_call(model: torch.nn.Module, x: Tensor) -> Callable[[], object]:
    return lambda: model(x)


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
              params: int, madds: int, compare) -> list[Row]:
    """ONNX Runtime fp32 (and int8) rows for ``model`` exported on ``example``; a failure skips the rows, loudly."""
    try:
        # the exporter prints the whole TorchScript graph on failure: keep it out of the table
        with quiet_output():
            path = export_onnx(model, example, work / f"{task}_{label}.onnx")
    except Exception as err:  # noqa: BLE001 - reported, and the other rows still run
        print(f"# SKIPPED {task} {name} onnxruntime rows: export failed: {type(err).__name__}: "
              f"{str(err).splitlines()[0][:300]}", flush=True)
        return []
    fp32 = OnnxModel(path, threads=threads)
    rows = [Row(task, "ours onnxruntime", name, "", wrap(fp32), params, madds, compare)]
    if int8:
        start = time.perf_counter()
        q_path = quantize_int8(path, work / f"{task}_{label}.int8.onnx", calibration)
        print(f"# {task} {name}: int8 quantization with {len(calibration)} calibration inputs took "
              f"{time.perf_counter() - start:.1f} s", flush=True)
        q = OnnxModel(q_path, threads=threads)
        rows.append(Row(task, "ours onnxruntime int8", name, "", wrap(q), params, madds, compare))
    return rows


def executorch_rows(task: str, model: torch.nn.Module, example: Tensor, *, label: str, name: str, work: Path,
                    threads: int, int8: bool, calibration: list[Tensor], wrap: Callable[[Callable], Callable],
                    params: int, madds: int, compare, reuse: bool = False) -> list[Row]:
    """ExecuTorch XNNPACK fp32 (and int8) rows; a failure skips the rows, loudly.

    ``reuse``: run a ``.pte`` already in ``work`` instead of exporting again (each task's weights
    depend only on ``--seed``: the ``max diff`` column shows a mismatch where it applies).
    """
    rows = []
    variants = [("ours executorch", None)] + ([("ours executorch int8", calibration)] if int8 else [])
    for row_name, calib in variants:
        suffix = ".int8.pte" if calib is not None else ".pte"
        path = work / f"{task}_{label}{suffix}"
        if reuse and path.is_file():
            print(f"# {task} {name} {row_name}: reusing {path}", flush=True)
            rows.append(Row(task, row_name, name, "", wrap(ExecuTorchModel(path, task=task, threads=threads)),
                            params, madds, compare))
            continue
        try:
            with quiet_output():
                result = export_executorch(model, example, work / f"{task}_{label}{suffix}", task=task,
                                           int8_calibration=calib)
        except Exception as err:  # noqa: BLE001 - reported, and the other rows still run
            print(f"# SKIPPED {task} {name} {row_name}: export failed: {type(err).__name__}: "
                  f"{str(err).splitlines()[0][:300]}", flush=True)
            continue
        print(f"# {task} {name} {row_name}: export took {result.seconds:.1f} s; {result.delegation_summary()}",
              flush=True)
        runtime = ExecuTorchModel(result.path, task=task, threads=threads)
        rows.append(Row(task, row_name, name, "", wrap(runtime), params, madds, compare))
    return rows


def classify_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    import mbv3_dense

    size = args.size or (64 if args.quick else 224)
    x = torch.rand(1, 3, size, size)
    tv = getattr(torchvision.models, f"mobilenet_v3_{args.arch}")().eval()
    ours = getattr(mbv3_dense, f"mobilenet_v3_{args.arch}")().eval()
    load_state_dict_strict(ours, from_torchvision_classifier(tv.state_dict()), "torchvision classifier")
    folded = fold_batchnorm(ours)
    name = f"mobilenet_v3_{args.arch}"
    params, madds = count_params(ours), count_madds(ours, x)
    rows = [
        Row("classify", BASELINE, name, "", torch_call(tv, x), count_params(tv), count_madds(tv, x), max_abs),
        Row("classify", "ours eager", name, "", torch_call(ours, x), params, madds, max_abs),
        Row("classify", "ours folded", name, "", torch_call(folded, x), params, madds, max_abs),
    ]
    if args.channels_last:
        cl = ChannelsLast(to_channels_last(folded)).eval()
        rows.append(Row("classify", "ours folded channels_last", name, "", torch_call(cl, x), params, madds, max_abs))
    calibration = [torch.rand(1, 3, size, size) for _ in range(args.calibration)]
    rows += onnx_rows("classify", ours, x, label=name, name=name, work=work, threads=args.threads,
                      int8=args.int8, calibration=calibration, wrap=lambda m: (lambda: m(x)), params=params,
                      madds=madds, compare=max_abs)
    if args.executorch:
        rows += executorch_rows("classify", ours, x, label=name, name=name, work=work, threads=args.threads,
                                int8=args.int8, calibration=calibration, wrap=lambda m: (lambda: m(x)),
                                params=params, madds=madds, compare=max_abs, reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{size}x{size}"
    return rows


def detect_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    import detection
    from detection.weights import from_torchvision_ssdlite

    h, w = (120, 160) if args.quick else (480, 640)
    image = torch.rand(3, h, w)
    builder = torchvision.models.detection.ssdlite320_mobilenet_v3_large
    if args.arch != "large":
        raise SystemExit("detect: torchvision has only ssdlite320_mobilenet_v3_large; use --arch large")
    tv = builder(weights=None, weights_backbone=None).eval()
    ours = detection.ssdlite_mobilenet_v3_large().eval()
    c4 = ours.backbone.feature_info["c4_expand"].index
    load_state_dict_strict(ours, from_torchvision_ssdlite(tv.state_dict(), c4), "torchvision ssdlite")
    folded = fold_batchnorm(ours)
    name = "ssdlite320_mobilenet_v3_large"
    net_in = ours.preprocess([image])
    size = [(h, w)]
    params, madds = count_params(ours), count_madds(ours, net_in)

    def compare(a: list[dict], b: list[dict]) -> float | None:
        if a[0]["boxes"].shape != b[0]["boxes"].shape or not torch.equal(a[0]["labels"], b[0]["labels"]):
            return None
        return (a[0]["boxes"] - b[0]["boxes"]).abs().max().item() if len(a[0]["boxes"]) else 0.0

    def deployed(raw_fn: Callable[[Tensor], dict]) -> Callable[[], list[dict]]:
        return lambda: ours.postprocess(raw_fn(ours.preprocess([image])), size)

    rows = [
        Row("detect", BASELINE, name, "", lambda: tv([image]), count_params(tv),
            count_madds(lambda t: tv([t[0]]), image[None]), compare),
        Row("detect", "ours eager", name, "", lambda: ours.predict([image]), params, madds, compare),
        Row("detect", "ours folded", name, "", deployed(folded), params, madds, compare),
    ]
    rows += onnx_rows("detect", ours, net_in, label=name, name=name, work=work, threads=args.threads, int8=False,
                      calibration=[], wrap=deployed, params=params, madds=madds, compare=compare)
    if args.executorch:
        calibration = [ours.preprocess([torch.rand(3, h, w)]) for _ in range(args.calibration)]
        rows += executorch_rows("detect", ours, net_in, label=name, name=name, work=work, threads=args.threads,
                                int8=args.int8, calibration=calibration, wrap=deployed, params=params, madds=madds,
                                compare=compare, reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{h}x{w} image"
    return rows


def segment_rows(args: argparse.Namespace, work: Path) -> list[Row]:
    import segmentation
    from segmentation.weights import from_torchvision_lraspp

    h, w = (128, 256) if args.quick else (1024, 2048)
    x = torch.rand(1, 3, h, w)
    tv = getattr(torchvision.models.segmentation, f"lraspp_mobilenet_v3_{args.arch}", None)
    if tv is None:
        raise SystemExit("segment: torchvision has only lraspp_mobilenet_v3_large; use --arch large")
    tv = tv(weights=None, weights_backbone=None, num_classes=19).eval()
    build = getattr(segmentation, f"lraspp_mobilenet_v3_{args.arch}")
    ours_tv = build(variant="torchvision").eval()
    load_state_dict_strict(ours_tv, from_torchvision_lraspp(tv.state_dict()), "torchvision lraspp")
    paper = build(variant="paper").eval()
    folded_paper = fold_batchnorm(paper)
    tv_name, tv_variant, paper_name = (f"lraspp_mobilenet_v3_{args.arch}", "ours torchvision variant",
                                       "ours paper variant (reduced tail)")
    tv_params, tv_madds = count_params(ours_tv), count_madds(ours_tv, x)
    p_params, p_madds = count_params(paper), count_madds(paper, x)

    rows = [
        Row("segment", BASELINE, tv_name, "", lambda: tv(x)["out"], count_params(tv), count_madds(tv, x), max_abs),
        Row("segment", "ours eager", tv_variant, "", torch_call(ours_tv, x), tv_params, tv_madds, max_abs),
        Row("segment", "ours eager", paper_name, "", torch_call(paper, x), p_params, p_madds, None),
        Row("segment", "ours folded", paper_name, "", torch_call(folded_paper, x), p_params, p_madds, None),
    ]
    if args.channels_last:
        cl = ChannelsLast(to_channels_last(folded_paper)).eval()
        rows.append(Row("segment", "ours folded channels_last", paper_name, "", torch_call(cl, x), p_params,
                        p_madds, None))
    rows += onnx_rows("segment", ours_tv, x, label="torchvision_variant", name=tv_variant, work=work,
                      threads=args.threads, int8=False, calibration=[], wrap=lambda m: (lambda: m(x)),
                      params=tv_params, madds=tv_madds, compare=max_abs)
    calibration = [torch.rand(1, 3, h, w) for _ in range(max(1, min(args.calibration, 2)))]
    rows += onnx_rows("segment", paper, x, label="paper", name=paper_name, work=work, threads=args.threads,
                      int8=args.int8, calibration=calibration, wrap=lambda m: (lambda: m(x)), params=p_params,
                      madds=p_madds, compare=None)
    if args.executorch:
        rows += executorch_rows("segment", paper, x, label="paper", name=paper_name, work=work,
                                threads=args.threads, int8=args.int8, calibration=calibration,
                                wrap=lambda m: (lambda: m(x)), params=p_params, madds=p_madds, compare=None,
                                reuse=args.reuse_exports)
    for r in rows:
        r.input = f"{h}x{w}"
    return rows


BUILDERS = {"classify": classify_rows, "detect": detect_rows, "segment": segment_rows}


def run_task(task: str, args: argparse.Namespace, work: Path) -> list[Row]:
    # Seeded per task: a task's random weights do not depend on the task list or on what the
    # exports of an earlier task drew (torch.export consumes the global generator).
    torch.manual_seed(args.seed)
    with torch.inference_mode():
        rows = BUILDERS[task](args, work)
    runs = args.runs if task != "segment" else args.segment_runs
    warmup = args.warmup if task != "segment" else min(args.warmup, 1)
    keys = [f"{i}:{r.name}" for i, r in enumerate(rows)]
    latency = interleaved_latency(dict(zip(keys, (r.call for r in rows), strict=True)), warmup=warmup, runs=runs)
    with torch.inference_mode():
        reference = rows[0].call()
        for key, row in zip(keys, rows, strict=True):
            lat = latency[key]
            diff = row.compare(reference, row.call()) if row.compare is not None and row is not rows[0] else None
            row.result = {"task": task, "row": row.name, "model": row.model, "input": row.input,
                          "median_ms": round(lat.median_ms, 3), "p90_ms": round(lat.p90_ms, 3), "runs": lat.runs,
                          "threads": lat.threads, "device": device_name(),
                          "params_M": round(row.params / 1e6, 3), "madds_G": round(row.madds / 1e9, 3),
                          "max_diff": diff}
    base = rows[0].result["median_ms"]
    for row in rows:
        row.result["ratio"] = round(row.result["median_ms"] / base, 3)
    return rows


def device_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu: " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu: " + (platform.processor() or platform.machine())


def print_table(rows: list[Row]) -> None:
    header = f"{'task':9} {'row':28} {'model':36} {'input':14} {'median ms':>10} {'p90 ms':>9} {'ratio':>6} " \
             f"{'params M':>9} {'MAdds G':>8} {'max diff':>10}"
    print(header)
    print("-" * len(header))
    for row in rows:
        r = row.result
        diff = "" if r["max_diff"] is None else f"{r['max_diff']:.1e}"
        print(f"{r['task']:9} {r['row']:28} {r['model']:36} {r['input']:14} {r['median_ms']:10.2f} "
              f"{r['p90_ms']:9.2f} {r['ratio']:6.2f} {r['params_M']:9.3f} {r['madds_G']:8.3f} {diff:>10}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=task_list, default=",".join(TASKS),
                        help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--arch", choices=("large", "small"), default="large")
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--runs", type=int, default=20, help="timed runs per row (classify, detect)")
    parser.add_argument("--segment-runs", type=int, default=5, help="timed runs per row at 1024x2048")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--size", type=int, default=None, help="classify input side (default 224)")
    parser.add_argument("--no-int8", dest="int8", action="store_false", help="skip the int8 rows")
    parser.add_argument("--channels-last", action="store_true", help="add folded + channels-last rows")
    parser.add_argument("--no-executorch", dest="executorch", action="store_false",
                        help="skip the ExecuTorch (XNNPACK) rows")
    parser.add_argument("--calibration", type=int, default=8, help="int8 calibration inputs (2 at most for segment)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny inputs and 3 runs (a smoke test; the figures mean nothing)")
    parser.add_argument("--json", type=Path, default=None, help="also write one JSON object per row here")
    parser.add_argument("--keep-onnx", type=Path, default=None,
                        help="keep the exported .onnx and .pte files in this folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every task's random weights and inputs")
    parser.add_argument("--reuse-exports", action="store_true",
                        help="with --keep-onnx: run .pte files already there instead of exporting again")
    args = parser.parse_args(argv)
    if args.reuse_exports and args.keep_onnx is None:
        parser.error("--reuse-exports needs --keep-onnx DIR")
    if args.quick:
        args.runs, args.segment_runs, args.warmup, args.calibration = 3, 2, 1, 2
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    try:
        import onnxruntime

        ort_version = onnxruntime.__version__
    except ImportError:
        ort_version = "not installed"
    try:
        from importlib.metadata import version

        et_version = version("executorch")
    except Exception:  # noqa: BLE001 - any failure means: not usable
        et_version = "not installed"
        args.executorch = False
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  {device_name()}  "
          f"threads {args.threads}  torch {torch.__version__}  torchvision {torchvision.__version__}  "
          f"onnxruntime {ort_version}  executorch {et_version}  batch 1")
    print(f"# command: python {' '.join(sys.argv)}")
    all_rows: list[Row] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep_onnx or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for task in args.tasks:
            all_rows += run_task(task, args, work)
    print_table(all_rows)
    lines = [json.dumps(r.result) for r in all_rows]
    for line in lines:
        print("JSON " + line)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
