"""Is an exported fp32 program the same model? Judged by what the task decides, within what the kernels do.

An fp32 program computes in another order than eager PyTorch (XNNPACK's packed GEMMs, fused
activations), so its outputs differ by float rounding: measured here at most 4.1e-6 of ``max|output|``
(docs/benchmark.md, "The fp32 export check"), and 1-3e-4 reported on another CPU. So an export is
checked twice, on a few inputs:

1. **Outputs**: the largest absolute error of each output must be at most
   :data:`FP32_TOLERANCE` x ``max(1, max|reference output|)``. A broken layer gives errors of the
   order of the outputs themselves; rounding stays three orders of magnitude below.
2. **Decisions**: what the task reads from the outputs must be the same, except where the reference
   itself is a near tie that the measured error can flip (a margin of at most twice the error):
   classify, the top-1 class of every input; segment, the class of every pixel; detect, the final
   detections compared as sets (same label, score and box within tolerances derived from the error).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbv3_dense.deploy.dynamic import SizeRange

# Largest error allowed between an fp32 program and eager PyTorch, times max(1, max|reference|). Measured here:
# 4.1e-6 at most (median 1.9e-6) over 13 seeded torchvision MobileNetV3-Large, 12 inputs of 3 kinds each
# (docs/benchmark.md, "The fp32 export check"); reported on another CPU: 1-3e-4. 1e-3 leaves a factor 3 over the
# worst report and stays far below a broken layer, whose errors are of the order of the outputs.
FP32_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Check:
    """One line of an export check: what was compared, and whether it passed."""

    ok: bool
    text: str

    def __str__(self) -> str:
        return f"{self.text}: {'OK' if self.ok else 'FAILED'}"


def output_check(name: str, reference: Tensor, got: Tensor, tolerance: float = FP32_TOLERANCE) -> Check:
    """The largest absolute error of one output against ``tolerance x max(1, max|reference|)``."""
    reference, got = reference.float(), torch.as_tensor(got).float()
    if tuple(reference.shape) != tuple(got.shape):
        return Check(False, f"{name}: shape {tuple(got.shape)} differs from the reference {tuple(reference.shape)}")
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    error = (reference - got).abs().max().item() if reference.numel() else 0.0
    return Check(error <= tolerance * scale,
                 f"{name}: max abs error {error:.3e} ({error / scale:.1e} of max(1, max|reference|) {scale:.3g}; "
                 f"tolerance {tolerance:.0e})")


def _margins(logits: Tensor, dim: int) -> Tensor:
    top2 = logits.float().topk(2, dim=dim).values
    return top2.select(dim, 0) - top2.select(dim, 1)


def decision_check(reference: Tensor, got: Tensor, *, dim: int = 1, what: str = "top-1 classes",
                   tolerance: float = FP32_TOLERANCE) -> Check:
    """The arg-max along ``dim`` must be equal wherever the reference's margin (best minus second best)
    exceeds twice the error: there, no error of that size can change it. The error is the largest one
    measured, capped at the allowed one (``tolerance x max(1, max|reference|)``), so that a broken program's
    large errors cannot excuse its changed decisions.

    ``reference``, ``got``: logits of the same shape (``[N, C]`` for top-1, ``[N, C, H, W]`` for pixels).
    """
    reference, got = reference.float(), torch.as_tensor(got).float()
    if reference.shape[dim] < 2:
        return Check(True, f"{what}: a single class")
    allowed = tolerance * max(1.0, reference.abs().max().item())
    error = min((reference - got).abs().max().item(), allowed)
    decided = _margins(reference, dim) > 2 * error
    differ = (reference.argmax(dim) != got.argmax(dim)) & decided
    total, ties = decided.numel(), int((~decided).sum())
    return Check(not bool(differ.any()),
                 f"{what}: {total - ties - int(differ.sum())} of {total - ties} equal where the reference's margin "
                 f"exceeds twice the error {error:.1e} ({ties} near ties left out)")


class Matching(NamedTuple):
    """How two detection lists match: counts, the largest box error of the boxes matched, what is left."""

    matched: int
    swapped: int
    worst_box_error: float
    ref_left: Tensor  # bool [R]: reference detections without a match
    got_left: Tensor  # bool [G]


def match_detections(ref: dict[str, Tensor], got: dict[str, Tensor], *, box_tolerance: float = 1e-3,
                     score_tolerance: float = 1e-5, swappable: Tensor | None = None) -> Matching:
    """Match reference detections one to one with ``got`` ones: same label and score, same box.

    Detections of equal score may come out in either order, and where several boxes tie (a barely
    trained network scores many anchors alike) NMS and the per-image cut keep either of them: which
    one is the CPU's floating-point choice. So the lists are compared as sets, first by label, score
    and box (the candidates with the fewest matches first, so the greedy matching cannot strand one),
    then what is left by label and score alone: boxes swapped among tied scores (only for the reference
    detections ``swappable`` marks, all by default).

    Returns:
        Reference detections matched with their box, those matched among tied scores, the largest box
        error (pixels) of the first, and the detections of each list left without a match.
    """
    if not len(ref["boxes"]) or not len(got["boxes"]):
        return Matching(0, 0, 0.0, torch.ones(len(ref["boxes"]), dtype=torch.bool),
                        torch.ones(len(got["boxes"]), dtype=torch.bool))
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
    ref_left = torch.zeros(len(ref["boxes"]), dtype=torch.bool)
    for j in left:
        candidates = torch.nonzero(same[:, j] & free).flatten()
        if len(candidates) and (swappable is None or bool(swappable[j])):
            free[int(candidates[0])] = False
            swapped += 1
        else:
            ref_left[j] = True
    return Matching(matched, swapped, worst, ref_left, free)


def detection_tolerances(reference: dict[str, Tensor], got: dict[str, Tensor],
                         image_size: tuple[int, int]) -> tuple[float, float]:
    """``(score, box)`` tolerances for detections decoded from two raw SSD outputs that differ by rounding.

    A softmax or sigmoid score moves by at most the largest logit error (its derivative is at most 1 in
    the max norm, summed over two logits); a box corner moves by at most ``(1/10 + 1/5 x 1/2) x side``
    per unit of box-code error (codes weighted 10, 10, 5, 5, boxes clipped to the image); both are
    doubled, and floored at 1e-5 and 1e-3 px.
    """
    cls_error = (reference["cls_logits"].float() - got["cls_logits"].float()).abs().max().item()
    box_error = (reference["box_regression"].float() - got["box_regression"].float()).abs().max().item()
    return max(1e-5, 2 * cls_error), max(1e-3, 2 * 0.2 * box_error * max(image_size))


def detections_check(ref: dict[str, Tensor], got: dict[str, Tensor], *, score_tolerance: float,
                     box_tolerance: float, score_floor: float) -> Check:
    """The final detections of one image are the same set.

    Every reference detection must have its match (:func:`match_detections`): the same box, or, where its
    score ties with another detection of its class or sits at a cut, another box of the same label and score
    (which of tied boxes NMS and the cut keep is the CPU's rounding). Unmatched ones are allowed only within
    ``score_tolerance`` of a cut the error can move them across: the score threshold (``score_floor``) or the
    lowest kept score (the per-image limit); the same holds for unmatched ones of ``got``.
    """
    lowest = min([float(ref["scores"].min())] if len(ref["scores"]) else [score_floor])

    def at_cut(scores: Tensor) -> Tensor:
        return ((scores - score_floor).abs() <= score_tolerance) | ((scores - lowest).abs() <= score_tolerance)

    tied = ((ref["labels"][:, None] == ref["labels"][None, :])
            & ((ref["scores"][:, None] - ref["scores"][None, :]).abs() <= score_tolerance)).sum(1) > 1
    matched, swapped, worst, ref_left, got_left = match_detections(
        ref, got, box_tolerance=box_tolerance, score_tolerance=score_tolerance, swappable=tied | at_cut(ref["scores"]))
    unmatched_ref, unmatched_got = int(ref_left.sum()), int(got_left.sum())
    ok = bool(at_cut(ref["scores"][ref_left]).all()) and bool(at_cut(got["scores"][got_left]).all())
    return Check(ok, f"detections: reference {len(ref['boxes'])}, exported {len(got['boxes'])}; {matched} equal "
                     f"(same label, score within {score_tolerance:.1e}, box within {box_tolerance:.1e} px; max box "
                     f"error {worst:.2e} px), {swapped} of the same label and score on another of tied boxes, "
                     f"{unmatched_ref} + {unmatched_got} unmatched at a score cut")


def check_inputs(task: str, model: nn.Module, size: tuple[int, int], dynamic: SizeRange | None = None,
                 count: int = 3, seed: int = 0) -> list[Tensor]:
    """Fresh inputs for the fp32 check: ``[1, 3, H, W]`` network inputs (classify, segment: the model's
    ``normalize``) or ``[3, H, W]`` images in [0, 1] (detect). Smooth random images with a little noise, as
    photographs are; with a dynamic range, one at its smallest size, one at its largest and one in between
    whose sides are odd."""
    gen = torch.Generator().manual_seed(seed)
    if dynamic is not None:
        low, high = dynamic
        sizes = [(low, low), (high, high), (min(((low + high) // 2) | 1, high), min(((low + 2 * high) // 3) | 1, high))]
    elif task == "detect":
        sizes = [(480, 640), (size[0], size[1]), (333, 517)]  # any image: the resize is part of the check
    else:
        sizes = [tuple(size)] * count
    inputs = []
    for h, w in sizes[:count]:
        base = F.interpolate(torch.rand(1, 3, 12, 16, generator=gen), size=(h, w), mode="bilinear", align_corners=False)
        image = (base + 0.05 * torch.rand(1, 3, h, w, generator=gen)).clamp(0, 1)
        inputs.append(image[0] if task == "detect" else model.normalize(image))
    return inputs


@torch.inference_mode()
def check_program(task: str, model: nn.Module, runtime, inputs: list[Tensor],
                  tolerance: float = FP32_TOLERANCE) -> list[list[Check]]:
    """The checks of an fp32 ``runtime`` against ``model`` (eval mode) on each input (:func:`check_inputs`).

    Classify and segment: the logits (:func:`output_check`) and the top-1 classes or pixels
    (:func:`decision_check`). Detect (an SSDLite, inputs are images in [0, 1]): both raw outputs for the
    image through ``model.preprocess`` (or, for a program that takes images, the image itself), and the
    detections after ``model.postprocess`` (:func:`detections_check`).
    """
    results = []
    for x in inputs:
        if task == "detect":
            size = (int(x.shape[-2]), int(x.shape[-1]))
            reference = model(model.preprocess([x]))
            got = runtime(x[None]) if getattr(runtime, "takes_image", False) else runtime(model.preprocess([x]))
            checks = [output_check(k, reference[k], got[k], tolerance) for k in reference]
            score_tolerance, box_tolerance = detection_tolerances(reference, got, size)
            checks.append(detections_check(model.postprocess(reference, [size])[0], model.postprocess(got, [size])[0],
                                           score_tolerance=score_tolerance, box_tolerance=box_tolerance,
                                           score_floor=model.score_thresh))
        else:
            reference, got = model(x), runtime(x)
            checks = [output_check("logits", reference, got, tolerance),
                      decision_check(reference, got, what="top-1 classes" if task == "classify" else "pixels",
                                     tolerance=tolerance)]
        results.append(checks)
    return results
