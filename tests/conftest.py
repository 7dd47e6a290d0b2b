"""Data the command-line tests share, written once per test session in the real on-disk formats
(read-only for the tests that use them), and a runner for the ``lightning`` entry point."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LIGHTNING = Path(sys.executable).parent / "lightning"


@pytest.fixture(scope="session")
def tiny_imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``train/`` and ``val/`` with 3 class folders of 6 and 3 images, 40 px."""
    from mbv3_dense.classification.synthetic import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("imagefolder"), num_classes=3, train_per_class=6,
                             val_per_class=3, size=40, seed=3)


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's COCO layout (4 categories, 5 classes with background), its ``--tiny`` size."""
    out = tmp_path_factory.mktemp("coco")
    subprocess.run([sys.executable, str(REPO / "scripts/make_demo_data.py"), "detect", "--out", str(out), "--tiny"],
                   check=True, cwd=REPO, capture_output=True)
    return out


@pytest.fixture(scope="session")
def tiny_cityscapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The official Cityscapes layout, 64x128: 3 train and 3 val images (an odd count, so a padding
    sampler would duplicate one)."""
    from segmentation.synthetic import CityscapesSpec, generate_cityscapes

    root = tmp_path_factory.mktemp("cityscapes")
    generate_cityscapes(root, CityscapesSpec(height=64, width=128, train_per_city=1, val_per_city=1))
    return root


@pytest.fixture
def lightning() -> Callable[..., subprocess.CompletedProcess]:
    """``lightning(*args, cwd=DIR)``: runs the entry point as a user does and fails the test, showing
    the end of its output, when it exits non-zero."""

    def run(*args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        result = subprocess.run([str(LIGHTNING), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                                env={**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")})
        assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        return result

    return run
