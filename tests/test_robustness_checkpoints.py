"""Checkpoint files: atomic writes (a failed or killed write leaves the previous file intact) and
checkpoints from strangers (a pickle that would run code is refused, never executed)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.fabric.utilities import cloud_io

from detection import ssdlite_mobilenet_v3_small
from detection.weights import load_ssdlite_weights
from mbv3_dense.checkpoints.weights import WeightsError
from mbv3_dense.training.checkpoint_io import AtomicCheckpointIO, atomic_torch_save
from segmentation import lraspp_mobilenet_v3_small
from segmentation.weights import load_lraspp_weights

REPO = Path(__file__).resolve().parents[1]


def _failing_save(real_save):
    """torch.save that writes half of the bytes into the target, then dies (a full disk, a kill)."""
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
        raise OSError(28, "No space left on device")
    return save


@pytest.mark.parametrize("writer", ["ours", "lightning"])
def test_failed_write_keeps_the_previous_checkpoint(writer, tmp_path, monkeypatch):
    path = tmp_path / "last.ckpt"
    save = atomic_torch_save if writer == "ours" else cloud_io._atomic_save
    save({"global_step": 1, "w": torch.ones(1000)}, path)
    monkeypatch.setattr(torch, "save", _failing_save(torch.save))
    with pytest.raises(OSError, match="No space"):
        save({"global_step": 2, "w": torch.zeros(1000)}, path)
    monkeypatch.undo()
    kept = torch.load(path, weights_only=True)
    assert kept["global_step"] == 1 and torch.equal(kept["w"], torch.ones(1000))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temp file left behind


def test_interrupted_file_write_never_touches_the_destination(tmp_path, monkeypatch):
    """The bytes go to a temp file beside the destination; only os.replace (atomic) touches it."""
    path = tmp_path / "last.ckpt"
    AtomicCheckpointIO().save_checkpoint({"global_step": 1}, path)
    replaced = []
    real_replace = os.replace

    def watch(src, dst):
        replaced.append((Path(src), Path(dst)))
        assert torch.load(src, weights_only=True)["global_step"] == 2  # complete before the rename
        raise KeyboardInterrupt  # killed right before the rename

    monkeypatch.setattr(os, "replace", watch)
    with pytest.raises(KeyboardInterrupt):
        AtomicCheckpointIO().save_checkpoint({"global_step": 2}, path)
    monkeypatch.setattr(os, "replace", real_replace)
    assert replaced[0][0].parent == tmp_path and replaced[0][1] == path  # same folder: a rename, not a copy
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert not list(tmp_path.glob("*.tmp-*"))
    AtomicCheckpointIO().save_checkpoint({"global_step": 3}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 3


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _evil(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"model.x": torch.zeros(1)}, "payload": _RunsCode(marker)}, path)
    return path, marker


def test_task_weight_loaders_refuse_code(tmp_path):
    path, marker = _evil(tmp_path)
    with pytest.raises(WeightsError, match="refused"):
        load_ssdlite_weights(ssdlite_mobilenet_v3_small(num_classes=5), path)
    with pytest.raises(WeightsError, match="refused"):
        load_lraspp_weights(lraspp_mobilenet_v3_small(), path)
    assert not marker.exists()


def test_cli_refuses_a_malicious_ckpt_path(tmp_path):
    path, marker = _evil(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "validate", "-c",
                           str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"), "--data.root", str(tmp_path),
                           "--ckpt_path", str(path)], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode != 0
    assert "Weights only load failed" in proc.stderr or "weights_only" in proc.stderr
    assert not marker.exists()
