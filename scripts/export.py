"""Export a classifier, SSDLite or LR-ASPP model to ONNX or ExecuTorch and check it against PyTorch.

    python scripts/export.py --task classify|detect|segment --arch large|small --weights W --out model.onnx
        [--format onnx|executorch] [--variant paper|torchvision] [--num-classes N] [--size H W]
        [--int8 --calibration-images DIR [--calibration-count 8]]

The graph is the network's ``forward`` (raw outputs: classifier logits, SSDLite ``box_regression``
and ``cls_logits``, LR-ASPP logits), spatial size fixed at ``--size``; SSDLite's resize, decode and
NMS stay in PyTorch (``model.preprocess`` / ``model.postprocess``), as in ``make_backend``. The check
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

from mbv3_dense.classifier import IMAGENET_MEAN, IMAGENET_STD
from mbv3_dense.deploy import ExecuTorchModel, OnnxModel, compare_outputs, export_executorch, export_onnx, quantize_int8
from mbv3_dense.image_io import read_image_rgb

DEFAULT_SIZE = {"classify": (224, 224), "detect": (320, 320), "segment": (1024, 2048)}


def build_model(args: argparse.Namespace) -> nn.Module:
    weights = str(args.weights) if args.weights is not None else None
    if args.task == "classify":
        import mbv3_dense

        build = getattr(mbv3_dense, f"mobilenet_v3_{args.arch}")
        return build(num_classes=args.num_classes or 1000, weights=weights)
    if args.task == "detect":
        import detection

        build = getattr(detection, f"ssdlite_mobilenet_v3_{args.arch}")
        return build(num_classes=args.num_classes or 91, weights=weights)
    import segmentation

    build = getattr(segmentation, f"lraspp_mobilenet_v3_{args.arch}")
    return build(num_classes=args.num_classes or 19, variant=args.variant, weights=weights)


def load_calibration(folder: Path, count: int, size: tuple[int, int], task: str,
                     model: nn.Module | None = None) -> list[Tensor]:
    """``count`` images from ``folder`` as ``[1, 3, H, W]`` inputs, preprocessed as the task's model expects.

    Classify and segment: resized to ``size`` and ImageNet-normalised. Detect: ``model.preprocess``
    (SSDLite's own normalisation, [-1, 1], and resize to its ``image_size``).
    """
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{folder}: no .jpg/.png images for int8 calibration")
    step = max(1, len(files) // count)  # spread over the folder (classes are usually sorted)
    inputs = []
    for path in files[::step][:count]:
        x = torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0
        if task == "detect":
            if model is None:
                raise ValueError("detect calibration needs the model (its preprocess)")
            with torch.no_grad():
                inputs.append(model.preprocess([x[0]]))
            continue
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        inputs.append((x - mean) / std)
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


def check_detections(model: nn.Module, runtime, name: str = "ONNX Runtime") -> bool:  # noqa: ANN001
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.predict([image])[0]
        got = _detections(model, runtime, image)
    same = ref["boxes"].shape == got["boxes"].shape and torch.equal(ref["labels"], got["labels"])
    err = (ref["boxes"] - got["boxes"]).abs().max().item() if same and len(ref["boxes"]) else 0.0
    ok = same and err <= 1e-3
    print(f"detections on a random 480x640 image: PyTorch {len(ref['boxes'])}, {name} {len(got['boxes'])}, "
          f"labels {'equal' if same else 'DIFFERENT'}, max box error {err:.2e} px (tolerance 1e-3 px): "
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
    parser.add_argument("--task", choices=("classify", "detect", "segment"), required=True)
    parser.add_argument("--arch", choices=("large", "small"), default="large")
    parser.add_argument("--weights", type=Path, default=None,
                        help="checkpoint (any layout the task's builder reads); without it: random weights")
    parser.add_argument("--out", type=Path, required=True, help="the .onnx or .pte file to write")
    parser.add_argument("--format", choices=("onnx", "executorch"), default="onnx",
                        help="onnx (ONNX Runtime) or executorch (.pte lowered to XNNPACK)")
    parser.add_argument("--variant", choices=("paper", "torchvision"), default="paper", help="segment only")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: 1000 classify, 91 detect, 19 segment")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default 224x224, 320x320, 1024x2048)")
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
    if args.int8 and args.task == "detect" and args.format == "onnx":
        parser.error("--int8 with --format onnx is offered for classify and segment only (use --format executorch)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.weights is None:
        print("no --weights: exporting randomly initialised weights", file=sys.stderr)
    model = build_model(args).eval()
    size = tuple(args.size) if args.size else DEFAULT_SIZE[args.task]
    gen = torch.Generator().manual_seed(0)
    example = torch.rand(1, 3, *size, generator=gen)
    if args.task != "detect":
        example = (example - 0.45) / 0.225
    if args.format == "executorch":
        return export_pte(args, model, example, gen, size)
    path = export_onnx(model, example, args.out)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB), input [N, 3, {size[0]}, {size[1]}]")
    onnx_model = OnnxModel(path, threads=args.threads)
    fresh = torch.rand(1, 3, *size, generator=gen)
    if args.task != "detect":
        fresh = (fresh - 0.45) / 0.225
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
    fresh = torch.rand(1, 3, *size, generator=gen)
    fresh = model.normalize(fresh) if args.task == "detect" else (fresh - 0.45) / 0.225
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
