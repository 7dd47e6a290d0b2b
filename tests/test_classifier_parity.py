"""Our classifier equals torchvision's with the same weights; params and MAdds match the model card."""

from __future__ import annotations

import pytest
import torch
import torchvision
from parity_utils import assert_input_dependent, calibrate_and_perturb

import mbv3_dense
from mbv3_dense.checkpoints.weights import from_torchvision_classifier, load_state_dict_strict
from mbv3_dense.complexity import count_madds, count_params

CASES = [
    ("large", {}),
    ("small", {}),
    ("large", {"reduced_tail": True}),
    ("small", {"reduced_tail": True}),
    ("large", {"width_mult": 0.75}),
    ("small", {"width_mult": 0.75}),
]


@pytest.mark.parametrize(("arch", "kwargs"), CASES, ids=[f"{a}-{k}" for a, k in CASES])
def test_outputs_equal_torchvision(arch: str, kwargs: dict) -> None:
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"mobilenet_v3_{arch}")(num_classes=10, **kwargs)
    ours = getattr(mbv3_dense, f"mobilenet_v3_{arch}")(num_classes=10, **kwargs)
    calibrate_and_perturb(reference, torch.randn(8, 3, 96, 96), seed=1)
    load_state_dict_strict(ours, from_torchvision_classifier(reference.state_dict()), "torchvision model")
    ours.eval()
    x = torch.randn(2, 3, 112, 96, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected, got = reference(x), ours(x)
    assert_input_dependent(expected[0], expected[1])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("arch", "params_m", "madds_g"), [("large", 5.48, 0.217), ("small", 2.54, 0.057)])
def test_params_and_madds_match_the_model_card(arch: str, params_m: float, madds_g: float) -> None:
    model = getattr(mbv3_dense, f"mobilenet_v3_{arch}")()
    reference = getattr(torchvision.models, f"mobilenet_v3_{arch}")()
    assert count_params(model) == count_params(reference)
    assert round(count_params(model) / 1e6, 2) == params_m
    madds = count_madds(model, torch.randn(1, 3, 224, 224))
    assert round(madds / 1e9, 3) == madds_g
    assert madds == count_madds(reference, torch.randn(1, 3, 224, 224))
