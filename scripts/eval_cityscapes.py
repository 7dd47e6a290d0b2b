"""Official Cityscapes evaluation of an LR-ASPP checkpoint.

    python scripts/eval_cityscapes.py --weights run.ckpt \
        --root DIR --split val --export-dir OUT [--device cpu|cuda] [--visualize DIR] [--json OUT]
        [--backend torch|onnxruntime|executorch [--int8 --calibration-images DIR] [--pte FILE]]
    python scripts/eval_cityscapes.py --weights W --arch large|small --variant paper|torchvision ...

``--weights`` takes our Lightning ``.ckpt`` (it names its network: builder and arguments) or a
torchvision LR-ASPP state dict; the latter (and our state dicts, ``.ckpt`` files from before the
record) are built from ``--arch`` (default large), ``--variant`` (default paper), ``--width-mult``
and ``--reduced-tail``, with the class count read from the file (:mod:`mbv3_dense.checkpoints.resolve`).

Runs the model over the split at full resolution (progress bar), writes one single-channel labelId
PNG per image to ``OUT`` (``<city>_<seq>_<frame>_leftImg8bit.png``, full size), runs
cityscapesscripts' own ``evalPixelLevelSemanticLabeling`` on them, and prints the official
per-class IoU and mean next to our torchmetrics mIoU (they must agree), the latency at
``--latency-size`` (1024x2048 by default) and params/MAdds.

Both means average over the classes that occur in the ground truth or the predictions (the
official evaluator skips NaN classes, torchmetrics drops classes with an empty union): on the
real val split that is all 19 classes; on generated data, the classes the scenes contain.

``--backend onnxruntime|executorch`` runs the network exported (ONNX Runtime, or a ``.pte`` lowered
to XNNPACK run by ExecuTorch), once per input size met, so mIoU and latency describe the deployed
form. ``--int8`` quantizes it, calibrated on ``--calibration-images`` (normalised as the evaluation
images, resized to the exported size). ``--pte FILE`` runs a file written by ``scripts/export.py
--task segment --format executorch``; it must match the images' size (or, exported with
``--dynamic-size``, hold them in its range), and the latency is then measured at a size it takes.
``--dynamic-size MIN:MAX`` exports one program for every image size in the range instead of one per size.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mbv3_dense.checkpoints.resolve import add_model_arguments, evaluation_summary, model_from_arguments, write_summary
from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.data.image_io import read_image_rgb
from mbv3_dense.deploy.backend import ShapeBackends
from mbv3_dense.deploy.options import (
    add_backend_arguments,
    add_dynamic_size_argument,
    backend_label,
    calibration_images,
    check_backend_arguments,
    require_cpu,
)
from mbv3_dense.training.latency import measure_latency
from mbv3_dense.training.progress import progress
from segmentation.data import list_split, read_train_ids
from segmentation.labels import CLASS_NAMES, IGNORE_INDEX, colorize, train_ids_to_label_ids
from segmentation.module import miou_metric


class OfficialEvaluationError(RuntimeError):
    """cityscapesscripts' evaluator stopped (it calls ``sys.exit`` on errors); carries its message."""


def official_evaluation(predictions: list[Path], ground_truths: list[Path], export_file: Path,
                        *, quiet: bool = False) -> dict:
    """Run ``evalPixelLevelSemanticLabeling.evaluateImgLists`` on labelId PNGs; returns its result dict.

    Instance-level scores are switched off: they need ``*_instanceIds.png`` and call ``np.in1d``,
    which numpy 2.4 removed (cityscapesscripts 2.3.0). The evaluator's ``sys.exit`` on bad input
    becomes an :class:`OfficialEvaluationError` with its printed message.
    """
    from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as official

    args = official.args
    args.evalInstLevelScore = False
    args.evalPixelAccuracy = False
    args.JSONOutput = True
    args.exportFile = str(export_file)
    args.quiet = quiet
    args.colorized = False
    args.bold = args.nocol = ""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured if quiet else sys.stdout):
            return official.evaluateImgLists([str(p) for p in predictions], [str(p) for p in ground_truths], args)
    except SystemExit as err:
        raise OfficialEvaluationError(
            f"cityscapesscripts' evaluator stopped: {captured.getvalue().strip()[-500:] or err}") from err


def overlay(image: np.ndarray, train_ids: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend the Cityscapes palette over the image."""
    return (image * (1 - alpha) + colorize(train_ids) * alpha).astype(np.uint8)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", required=True, type=Path,
                        help="our .ckpt (names its network) or a torchvision LR-ASPP state dict")
    add_model_arguments(parser, "segment")
    parser.add_argument("--root", type=Path, required=True, help="Cityscapes root (leftImg8bit/, gtFine/)")
    parser.add_argument("--split", default="val")
    parser.add_argument("--export-dir", type=Path, required=True, help="where the labelId PNGs are written")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--visualize", type=Path, default=None, help="write colour overlays (PNG) here")
    parser.add_argument("--json", type=Path, default=None, help="write a summary JSON here")
    parser.add_argument("--latency-size", type=int, nargs=2, default=(1024, 2048), metavar=("H", "W"))
    parser.add_argument("--latency-runs", type=int, default=5)
    add_backend_arguments(parser)
    add_dynamic_size_argument(parser)
    args = parser.parse_args(argv)
    check_backend_arguments(parser, args)
    require_cpu(args.backend, args.device)
    return args


def model_input(model: torch.nn.Module, image: np.ndarray) -> torch.Tensor:
    """``[H, W, 3]`` uint8 RGB -> ``[1, 3, H, W]``, normalised by the network's own ``normalize``."""
    return model.normalize(torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255)


def make_network(model: torch.nn.Module, args: argparse.Namespace) -> torch.nn.Module | ShapeBackends:
    """The model on the chosen runtime: one program for every size in a dynamic range (``--dynamic-size``, or
    a ``--pte`` exported with one), else one per input shape (:class:`ShapeBackends`)."""
    if args.backend == "torch":
        return model
    calibration = None
    if args.int8:
        calibration = [model_input(model, a)
                       for a in calibration_images(args.calibration_images, args.calibration_count)]
    return ShapeBackends(args.backend, model, threads=args.threads, calibration=calibration, pte_file=args.pte,
                         task="segment", dynamic_size=args.dynamic_size)


def predict_split(model: torch.nn.Module, network, pairs: list[tuple[Path, Path]],
                  args: argparse.Namespace, device: torch.device) -> tuple[float, list[Path]]:
    """Run the network over the split: labelId PNGs (and overlays) written; returns our mIoU and the PNGs."""
    metric = miou_metric().to(device)
    predictions = []
    with torch.inference_mode():
        for image_path, label_path in progress(pairs, desc=f"LR-ASPP on {args.split}", unit="img"):
            image = read_image_rgb(image_path)
            target = torch.as_tensor(read_train_ids(label_path), dtype=torch.int64, device=device)
            x = model_input(model, image).to(device)
            pred = network(x).argmax(1)[0]
            metric.update(pred[None], target[None])
            train_ids = pred.cpu().numpy().astype(np.uint8)
            out = args.export_dir / image_path.name
            Image.fromarray(train_ids_to_label_ids(train_ids), mode="L").save(out)
            predictions.append(out)
            if args.visualize:
                Image.fromarray(overlay(image, train_ids)).save(args.visualize / image_path.name)
    return float(metric.compute()), predictions


def print_scores(class_scores: dict, official_mean: float, ours: float, present: list[str]) -> bool:
    """The official per-class IoU and both means; returns whether the means agree."""
    print("\nofficial per-class IoU (cityscapesscripts):")
    for name in CLASS_NAMES:
        score = class_scores[name]
        print(f"  {name:<14} {'   n/a' if math.isnan(score) else f'{score:6.4f}'}")
    print(f"official mIoU:    {official_mean:.4f}  (over {len(present)} classes present: {', '.join(present)})")
    print(f"torchmetrics mIoU: {ours:.4f}  (MulticlassJaccardIndex, ignore_index={IGNORE_INDEX})")
    agree = abs(official_mean - ours) < 1e-4
    print("the two means agree" if agree else f"WARNING: the means differ by {official_mean - ours:+.6f}")
    return agree


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    resolved = model_from_arguments("segment", args)
    print(f"model: {resolved.description}")
    model = resolved.model.to(device).eval()
    pairs = list_split(args.root, args.split)
    args.export_dir.mkdir(parents=True, exist_ok=True)
    if args.visualize:
        args.visualize.mkdir(parents=True, exist_ok=True)
    network = make_network(model, args)
    ours, predictions = predict_split(model, network, pairs, args, device)

    results = official_evaluation(predictions, [label for _, label in pairs],
                                  args.export_dir / "resultPixelLevelSemanticLabeling.json")
    class_scores = results["classScores"]
    official_mean = results["averageScoreClasses"]
    present = [name for name in CLASS_NAMES if not math.isnan(class_scores[name])]

    program = network.first() if isinstance(network, ShapeBackends) else None
    if hasattr(program, "accepts") and not program.accepts(*args.latency_size):  # a size the .pte takes
        args.latency_size = tuple(program.input_shape[2:])
    example = torch.randn(1, 3, *args.latency_size, device=device)
    latency = measure_latency(network, example, warmup=2, runs=args.latency_runs)
    params = count_params(model)
    madds = count_madds(model, example)

    agree = print_scores(class_scores, official_mean, ours, present)
    h, w = args.latency_size
    runtime, int8 = backend_label(args.backend, program)
    print(f"latency ({runtime}) at {h}x{w}, batch 1, {latency.device}, {latency.threads} threads: "
          f"median {latency.median_ms:.1f} ms (p90 {latency.p90_ms:.1f} ms)")
    print(f"params {params / 1e6:.3f}M, MAdds at {h}x{w}: {madds / 1e9:.3f}G")
    if args.json:
        write_summary(args.json, {
            **evaluation_summary("segment", "mIoU", ours, latency, latency_input=(h, w), backend=args.backend,
                                 int8=int8, pte=args.pte, weights=args.weights, model=resolved.description),
            "official_miou": official_mean, "classes_present": present,
            "per_class_iou": {n: class_scores[n] for n in present},
            "params_M": params / 1e6, "madds_G": madds / 1e9, "images": len(pairs)})
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
