"""Evaluate a classifier on an ImageFolder ``val`` split: top-1/top-5, latency, params and MAdds.

    python scripts/eval_classify.py --weights run.ckpt --root DIR [--split val]
        [--image-size 224] [--device cpu|cuda] [--json OUT] [--visualize DIR]
        [--backend torch|onnxruntime|executorch [--int8 --calibration-images DIR] [--pte FILE]]
    python scripts/eval_classify.py --weights W --arch large|small [--width-mult M] --root DIR ...

``--weights`` takes any checkpoint the classifier loads. A ``.ckpt`` of ``lightning fit`` names its
network (builder and arguments); torchvision's, mmpretrain's and timm's checkpoints, our plain state
dicts and older ``.ckpt`` files are built from ``--arch`` (default large), ``--width-mult`` and
``--reduced-tail``, the class count read from the file (:mod:`mbv3_dense.checkpoints.resolve`). Class indices
follow the sorted folder names of ``DIR/train`` (as in training), or of the split itself when there
is no ``train`` folder.
``--backend onnxruntime|executorch`` runs the network exported (ONNX Runtime, or a ``.pte`` lowered to
XNNPACK run by ExecuTorch), so top-1 and latency describe the deployed form; ``--int8`` quantizes it,
calibrated on ``--calibration-images`` prepared like the evaluation images; ``--pte FILE`` runs a file
written by ``scripts/export.py --format executorch`` (checked: task ``classify``, ``--image-size``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from mbv3_dense.checkpoints.resolve import add_model_arguments, evaluation_summary, model_from_arguments, write_summary
from mbv3_dense.classification.data import ImageFolderDataset, collate_skipping, find_classes, scan_image_folder
from mbv3_dense.classification.transforms import eval_transform
from mbv3_dense.complexity import count_madds, count_params
from mbv3_dense.deploy import make_backend
from mbv3_dense.deploy.options import (
    add_backend_arguments,
    backend_label,
    calibration_images,
    check_backend_arguments,
    require_cpu,
)
from mbv3_dense.training.latency import measure_latency
from mbv3_dense.training.progress import progress


def save_grid(images: list[torch.Tensor], titles: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.8 * cols, 2.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles, strict=False):
        ax.imshow(image.permute(1, 2, 0).numpy())
        ax.set_title(title, fontsize=7, color="green" if "ok" in title else "red")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", type=Path, required=True,
                   help="our .ckpt (names its network) or a classifier checkpoint of another layout")
    add_model_arguments(p, "classify")
    p.add_argument("--root", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--image-size", type=int, default=224, help="centre-crop size (also the latency input)")
    p.add_argument("--resize-size", type=int, default=None, help="short side before the crop (default size*256/224)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--latency-runs", type=int, default=20)
    add_backend_arguments(p)
    p.add_argument("--json", type=Path, default=None, help="write the summary as JSON here")
    p.add_argument("--visualize", type=Path, default=None, help="save a grid of predictions as PNG here")
    args = p.parse_args(argv)
    check_backend_arguments(p, args)
    return args


def split_dataset(args: argparse.Namespace, num_classes: int) -> tuple[ImageFolderDataset, list[str]]:
    """The evaluated split, its class indices those of the sorted folders of ``train`` (or of the split)."""
    class_dir = args.root / "train" if (args.root / "train").is_dir() else args.root / args.split
    classes = find_classes(class_dir)
    if len(classes) != num_classes:
        raise SystemExit(f"{class_dir} has {len(classes)} classes but {args.weights} predicts {num_classes}")
    scan = scan_image_folder(args.root / args.split, {c: i for i, c in enumerate(classes)})
    resize = args.resize_size or round(args.image_size * 256 / 224)
    return ImageFolderDataset(scan.samples, eval_transform(resize_size=resize, crop_size=args.image_size)), classes


def make_network(model: torch.nn.Module, dataset: ImageFolderDataset, example: torch.Tensor,
                 args: argparse.Namespace):
    """The model on the chosen runtime, int8 calibrated on images prepared like the evaluation's."""
    if args.backend == "torch":
        return model
    calibration = None
    if args.int8:
        calibration = [model.normalize(dataset.transform(torch.from_numpy(a).permute(2, 0, 1).contiguous())[None]
                                       .float() / 255)
                       for a in calibration_images(args.calibration_images, args.calibration_count)]
    return make_backend(args.backend, model, example, threads=args.threads, int8_calibration=calibration,
                        pte_file=args.pte, task="classify")


def evaluate(model: torch.nn.Module, net, dataset: ImageFolderDataset, classes: list[str],
             args: argparse.Namespace, device: torch.device) -> tuple[float, float, list[tuple[torch.Tensor, str]]]:
    """Top-1 and top-5 over the split, and (``--visualize``) 16 images spread over it with their titles."""
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate_skipping)
    num_classes = len(classes)
    top1 = MulticlassAccuracy(num_classes=num_classes, top_k=1, average="micro").to(device)
    top5 = MulticlassAccuracy(num_classes=num_classes, top_k=min(5, num_classes), average="micro").to(device)
    shown: list[tuple[torch.Tensor, str]] = []
    # A spread of the split (it is sorted by class), not just its first class.
    wanted = {round(i * (len(dataset) - 1) / 15) for i in range(16)} if args.visualize else set()
    seen = 0
    with torch.inference_mode():
        for batch in progress(loader, desc=f"eval {args.split}", unit="batch"):
            images, labels = batch.images.to(device), batch.labels.to(device)  # uint8, as the loader gives them
            logits = net(model.normalize(images.float() / 255))
            top1.update(logits, labels)
            top5.update(logits, labels)
            if wanted:
                pred = logits.argmax(1)
                for offset, (img, y, t) in enumerate(zip(images.cpu(), pred.cpu(), labels.cpu(), strict=True)):
                    if seen + offset in wanted:
                        mark = "ok" if y == t else f"true {classes[t]}"
                        shown.append((img, f"{classes[y]} ({mark})"))
            seen += len(labels)
    return float(top1.compute()), float(top5.compute()), shown


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    require_cpu(args.backend, device)
    resolved = model_from_arguments("classify", args)
    print(f"model: {resolved.description}")
    model = resolved.model.eval().to(device)
    dataset, classes = split_dataset(args, model.num_classes)
    example = torch.rand(1, 3, args.image_size, args.image_size, device=device)
    net = make_network(model, dataset, example, args)
    runtime, int8 = backend_label(args.backend, net)
    top1, top5, shown = evaluate(model, net, dataset, classes, args, device)
    latency = measure_latency(net, example, runs=args.latency_runs)
    summary = {
        **evaluation_summary("classify", "top1", top1, latency,
                             latency_input=(args.image_size, args.image_size), backend=args.backend, int8=int8,
                             pte=args.pte, weights=args.weights, model=resolved.description),
        "top1": top1, "top5": top5, "images": len(dataset),
        "params_M": count_params(model) / 1e6, "madds_G": count_madds(model, example) / 1e9,
    }
    print(f"top-1 {summary['top1']:.4f}  top-5 {summary['top5']:.4f}  on {len(dataset)} images of {args.split}")
    size = f"{args.image_size}x{args.image_size}"
    print(f"latency ({runtime}, batch 1, {size}, {latency.device}, {latency.threads} threads): "
          f"median {latency.median_ms:.2f} ms, p90 {latency.p90_ms:.2f} ms")
    print(f"params {summary['params_M']:.3f}M  MAdds {summary['madds_G']:.4f}G")
    if args.visualize and shown:
        path = args.visualize / "predictions.png"
        save_grid([img for img, _ in shown], [t for _, t in shown], path)
        print(f"predictions drawn in {path}")
    if args.json:
        write_summary(args.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
