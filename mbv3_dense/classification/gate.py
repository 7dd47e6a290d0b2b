"""The classifier's held-out data for ``scripts/export.py --gate``: top-1 on an image folder
(:mod:`mbv3_dense.deploy.gate`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mbv3_dense.data.image_io import read_image_rgb
from mbv3_dense.deploy.gate import GateData, GateDataError
from mbv3_dense.training.progress import progress


def _image_folder_split(root: Path) -> Path:
    """``root/val`` when it holds the class folders, else ``root`` itself."""
    val = root / "val"
    return val if val.is_dir() and any(p.is_dir() for p in val.iterdir()) else root


def is_image_folder(root: Path) -> bool:
    """Class folders holding images, in ``root`` or ``root/val``."""
    from mbv3_dense.data.listing import IMAGE_EXTENSIONS

    split = _image_folder_split(root)
    return any(p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
               for d in split.iterdir() if d.is_dir() for p in d.rglob("*"))


def image_folder_gate(root: Path, model: nn.Module, size: tuple[int, int]) -> GateData:
    """Top-1 (%) on an ImageFolder split (``root/<class>/*`` or ``root/val/<class>/*``), classes in sorted order;
    images resized (short side ``size * 256 / 224``) and centre-cropped to ``size``, as in validation."""
    from torchmetrics.classification import MulticlassAccuracy

    from mbv3_dense.classification.data import find_classes, scan_image_folder
    from mbv3_dense.classification.transforms import eval_transform

    split = _image_folder_split(root)
    classes = find_classes(split)
    if len(classes) != model.num_classes:
        raise GateDataError(f"{split}: {len(classes)} class folders, but the classifier has {model.num_classes} "
                            f"classes")
    samples = scan_image_folder(split, {c: i for i, c in enumerate(classes)}).samples
    if size[0] != size[1]:
        raise GateDataError(f"{split}: the classifier gate centre-crops a square; export with --size S S")
    transform = eval_transform(resize_size=round(size[0] * 256 / 224), crop_size=size[0])

    def evaluate(network, description: str) -> dict[str, float]:
        top1 = MulticlassAccuracy(num_classes=model.num_classes, top_k=1, average="micro")
        with torch.inference_mode():
            for path, label in progress(samples, desc=description, unit="img"):
                image = transform(torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1).contiguous())
                top1.update(torch.as_tensor(network(model.normalize(image[None].float() / 255))), torch.tensor([label]))
        return {"top1": 100 * float(top1.compute())}

    return GateData("classify", "image folder", root, "top1", len(samples), evaluate, (size,))
