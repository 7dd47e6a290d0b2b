"""Export a classifier, SSDLite or LR-ASPP model to ONNX or ExecuTorch, check it, and gate its int8 form.

    python scripts/export.py --weights run.ckpt --out model.onnx
        [--format onnx|executorch] [--size H W] [--int8 --calibration-images DIR [--calibration-count 8]]
    python scripts/export.py --weights run.ckpt --format executorch --out model.pte
        [--dynamic-size MIN:MAX] [--gate DIR [--max-drop POINTS] --calibration-images DIR]
    python scripts/export.py --task classify|detect|segment --weights W --arch large|small --out model.onnx
        [--variant paper|torchvision] [--num-classes N] [--width-mult M] ...

A ``.ckpt`` of ``lightning fit`` names its task and network (builder and arguments): ``--weights``
alone describes the model. Other files (torchvision's, mmpretrain's, plain state dicts, older
``.ckpt``) need ``--task`` and are built from ``--arch`` (default large), ``--variant``,
``--width-mult`` and ``--reduced-tail``, the class count read from the file unless ``--num-classes``
is given; without ``--weights`` the network of ``--task`` is exported with random weights
(:mod:`mbv3_dense.checkpoints.resolve`).

The graph is the network's ``forward`` (raw outputs: classifier logits, SSDLite ``box_regression``
and ``cls_logits``, LR-ASPP logits), spatial size fixed at ``--size`` (default 224x224 classify, the
model's ``image_size`` detect, 1024x2048 segment); SSDLite's resize, decode and NMS stay in PyTorch
(``model.preprocess`` / ``model.postprocess``), as in ``make_backend``.

The check (:mod:`mbv3_dense.deploy.parity`) runs PyTorch and the exported file on three fresh inputs
(smooth random images, through the model's own ``normalize``) and prints, per input, each output's
largest absolute error against ``--tolerance x max(1, max|reference|)`` (default 1e-3, from the errors
XNNPACK's fp32 kernels were measured to make, docs/benchmark.md) and whether the task's decisions are
the same: top-1 classes, pixels (both except near ties the error could flip), SSDLite's detections as
sets. Exit status 1 when a check fails.

``--format onnx`` (default): batch axis dynamic, run by ONNX Runtime. ``--int8`` also writes
``<out stem>.int8.onnx``, statically quantized with ONNX Runtime (classify and segment).

``--format executorch``: a ``.pte`` lowered to XNNPACK at batch 1, run by ExecuTorch's runtime; the
script prints the XNNPACK coverage (compute nodes delegated of all, and the operators left outside).
``--int8`` also writes ``<out stem>.int8.pte``, quantized with PT2E and the XNNPACK quantizer
(per-channel int8 weights, int8 activations), for every task. The file records its task and input
size; the evaluation scripts refuse a file built for another.

``--dynamic-size MIN:MAX`` (detect, segment): the ``.pte`` takes any height and width in MIN..MAX.
LR-ASPP takes the normalised image at its own size; SSDLite's program takes the image in [0, 1] at its
own size and runs its ``preprocess`` (normalise, resize to ``image_size``) inside. A range the network
cannot take (the paper LR-ASPP's 49x49 window would change inside it) is refused before anything is
written (:mod:`mbv3_dense.deploy.dynamic`). The check then runs at the range's smallest and largest
sizes and at one in between.

int8 is calibrated on ``--calibration-count`` images read from ``--calibration-images`` (searched
recursively for .jpg/.png), prepared as the model expects (classify and segment: resized to
``--size`` and normalised; detect: ``model.preprocess``; with a dynamic range each at its own size), and
the script prints how the int8 model agrees with the float one on those images (top-1 labels for
classify, pixels for segment, per-box top classes and the final detections for detect).

``--gate DIR`` (executorch; implies ``--int8``): the task's metric on held-out data, three ways (eager,
fp32 ``.pte``, int8 ``.pte``): top-1 on an image folder, COCO mAP@[.5:.95] on a COCO tree, mIoU on a
Cityscapes tree's ``val`` split. It writes ``<out stem>.report.json`` and ``.report.md`` beside the
``.pte``: the metric of each form, and per program its size, load time, latency median and p90 at 1
thread and at all threads, peak memory (each timed in a process of its own) and XNNPACK coverage. Exit
status 1 when int8 loses more than ``--max-drop`` points against eager (default 1 of top-1 or mIoU, 2
of mAP). A folder of another task's layout, an empty folder, a negative ``--max-drop`` stop the script
(exit 2) before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
from torch import Tensor, nn

from detection.gate import coco_gate, is_coco
from mbv3_dense.checkpoints.resolve import add_model_arguments, model_from_arguments
from mbv3_dense.classification.gate import image_folder_gate, is_image_folder
from mbv3_dense.deploy import ExecuTorchModel, OnnxModel, export_executorch, export_onnx, quantize_int8
from mbv3_dense.deploy.calibration import detection_agreement, int8_agreement, load_calibration, report_checks
from mbv3_dense.deploy.dynamic import DynamicSizeError, parse_size_range
from mbv3_dense.deploy.gate import (
    DEFAULT_MAX_DROP,
    GateData,
    GateDataError,
    check_gate_sizes,
    environment,
    gate_verdict,
    report_forms,
    run_gate,
    write_report,
)
from mbv3_dense.deploy.parity import FP32_TOLERANCE, check_inputs
from segmentation.gate import cityscapes_gate, is_cityscapes

# Default input sizes of the networks that take any size (SSDLite has its own, ``image_size``).
DEFAULT_SIZE = {"classify": (224, 224), "segment": (1024, 2048)}
INT8_ONNX_DETECT = "--int8 with --format onnx is offered for classify and segment only (use --format executorch)"


# ---------------------------------------------------------------------------------------------- gate data
# One reader per layout of held-out data, in its task's package: (name, task, is_layout(folder),
# read(folder, model, size) -> GateData). The mask-folder layout of segmentation (images/ + masks/) is one more entry.
LAYOUTS = (
    ("Cityscapes tree (root/leftImg8bit/val, root/gtFine/val)", "segment", is_cityscapes, cityscapes_gate),
    ("COCO tree (root/annotations/instances_val*.json, root/val*/)", "detect", is_coco, coco_gate),
    ("image folder (root/<class>/* or root/val/<class>/*)", "classify", is_image_folder, image_folder_gate),
)


def read_gate_data(task: str, root: Path, model: nn.Module, size: tuple[int, int]) -> GateData:
    """The held-out data of ``root`` for ``task``'s metric; :class:`GateDataError` naming the folder otherwise."""
    if not root.is_dir():
        raise GateDataError(f"--gate {root}: not a folder")
    if not any(p.is_file() for p in root.rglob("*")):
        raise GateDataError(f"--gate {root}: empty folder (no files)")
    expected = next(name for name, t, _, _ in LAYOUTS if t == task)
    for name, layout_task, is_layout, read in LAYOUTS:
        if is_layout(root):
            if layout_task != task:
                raise GateDataError(f"--gate {root}: a {name}, held-out data of the {layout_task} task; a {task} "
                                    f"model is gated on this layout: {expected}")
            try:
                data = read(root, model, size)
            except (FileNotFoundError, ValueError, OSError) as err:  # the task readers' errors name the file
                raise GateDataError(f"--gate {root}: {err}") from err
            if data.items == 0:
                raise GateDataError(f"--gate {root}: no images in the {name}")
            return data
    raise GateDataError(f"--gate {root}: not a layout the gate reads; a {task} model is gated on this layout: "
                        f"{expected}")


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=("classify", "detect", "segment"), default=None,
                        help="default: the one the checkpoint's model record names")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (our .ckpt names its network; any layout the task's loader reads); "
                             "without it: random weights")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx or .pte file to write")
    parser.add_argument("--format", choices=("onnx", "executorch"), default="onnx",
                        help="onnx (ONNX Runtime) or executorch (.pte lowered to XNNPACK)")
    add_model_arguments(parser, None)
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default 224x224 classify, the model's image_size detect, "
                             "1024x2048 segment, or the gate images' size when they share one); with "
                             "--dynamic-size, the size it is traced at")
    parser.add_argument("--dynamic-size", type=str, default=None, metavar="MIN:MAX",
                        help="executorch, detect and segment: the .pte takes any height and width in MIN..MAX "
                             "(detect: the image at its own size, SSDLite's resize inside the program)")
    parser.add_argument("--tolerance", type=float, default=FP32_TOLERANCE,
                        help="allowed max abs error of an fp32 export, times max(1, max|reference output|)")
    parser.add_argument("--int8", action="store_true",
                        help="also write a statically quantized int8 model (<out stem>.int8.onnx / .int8.pte)")
    parser.add_argument("--calibration-images", type=Path, default=None)
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--gate", type=Path, default=None, metavar="DIR",
                        help="executorch: score eager, fp32 and int8 on this held-out data (an image folder, a COCO "
                             "tree or a Cityscapes tree), write <out stem>.report.json/.md, exit 1 when int8 "
                             "loses more than --max-drop; implies --int8")
    parser.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                        help="points of the metric int8 may lose against eager (default 1 top-1 or mIoU, 2 mAP)")
    parser.add_argument("--latency-runs", type=int, default=20, help="timed runs per program in the report")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.gate is not None:
        if args.format != "executorch":
            parser.error("--gate compares the fp32 and int8 .pte: it needs --format executorch")
        args.int8 = True
    if args.max_drop is not None and args.gate is None:
        parser.error("--max-drop needs --gate DIR")
    if args.max_drop is not None and args.max_drop < 0:
        parser.error(f"--max-drop {args.max_drop:g}: must be at least 0 points")
    if args.int8 and args.calibration_images is None:
        parser.error("--int8 needs --calibration-images DIR" + (" (--gate implies --int8)" if args.gate else ""))
    if args.calibration_images is not None and not args.calibration_images.is_dir():
        parser.error(f"--calibration-images {args.calibration_images}: not a folder")
    if args.task is None and args.weights is None:
        parser.error("--task is needed without --weights (random weights)")
    if args.int8 and args.task == "detect" and args.format == "onnx":
        parser.error(INT8_ONNX_DETECT)
    if args.latency_runs < 1:
        parser.error("--latency-runs must be at least 1")
    if args.dynamic_size is not None:
        if args.format != "executorch":
            parser.error("--dynamic-size needs --format executorch (ONNX exports keep a dynamic batch only)")
        try:
            args.dynamic_size = parse_size_range(args.dynamic_size)
        except DynamicSizeError as err:
            parser.error(f"--dynamic-size: {err}")
        if args.task == "classify":
            parser.error("--dynamic-size: a classifier is exported at its crop size (--size S S)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.weights is None:
        print("no --weights: exporting randomly initialised weights", file=sys.stderr)
    resolved = model_from_arguments(args.task, args)
    args.task = resolved.task
    if args.int8 and args.task == "detect" and args.format == "onnx":  # the task read from the record
        print(f"error: {INT8_ONNX_DETECT}", file=sys.stderr)
        return 2
    if args.dynamic_size is not None and args.task == "classify":
        print("error: --dynamic-size: a classifier is exported at its crop size (--size S S)", file=sys.stderr)
        return 2
    print(f"model ({args.task}): {resolved.description}")
    model = resolved.model.eval()
    size = choose_size(args, model)
    gate = None
    if args.gate is not None:
        try:
            gate = read_gate_data(args.task, args.gate, model, size)
            if args.task == "segment" and args.size is None and args.dynamic_size is None and len(gate.sizes) == 1:
                size = gate.sizes[0]
            check_gate_sizes(gate, size, args.dynamic_size)
        except GateDataError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"gate data: {gate.root} ({gate.layout}, {gate.items} images)")
    gen = torch.Generator().manual_seed(0)
    example = model.normalize(torch.rand(1, 3, *size, generator=gen))
    if args.format == "executorch":
        try:
            return export_pte(args, model, example, size, gate, resolved.description)
        except DynamicSizeError as err:
            print(f"error: --dynamic-size {args.dynamic_size}: {err}", file=sys.stderr)
            return 2
    path = export_onnx(model, example, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), input [N, 3, {size[0]}, {size[1]}]")
    onnx_model = OnnxModel(path, threads=args.threads)
    ok = report_checks(args.task, model, onnx_model, check_inputs(args.task, model, size, None), args.tolerance,
                       "ONNX Runtime")
    if args.int8:
        inputs = calibration_inputs(args, size, model)
        q_path = quantize_int8(path, path.with_name(path.stem + ".int8.onnx"), inputs)
        print(f"wrote {q_path} ({q_path.stat().st_size / 1e6:.2f} MB), calibrated on {len(inputs)} images")
        print(int8_agreement(args.task, onnx_model, OnnxModel(q_path, threads=args.threads), inputs))
    return 0 if ok else 1


def choose_size(args: argparse.Namespace, model: nn.Module) -> tuple[int, int]:
    """The size the network is exported (or, with a dynamic range, traced) at."""
    if args.size:
        size = tuple(args.size)
    elif args.task == "detect":
        size = tuple(model.image_size)
    else:
        size = DEFAULT_SIZE[args.task]
    if args.dynamic_size is not None:
        low, high = args.dynamic_size
        if args.size and not args.dynamic_size.contains(*size):
            raise SystemExit(f"error: --size {size[0]} {size[1]} outside --dynamic-size {args.dynamic_size}")
        size = (min(max(size[0], low), high), min(max(size[1], low), high))
    return size


def calibration_inputs(args: argparse.Namespace, size: tuple[int, int], model: nn.Module) -> list[Tensor]:
    """The int8 calibration inputs (:func:`~mbv3_dense.deploy.calibration.load_calibration`); exit naming the folder
    when it holds no image."""
    try:
        return load_calibration(args.calibration_images, args.calibration_count, size, args.task, model,
                                dynamic=args.dynamic_size)
    except FileNotFoundError as err:
        raise SystemExit(str(err)) from err


def export_pte(args: argparse.Namespace, model: nn.Module, example: Tensor, size: tuple[int, int],
               gate: GateData | None, description: str) -> int:
    """``--format executorch``: write, report delegation, check; int8 too when asked; the gate and its report."""
    dynamic = args.dynamic_size
    takes_image = dynamic is not None and args.task == "detect"
    if takes_image:  # the program takes the image in [0, 1] at its own size
        example = torch.rand(1, 3, *size, generator=torch.Generator().manual_seed(0))
    result = export_executorch(model, example, args.out, task=args.task, dynamic_size=dynamic, preprocess=takes_image)
    path = result.path
    shape = f"H, W in {dynamic}" if dynamic else f"{size[0]}, {size[1]}"
    if takes_image:
        shape += f"] (the image in [0, 1]; resized to {model.image_size[0]}x{model.image_size[1]} inside"
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), input [1, 3, {shape}], fp32, {result.seconds:.1f} s")
    print(f"XNNPACK delegation: {result.delegation_summary()}")
    runtime = ExecuTorchModel(path, task=args.task, threads=args.threads)
    ok = report_checks(args.task, model, runtime, check_inputs(args.task, model, size, dynamic), args.tolerance,
                       "ExecuTorch (XNNPACK)")
    if not args.int8:
        return 0 if ok else 1
    inputs = calibration_inputs(args, size, model)
    q = export_executorch(model, example, path.with_name(path.stem + ".int8.pte"), task=args.task,
                          int8_calibration=inputs, dynamic_size=dynamic, preprocess=takes_image)
    print(f"wrote {q.path} ({q.path.stat().st_size / 1e6:.2f} MB), int8 (PT2E, XNNPACKQuantizer, "
          f"per-channel), calibrated on {len(inputs)} images, {q.seconds:.1f} s")
    print(f"XNNPACK delegation (int8): {q.delegation_summary()}")
    int8_runtime = ExecuTorchModel(q.path, task=args.task, threads=args.threads)
    with torch.inference_mode():
        print(int8_agreement(args.task, runtime, int8_runtime, inputs))
        if args.task == "detect":
            print(detection_agreement(model, runtime, int8_runtime, inputs))
    if gate is None:
        return 0 if ok else 1
    metrics = run_gate(gate, {"eager": model, "fp32": runtime, "int8": int8_runtime})
    max_drop = args.max_drop if args.max_drop is not None else DEFAULT_MAX_DROP[args.task]
    verdict = gate_verdict(metrics, gate.metric, max_drop)
    report = build_report(args, description, size, gate, metrics, verdict, {"fp32": result, "int8": q})
    json_path, md_path = write_report(path, report)
    for name, values in metrics.items():
        print(f"gate {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    print(f"gate: int8 {gate.metric} {verdict['int8']:.2f} vs eager {verdict['eager']:.2f}: drop {verdict['drop']:.2f} "
          f"points (allowed {max_drop:g}): {'PASSED' if verdict['passed'] else 'FAILED'}")
    print(f"wrote {json_path} and {md_path}")
    return 0 if ok and verdict["passed"] else 1


def build_report(args: argparse.Namespace, description: str, size: tuple[int, int], gate: GateData,
                 metrics: dict, verdict: dict, exports: dict) -> dict:
    """The export report: this run's model, input and calibration, the gate's verdict, and each form's metrics and
    costs (:func:`~mbv3_dense.deploy.gate.report_forms`)."""
    forms = report_forms(metrics, exports, size=size, runs=args.latency_runs)
    return {"model": description, "task": args.task, "weights": str(args.weights) if args.weights else None,
            "input": {"size": list(size), "dynamic_size": list(args.dynamic_size) if args.dynamic_size else None,
                      "takes_image": bool(args.dynamic_size) and args.task == "detect"},
            "environment": environment(), "calibration": {"folder": str(args.calibration_images),
                                                          "count": args.calibration_count},
            "gate": {"data": str(gate.root), "layout": gate.layout, "items": gate.items, **verdict},
            "forms": forms}


if __name__ == "__main__":
    sys.exit(main())
