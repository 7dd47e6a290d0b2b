"""Predict on your own images without Lightning: the same files as ``lightning predict``, any backend.

    python scripts/predict.py --weights run.ckpt --images PATH --out DIR \\
        [--backend torch|onnxruntime|executorch [--pte FILE | --dynamic-size MIN:MAX]] \\
        [--batch-size B] [--workers N] [--threads T] \\
        [--class-names FILE_OR_DIR] [--annotations instances.json] [--no-pictures] [--overwrite] \\
        [--max-pixels P] [--benchmark [--benchmark-images K]]
    python scripts/predict.py --task classify|detect|segment --weights W --images PATH --out DIR \\
        [--arch large|small] [--num-classes N] [--width-mult M] [--variant paper|torchvision] ...

PATH is a folder (read recursively), a glob or a text file of paths. ``--weights`` takes any
layout the task's loader reads. A ``.ckpt`` of ``lightning fit`` names its task and network (builder
and arguments); other files (torchvision's state dicts, ours, older ``.ckpt``) need ``--task`` and are
built from ``--arch`` (default large), ``--width-mult``, ``--reduced-tail`` and ``--variant``, the class
count read from the file unless ``--num-classes`` is given (:mod:`mbv3_dense.checkpoints.resolve`). The writers
are those of
``lightning predict`` (mbv3_dense/classification/predict.py, detection/predict.py,
segmentation/predict.py): classify writes ``classifications.jsonl`` (top-5 names and probabilities;
class names from the checkpoint's record, else ``--class-names``: a text file with one name a line, or an
ImageFolder ``train/`` folder), detect writes ``coco_results.json`` and ``detections/<name>.json`` (category
ids and names from the checkpoint's record, torchvision's COCO list for its 91-class files, or
``--annotations``),
segment writes ``labelIds/<name>.png`` (full size) and ``overlays/``; pictures unless ``--no-pictures``.
Bad files are named, counted and skipped; the last line says how many were written and skipped.

Backends (:func:`mbv3_dense.deploy.make_backend`): ``torch`` (batch norms folded), ``onnxruntime`` and
``executorch`` (XNNPACK, one image a call). The networks of classify (crops of ``--image-size``) and
detect (``image_size`` of the model) see one input size; segment sees each image at its own size.
``--pte FILE`` runs a program written by ``scripts/export.py --format executorch``; one exported with
``--dynamic-size MIN:MAX`` takes every image whose sides are in that range at its own size (segment: the
normalised image; detect: the image itself, SSDLite's resize inside the program), and an image outside it
stops the run with an error naming the image, the file and the range. ``--dynamic-size MIN:MAX`` without
``--pte`` exports such a program once, on the fly. Otherwise an exported segmentation backend is built
once per distinct image size (kept for the last 4 sizes).

``--benchmark`` then times the prediction function alone (preprocess, network, postprocess; not the
decoding nor the writing) over the first ``--benchmark-images`` readable images, at batch 1 and at
``--batch-size``: ours in eager PyTorch, the chosen backend, and a plain loop over torchvision's model
of the task built with the same weights (only when ``--weights`` is a torchvision state dict of that
model), and prints images/s for each.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

# Idle OpenMP threads that spin would stall ONNX Runtime's and the loader's on a small machine.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
from torch import Tensor

from mbv3_dense.checkpoints.resolve import add_model_arguments, model_from_arguments
from mbv3_dense.data.listing import list_images, note_ignored
from mbv3_dense.data.predict import DEFAULT_MAX_PIXELS, PredictBatch, PredictionWriter, predict_loader
from mbv3_dense.deploy import ExecuTorchFileError, ExecuTorchModel, make_backend
from mbv3_dense.deploy.backend import BACKENDS, detect
from mbv3_dense.deploy.dynamic import DynamicSizeError, parse_size_range
from mbv3_dense.deploy.executorch_runtime import ExecuTorchInputError
from mbv3_dense.training.progress import progress

log = logging.getLogger("predict")
Predict = Callable[[PredictBatch], list]


def backend_for(kind: str, model: torch.nn.Module, example: Tensor, args: argparse.Namespace,
                task: str) -> Callable[[Tensor], object]:
    """The network on backend ``kind``; ExecuTorch programs (``--pte``, or exported here, with
    ``--dynamic-size`` when given) run a batch one image at a time."""
    if kind == "executorch":
        return make_backend(kind, model, example, threads=args.threads, task=task, pte_file=args.pte,
                            dynamic_size=args.dynamic_size)
    return make_backend(kind, model, example, threads=args.threads)


def dynamic_example(args: argparse.Namespace, size: tuple[int, int]) -> tuple[int, int]:
    """``size`` brought into ``--dynamic-size`` (the size a dynamic program is traced at)."""
    if args.dynamic_size is None:
        return size
    return tuple(min(max(v, args.dynamic_size.min), args.dynamic_size.max) for v in size)


# ---------------------------------------------------------------------------------------------- tasks
def classify_setup(args: argparse.Namespace, model: torch.nn.Module) -> tuple[PredictionWriter, Callable | None]:
    from mbv3_dense.classification.data import find_classes
    from mbv3_dense.classification.predict import ClassificationWriter
    from mbv3_dense.classification.transforms import eval_transform

    classes = args.classes
    if args.class_names is not None:
        names = find_classes(args.class_names) if args.class_names.is_dir() else \
            [line.strip() for line in args.class_names.read_text().splitlines() if line.strip()]
        if len(names) != model.num_classes:
            raise SystemExit(f"{args.class_names}: {len(names)} class names for a network of {model.num_classes} "
                             f"classes ({args.weights})")
        classes = {"names": names}
    writer = ClassificationWriter(args.out, overwrite=args.overwrite, pictures=args.pictures, class_info=classes)
    resize = args.resize_size or round(args.image_size * 256 / 224)
    return writer, eval_transform(resize_size=resize, crop_size=args.image_size)


def classify_predict(model: torch.nn.Module, net: Callable[[Tensor], object]) -> Predict:
    from mbv3_dense.classification.predict import top_k

    def run(batch: PredictBatch) -> list:
        if batch.inputs is None:
            return []
        return top_k(net(model.normalize(batch.inputs.float() / 255)))
    return run


def detect_setup(args: argparse.Namespace, model: torch.nn.Module) -> tuple[PredictionWriter, Callable | None]:
    from detection.annotations import AnnotationError, read_categories
    from detection.predict import DetectionWriter

    classes = args.classes
    if args.annotations is not None:
        try:
            classes = read_categories(args.annotations, model.num_classes).class_info
        except AnnotationError as err:
            raise SystemExit(f"error: {err}") from err
    writer = DetectionWriter(args.out, overwrite=args.overwrite, pictures=args.pictures, class_info=classes)
    return writer, None


def detect_predict(model: torch.nn.Module, net: Callable[[Tensor], object]) -> Predict:
    def run(batch: PredictBatch) -> list:
        return detect(model, net, [img.float().div(255) for img in batch.images])
    return run


def segment_setup(args: argparse.Namespace, model: torch.nn.Module) -> tuple[PredictionWriter, Callable | None]:
    from segmentation.predict import SegmentationWriter

    return SegmentationWriter(args.out, overwrite=args.overwrite, pictures=args.pictures, class_info=args.classes), None


def segment_predict(model: torch.nn.Module, make_net: Callable[[Tensor], Callable[[Tensor], object]]) -> Predict:
    from segmentation.predict import class_map

    def run(batch: PredictBatch) -> list:
        out = []
        for image in batch.images:
            x = model.normalize(image.float() / 255.0)[None]
            out.append(class_map(make_net(x)(x)))
        return out
    return run


def build_predict(task: str, kind: str, model: torch.nn.Module, args: argparse.Namespace) -> Predict:
    """The function ``batch -> outputs`` of ``task`` on backend ``kind`` (the network exported once)."""
    if task == "classify":
        example = torch.rand(1, 3, args.image_size, args.image_size)
        return classify_predict(model, backend_for(kind, model, example, args, task))
    if task == "detect":
        if kind == "executorch" and args.dynamic_size is not None:  # the program takes the image itself
            example = torch.rand(1, 3, *dynamic_example(args, tuple(model.image_size)))
        else:
            example = model.preprocess([torch.rand(3, *model.image_size)])
        return detect_predict(model, backend_for(kind, model, example, args, task))
    if kind == "torch":
        net = backend_for("torch", model, torch.rand(1, 3, 64, 64), args, task)
        return segment_predict(model, lambda x: net)
    if kind == "executorch" and args.pte is not None:  # one program; each image's size is checked against it
        net = ExecuTorchModel(args.pte, task=task, threads=args.threads)
        log.info("segment: %s takes %s", args.pte, net.size_text())
        return segment_predict(model, lambda x: net)
    if kind == "executorch" and args.dynamic_size is not None:
        net = backend_for(kind, model, model.normalize(torch.rand(1, 3, *dynamic_example(args, (512, 1024)))), args,
                          task)
        return segment_predict(model, lambda x: net)
    cache: OrderedDict[tuple[int, int], Callable] = OrderedDict()

    def make_net(x: Tensor) -> Callable[[Tensor], object]:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        if size not in cache:
            log.info("segment: building the %s network for %dx%d inputs", kind, *size)
            cache[size] = backend_for(kind, model, x, args, task)
            while len(cache) > 4:
                cache.popitem(last=False)
        cache.move_to_end(size)
        return cache[size]
    return segment_predict(model, make_net)


SETUP = {"classify": classify_setup, "detect": detect_setup, "segment": segment_setup}


# ---------------------------------------------------------------------------------------------- benchmark
def torchvision_predict(task: str, args: argparse.Namespace, model: torch.nn.Module) -> Predict | None:
    """A plain loop over torchvision's model of the task with ``--weights`` (a torchvision state dict), or None."""
    import torchvision

    name = {"classify": f"mobilenet_v3_{model.backbone.arch}", "detect": "ssdlite320_mobilenet_v3_large",
            "segment": "lraspp_mobilenet_v3_large"}[task]
    try:
        state = torch.load(args.weights, map_location="cpu", weights_only=True)
        if task == "classify":
            tv = getattr(torchvision.models, name)(num_classes=model.num_classes,
                                                   width_mult=model.backbone.width_mult)
        elif task == "detect":
            tv = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=model.num_classes)
        else:
            tv = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
                weights=None, weights_backbone=None, num_classes=model.num_classes)
        tv.load_state_dict(state)
    except (RuntimeError, KeyError, TypeError, ValueError, AttributeError) as err:
        print(f"# torchvision {name}: not compared, --weights is not its state dict ({str(err)[:120]})")
        return None
    tv.eval()
    if task == "classify":
        def run(batch: PredictBatch) -> list:
            return list(tv(model.normalize(batch.inputs.float() / 255)).softmax(1).topk(5, dim=1).indices)
    elif task == "detect":
        def run(batch: PredictBatch) -> list:
            return tv([img.float().div(255) for img in batch.images])
    else:
        def run(batch: PredictBatch) -> list:
            return [tv(model.normalize(img.float() / 255.0)[None])["out"].argmax(1)[0] for img in batch.images]
    return run


def images_per_second(runs: dict[str, tuple[Predict, list[PredictBatch]]], repeats: int = 3) -> dict[str, float]:
    """Images per second of each ``run`` over its batches: the best of ``repeats`` passes, the
    contenders taking turns (A B C A B C ...) after a warm-up batch each, so that they share the
    machine's load alike."""
    best = dict.fromkeys(runs, float("inf"))
    with torch.inference_mode():
        for run, batches in runs.values():
            run(batches[0])
        for _ in range(repeats):
            for key, (run, batches) in runs.items():
                start = time.perf_counter()
                for batch in batches:
                    run(batch)
                best[key] = min(best[key], time.perf_counter() - start)
    return {key: sum(len(b.files) for b in runs[key][1]) / best[key] for key in runs}


def rebatch(batches: list[PredictBatch], size: int) -> list[PredictBatch]:
    images = [img for b in batches for img in b.images]
    files = [f for b in batches for f in b.files]
    inputs = [x for b in batches if b.inputs is not None for x in b.inputs]
    out = []
    for i in range(0, len(files), size):
        out.append(PredictBatch(images[i:i + size], torch.stack(inputs[i:i + size]) if inputs else None,
                                files[i:i + size], [None] * len(files[i:i + size]), []))
    return out


def benchmark(task: str, args: argparse.Namespace, model: torch.nn.Module, transform: Callable | None,
              images: list) -> list[dict]:
    loader = predict_loader(images, transform=transform, batch_size=1, num_workers=0, max_pixels=args.max_pixels)
    batches = []
    for batch in loader:
        if batch.files:
            batches.append(batch)
        if len(batches) >= args.benchmark_images:
            break
    if not batches:
        return []
    contenders: list[tuple[str, Predict]] = [("ours eager (torch, unfolded)", build_predict_eager(task, model))]
    if args.backend != "torch":
        contenders.append((f"ours {args.backend}", build_predict(task, args.backend, model, args)))
    else:
        contenders.append(("ours torch (BN folded)", build_predict(task, "torch", model, args)))
    tv = torchvision_predict(task, args, model)
    if tv is not None:
        contenders.append(("torchvision eager, plain loop", tv))
    sizes = sorted({1, args.batch_size}) if task != "segment" else [1]  # segment: one image a call anyway
    runs = {(name, bs): (run, rebatch(batches, bs)) for name, run in contenders for bs in sizes
            if bs == 1 or "executorch" not in name}  # ExecuTorch takes batch 1 per call: the same figure
    figures = images_per_second(runs)
    n = sum(len(b.files) for b in batches)
    return [{"task": task, "row": name, "batch": bs, "images": n, "images_per_second": round(ips, 2)}
            for (name, bs), ips in figures.items()]


def build_predict_eager(task: str, model: torch.nn.Module) -> Predict:
    if task == "classify":
        return classify_predict(model, model)
    if task == "detect":
        return detect_predict(model, model)
    return segment_predict(model, lambda x: model)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=sorted(SETUP), default=None,
                   help="default: the one the checkpoint's model record names")
    p.add_argument("--weights", required=True, type=Path,
                   help="our .ckpt (names its task and network) / state dict, or torchvision's state dict")
    p.add_argument("--images", required=True, help="a folder (recursive), a glob or a text file of paths")
    p.add_argument("--out", type=Path, required=True)
    add_model_arguments(p, None)
    p.add_argument("--image-size", type=int, default=224, help="classify: centre-crop size")
    p.add_argument("--resize-size", type=int, default=None, help="classify: short side before the crop")
    p.add_argument("--class-names", type=Path, default=None, help="classify: names file or ImageFolder train/")
    p.add_argument("--annotations", type=Path, default=None, help="detect: COCO instances file (categories)")
    p.add_argument("--backend", choices=BACKENDS, default="torch")
    p.add_argument("--pte", type=Path, default=None,
                   help="executorch: run this .pte (scripts/export.py --format executorch), built for this task")
    p.add_argument("--dynamic-size", default=None, metavar="MIN:MAX",
                   help="executorch, detect and segment: export one program taking any size in MIN..MAX")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS)
    p.add_argument("--no-pictures", dest="pictures", action="store_false")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run's results in --out")
    p.add_argument("--benchmark", action="store_true", help="also time the prediction function (see above)")
    p.add_argument("--benchmark-images", type=int, default=16)
    args = p.parse_args(argv)
    if (args.pte is not None or args.dynamic_size is not None) and args.backend != "executorch":
        p.error("--pte and --dynamic-size need --backend executorch")
    if args.pte is not None and args.dynamic_size is not None:
        p.error("--pte runs the file as it was exported: drop --dynamic-size")
    if args.pte is not None and not args.pte.is_file():
        p.error(f"--pte {args.pte}: no such file")
    if args.dynamic_size is not None:
        try:
            args.dynamic_size = parse_size_range(args.dynamic_size)
        except DynamicSizeError as err:
            p.error(f"--dynamic-size: {err}")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        images = list_images(args.images)
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    note_ignored(images, args.images)
    resolved = model_from_arguments(args.task, args)
    args.task, args.classes = resolved.task, resolved.classes
    log.info("model (%s): %s", args.task, resolved.description)
    model = resolved.model.eval()
    writer, transform = SETUP[args.task](args, model)
    writer.ignored = len(images.ignored)
    try:
        run = build_predict(args.task, args.backend, model, args)
    except (ExecuTorchFileError, DynamicSizeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    loader = predict_loader(images.files, transform=transform, batch_size=args.batch_size, num_workers=args.workers,
                            max_pixels=args.max_pixels)
    try:
        writer.open()
    except FileExistsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        with torch.inference_mode():
            for batch in progress(loader, desc=f"predict {args.task} ({args.backend})", unit="batch"):
                writer.write(batch, run(batch))
    except ExecuTorchInputError as err:
        print(f"error: {', '.join(str(f) for f in batch.files)}: {err}", file=sys.stderr)
        return 2
    finally:
        summary = writer.close()
    if args.benchmark:
        rows = benchmark(args.task, args, model, transform, images.files)
        print(f"throughput ({args.task}, {torch.get_num_threads()} threads; preprocess + network + postprocess, "
              "no decoding or writing):")
        for r in rows:
            print(f"  {r['row']:<34} batch {r['batch']:>3}: {r['images_per_second']:8.2f} images/s "
                  f"({r['images']} images)")
    return 0 if summary["written"] > 0 else 1


if __name__ == "__main__":
    sys.exit(main())
