"""What an export prints about its programs: fp32 parity against eager, and int8 against fp32 on calibration images.

:func:`load_calibration` reads the images an int8 program is calibrated on, prepared as the task's model expects;
:func:`report_checks` prints the fp32 checks (:mod:`mbv3_dense.deploy.parity`); :func:`int8_agreement` and
:func:`detection_agreement` say how often int8 decides as the float model does on those images.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbv3_dense.data.image_io import read_image_rgb
from mbv3_dense.deploy.backend import detect
from mbv3_dense.deploy.dynamic import SizeRange, fit_size
from mbv3_dense.deploy.options import calibration_files
from mbv3_dense.deploy.parity import check_program


def load_calibration(folder: Path, count: int, size: tuple[int, int], task: str, model: nn.Module, *,
                     dynamic: SizeRange | None = None) -> list[Tensor]:
    """``count`` images from ``folder`` as ``[1, 3, H, W]`` inputs, preprocessed as the task's model expects.

    Classify and segment: resized to ``size`` and normalised by ``model.normalize`` (ImageNet mean
    and std). Detect: ``model.preprocess`` (SSDLite's own normalisation, [-1, 1], and resize to its
    ``image_size``). With a dynamic range, each image keeps its size, each side brought into the range
    (segment: normalised; detect: the image in [0, 1] itself, which its program takes).

    Raises:
        FileNotFoundError: ``folder`` holds no .jpg/.png image.
    """
    inputs = []
    for path in calibration_files(folder, count):
        x = torch.from_numpy(read_image_rgb(path)).permute(2, 0, 1)[None].float() / 255.0
        with torch.no_grad():
            if dynamic is not None:
                x = fit_size(x, dynamic)
                inputs.append(x if task == "detect" else model.normalize(x))
            elif task == "detect":
                inputs.append(model.preprocess([x[0]]))
            else:
                inputs.append(model.normalize(F.interpolate(x, size=size, mode="bilinear", align_corners=False)))
    return inputs


def report_checks(task: str, model: nn.Module, runtime, inputs: list[Tensor], tolerance: float,
                  name: str) -> bool:
    """Print the fp32 checks of ``runtime`` against ``model`` (:func:`~mbv3_dense.deploy.parity.check_program`);
    True when all pass."""
    ok = True
    for x, checks in zip(inputs, check_program(task, model, runtime, inputs, tolerance), strict=True):
        shape = "x".join(str(v) for v in x.shape[-2:])
        for check in checks:
            print(f"{name} vs PyTorch, {shape} input: {check}")
            ok = ok and check.ok
    return ok


def int8_agreement(task: str, fp32, int8, inputs: list[Tensor]) -> str:
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


def detection_agreement(model: nn.Module, fp32, int8, inputs: list[Tensor], threshold: float = 0.3) -> str:
    """Detections above ``threshold`` of the float model that int8 finds too (same label, IoU >= 0.5)."""
    from torchvision.ops import box_iou

    found, total = 0, 0
    for x in inputs:
        image = x[0] if getattr(fp32, "takes_image", False) else None
        if image is None:
            size = [tuple(model.image_size)]
            a, b = model.postprocess(fp32(x), size)[0], model.postprocess(int8(x), size)[0]
        else:
            a, b = detect(model, fp32, [image])[0], detect(model, int8, [image])[0]
        a_keep, b_keep = a["scores"] > threshold, b["scores"] > threshold
        boxes_a, labels_a = a["boxes"][a_keep], a["labels"][a_keep]
        boxes_b, labels_b = b["boxes"][b_keep], b["labels"][b_keep]
        total += len(boxes_a)
        if len(boxes_a) and len(boxes_b):
            iou = box_iou(boxes_a, boxes_b) * (labels_a[:, None] == labels_b[None, :])
            found += int((iou.max(1).values >= 0.5).sum())
    return (f"float detections (score > {threshold}) on the calibration images also found by int8 "
            f"(same label, IoU >= 0.5): {found}/{total}")
