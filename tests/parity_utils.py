"""Helpers for parity tests: weights and BN statistics that make a network's output depend on its input.

A default-initialised MobileNetV3 with random BN statistics gives almost the same logits for any
input (docs/known_traps.md), which would hide a broken layer. So: random weights with a scale
that keeps activations alive, BN statistics measured by a forward pass in train mode (cumulative
average), then perturbed so that BN is not a plain standardisation.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


@torch.no_grad()
def calibrate_and_perturb(model: nn.Module, example: torch.Tensor | list, *, seed: int = 0) -> nn.Module:
    """Set every BN's running stats from ``model(example)`` in train mode, then perturb them and the
    affine parameters; heavier-tailed Linear/conv weights keep the output input-dependent.

    Returns the model in eval mode.
    """
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0, 1.0 / m.in_features**0.5, generator=gen)
            if m.bias is not None:
                m.bias.normal_(0, 0.1, generator=gen)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration pass
            m.weight.uniform_(0.5, 1.5, generator=gen)
            m.bias.normal_(0, 0.2, generator=gen)
    model.train()
    model(example)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.add_(0.1 * torch.randn(m.running_mean.shape, generator=gen) * m.running_var.sqrt())
            m.running_var.mul_(torch.empty(m.running_var.shape).uniform_(0.8, 1.25, generator=gen))
    return model.eval()


def assert_input_dependent(a: torch.Tensor, b: torch.Tensor, min_diff: float = 1e-3) -> None:
    """Fail when two outputs for different inputs agree: the comparison would then prove nothing."""
    diff = (a - b).abs().max().item()
    assert diff > min_diff, f"reference output ignores its input (max difference {diff:.2e})"


def assert_same_detections(got: dict, ref: dict, *, box_atol: float = 1e-3, score_atol: float = 1e-4) -> None:
    """The two detection lists hold the same (box, score, label) triples, in whatever order.

    Detections of exactly (or nearly) equal score may come out in either order, and which one depends
    on the CPU's floating-point paths, so the lists are compared as sets: every reference detection is
    matched to one unmatched detection of the same label with box and score within tolerance.
    """
    assert len(got["boxes"]) == len(ref["boxes"]), (len(got["boxes"]), len(ref["boxes"]))
    close = ((got["labels"][:, None] == ref["labels"][None, :])
             & ((got["boxes"][:, None, :] - ref["boxes"][None, :, :]).abs().amax(-1) <= box_atol)
             & ((got["scores"][:, None] - ref["scores"][None, :]).abs() <= score_atol))
    free = torch.ones(len(got["boxes"]), dtype=torch.bool)
    # Reference detections with the fewest candidates first: greedy matching then cannot strand one.
    for j in torch.argsort(close.sum(0), stable=True).tolist():
        candidates = torch.nonzero(close[:, j] & free).flatten()
        assert len(candidates), (f"reference detection {j} (label {int(ref['labels'][j])}, score "
                                 f"{float(ref['scores'][j]):.6f}, box {ref['boxes'][j].tolist()}) has no match")
        free[candidates[0]] = False


@torch.no_grad()
def label_id_agreement(net: nn.Module, image: torch.Tensor, written: np.ndarray, *, tie: float) -> float:
    """The share of pixels where ``written`` (a predicted labelIds map of the uint8 ``[3, H, W]`` ``image``) is the
    segmenter's argmax, as labelIds. Every other pixel must be a near tie (the two best logits within ``tie``:
    float sums in another order may pick either) written as the second best class."""
    from segmentation.labels import train_ids_to_label_ids

    logits = net(net.normalize(image.float() / 255)[None])[0]
    ref = train_ids_to_label_ids(logits.argmax(0).numpy().astype(np.uint8))
    top2 = logits.topk(2, dim=0)
    near_tie = (top2.values[0] - top2.values[1] < tie).numpy()
    second = train_ids_to_label_ids(top2.indices[1].numpy().astype(np.uint8))
    assert ((written == ref) | (near_tie & (written == second))).all()
    return float((written == ref).mean())
