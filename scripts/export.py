"""Export a classifier, SSDLite or LR-ASPP model to ONNX and check it against PyTorch.

    python scripts/export.py --task classify|detect|segment --arch large|small --weights W --out model.onnx
        [--variant paper|torchvision] [--num-classes N] [--size H W]
        [--int8 --calibration-images DIR [--calibration-count 8]]

The graph is the network's ``forward`` (raw outputs: classifier logits, SSDLite ``box_regression``
and ``cls_logits``, LR-ASPP logits), batch axis dynamic, spatial size fixed at ``--size``; SSDLite's
resize, decode and NMS stay in PyTorch (``model.preprocess`` / ``model.postprocess``), as in
``make_backend``. The check runs PyTorch and ONNX Runtime on a fresh random input and prints each
output's largest absolute error next to the tolerance ``--tolerance x max(1, max|reference|)``;
for SSDLite it also compares the final detections of a random 480x640 image. Exit status 1 when
the check fails.

``--int8`` also writes ``<out stem>.int8.onnx``, statically quantized with ONNX Runtime, calibrated
on ``--calibration-count`` images read from ``--calibration-images`` (searched recursively for
.jpg/.png), resized to ``--size`` and normalised as the model expects; the script prints how often
the int8 model agrees with the float one on those images (top-1 for classify, pixels for segment).
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
from mbv3_dense.deploy import OnnxModel, compare_outputs, export_onnx, quantize_int8
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


def load_calibration(folder: Path, count: int, size: tuple[int, int], task: str) -> list[Tensor]:
    """``count`` images from ``folder`` as ``[1, 3, H, W]`` inputs, preprocessed as the task's model expects."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"{folder}: no .jpg/.png images for int8 calibration")
    step = max(1, len(files) // count)  # spread over the folder (classes are usually sorted)
    inputs = []
    for path in files[::step][:count]:
        x = torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        if task != "detect":  # SSDLite normalises inside its forward
            mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = (x - mean) / std
        inputs.append(x)
    return inputs


def check(model: nn.Module, onnx_model: OnnxModel, example: Tensor, tolerance: float) -> bool:
    with torch.inference_mode():
        reference = model(example)
    scale = max(1.0, max(t.abs().max().item() for t in _tensors(reference)))
    report = compare_outputs(reference, onnx_model(example), tolerance=tolerance * scale)
    print(f"ONNX Runtime vs PyTorch on a random {tuple(example.shape)} input: {report}")
    return report.ok


def check_detections(model: nn.Module, onnx_model: OnnxModel) -> bool:
    image = torch.rand(3, 480, 640, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model.predict([image])[0]
        got = model.postprocess(onnx_model(model.preprocess([image])), [(480, 640)])[0]
    same = ref["boxes"].shape == got["boxes"].shape and torch.equal(ref["labels"], got["labels"])
    err = (ref["boxes"] - got["boxes"]).abs().max().item() if same and len(ref["boxes"]) else 0.0
    ok = same and err <= 1e-3
    print(f"detections on a random 480x640 image: PyTorch {len(ref['boxes'])}, ONNX Runtime {len(got['boxes'])}, "
          f"labels {'equal' if same else 'DIFFERENT'}, max box error {err:.2e} px (tolerance 1e-3 px): "
          f"{'OK' if ok else 'FAILED'}")
    return ok


def int8_agreement(task: str, fp32: OnnxModel, int8: OnnxModel, inputs: list[Tensor]) -> str:
    agree, total = 0, 0
    for x in inputs:
        a, b = fp32(x), int8(x)
        a, b = (a, b) if isinstance(a, Tensor) else (a[0], b[0])
        a, b = a.argmax(1), b.argmax(1)
        agree += (a == b).sum().item()
        total += a.numel()
    what = "top-1 labels" if task == "classify" else ("pixels" if task == "segment" else "argmax entries")
    return f"int8 vs float {what} agreeing on {len(inputs)} calibration images: {agree / max(1, total):.2%}"


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
    parser.add_argument("--out", type=Path, required=True, help="the .onnx file to write")
    parser.add_argument("--variant", choices=("paper", "torchvision"), default="paper", help="segment only")
    parser.add_argument("--num-classes", type=int, default=None,
                        help="default: 1000 classify, 91 detect, 19 segment")
    parser.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), default=None,
                        help="network input size (default 224x224, 320x320, 1024x2048)")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="allowed max abs error, times max(1, max|reference output|)")
    parser.add_argument("--int8", action="store_true", help="also write a statically quantized int8 model")
    parser.add_argument("--calibration-images", type=Path, default=None)
    parser.add_argument("--calibration-count", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.int8 and args.calibration_images is None:
        parser.error("--int8 needs --calibration-images DIR")
    if args.int8 and args.task == "detect":
        parser.error("--int8 is offered for classify and segment only")
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
        inputs = load_calibration(args.calibration_images, args.calibration_count, size, args.task)
        q_path = quantize_int8(path, path.with_name(path.stem + ".int8.onnx"), inputs)
        print(f"wrote {q_path} ({q_path.stat().st_size / 1e6:.2f} MB), calibrated on {len(inputs)} images")
        print(int8_agreement(args.task, onnx_model, OnnxModel(q_path, threads=args.threads), inputs))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
