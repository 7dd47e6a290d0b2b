"""One seed, one run: through ``python -m mbv3_dense fit`` on each task's real config, shrunk to a tiny CPU run.

For each task the same seed gives bit-identical final weights with 0, 2 and 4 loader workers, and a
run killed with SIGKILL mid-epoch and resumed with ``--ckpt_path last`` (2 workers) ends with the
weights, EMA, optimizer state and schedule of the uninterrupted run. Every augmentation of the
task's recipe is switched on (crop, scale, flip, colour, IoU crop, zoom-out, AutoAugment, random
erasing), so a single draw from a worker's or the OS's generator would break the equality.
Under 2-process DDP (gloo) each sample index gets the same augmentation whichever rank draws it,
and a mid-epoch resume continues where it stopped.

All runs use one thread (``OMP_NUM_THREADS=1``): the equality is between runs on one machine with
one thread count, which is what "the same run" means.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.classification.synthetic import write_imagefolder
from segmentation.synthetic import CityscapesSpec, generate_cityscapes

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
EVERY_N_STEPS = 3


@dataclass(frozen=True)
class Case:
    config: str
    make_data: Callable[[Path], Path]
    shrink: Callable[[dict], None]  # the task's part of the tiny config (model, optimizer, data)
    steps_per_epoch: int


def _classify_data(root: Path) -> Path:
    return write_imagefolder(root, num_classes=3, train_per_class=5, val_per_class=1, size=40, seed=1)


def _classify(cfg: dict) -> None:
    model = cfg["model"]["init_args"]
    model["model"]["init_args"].update(num_classes=3, width_mult=0.5)
    model["optimizer"]["init_args"]["lr"] = 0.001
    model["ema_decay"] = 0.9
    cfg["data"]["init_args"].update(batch_size=3, crop_size=32, val_resize_size=32, pin_memory=False,
                                    auto_augment=True, random_erase=0.5)


def _detect_data(root: Path) -> Path:
    generate_coco(root, DetectionSpec(train_images=10, val_images=2, min_side=96, max_side=128, min_object=40,
                                      max_object=90, max_objects=2, empty_fraction=0.0, crowd_fraction=0.0, seed=2))
    return root


def _detect(cfg: dict) -> None:
    model = cfg["model"]["init_args"]
    model["model"]["init_args"].update(num_classes=5, width_mult=0.5)
    model["optimizer"]["init_args"]["lr"] = 0.01
    model["warmup_steps"] = 2
    cfg["data"]["init_args"].update(num_classes=5, batch_size=2, val_batch_size=2, iou_crop=True, zoom_out_p=0.5,
                                    photometric_p=0.5, hflip_p=0.5)


def _segment_data(root: Path) -> Path:
    generate_cityscapes(root, CityscapesSpec(height=64, width=128, train_per_city=4, val_per_city=1, seed=3))
    return root


def _segment(cfg: dict) -> None:
    cfg["trainer"].update(max_steps=-1, check_val_every_n_epoch=1)
    cfg["data"]["init_args"].update(batch_size=2, val_batch_size=1, crop_size=[64, 64], scale_range=[0.5, 2.0],
                                    hflip=True)


CASES = {
    "classify": Case("configs/mobilenet_v3_small_imagenet.yaml", _classify_data, _classify, steps_per_epoch=5),
    "detect": Case("configs/ssdlite_mobilenet_v3_small_coco.yaml", _detect_data, _detect, steps_per_epoch=5),
    "segment": Case("configs/lraspp_mobilenet_v3_small_cityscapes.yaml", _segment_data, _segment, steps_per_epoch=6),
}


def tiny_config(case: Case, data: Path, out: Path, *, workers: int, devices: int = 1, throttle: float = 0.0,
                record: Path | None = None) -> Path:
    """The task's real config with the sizes of a seconds-long CPU run (its structure is kept)."""
    cfg = yaml.safe_load((REPO / case.config).read_text())
    cfg["trainer"].update(accelerator="cpu", devices=devices, max_epochs=2, deterministic=True, log_every_n_steps=1,
                          enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                          limit_val_batches=1)
    if devices > 1:
        cfg["trainer"]["strategy"] = "ddp"
    assert not any(c["class_path"].endswith("ModelCheckpoint") for c in cfg["trainer"]["callbacks"]), \
        f"{case.config}: the CLI adds the checkpoints"
    cfg["checkpoints"] = {"every_n_train_steps": EVERY_N_STEPS}  # last.ckpt every N steps and every epoch end
    # One training-device latency entry, small; the deployment-latency entry (an export) is dropped.
    cfg["trainer"]["callbacks"] = [c for c in cfg["trainer"]["callbacks"] if not (
        c["class_path"].endswith("LatencyCallback") and c.get("init_args", {}).get("backend", "torch") != "torch")]
    for c in cfg["trainer"]["callbacks"]:
        if c["class_path"].endswith("LatencyCallback"):
            c["init_args"] = {"input_size": [64, 64], "warmup": 0, "runs": 1}
    if throttle:
        cfg["trainer"]["callbacks"].append({"class_path": "tests.robustness_helpers.Throttle",
                                            "init_args": {"seconds": throttle}})
    if record is not None:
        cfg["trainer"]["callbacks"].append({"class_path": "tests.robustness_helpers.RecordSamples",
                                            "init_args": {"path": str(record)}})
    case.shrink(cfg)
    cfg["data"]["init_args"].update(root=str(data), num_workers=workers)
    out.write_text(yaml.safe_dump(cfg))
    return out


def fit(config: Path, cwd: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", "fit", "-c", str(config), *extra], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def last_ckpt(workdir: Path) -> Path:
    found = list(workdir.glob("runs/*/checkpoints/last.ckpt"))
    assert len(found) == 1, found
    return found[0]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def kill_after_first_step_checkpoint(config: Path, workdir: Path) -> Path:
    """Start a throttled run and SIGKILL it as soon as its first step checkpoint exists; returns that file."""
    proc = subprocess.Popen([sys.executable, "-m", "mbv3_dense", "fit", "-c", str(config)], cwd=workdir, env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list(workdir.glob("runs/*/checkpoints/last.ckpt")) and proc.poll() is None:
            assert time.monotonic() < deadline, "no step checkpoint was written"
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGKILL)  # the trainer, its loader workers and DDP peers alike
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    return last_ckpt(workdir)


def assert_same_training_state(resumed: dict, reference: dict, what: str) -> None:
    assert resumed["global_step"] == reference["global_step"], what
    assert set(resumed["state_dict"]) == set(reference["state_dict"]), what
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), f"{what}: {key} differs"


def assert_same_optimizer_and_schedule(resumed: dict, reference: dict) -> None:
    ref_opt, res_opt = reference["optimizer_states"][0]["state"], resumed["optimizer_states"][0]["state"]
    assert set(ref_opt) == set(res_opt)
    for idx, state in ref_opt.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(res_opt[idx][name]), torch.as_tensor(value)), (idx, name)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]


def final_state(case: Case, data: Path, workdir: Path, *, workers: int,
                config: Callable[[Path], Path] = lambda path: path) -> dict:
    """The last checkpoint of ``case``'s tiny run on ``data`` with ``workers`` loader workers, in ``workdir`` (made
    here); ``config`` edits the config file first."""
    workdir.mkdir()
    fit(config(tiny_config(case, data, workdir / "c.yaml", workers=workers)), workdir)
    return load(last_ckpt(workdir))


def assert_resumes_after_sigkill(case: Case, data: Path, workdir: Path, reference: dict, what: str, *,
                                 config: Callable[[Path], Path] = lambda path: path) -> None:
    """A run (2 workers, in ``workdir``, made here) killed with SIGKILL mid-epoch and resumed with ``--ckpt_path
    last`` ends with ``reference``'s weights, optimizer state and schedule; ``config`` edits its config files."""
    workdir.mkdir()
    saved = load(kill_after_first_step_checkpoint(
        config(tiny_config(case, data, workdir / "slow.yaml", workers=2, throttle=0.5)), workdir))
    assert saved["global_step"] == EVERY_N_STEPS and saved["epoch"] == 0, "not killed mid-epoch"
    fit(config(tiny_config(case, data, workdir / "c.yaml", workers=2)), workdir, "--ckpt_path", "last")
    resumed = load(last_ckpt(workdir))
    assert_same_training_state(resumed, reference, what)
    assert_same_optimizer_and_schedule(resumed, reference)


@pytest.mark.parametrize("task", sorted(CASES))
def test_one_seed_one_run_any_workers_and_after_sigkill(task: str, tmp_path: Path) -> None:
    case = CASES[task]
    data = case.make_data(tmp_path / "data")
    finals = {workers: final_state(case, data, tmp_path / f"workers{workers}", workers=workers)
              for workers in (0, 2, 4)}
    reference = finals[2]
    assert reference["global_step"] == 2 * case.steps_per_epoch
    if task == "classify":
        assert any(k.startswith("model_ema.") for k in reference["state_dict"])
    for workers in (0, 4):
        assert_same_training_state(finals[workers], reference, f"{workers} workers vs 2")
    assert_resumes_after_sigkill(case, data, tmp_path / "killed", reference, "resumed after SIGKILL vs uninterrupted")


def _digest(tensor: torch.Tensor) -> str:
    return hashlib.sha1(tensor.contiguous().numpy().tobytes()).hexdigest()


def recorded_samples(record: Path) -> list[tuple[int, dict]]:
    """``(rank, {"epoch", "index", "digest"})`` of every training sample the two ranks' RecordSamples wrote."""
    return [(rank, row) for rank in (0, 1) for row in json.loads((record / f"rank{rank}.json").read_text())]


def assert_samples_are_the_files(config: Path, data: Path, digests: dict[tuple[int, int], str]) -> None:
    """Each ``(epoch, index)``'s recorded digest is that of the sample a single process (one thread) computes from
    the image folder ``data`` with ``config``'s data settings."""
    from mbv3_dense.classification.data import ImageFolderDataModule
    from mbv3_dense.data.sampling import SampleKey

    cfg = yaml.safe_load(config.read_text())["data"]["init_args"]
    module = ImageFolderDataModule(**{k: v for k, v in cfg.items() if k not in ("num_workers", "streaming", "root")},
                                   root=str(data), num_workers=0)
    module.setup("fit")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (epoch, index), digest in digests.items():
            image, _ = module.train_set[SampleKey(index, epoch, 0)]
            assert digest == _digest(image), (epoch, index)
    finally:
        torch.set_num_threads(threads)


def test_ddp_each_index_gets_its_augmentation_on_any_rank_and_resumes_mid_epoch(tmp_path: Path) -> None:
    """2 gloo processes: the recorded training samples equal the ones a single process computes for the
    same (seed, epoch, index); a SIGKILL mid-epoch and ``--ckpt_path last`` end where the uninterrupted run does."""
    case = CASES["classify"]
    data = write_imagefolder(tmp_path / "data", num_classes=3, train_per_class=10, val_per_class=1, size=40,
                             seed=1)  # 30 images, batch 3 on each of 2 ranks: 5 steps per epoch
    straight = tmp_path / "straight"
    straight.mkdir()
    record = straight / "samples"
    fit(tiny_config(case, data, straight / "c.yaml", workers=2, devices=2, record=record), straight)
    reference = load(last_ckpt(straight))
    assert reference["global_step"] == 10

    seen: dict[tuple[int, int], set[str]] = {}
    ranks_per_epoch: dict[int, set[int]] = {}
    for rank, row in recorded_samples(record):
        seen.setdefault((row["epoch"], row["index"]), set()).add(row["digest"])
        ranks_per_epoch.setdefault(row["epoch"], set()).add(rank)
    assert ranks_per_epoch == {0: {0, 1}, 1: {0, 1}}
    assert all(len(d) == 1 for d in seen.values()), "one sample index got two augmentations"
    assert_samples_are_the_files(straight / "c.yaml", data, {key: digest for key, (digest,) in seen.items()})

    broken = tmp_path / "killed"
    broken.mkdir()
    saved = load(kill_after_first_step_checkpoint(
        tiny_config(case, data, broken / "slow.yaml", workers=2, devices=2, throttle=1.0), broken))
    assert saved["global_step"] == EVERY_N_STEPS and saved["epoch"] == 0, "not killed mid-epoch"
    fit(tiny_config(case, data, broken / "c.yaml", workers=2, devices=2), broken, "--ckpt_path", "last")
    assert_same_training_state(load(last_ckpt(broken)), reference, "DDP resumed after SIGKILL vs uninterrupted")


def test_seeded_sampler_shards_an_epoch_like_distributed_sampler_and_skips_on_resume() -> None:
    from torch.utils.data import DistributedSampler

    from mbv3_dense.data.sampling import SampleKey, SeededSampler

    data = list(range(11))  # 11 over 3 ranks: padded to 12, as DistributedSampler does
    shards = []
    for rank in range(3):
        ours = SeededSampler(data, num_replicas=3, rank=rank, seed=5)
        ours.set_epoch(2)
        reference = DistributedSampler(data, num_replicas=3, rank=rank, shuffle=True, seed=5)
        reference.set_epoch(2)
        keys = list(ours)
        assert keys == [SampleKey(i, 2, 5) for i in reference]
        shards.append([k.index for k in keys])
        ours.skip_next(2)
        assert list(ours) == keys[2:] and list(ours) == keys  # the skip applies to the next iteration only
    assert sorted(i for s in shards for i in s) == sorted([*range(11), shards[0][0]])


def test_augmentation_is_a_function_of_the_key_and_leaves_global_generators_alone() -> None:
    import random

    import numpy as np

    from detection.transforms import train_transform
    from mbv3_dense.data.sampling import SampleKey, sample_randomness

    pipeline = train_transform(image_size=64, zoom_out_p=0.5, photometric_p=0.5)
    image = np.random.default_rng(0).integers(0, 255, (80, 100, 3), dtype=np.uint8)
    boxes = np.array([[10, 10, 60, 50], [40, 30, 90, 70]], dtype=np.float32)

    def draw(key: SampleKey) -> tuple[bytes, list]:
        with sample_randomness(key) as generators:
            pipeline.set_random_state(generators.numpy, generators.python)
            out = pipeline(image=image, bboxes=boxes, labels=[1, 2])
            return out["image"].tobytes(), np.asarray(out["bboxes"]).round(4).tolist()

    torch.manual_seed(1)
    random.seed(1)
    before = torch.rand(1), random.random()
    torch.manual_seed(1)
    random.seed(1)
    first = draw(SampleKey(3, 1, 0))
    assert draw(SampleKey(3, 1, 0)) == first
    others = {draw(SampleKey(3, epoch, 0))[0] for epoch in range(2, 8)} | {draw(SampleKey(3, 1, seed))[0]
                                                                           for seed in range(1, 7)}
    assert len(others | {first[0]}) >= 10, "epochs and seeds should draw different augmentations"
    assert (torch.rand(1), random.random()) == before, "loading a sample moved the global generators"
