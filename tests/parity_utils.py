"""Helpers for parity tests: weights and BN statistics that make a network's output depend on its input.

A default-initialised MobileNetV3 with random BN statistics gives almost the same logits for any
input (../shared/REFERENCE.md), which would hide a broken layer. So: random weights with a scale
that keeps activations alive, BN statistics measured by a forward pass in train mode (cumulative
average), then perturbed so that BN is not a plain standardisation.
"""

from __future__ import annotations

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
