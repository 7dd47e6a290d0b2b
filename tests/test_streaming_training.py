"""Training from LitData chunks gives the weights of training from the files, through ``python -m mbv3_dense fit``.

Each task's real config shrunk to a tiny CPU run (tests/test_determinism.py's machinery, every augmentation on),
its data written by ``scripts/prepare_streaming.py`` (2 preparer workers) and read with ``--data.streaming``
while ``--data.root`` names a folder that does not exist:

- with 0 and with 2 loader workers, the final weights, EMA included, are bit-identical to the run from files;
- a run from chunks killed with SIGKILL mid-epoch and resumed with ``--ckpt_path last`` (2 workers) ends with
  the weights, optimizer state and schedule of the run from files: the position in the epoch is the loop's,
  in the checkpoint, and the sampler skips what was done;
- under 2-process DDP (gloo) the two ranks' shards of each epoch do not overlap and cover the dataset, and every
  sample a rank trained on is the one a single process computes from the files for that (seed, epoch, index).

Classification runs by default; detection and segmentation are marked ``slow`` (CI runs them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.test_determinism import (
    CASES,
    assert_resumes_after_sigkill,
    assert_same_training_state,
    assert_samples_are_the_files,
    final_state,
    fit,
    last_ckpt,
    load,
    recorded_samples,
    tiny_config,
)
from tests.test_streaming import prepare

PREPARE_TASK = {"classify": ["--task", "classify"], "detect": ["--task", "detect"], "segment": ["--task", "segment"]}


def streaming_config(config: Path, chunks: Path, missing_root: Path) -> Path:
    """``config`` reading ``chunks`` instead of files (its root made a folder that does not exist)."""
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["init_args"].update(streaming=str(chunks), root=str(missing_root))
    config.write_text(yaml.safe_dump(cfg))
    return config


@pytest.mark.parametrize("task", ["classify", pytest.param("detect", marks=pytest.mark.slow),
                                  pytest.param("segment", marks=pytest.mark.slow)])
def test_streaming_trains_the_weights_of_the_files_with_any_workers_and_after_sigkill(task: str,
                                                                                      tmp_path: Path) -> None:
    case = CASES[task]
    data = case.make_data(tmp_path / "data")
    chunks = prepare(data, tmp_path / "chunks", *PREPARE_TASK[task])
    missing = tmp_path / "no_files_here"

    reference = final_state(case, data, tmp_path / "files", workers=0)
    assert reference["global_step"] == 2 * case.steps_per_epoch
    if task == "classify":
        assert any(k.startswith("model_ema.") for k in reference["state_dict"])

    def from_chunks(config: Path) -> Path:
        return streaming_config(config, chunks, missing)

    for workers in (0, 2):
        assert_same_training_state(final_state(case, data, tmp_path / f"streaming{workers}", workers=workers,
                                               config=from_chunks), reference, f"chunks, {workers} workers, vs files")
    assert_resumes_after_sigkill(case, data, tmp_path / "killed", reference, "chunks, resumed after SIGKILL, vs files",
                                 config=from_chunks)


def test_ddp_shards_from_chunks_do_not_overlap_and_hold_the_files_samples(tmp_path: Path) -> None:
    from mbv3_dense.classification.synthetic import write_imagefolder

    case = CASES["classify"]
    data = write_imagefolder(tmp_path / "data", num_classes=3, train_per_class=10, val_per_class=1, size=40,
                             seed=1)  # 30 images, batch 3 on each of 2 ranks: 5 steps per epoch, no padding
    chunks = prepare(data, tmp_path / "chunks", *PREPARE_TASK["classify"])
    workdir = tmp_path / "ddp"
    workdir.mkdir()
    record = workdir / "samples"
    config = tiny_config(case, data, workdir / "c.yaml", workers=2, devices=2, record=record)
    fit(streaming_config(config, chunks, tmp_path / "no_files_here"), workdir)
    assert load(last_ckpt(workdir))["global_step"] == 10

    shards: dict[tuple[int, int], list[int]] = {}
    digests: dict[tuple[int, int], str] = {}
    for rank, row in recorded_samples(record):
        shards.setdefault((row["epoch"], rank), []).append(row["index"])
        digests[(row["epoch"], row["index"])] = row["digest"]
    for epoch in (0, 1):
        first, second = shards[(epoch, 0)], shards[(epoch, 1)]
        assert not set(first) & set(second), f"epoch {epoch}: the ranks' shards overlap"
        assert sorted(first + second) == list(range(30)), f"epoch {epoch}: the shards do not cover the dataset"
    assert_samples_are_the_files(config, data, digests)
