"""Export a classifier, SSDLite or LR-ASPP model to ONNX or ExecuTorch and check it against PyTorch.

    python scripts/export.py --weights run.ckpt --out model.onnx
        [--format onnx|executorch] [--size H W] [--int8 --calibration-images DIR [--calibration-count 8]]
    python scripts/export.py --task classify|detect|segment --weights W --arch large|small --out model.onnx
        [--variant paper|torchvision] [--num-classes N] [--width-mult M] ...

A ``.ckpt`` of ``lightning fit`` names its task and network (builder and arguments): ``--weights``
alone describes the model. Other files (torchvision's, mmpretrain's, plain state dicts, older
``.ckpt``) need ``--task`` and are built from ``--arch`` (default large), ``--variant``,
``--width-mult`` and ``--reduced-tail``, the class count read from the file unless ``--num-classes``
is given; without ``--weights`` the network of ``--task`` is exported with random weights
(:mod:`mbv3_dense.resolve`).

The graph is the network's ``forward`` (raw outputs: classifier logits, SSDLite ``box_regression``
and ``cls_logits``, LR-ASPP logits), spatial size fixed at ``--size`` (default 224x224 classify, the
model's ``image_size`` detect, 1024x2048 segment); SSDLite's resize, decode and NMS stay in PyTorch
(``model.preprocess`` / ``model.postprocess``), as in ``make_backend``. The inputs are random images in
[0, 1] through the model's own ``normalize``. The check
runs PyTorch and the exported file on a fresh random input and prints each output's largest absolute
error next to the tolerance ``--tolerance x max(1, max|reference|)``; for SSDLite it also compares the
final detections of a random 480x640 image. Exit status 1 when the check fails.

``--format onnx`` (default): batch axis dynamic, run by ONNX Runtime. ``--int8`` also writes
``<out stem>.int8.onnx``, statically quantized with ONNX Runtime (classify and segment).

``--format executorch``: a ``.pte`` lowered to XNNPACK at batch 1, run by ExecuTorch's runtime; the
script prints which operators XNNPACK did not take. ``--int8`` also writes ``<out stem>.int8.pte``,
quantized with PT2E and the XNNPACK quantizer (per-channel int8 weights, int8 activations), for every
task. The file records its task and input size; the evaluation scripts refuse a file built for
another.

int8 is calibrated on ``--calibration-count`` images read from ``--calibration-images`` (searched
recursively for .jpg/.png), prepared as the model expects (classify and segment: resized to
``--size`` and normalised; detect: ``model.preprocess``), and the script prints how the int8 model
agrees with the float one on those images (top-1 labels for classify, pixels for segment, per-box top
classes and the final detections for detect) and its error against PyTorch on the fresh input.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbv3_dense.deploy import ExecuTorchModel, OnnxModel, compare_outputs, export_executorch, export_onnx, quantize_int8
from mbv3_dense.image_io import read_image_rgb
from mbv3_dense.resolve import add_model_arguments, model_from_arguments

# Default input sizes of the networks that take any size (SSDLite has its own, ``image_size``).
DEFAULT_SIZE = {"classify": (224, 224), "segment": (1024, 2048)}
INT8_ONNX_DETECT = "--int8 with --format onnx is offered for classify and segment only (use --format executorch)"


def load_calibration(folder: Path, count: int, size: tuple[int, int], task: str, model: nn.Module) -> list[Tensor]:
    """``count`` images from ``folder`` as ``[1, 3, H, W]`` inputs, preprocessed as the task's model expects.

    Classify and segment: resized to ``size`` and normalised by ``model.normalize`` (ImageNet mean
    and std). Detect: ``model.preprocess`` (SSDLite's own normalisation, [-1, 1], and resize to its
    ``image_size``).
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{folder}: no .jpg/.png images for int8 calibration")
    step = max(1, len(files) // count)  # spread over the folder (classes are usually sorted)
    inputs = []
    for path in files[::step][:count]:
        x = torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            if task == "detect":
                inputs.append(model.preprocess([x[0]]))
            else:
                inputs.append(model.normalize(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))
    return inputs


def check(model: nn.Module, runtime, example: Tensor, tolerance: float, name: str = "ONNX Runtime") -> bool:  # noqa: ANN001
    with torch.inference_mode():
        reference = model(example)
    scale = max(1.0, max(t.abs().max().item() for t in _tensors(reference)))
    report = compare_outputs(reference, runtime(example), tolerance=tolerance * scale)
    print(f"{name} vs PyTorch on a random {tuple(example.shape)} input: {report}")
    return report.ok


def _detections(model: nn.Module, runtime, image: Tensor) -> dict[str, Tensor]:  # noqa: ANN001
    h, w = image.shape[-2:]
    return model.postprocess(runtime(model.preprocess([image])), [(int(h), int(w))])[0]


def match_detections(ref: dict[str, Tensor], got: dict[str, Tensor], *, box_tolerance: float = 1e-3,
                     score_tolerance: float = 1e-5) -> tuple[int, int, float]:
    """Match reference detections one to one with ``got`` ones: same label and score, same box.

    Detections of equal score may come out in either order, and where several boxes tie (a barely
    trained network scores many anchors alike) NMS and the per-image cut keep either of them: which
    one is the CPU's floating-point choice. So the lists are compared as sets, first by label, score
    and box (the candidates with the fewest matches first, so the greedy matching cannot strand one),
    then what is left by label and score alone: boxes swapped among tied scores.

    Returns:
        Reference detections matched with their box, those matched among tied scores, and the
        largest box error (pixels) of the first.
    """
    if not len(ref["boxes"]) or not len(got["boxes"]):
        return 0, 0, 0.0
    box_error = (got["boxes"][:, None, :] - ref["boxes"][None, :, :]).abs().amax(-1)  # [got, ref]
    same = ((got["labels"][:, None] == ref["labels"][None, :])
            & ((got["scores"][:, None] - ref["scores"][None, :]).abs() <= score_tolerance))
    free = torch.ones(len(got["boxes"]), dtype=torch.bool)
    left = []
    matched, worst = 0, 0.0
    close = same & (box_error <= box_tolerance)
    for j in torch.argsort(close.sum(0), stable=True).tolist():
        candidates = torch.nonzero(close[:, j] & free).flatten()
        if not len(candidates):
            left.append(j)
            continue
        i = int(candidates[box_error[candidates, j].argmin()])
        free[i] = False
        matched += 1
        worst = max(worst, float(box_error[i, j]))
    swapped = 0
    for j in left:
        candidates = torch.nonzero(same[:, j] & free).flatten()
        if len(candidates):
            free[int(candidates[0])] = False
            swapped += 1
    return matched, swapped, worst


def check_detections(model: nn.Module, runtime, name: str = "ONNX Runtime") -> bool:  # noqa: ANN001
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.predict([image])[0]
        got = _detections(model, runtime, image)
    matched, swapped, err = match_detections(ref, got)
    ok = len(ref["boxes"]) == len(got["boxes"]) == matched + swapped
    print(f"detections on a random 480x640 image: PyTorch {len(ref['boxes'])}, {name} {len(got['boxes'])}, "
          f"in any order {matched} equal (same label, score within 1e-5, box within 1e-3 px; max box error "
          f"{err:.2e} px) and {swapped} of the same label and score with another of the tied boxes: "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def int8_agreement(task: str, fp32, int8, inputs: list[Tensor]) -> str:  # noqa: ANN001
    """How often the int8 model's decisions equal the float model's on ``inputs``."""
    agree, total = 0, 0
    for x in inputs:
        a, b = fp32(x), int8(x)
        if task == "detect":  # the top class of every default box
            a, b = a["cls_logits"].argmax(-1), b["cls_logits"].argmax(-1)
        else:
            a, b = (a, b) if isinstance(a, Tensor) else (a[0], b[0])
            a, b = a.argmax(1), b.argmax(1)
        agree += (a == b).sum().item()
        total += a.numel()
    what = {"classify": "top-1 labels", "segment": "pixels", "detect": "default boxes' top classes"}[task]
    return f"int8 vs float {what} agreeing on {len(inputs)} calibration images: {agree / max(1, total):.2%}"


def detection_agreement(model: nn.Module, fp32, int8, inputs: list[Tensor], threshold: float = 0.3) -> str:  # noqa: ANN001
    """Detections above ``threshold`` of the float model that int8 finds too (same label, IoU >= 0.5)."""
    from torchvision.ops import box_iou

    found, total = 0, 0
    size = [tuple(model.image_size)]
    for x in inputs:
        a = model.postprocess(fp32(x), size)[0]
        b = model.postprocess(int8(x), size)[0]
        a_keep, b_keep = a["scores"] > threshold, b["scores"] > threshold
        boxes_a, labels_a = a["boxes"][a_keep], a["labels"][a_keep]
        boxes_b, labels_b = b["boxes"][b_keep], b["labels"][b_keep]
        total += len(boxes_a)
        if len(boxes_a) and len(boxes_b):
            iou = box_iou(boxes_a, boxes_b) * (labels_a[:, None] == labels_b[None, :])
            found += int((iou.max(1).values >= 0.5).sum())
    return (f"float detections (score > {threshold}) on the calibration images also found by int8 "
            f"(same label, IoU >= 0.5): {found}/{total}")


def _tensors(out: object) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out]
    return list(out.values()) if isinstance(out, dict) else list(out)


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
                             "1024x2048 segment)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="allowed max abs error, times max(1, max|reference output|)")
    parser.add_argument("--int8", action="store_true",
                        help="also write a statically quantized int8 model (<out stem>.int8.onnx / .int8.pte)")
    parser.add_argument("--calibration-images", type=Path, default=None)
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.int8 and args.calibration_images is None:
        parser.error("--int8 needs --calibration-images DIR")
    if args.task is None and args.weights is None:
        parser.error("--task is needed without --weights (random weights)")
    if args.int8 and args.task == "detect" and args.format == "onnx":
        parser.error(INT8_ONNX_DETECT)
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
    print(f"model ({args.task}): {resolved.description}")
    model = resolved.model.eval()
    if args.size:
        size = tuple(args.size)
    elif args.task == "detect":
        size = tuple(model.image_size)
    else:
        size = DEFAULT_SIZE[args.task]
    gen = torch.Generator().manual_seed(0)
    example = model.normalize(torch.rand(1, 3, *size, generator=gen))
    if args.format == "executorch":
        return export_pte(args, model, example, gen, size)
    path = export_onnx(model, example, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), input [N, 3, {size[0]}, {size[1]}]")
    onnx_model = OnnxModel(path, threads=args.threads)
    fresh = model.normalize(torch.rand(1, 3, *size, generator=gen))
    ok = check(model, onnx_model, fresh, args.tolerance)
    if args.task == "detect":
        ok = check_detections(model, onnx_model) and ok
    if args.int8:
        inputs = load_calibration(args.calibration_images, args.calibration_count, size, args.task, model)
        q_path = quantize_int8(path, path.with_name(path.stem + ".int8.onnx"), inputs)
        print(f"wrote {q_path} ({q_path.stat().st_size / 1e6:.2f} MB), calibrated on {len(inputs)} images")
        print(int8_agreement(args.task, onnx_model, OnnxModel(q_path, threads=args.threads), inputs))
    return 0 if ok else 1


def export_pte(args: argparse.Namespace, model: nn.Module, example: Tensor, gen: torch.Generator,
               size: tuple[int, int]) -> int:
    """``--format executorch``: write, report delegation, check; int8 too when asked."""
    result = export_executorch(model, example, args.out, task=args.task)
    path = result.path
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), input [1, 3, {size[0]}, {size[1]}], fp32, "
          f"{result.seconds:.1f} s")
    print(f"XNNPACK delegation: {result.delegation_summary()}")
    runtime = ExecuTorchModel(path, task=args.task, input_size=size, threads=args.threads)
    fresh = model.normalize(torch.rand(1, 3, *size, generator=gen))
    ok = check(model, runtime, fresh, args.tolerance, "ExecuTorch (XNNPACK)")
    if args.task == "detect":
        ok = check_detections(model, runtime, "ExecuTorch (XNNPACK)") and ok
    if args.int8:
        inputs = load_calibration(args.calibration_images, args.calibration_count, size, args.task, model)
        q = export_executorch(model, example, path.with_name(path.stem + ".int8.pte"), task=args.task,
                              int8_calibration=inputs)
        print(f"wrote {q.path} ({q.path.stat().st_size / 1e6:.2f} MB), int8 (PT2E, XNNPACKQuantizer, "
              f"per-channel), calibrated on {len(inputs)} images, {q.seconds:.1f} s")
        print(f"XNNPACK delegation (int8): {q.delegation_summary()}")
        int8_runtime = ExecuTorchModel(q.path, task=args.task, input_size=size, threads=args.threads)
        with torch.inference_mode():
            reference = model(fresh)
            report = compare_outputs(reference, int8_runtime(fresh), tolerance=float("inf"))
        scale = max(t.abs().max().item() for t in _tensors(reference))
        errors = ", ".join(f"{k}: {v:.3e} ({v / max(scale, 1e-30):.1%} of max|reference| {scale:.3g})"
                           for k, v in report.max_abs_error.items())
        print(f"ExecuTorch int8 vs PyTorch on the random input: max abs error {errors}")
        with torch.inference_mode():
            print(int8_agreement(args.task, runtime, int8_runtime, inputs))
            if args.task == "detect":
                print(detection_agreement(model, runtime, int8_runtime, inputs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
