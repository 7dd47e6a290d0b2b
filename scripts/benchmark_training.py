"""Training throughput, ours against torchvision: the train step on the device and the data pipeline per worker.

    python scripts/benchmark_training.py [--tasks classify,detect,segment] [--device cpu|cuda]
        [--precision 32-true|bf16-mixed|16-mixed] [--channels-last] [--compile] [--batch-size N]
        [--steps N] [--json OUT] [--workdir DIR] [--quick]

Two measurements per task, each timed in turns (ours, torchvision, torchvision, ours, ...) after a
warm-up, so the ratio is measured under the same machine load; the figure is the median of the turns.

Train step (images/s of forward + loss + backward + optimizer step, on ``--device``), at the training
shape and per-device batch of the task's config (read from ``configs/``; ``--batch-size`` overrides):

- classify (``mobilenet_v3_large_imagenet.yaml``): 224x224 crops, batch 128.
- detect (``ssdlite_mobilenet_v3_large_coco.yaml``): 320x320 inputs, batch 24.
- segment (``lraspp_mobilenet_v3_large_cityscapes.yaml``): 769x769 crops, batch 8.

"Ours" is the config's LightningModule (model, loss, optimizer type and arguments as configured), built
with its data module as ``lightning fit -c CONFIG`` builds them (the project's CLI with ``run=False``: the
network's classes follow the generated data, 4 ImageNet-like ones for the classifier, and torchvision's
model gets the same count), stepped as Lightning's automatic optimization steps it: the data module's and module's
``on_after_batch_transfer``, ``training_step`` under autocast, backward, optimizer step, and the
module's per-step weight average when the config keeps one (``ema_decay``). The batch is one real
batch of the config's data module (its dataset and collate function) on generated files, moved to
the device once. "torchvision" is ``torchvision.models.mobilenet_v3_large``,
``detection.ssdlite320_mobilenet_v3_large`` (its own loss from its training-mode forward, which also
resizes and normalises the images) or ``segmentation.lraspp_mobilenet_v3_large``, trained with the
same kind of loss (cross-entropy; SSD's; cross-entropy ignoring 255) and the same optimizer in a
plain PyTorch loop, on the same images (uint8 batches are converted to the float input it expects).
Both use the learning rate the module's ``configure_optimizers`` sets with the Trainer attached (the config's,
scaled to the global batch: ``lr_batch_size``). ``--precision``: autocast to bf16 or
fp16 (with a gradient scaler) on the device; ``--channels-last``: both models and inputs in
channels-last memory format; ``--compile``: both networks wrapped in ``torch.compile``.

Data pipeline (images/s of ``dataset[i]`` in one process with one thread: one loader worker), at
real resolutions on files generated in ``--workdir``: ImageNet-like 500x375 JPEGs, COCO-like
JPEGs of 480-640 px a side with about 7 boxes, Cityscapes-sized 2048x1024 PNG pairs. Ours is the
training dataset of the config's data module, whatever its current implementation; the reference
is a torchvision-references-style pipeline for the same augmentation: PIL decode, then
``torchvision.transforms.v2`` on the uint8 tensor (the references' ``--backend tensor``, faster here
than their PIL backend for all three): RandomResizedCrop, flip, AutoAugment, ToDtype, Normalize,
RandomErasing; RandomIoUCrop (and zoom-out when configured), flip, resize, to float;
RandomResize (scale range), RandomCrop with padding, flip, normalise.

PNG decoders (``--measure decode``, Cityscapes only): milliseconds per 2048x1024 image and per label of
each PNG decoder the package index serves, in the same one-thread process and interleaved turns as the
pipeline: PIL (the reference pipeline's), OpenCV (this project's reader before), libspng through ``pyspng``,
imagecodecs' libpng and libspng (when imagecodecs is installed; it is not a dependency), then this project's
reader (``mbv3_dense.data.image_io``: the CRC and completeness checks, then libspng) decoding whole frames and
decoding only down to the last row the training crop reads (the config's own scale-crop-flip draws).

Output: a table (ours and torchvision images/s, ratio ours/torchvision, the issue's target) and
with ``--json OUT`` one JSON object ``{"meta": {...}, "rows": [...], "decoders": [...]}``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from lightning.pytorch.cli import LightningCLI
from PIL import Image
from torch import Tensor, nn
from torchvision import tv_tensors
from torchvision.transforms import v2
from tqdm import tqdm

from mbv3_dense.checkpoints.model_record import TASKS, task_list
from mbv3_dense.constants import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "classify": REPO / "configs" / "mobilenet_v3_large_imagenet.yaml",
    "detect": REPO / "configs" / "ssdlite_mobilenet_v3_large_coco.yaml",
    "segment": REPO / "configs" / "lraspp_mobilenet_v3_large_cityscapes.yaml",
}
PRECISIONS = {"32-true": None, "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}
# Issue 13's targets for ours / torchvision (train step on the CPU; data pipeline per worker).
TRAIN_TARGET = 1.0
PIPELINE_TARGETS = {"classify": 1.0, "detect": 1.2, "segment": 1.5}


@dataclass(frozen=True)
class DataSizes:
    """What is generated on disk (the real resolutions, or tiny ones with ``--quick``)."""

    imagenet_size: tuple[int, int]  # (width, height) of each JPEG
    imagenet_classes: int
    imagenet_per_class: int
    coco_sides: tuple[int, int]  # min and max side
    coco_images: int
    coco_max_objects: int  # objects per image drawn in 1..max: about 7 on average for 13
    cityscapes_size: tuple[int, int]  # (height, width)
    cityscapes_per_city: int  # 3 training cities


REAL_DATA = DataSizes((500, 375), 4, 16, (480, 640), 48, 13, (1024, 2048), 2)
QUICK_DATA = DataSizes((160, 120), 2, 3, (160, 224), 4, 5, (128, 256), 1)


@dataclass
class Row:
    """One line of the table: a task's train step or data pipeline, ours against torchvision."""

    task: str
    what: str
    input: str
    batch: int
    ours_img_s: float
    torchvision_img_s: float
    ratio: float
    target: float
    meets_target: bool
    turns: int
    note: str = ""


# ---------------------------------------------------------------------------------------------- set-up
def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name, core count and torch's thread count."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"cuda: {props.name} ({props.total_memory / 2**30:.0f} GiB, sm {props.major}{props.minor})"
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"cpu: {name}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def build_run(task: str, args: argparse.Namespace, root: Path) -> LightningCLI:
    """The config's module, data module and Trainer as ``lightning fit -c CONFIG --data.root ROOT`` builds them
    (the project's CLI, ``run=False``): the network's classes follow the data, the scheduler's length the
    trainer's. The data module loads in this process (no workers), ``--batch-size`` per device, and is set up
    for fitting; ``--quick`` shrinks its training shapes."""
    from mbv3_dense.training.cli import MBV3CLI

    options = ["-c", str(CONFIGS[task]), "--seed_everything", str(args.seed), "--data.root", str(root),
               "--data.num_workers", "0", "--trainer.accelerator", "gpu" if args.device == "cuda" else "cpu",
               "--trainer.devices", "1", "--trainer.logger", "false", "--trainer.default_root_dir", str(root.parent),
               # The Trainer only gives the module its global batch (the LR scaling); --precision is applied below.
               "--trainer.precision", "32-true"]
    if args.batch_size:
        options += ["--data.batch_size", str(args.batch_size)]
    for key, value in (quick_overrides(task) if args.quick else {}).items():
        options += [f"--data.{key}", json.dumps(value)]
    for name in ("lightning.pytorch", "lightning.fabric"):  # not "Seed set to 0", "GPU available: ..."
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():  # that this script's own command line is not the CLI's: it is not
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended to run from within")
        cli = MBV3CLI(args=options, run=False)
    cli.datamodule.setup("fit")
    return cli


def configured_optimizers(cli: LightningCLI, theirs: nn.Module) -> tuple[torch.optim.Optimizer,
                                                                       torch.optim.Optimizer, float]:
    """Our module's optimizer as its ``configure_optimizers`` builds it in ``fit`` (the Trainer attached: the
    learning rate scaled to the global batch), and the config's optimizer over torchvision's parameters at that
    learning rate; and the rate."""
    module, trainer = cli.model, cli.trainer
    trainer.datamodule, module.trainer = cli.datamodule, trainer
    try:
        configured = module.configure_optimizers()
    finally:
        module.trainer = None  # detached again: self.log() without a Trainer does nothing
    ours = configured["optimizer"] if isinstance(configured, dict) else configured
    lr = next(group["lr"] for group in ours.param_groups if not group.get("name", "").startswith("backbone"))
    their_optimizer = module.optimizer(theirs.parameters())
    for group in their_optimizer.param_groups:
        group["lr"] = lr
    return ours, their_optimizer, lr


# ---------------------------------------------------------------------------------------------- data on disk
def generate_imagenet(root: Path, sizes: DataSizes) -> None:
    """``root/{train,val}/<class>/*.JPEG``: the project's synthetic shapes, cut to ImageNet's typical 500x375."""
    from mbv3_dense.classification.synthetic import KINDS, draw_image

    width, height = sizes.imagenet_size
    kinds = list(KINDS)[:sizes.imagenet_classes]
    for split, count in (("train", sizes.imagenet_per_class), ("val", 1)):
        for label, kind in enumerate(kinds):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                rng = np.random.default_rng([label, i, split == "val"])
                image = draw_image(kind, max(width, height), rng).crop((0, 0, width, height))
                image.save(folder / f"{kind}_{i:05d}.JPEG", quality=90)


def generate_data(workdir: Path, sizes: DataSizes) -> dict[str, Path]:
    """Write the three datasets in their real on-disk layouts (skipped when already there)."""
    from detection.synthetic import DetectionSpec, generate_coco
    from segmentation.synthetic import CityscapesSpec, generate_cityscapes

    roots = {task: workdir / name for task, name in (("classify", "imagenet"), ("detect", "coco"),
                                                       ("segment", "cityscapes"))}
    stamp = workdir / f"generated-{'-'.join(str(v) for v in asdict(sizes).values())}"
    if stamp.exists():
        return roots
    start = time.perf_counter()
    generate_imagenet(roots["classify"], sizes)
    generate_coco(roots["detect"], DetectionSpec(
        train_images=sizes.coco_images, val_images=2, min_side=sizes.coco_sides[0], max_side=sizes.coco_sides[1],
        min_object=min(56, sizes.coco_sides[0] // 4), max_objects=sizes.coco_max_objects, empty_fraction=0.0))
    height, width = sizes.cityscapes_size
    generate_cityscapes(roots["segment"], CityscapesSpec(height=height, width=width,
                                                         train_per_city=sizes.cityscapes_per_city, val_per_city=1))
    stamp.touch()
    print(f"# generated the data in {workdir} in {time.perf_counter() - start:.1f} s", flush=True)
    return roots


# ---------------------------------------------------------------------------------------------- batches
def images_of(batch: object) -> Tensor:
    return batch.images if hasattr(batch, "images") else batch[0]


def targets_of(batch: object) -> object:
    return batch.labels if hasattr(batch, "labels") else batch[1]


def map_images(batch: object, fn: Callable[[Tensor], Tensor]) -> object:
    """``batch`` with ``fn`` applied to its image tensor (the first field)."""
    images = images_of(batch)
    if not isinstance(images, Tensor) or images.dim() != 4:
        return batch
    if hasattr(batch, "_replace"):
        return batch._replace(**{batch._fields[0]: fn(images)})
    return type(batch)((fn(images), *batch[1:]))


def batch_hook(module: nn.Module, datamodule: object, name: str) -> Callable:
    """The hook Lightning calls: the data module's when it overrides it, else the module's."""
    import lightning as L

    if getattr(type(datamodule), name, None) is not getattr(L.LightningDataModule, name):
        return getattr(datamodule, name)
    return getattr(module, name)


def real_batch(datamodule: object, module: nn.Module, batch: int, device: torch.device,
               channels_last: bool) -> object:
    """One training batch of the data module (its dataset and collate function), on ``device``."""
    loader = datamodule.train_dataloader()
    dataset = loader.dataset
    samples = [dataset[i % len(dataset)] for i in range(batch)]
    out = loader.collate_fn(samples)
    out = batch_hook(module, datamodule, "on_before_batch_transfer")(out, 0)
    out = batch_hook(module, datamodule, "transfer_batch_to_device")(out, device, 0)
    if channels_last:
        out = map_images(out, lambda x: x.contiguous(memory_format=torch.channels_last))
    return out


def torchvision_input(task: str, images: Tensor, channels_last: bool) -> Tensor:
    """What torchvision's training loop feeds its model: float images, normalised for the classifier and
    LR-ASPP, in [0, 1] for SSDLite (its forward normalises). Float batches are taken as they are."""
    if not images.is_floating_point():
        images = images.float().div_(255)
        if task != "detect":
            mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
            images = (images - mean) / std
    return images.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


# ---------------------------------------------------------------------------------------------- train step
class Precision:
    """Autocast (and for fp16 a gradient scaler) as Lightning's mixed-precision plugin applies them."""

    def __init__(self, name: str, device: torch.device) -> None:
        self.dtype = PRECISIONS[name]
        self.device = device
        self.scaler = torch.amp.GradScaler(device.type) if self.dtype is torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: Tensor, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)
            self.scaler.update()
        optimizer.zero_grad(set_to_none=True)


def ours_step(module: nn.Module, datamodule: object, batch: object, optimizer: torch.optim.Optimizer,
              precision: Precision) -> Callable[[], None]:
    """One training iteration of our module, as Lightning's automatic optimization runs it."""
    from mbv3_dense.classification.module import ema_update

    after_transfer = batch_hook(module, datamodule, "on_after_batch_transfer")
    module.train()

    def step() -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log() without a Trainer warns and does nothing
            with precision.autocast():
                loss = module.training_step(after_transfer(batch, 0), 0)
        if loss is None:  # the module skipped the batch
            return
        precision.step(loss, optimizer)
        average = getattr(module, "model_ema", None)
        if average is not None:  # ClassificationModule.optimizer_step's weight average
            ema_update(average, module.model, module.ema_decay)

    return step


def torchvision_model(task: str, num_classes: int) -> nn.Module:
    if task == "classify":
        return torchvision.models.mobilenet_v3_large(num_classes=num_classes)
    if task == "detect":
        return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                          num_classes=num_classes)
    return torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=num_classes)


def torchvision_step(task: str, model: nn.Module, batch: object, optimizer: torch.optim.Optimizer,
                     precision: Precision, channels_last: bool) -> Callable[[], None]:
    """One iteration of a plain PyTorch loop on torchvision's model with the same kind of loss."""
    images = torchvision_input(task, images_of(batch), channels_last)
    targets = targets_of(batch)
    if task == "detect":
        image_list = list(images)
        targets = [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets]
    elif task == "segment":
        targets = targets.long()
    model.train()

    def step() -> None:
        with precision.autocast():
            if task == "classify":
                loss = F.cross_entropy(model(images), targets)
            elif task == "detect":
                loss = sum(model(image_list, targets).values())
            else:
                loss = F.cross_entropy(model(images)["out"], targets, ignore_index=255)
        precision.step(loss, optimizer)

    return step


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(calls: dict[str, Callable[[], object]], *, items: int, warmup: int, turns: int,
                      device: torch.device, desc: str) -> dict[str, float]:
    """Items per second of each call, median over ``turns`` timed turns taken in alternating order
    (A B, B A, ...) after ``warmup`` untimed turns each; CUDA is synchronised before each clock read."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    with tqdm(total=(warmup + turns) * len(names), desc=desc, unit="turn", file=sys.stderr, leave=False,
              mininterval=5.0) as progress:
        for turn in range(warmup + turns):
            for name in names if turn % 2 == 0 else names[::-1]:
                sync(device)
                start = time.perf_counter()
                calls[name]()
                sync(device)
                if turn >= warmup:
                    times[name].append(time.perf_counter() - start)
                progress.update()
    return {name: items / statistics.median(values) for name, values in times.items()}


def train_step_row(task: str, args: argparse.Namespace, cli: LightningCLI, device: torch.device) -> Row:
    module, datamodule, batch_size = cli.model, cli.datamodule, cli.datamodule.batch_size
    torch.manual_seed(args.seed)
    theirs = torchvision_model(task, int(cli.config.get("model.init_args.model.init_args.num_classes") or 91))
    module.to(device)
    theirs.to(device)
    if args.channels_last:
        module.to(memory_format=torch.channels_last)
        theirs.to(memory_format=torch.channels_last)
    if args.compile:
        module.model = torch.compile(module.model)
        theirs = torch.compile(theirs)
    optimizer, their_optimizer, lr = configured_optimizers(cli, theirs)
    batch = real_batch(datamodule, module, batch_size, device, args.channels_last)
    precision = Precision(args.precision, device)
    calls = {"ours": ours_step(module, datamodule, batch, optimizer, precision),
             "torchvision": torchvision_step(task, theirs, batch, their_optimizer, Precision(args.precision, device),
                                             args.channels_last)}
    rates = interleaved_rates(calls, items=batch_size, warmup=args.warmup, turns=args.steps, device=device,
                              desc=f"{task} train step")
    height, width = images_of(batch).shape[-2:]
    note = f"{type(optimizer).__name__} lr {lr:.4g}"
    if getattr(module, "model_ema", None) is not None:
        note += "; ours also updates its weight average (ema_decay) every step"
    ratio = rates["ours"] / rates["torchvision"]
    return Row(task, "train step", f"{height}x{width}", batch_size, rates["ours"], rates["torchvision"], ratio,
               TRAIN_TARGET, ratio >= TRAIN_TARGET, args.steps, note)


# ---------------------------------------------------------------------------------------------- data pipeline
def reference_classify(root: Path, data_args: dict) -> tuple[Callable[[int], object], int]:
    """torchvision references' ImageNet training preset (tensor backend) over ``root/train``."""
    samples = [(path, label) for label, folder in enumerate(sorted(p for p in (root / "train").iterdir() if p.is_dir()))
               for path in sorted(folder.iterdir())]
    steps: list[v2.Transform] = [v2.ToImage(), v2.RandomResizedCrop(data_args.get("crop_size", 224),
                                                      scale=tuple(data_args.get("crop_scale", (0.08, 1.0))),
                                                      antialias=True)]
    if data_args.get("hflip", True):
        steps.append(v2.RandomHorizontalFlip())
    if data_args.get("auto_augment", True):
        steps.append(v2.AutoAugment(v2.AutoAugmentPolicy.IMAGENET))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if data_args.get("random_erase", 0.2) > 0:
        steps.append(v2.RandomErasing(p=data_args.get("random_erase", 0.2)))
    transform = v2.Compose(steps)

    def item(index: int) -> tuple[Tensor, int]:
        path, label = samples[index % len(samples)]
        with Image.open(path) as image:
            return transform(image.convert("RGB")), label

    return item, len(samples)


def reference_detect(root: Path, data_args: dict) -> tuple[Callable[[int], object], int]:
    """torchvision references' SSDLite preset (tensor backend): IoU crop (and zoom-out when configured),
    flip, then the resize our pipeline also does, to a float tensor; crowd boxes left out as ours does."""
    coco = json.loads((root / "annotations" / "instances_train2017.json").read_text())
    boxes: dict[int, list[list[float]]] = {image["id"]: [] for image in coco["images"]}
    labels: dict[int, list[int]] = {image["id"]: [] for image in coco["images"]}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd", 0):
            x, y, w, h = ann["bbox"]
            boxes[ann["image_id"]].append([x, y, x + w, y + h])
            labels[ann["image_id"]].append(ann["category_id"])
    images = [(root / "train2017" / image["file_name"], image["id"]) for image in coco["images"]
              if boxes[image["id"]]]
    size = data_args.get("image_size", 320)
    steps: list[v2.Transform] = [v2.ToImage()]
    if data_args.get("photometric_p", 0.0) > 0:
        steps.append(v2.RandomPhotometricDistort(p=data_args["photometric_p"]))
    if data_args.get("zoom_out_p", 0.0) > 0:
        steps.append(v2.RandomZoomOut(fill={tv_tensors.Image: (123, 117, 104), "others": 0}, p=data_args["zoom_out_p"]))
    if data_args.get("iou_crop", True):
        steps.append(v2.RandomIoUCrop())
    steps += [v2.RandomHorizontalFlip(p=data_args.get("hflip_p", 0.5)), v2.Resize((size, size), antialias=True),
              v2.ToDtype(torch.float32, scale=True), v2.SanitizeBoundingBoxes(), v2.ToPureTensor()]
    transform = v2.Compose(steps)

    def item(index: int) -> tuple[Tensor, dict]:
        path, image_id = images[index % len(images)]
        with Image.open(path) as image:
            image = image.convert("RGB")
        target = {"boxes": tv_tensors.BoundingBoxes(boxes[image_id], format="XYXY",
                                                    canvas_size=(image.height, image.width)),
                  "labels": torch.tensor(labels[image_id])}
        return transform(image, target)

    return item, len(images)


def reference_segment(root: Path, data_args: dict, height: int) -> tuple[Callable[[int], object], int]:
    """torchvision references' segmentation preset (tensor backend): RandomResize over the scale range,
    RandomCrop padded with 0 (image) and 255 (mask), flip, normalise; labelIds mapped to trainIds."""
    from cityscapesscripts.helpers.labels import labels as cityscapes_labels

    lut = np.full(256, 255, dtype=np.uint8)
    for label in cityscapes_labels:
        if 0 <= label.id < 256 and 0 <= label.trainId < 255:
            lut[label.id] = label.trainId
    pairs = [(path, root / "gtFine" / "train" / path.parent.name /
              path.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png"))
             for path in sorted((root / "leftImg8bit" / "train").glob("*/*_leftImg8bit.png"))]
    low, high = data_args.get("scale_range", (0.5, 2.0))
    crop = list(data_args.get("crop_size", (769, 769)))
    steps: list[v2.Transform] = [
        v2.ToImage(),
        v2.RandomResize(int(low * height), int(high * height), antialias=True),
        v2.RandomCrop(crop, pad_if_needed=True, fill={tv_tensors.Mask: 255, "others": 0}),
    ]
    if data_args.get("hflip", True):
        steps.append(v2.RandomHorizontalFlip())
    steps += [v2.ToDtype({tv_tensors.Image: torch.float32, "others": None}, scale=True),
              v2.Normalize(IMAGENET_MEAN, IMAGENET_STD), v2.ToPureTensor()]
    transform = v2.Compose(steps)

    def item(index: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = pairs[index % len(pairs)]
        with Image.open(image_path) as image, Image.open(label_path) as label:
            image = image.convert("RGB")
            mask = tv_tensors.Mask(torch.from_numpy(lut[np.asarray(label)]))
        return transform(image, mask)

    return item, len(pairs)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """One loader worker's share of the machine: one torch thread and one OpenCV thread."""
    import cv2

    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    try:
        yield
    finally:
        torch.set_num_threads(torch_threads)
        cv2.setNumThreads(cv2_threads)


def pipeline_row(task: str, args: argparse.Namespace, cli: LightningCLI, root: Path, sizes: DataSizes) -> Row:
    dataset = cli.datamodule.train_dataloader().dataset
    data_args = cli.config.data.init_args.as_dict()  # the data module's arguments, its defaults included
    if task == "classify":
        reference, count = reference_classify(root, data_args)
        width, height = sizes.imagenet_size
        what = f"{width}x{height} JPEG"
    elif task == "detect":
        reference, count = reference_detect(root, data_args)
        what = f"{sizes.coco_sides[0]}-{sizes.coco_sides[1]} px JPEG"
    else:
        reference, count = reference_segment(root, data_args, sizes.cityscapes_size[0])
        height, width = sizes.cityscapes_size
        what = f"{width}x{height} PNG pair"
    per_turn = args.pipeline_samples[task]
    counter = {"ours": 0, "torchvision": 0}

    def run(name: str, get: Callable[[int], object], length: int) -> Callable[[], None]:
        def turn() -> None:
            for _ in range(per_turn):
                get(counter[name] % length)
                counter[name] += 1
        return turn

    torch.manual_seed(args.seed)
    with one_thread():
        rates = interleaved_rates({"ours": run("ours", dataset.__getitem__, len(dataset)),
                                   "torchvision": run("torchvision", reference, count)},
                                  items=per_turn, warmup=1, turns=args.pipeline_turns, device=torch.device("cpu"),
                                  desc=f"{task} data pipeline")
    ratio = rates["ours"] / rates["torchvision"]
    sample = dataset[0]
    out = images_of(sample) if isinstance(sample, tuple | list) else sample
    note = f"ours yields {str(out.dtype).removeprefix('torch.')} {'x'.join(str(s) for s in out.shape)}"
    return Row(task, "data pipeline, 1 worker", what, 1, rates["ours"], rates["torchvision"], ratio,
               PIPELINE_TARGETS[task], ratio >= PIPELINE_TARGETS[task], args.pipeline_turns, note)


# ---------------------------------------------------------------------------------------------- PNG decoders
@dataclass
class DecodeRow:
    """One PNG decoder on the Cityscapes files: ms per image and per label, and PIL's time over its own."""

    decoder: str
    image_ms: float
    label_ms: float
    pair_ms: float
    vs_pil: float
    turns: int
    note: str = ""


def crop_rows(transform: object, height: int, width: int, key: object) -> int:
    """How many rows of a ``height x width`` frame the training crop of ``key`` reads: its scale-crop-flip draw
    (the dataset's own, from the key) gives the crop's last row in the scaled frame; its source row and the row
    below it (bilinear interpolation) are the last ones needed. A measurement helper: the datasets decode whole
    frames today."""
    from mbv3_dense.data.sampling import sample_randomness

    with sample_randomness(key) as generators:
        draw = transform.draw(height, width, generators.python)
    scaled = int(height * draw.scale)
    last = min(transform.crop_size[0], scaled - draw.top) - 1 + draw.top  # the crop's last row inside the frame
    if last < 0:
        return 1
    return min(height, math.floor((last + 0.5) * height / scaled - 0.5) + 2)


def png_decoders() -> dict[str, tuple[Callable[[Path], object], Callable[[Path], object], str]]:
    """``name -> (decode an image file, decode a label file, note)`` for every PNG decoder that is installed."""
    import cv2
    import pyspng

    from mbv3_dense.data.image_io import read_image_rgb, read_label_png

    def pil_image(path: Path) -> object:
        with Image.open(path) as image:
            return np.asarray(image.convert("RGB"))

    def pil_label(path: Path) -> object:
        with Image.open(path) as label:
            return np.asarray(label)

    decoders = {
        "PIL": (pil_image, pil_label, "the reference pipeline's decoder"),
        "OpenCV": (lambda p: cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_COLOR_RGB),
                   lambda p: cv2.imdecode(np.frombuffer(p.read_bytes(), np.uint8), cv2.IMREAD_UNCHANGED),
                   "mbv3_dense.data.image_io before libspng"),
        "libspng (pyspng)": (lambda p: pyspng.load(p.read_bytes(), "RGB"), lambda p: pyspng.load(p.read_bytes(), "L"),
                             f"pyspng {pyspng.__version__}, no checks"),
    }
    try:
        import imagecodecs
    except ImportError:
        pass
    else:
        decoders["imagecodecs libpng"] = (lambda p: imagecodecs.png_decode(p.read_bytes()),
                                          lambda p: imagecodecs.png_decode(p.read_bytes()),
                                          f"imagecodecs {imagecodecs.__version__}")
        decoders["imagecodecs libspng"] = (lambda p: imagecodecs.spng_decode(p.read_bytes()),
                                           lambda p: imagecodecs.spng_decode(p.read_bytes()),
                                           f"imagecodecs {imagecodecs.__version__}")
    decoders["ours, whole frame"] = (read_image_rgb, read_label_png, "image_io: CRC checks, then libspng")
    return decoders


def decode_rows(args: argparse.Namespace, datamodule: object, sizes: DataSizes) -> list[DecodeRow]:
    """Each PNG decoder timed on the training split's files in interleaved one-thread turns (as the pipeline)."""
    from mbv3_dense.data.image_io import read_image_rgb, read_label_png
    from mbv3_dense.data.sampling import SampleKey

    dataset = datamodule.train_dataloader().dataset
    pairs, transform = dataset.pairs, dataset.transform
    height, width = sizes.cityscapes_size
    per_turn = args.pipeline_samples["segment"]
    turns = args.pipeline_turns + 1  # one warm-up turn
    # The samples of each turn, with the rows their training crops read (epoch = how often the files came round).
    samples = [(pairs[i % len(pairs)], crop_rows(transform, height, width, SampleKey(i % len(pairs),
                                                                                      i // len(pairs), args.seed)))
               for i in range(per_turn * turns)]
    decoders = png_decoders()
    decoders["ours, to the crop's last row"] = (read_image_rgb, read_label_png,
                                                "image_io with rows=: stops inflating below the crop")
    counters: dict[str, int] = {}

    def call(name: str, which: int) -> Callable[[], None]:
        decode, rows_wanted = decoders[name][which], name == "ours, to the crop's last row"
        key = f"{name}/{which}"
        counters[key] = 0

        def turn() -> None:
            for _ in range(per_turn):
                (image, label), rows = samples[counters[key] % len(samples)]
                path = (image, label)[which]
                decode(path, rows=rows) if rows_wanted else decode(path)
                counters[key] += 1
        return turn

    calls = {f"{name}/{which}": call(name, which) for name in decoders for which in (0, 1)}
    with one_thread():
        rates = interleaved_rates(calls, items=per_turn, warmup=1, turns=args.pipeline_turns,
                                  device=torch.device("cpu"), desc="segment PNG decoders")
    fraction = statistics.mean(rows for _, rows in samples) / height
    rows_out = []
    pil_pair = 1000 / rates["PIL/0"] + 1000 / rates["PIL/1"]
    for name, (_, _, note) in decoders.items():
        image_ms, label_ms = 1000 / rates[f"{name}/0"], 1000 / rates[f"{name}/1"]
        if name == "ours, to the crop's last row":
            note += f"; {fraction:.0%} of the rows on average"
        rows_out.append(DecodeRow(name, image_ms, label_ms, image_ms + label_ms, pil_pair / (image_ms + label_ms),
                                  args.pipeline_turns, note))
    return rows_out


DECODE_HEADER = f"{'PNG decoder (segment)':32} {'image ms':>9} {'label ms':>9} {'pair ms':>8} {'vs PIL':>7}  note"


def print_decode_rows(rows: list[DecodeRow]) -> None:
    print(DECODE_HEADER)
    print("-" * len(DECODE_HEADER))
    for row in rows:
        print(f"{row.decoder:32} {row.image_ms:9.2f} {row.label_ms:9.2f} {row.pair_ms:8.2f} {row.vs_pil:6.2f}x  "
              f"{row.note}", flush=True)


# ---------------------------------------------------------------------------------------------- main
def quick_overrides(task: str) -> dict:
    """Tiny training shapes for ``--quick`` (the figures then mean nothing)."""
    return {"classify": {"crop_size": 64, "val_resize_size": 72}, "detect": {},
            "segment": {"crop_size": [128, 128]}}[task]


def run_task(task: str, args: argparse.Namespace, root: Path, sizes: DataSizes, device: torch.device) -> list[Row]:
    if not set(args.measure) & {"train", "pipeline"} and not (task == "segment" and "decode" in args.measure):
        return []
    cli = build_run(task, args, root)
    rows = []
    if "train" in args.measure:
        rows.append(train_step_row(task, args, cli, device))
        print_row(rows[-1])
    if "pipeline" in args.measure:
        rows.append(pipeline_row(task, args, cli, root, sizes))
        print_row(rows[-1])
    if "decode" in args.measure and task == "segment":
        args.decode_rows = decode_rows(args, cli.datamodule, sizes)
        print_decode_rows(args.decode_rows)
    return rows


HEADER = f"{'task':9} {'what':25} {'input':22} {'batch':>5} {'ours img/s':>11} {'tv img/s':>10} {'ratio':>6} " \
         f"{'target':>6}"


def print_row(row: Row) -> None:
    mark = "ok" if row.meets_target else "below"
    print(f"{row.task:9} {row.what:25} {row.input:22} {row.batch:5d} {row.ours_img_s:11.2f} "
          f"{row.torchvision_img_s:10.2f} {row.ratio:6.2f} {row.target:>5.1f}x {mark}", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", type=task_list, default=",".join(TASKS),
                        help="comma-separated subset of " + ", ".join(TASKS))
    parser.add_argument("--measure", default="train,pipeline",
                        help="comma-separated: train (train step), pipeline (data pipeline), decode (the PNG "
                             "decoders on the Cityscapes files); default train,pipeline")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--precision", choices=tuple(PRECISIONS), default="32-true")
    parser.add_argument("--channels-last", action="store_true", help="models and inputs in channels-last format")
    parser.add_argument("--compile", action="store_true", help="wrap both networks in torch.compile")
    parser.add_argument("--batch-size", type=int, default=None, help="train-step batch (default: the config's)")
    parser.add_argument("--steps", type=int, default=5, help="timed train steps per contender")
    parser.add_argument("--warmup", type=int, default=1, help="untimed train steps per contender first")
    parser.add_argument("--pipeline-turns", type=int, default=4, help="timed data-pipeline turns per contender")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for the train step (default: torch's)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the generated data go (kept; reused when already there); default a temp dir")
    parser.add_argument("--json", type=Path, default=None, help="write the rows and the set-up here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="tiny data, shapes, batches and turns: a smoke test (the figures mean nothing)")
    args = parser.parse_args(argv)
    args.measure = [m.strip() for m in args.measure.split(",") if m.strip()]
    if not args.measure or set(args.measure) - {"train", "pipeline", "decode"}:
        parser.error(f"--measure takes train, pipeline and/or decode, got {args.measure}")
    if args.measure == ["decode"] and "segment" not in args.tasks:
        parser.error("--measure decode times the Cityscapes PNG decoders: include segment in --tasks")
    args.decode_rows = []
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if min(args.steps, args.pipeline_turns) < 1 or args.warmup < 0:
        parser.error("--steps and --pipeline-turns must be at least 1, --warmup at least 0")
    # Samples per data-pipeline turn: about 1-2 s of work each at the real resolutions.
    args.pipeline_samples = {"classify": 32, "detect": 32, "segment": 8}
    if args.quick:
        args.batch_size = args.batch_size or 2
        args.steps, args.warmup, args.pipeline_turns = min(args.steps, 2), min(args.warmup, 1), 2
        args.pipeline_samples = {"classify": 2, "detect": 2, "segment": 1}
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = QUICK_DATA if args.quick else REAL_DATA
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  "
          f"{device_description(device)}  torch {torch.__version__}  torchvision {torchvision.__version__}")
    print(f"# train step on {device}: precision {args.precision}, channels_last {args.channels_last}, "
          f"compile {args.compile}, {args.steps} timed steps after {args.warmup} warm-up each; data pipeline: "
          f"1 process, 1 thread, {args.pipeline_turns} timed turns each")
    print(f"# command: python {' '.join(sys.argv)}", flush=True)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="benchmark_training_") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        roots = generate_data(workdir, sizes)
        if set(args.measure) & {"train", "pipeline"}:
            print(HEADER)
            print("-" * len(HEADER), flush=True)
        for task in args.tasks:
            rows += run_task(task, args, roots[task], sizes, device)
    if rows:
        print("\n" + HEADER)
        print("-" * len(HEADER))
    for row in rows:
        print_row(row)
    if args.decode_rows:
        print()
        print_decode_rows(args.decode_rows)
    for row in rows:
        if row.note:
            print(f"# {row.task} {row.what}: {row.note}")
    if args.json is not None:
        meta = {"time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                "device": device_description(device), "threads": torch.get_num_threads(),
                "torch": torch.__version__, "torchvision": torchvision.__version__,
                "precision": args.precision, "channels_last": args.channels_last, "compile": args.compile,
                "steps": args.steps, "warmup": args.warmup, "pipeline_turns": args.pipeline_turns,
                "quick": args.quick, "command": " ".join(sys.argv)}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "rows": [asdict(r) for r in rows],
                                         "decoders": [asdict(r) for r in args.decode_rows]}, indent=2) + "\n")
    bad = [r for r in rows if not (math.isfinite(r.ours_img_s) and math.isfinite(r.torchvision_img_s))]
    bad += [r for r in args.decode_rows if not math.isfinite(r.pair_ms)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
