"""Evaluate an SSDLite checkpoint on a COCO-format dataset with the official COCO metric.

    python scripts/eval_coco.py --weights run.ckpt \\
        --images DIR --annotations FILE --results OUT.json [--device cpu|cuda] [--batch-size B] \\
        [--backend torch|onnxruntime|executorch [--int8 --calibration-images DIR] [--pte FILE]] \\
        [--evaluator pycocotools|faster_coco_eval] [--visualize DIR] \\
        [--json METRICS.json]
    python scripts/eval_coco.py --weights W --arch large|small [--num-classes N] [--width-mult M] ...

Runs the model over every image of the annotation file (progress bar), writes OUT.json in the COCO
results format (original category ids, XYWH boxes in original-image pixels), runs COCOeval and
prints its 12-number summary, then the latency (batch 1 at the model's ``image_size``, end to end:
resize, network, decoding, NMS) and params/MAdds (raw network at that size). ``--weights`` takes
our Lightning ``.ckpt`` (it names its network: builder and arguments), our state dict or
torchvision's ``ssdlite320_mobilenet_v3_large`` state dict; the last two (and ``.ckpt`` files from
before the record) are built from ``--arch`` (default large), ``--width-mult``, ``--reduced-tail`` and
``--score-activation``, with the class count read from the file unless ``--num-classes`` is given
(:mod:`mbv3_dense.checkpoints.resolve`). With no detections at all the metrics are reported as zeros
(pycocotools' ``loadRes([])`` would raise).
``--backend onnxruntime`` runs the network (backbone and heads) exported to ONNX in ONNX Runtime and
decodes + NMS in the same vectorised PyTorch step, so metric and latency describe the deployed form;
``--backend executorch`` does the same with the network lowered to XNNPACK in a ``.pte`` run by
ExecuTorch (``model.preprocess`` -> ``.pte`` -> ``model.postprocess``); with ``--dynamic-size MIN:MAX``,
or a ``--pte`` exported with one, the program takes each image at its own size and runs the resize
itself (``.pte`` -> ``model.postprocess``). ``--int8`` quantizes the network,
calibrated on ``--calibration-images`` passed through ``model.preprocess``; ``--pte FILE`` runs a file
written by ``scripts/export.py --task detect --format executorch`` (checked: task and input size).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from detection.data import collate_eval, eval_dataset
from mbv3_dense.checkpoints.resolve import add_model_arguments, evaluation_summary, model_from_arguments, write_summary
from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.deploy import make_backend
from mbv3_dense.deploy.backend import detect
from mbv3_dense.deploy.dynamic import fit_size
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

STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


def coco_results(detections: list[dict[str, torch.Tensor]], image_ids: list[int], cmap) -> list[dict]:
    """Detections (XYXY, model labels) -> COCO results entries (XYWH, category ids)."""
    out = []
    for det, image_id in zip(detections, image_ids, strict=True):
        boxes = det["boxes"].cpu().double()
        xywh = torch.cat((boxes[:, :2], boxes[:, 2:] - boxes[:, :2]), dim=1).tolist()
        cats = cmap.to_category_ids(det["labels"].cpu()).tolist()
        for box, score, cat in zip(xywh, det["scores"].cpu().tolist(), cats, strict=True):
            out.append({"image_id": int(image_id), "category_id": int(cat),
                        "bbox": [round(v, 3) for v in box], "score": round(float(score), 5)})
    return out


def coco_evaluate(annotations: str | Path, results: str | Path, backend: str = "pycocotools") -> np.ndarray:
    """COCOeval (bbox) of a results file; prints the summary. Returns the 12 stats (zeros if no detections)."""
    if not json.loads(Path(results).read_text()):
        print("no detections: every metric is 0")
        return np.zeros(12)
    if backend == "faster_coco_eval":
        from faster_coco_eval import COCO
        from faster_coco_eval import COCOeval_faster as COCOeval
    else:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(annotations))
        dt = gt.loadRes(str(results))
    evaluator = COCOeval(gt, dt, "bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.evaluate()
        evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats[:12], dtype=np.float64)


def visualize(images: list[torch.Tensor], detections: list[dict], image_ids: list[int], cmap, names: dict,
              out_dir: Path, threshold: float) -> None:
    from PIL import Image, ImageDraw

    out_dir.mkdir(parents=True, exist_ok=True)
    for img, det, image_id in zip(images, detections, image_ids, strict=True):
        pil = Image.fromarray(img.permute(1, 2, 0).cpu().numpy())
        draw = ImageDraw.Draw(pil)
        keep = det["scores"] > threshold
        cats = cmap.to_category_ids(det["labels"][keep].cpu()).tolist()
        for box, score, cat in zip(det["boxes"][keep].tolist(), det["scores"][keep].tolist(), cats, strict=True):
            draw.rectangle(box, outline=(255, 40, 40), width=2)
            draw.text((box[0] + 3, box[1] + 2), f"{names.get(cat, cat)} {score:.2f}", fill=(255, 255, 0))
        pil.save(out_dir / f"{image_id}.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", required=True, type=Path,
                   help="our .ckpt (names its network) / state dict, or torchvision's SSDLite state dict")
    add_model_arguments(p, "detect")
    p.add_argument("--no-reduced-tail", dest="reduced_tail", action="store_const", const=False,
                   help="the same as --reduced-tail false")
    p.add_argument("--images", required=True, type=Path)
    p.add_argument("--annotations", required=True, type=Path)
    p.add_argument("--results", required=True, type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    add_backend_arguments(p)
    add_dynamic_size_argument(p)
    p.add_argument("--evaluator", choices=("pycocotools", "faster_coco_eval"), default="pycocotools")
    p.add_argument("--visualize", type=Path, default=None, help="write a few images with detections as PNG")
    p.add_argument("--num-visualize", type=int, default=8)
    p.add_argument("--vis-threshold", type=float, default=0.3)
    p.add_argument("--json", type=Path, default=None, help="write the headline figures to this JSON file")
    p.add_argument("--latency-runs", type=int, default=20)
    args = p.parse_args(argv)
    check_backend_arguments(p, args)
    return args


def make_network(model: torch.nn.Module, args: argparse.Namespace):
    """The detector's network on ``--backend`` (onnxruntime or executorch), int8 calibrated on
    ``--calibration-images`` through ``model.preprocess`` (or as images, for a dynamic program)."""
    calibration = None
    dynamic = args.dynamic_size  # a dynamic program takes the images themselves, SSDLite's resize inside
    if args.int8:
        with torch.no_grad():
            images = [torch.from_numpy(a).permute(2, 0, 1).float()[None] / 255.0
                      for a in calibration_images(args.calibration_images, args.calibration_count)]
            calibration = [fit_size(x, dynamic) if dynamic else model.preprocess([x[0]]) for x in images]
    example = (fit_size(torch.rand(1, 3, *model.image_size), dynamic) if dynamic
               else model.preprocess([torch.rand(3, *model.image_size)]))
    return make_backend(args.backend, model, example, threads=args.threads, int8_calibration=calibration,
                        pte_file=args.pte, task="detect", dynamic_size=dynamic)


def detect_all(predict, loader: DataLoader, cmap, names: dict, args: argparse.Namespace,
               device: torch.device) -> list[dict]:
    """Detections of every image as COCO results entries; the first ``--num-visualize`` drawn (``--visualize``)."""
    results: list[dict] = []
    shown = 0
    for images, targets in progress(loader, desc="detect", unit="batch"):
        image_ids = [int(t["image_id"]) for t in targets]
        with torch.inference_mode():
            detections = predict([img.to(device).float() / 255 for img in images])  # the loader's are uint8
        results += coco_results(detections, image_ids, cmap)
        if args.visualize is not None and shown < args.num_visualize:
            n = args.num_visualize - shown
            visualize(images[:n], detections[:n], image_ids[:n], cmap, names, args.visualize, args.vis_threshold)
            shown += len(images[:n])
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    resolved = model_from_arguments("detect", args)
    print(f"model: {resolved.description}")
    model = resolved.model
    device = torch.device(args.device)
    model.eval().to(device)
    dataset, cmap = eval_dataset(args.images, args.annotations, model.num_classes)
    names = {c["id"]: c["name"] for c in json.loads(args.annotations.read_text())["categories"]}
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_eval)
    predict, net = model.predict, None
    runtime, int8 = args.backend, False
    if args.backend != "torch":
        require_cpu(args.backend, device)
        net = make_network(model, args)
        runtime, int8 = backend_label(args.backend, net)

        def predict(images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
            return detect(model, net, images)

    results = detect_all(predict, loader, cmap, names, args, device)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results))
    print(f"wrote {len(results)} detections for {len(dataset)} images to {args.results}")

    stats = coco_evaluate(args.annotations, args.results, args.evaluator)
    height, width = model.image_size
    if args.backend == "executorch" and getattr(net, "dynamic_size", None) is not None:  # a size the program takes
        height, width = (min(max(v, net.dynamic_size.min), net.dynamic_size.max) for v in (height, width))
    example = torch.rand(1, 3, height, width, device=device)
    latency = measure_latency(lambda x: predict(list(x)), example, warmup=3, runs=args.latency_runs)
    params, madds = count_params(model), count_madds(model, model.normalize(example))
    print(f"latency ({runtime}, batch 1, {height}x{width}, end to end, {latency.device}, {latency.threads} threads): "
          f"median {latency.median_ms:.1f} ms, p90 {latency.p90_ms:.1f} ms")
    print(f"params {params / 1e6:.3f}M, MAdds {madds / 1e9:.3f}G (network at {height}x{width})")
    if args.json is not None:
        write_summary(args.json, {
            **evaluation_summary("detect", "mAP", float(stats[0]), latency, latency_input=(height, width),
                                 backend=args.backend, int8=int8, pte=args.pte, weights=args.weights,
                                 model=resolved.description),
            "map_50": float(stats[1]), "map_75": float(stats[2]),
            "stats": dict(zip(STAT_NAMES, (float(s) for s in stats), strict=True)),
            "params_M": params / 1e6, "madds_G": madds / 1e9,
            "images": len(dataset), "detections": len(results)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
