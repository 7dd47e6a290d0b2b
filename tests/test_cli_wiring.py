"""What the CLI adds to every run, through `lightning fit` on the users' own configs: the network's
class count from the data, the LR scaled to the global batch, the schedule length from the trainer,
checkpoints under the run's root (self-describing, with random states), and the safety switch."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from detection.synthetic import DetectionSpec, generate_coco
from mbv3_dense.checkpoints.model_record import RECORD_KEY, build_from_record, read_model_record
from mbv3_dense.training.cli import auto_precision

REPO = Path(__file__).resolve().parents[1]
QUICK = ["--trainer.accelerator", "cpu", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2",
         "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
         "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
         "--data.num_workers", "0"]


def test_imagenet_config_trains_on_a_3_class_folder_as_it_is(tiny_imagefolder: Path, tmp_path: Path, lightning) -> None:
    """No --model...num_classes: the network gets the folder's 3 classes; the LR written per 1024
    images is scaled to this run's batch; the checkpoint says how to rebuild the network."""
    result = lightning("fit", "-c", str(REPO / "configs/mobilenet_v3_large_imagenet.yaml"),
                       "--data.root", str(tiny_imagefolder), "--data.batch_size", "4", "--data.crop_size", "32",
                       "--data.val_resize_size", "32", "--trainer.default_root_dir", str(tmp_path / "root_a"),
                       *QUICK, cwd=tmp_path)
    assert "the data has 3 classes: model.init_args.model.init_args.num_classes 1000 -> 3" in result.stderr
    assert "precision 32-true (trainer.precision null: accelerator cpu, no CUDA GPU in use)" in result.stderr
    assert "learning rate 0.00025: 0.064 per 1024 images x global batch 4 (4 per device x 1 devices" in result.stderr
    ckpt = torch.load(tmp_path / "root_a/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert [g["initial_lr"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [0.064 * 4 / 1024] * 2
    # no weight decay on norms and biases: the second group
    assert [g["weight_decay"] for g in ckpt["optimizer_states"][0]["param_groups"]] == [1e-5, 0.0]
    record = read_model_record(ckpt)
    names = ["circle", "square", "triangle"]  # the class folders: the network's names, recorded
    assert record == {"task": "classify", "builder": "mbv3_dense.mobilenet_v3_large",
                      "init_args": {"num_classes": 3, "width_mult": 1.0, "reduced_tail": False, "dropout": 0.2,
                                    "weights": None, "class_names": names, "keep_class_rows": True},
                      "classes": {"names": names}}
    network = build_from_record(record)
    state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    network.load_state_dict(state)  # strict: the rebuilt network has exactly the trained shapes
    assert "rng_states" in ckpt  # ResumeState, added by the CLI
    # The run's checkpoints, added by the CLI (the config lists none): the best by val/top1, and
    # last.ckpt; the learning rate logged at the scheduler's interval.
    names = sorted(p.name for p in (tmp_path / "root_a/checkpoints").iterdir())
    assert names == ["epoch000-top1" + f"{ckpt['callbacks'][_best_key(ckpt)]['best_model_score']:.4f}.ckpt",
                     "last.ckpt"], names
    logged = (tmp_path / "root_a/lightning_logs/version_0/metrics.csv")
    assert logged.is_file() and "lr-RMSprop" in logged.read_text().splitlines()[0]


def _best_key(ckpt: dict) -> str:
    (key,) = [k for k in ckpt["callbacks"] if k.startswith("ModelCheckpoint") and "'monitor': 'val/top1'" in k]
    return key


def test_checkpoint_switches(tiny_imagefolder: Path, tmp_path: Path, lightning) -> None:
    """--checkpoints.* change what the CLI adds; a ModelCheckpoint in the config is left in charge."""
    common = ["-c", str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"), "--data.root", str(tiny_imagefolder),
              "--data.batch_size", "4", "--data.crop_size", "32", "--data.val_resize_size", "32",
              "--model.init_args.model.init_args.width_mult", "0.5", *QUICK,
              "--trainer.limit_train_batches", "3", "--trainer.callbacks", "[]", "--lr_monitor", "false"]
    lightning("fit", *common, "--trainer.default_root_dir", "steps", "--checkpoints.every_n_train_steps", "1",
              "--checkpoints.best", "false", cwd=tmp_path)
    steps = torch.load(tmp_path / "steps/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert sorted(p.name for p in (tmp_path / "steps/checkpoints").iterdir()) == ["last.ckpt"]
    assert steps["global_step"] == 3
    assert any("'every_n_train_steps': 1" in k for k in steps["callbacks"])
    assert not (tmp_path / "steps/lightning_logs/version_0/metrics.csv").read_text().count("lr-")
    lightning("fit", *common, "--trainer.default_root_dir", "none", "--checkpoints.last", "false",
              "--checkpoints.best", "false", cwd=tmp_path)
    assert not (tmp_path / "none/checkpoints").exists()
    own = ("[{class_path: lightning.pytorch.callbacks.ModelCheckpoint, init_args: {filename: mine, "
           "save_top_k: 1}}]")
    lightning("fit", *common, "--trainer.default_root_dir", "own", "--trainer.callbacks", own, cwd=tmp_path)
    assert sorted(p.name for p in (tmp_path / "own/checkpoints").iterdir()) == ["mine.ckpt"]


def test_checkpoints_live_under_the_run_root_and_resume_from_it(tiny_imagefolder: Path, tmp_path: Path,
                                                                lightning) -> None:
    common = ["-c", str(REPO / "configs/mobilenet_v3_small_imagenet.yaml"),
              "-c", str(REPO / "configs/demo/classify.yaml"), "--data.root", str(tiny_imagefolder),
              "--data.batch_size", "4", "--data.crop_size", "32", "--data.val_resize_size", "32", *QUICK]
    for root in ("run_a", "run_b"):
        lightning("fit", *common, "--trainer.default_root_dir", root, cwd=tmp_path)
    a, b = (torch.load(tmp_path / r / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
            for r in ("run_a", "run_b"))
    assert a["global_step"] == b["global_step"] == 2
    assert not (tmp_path / "runs").exists()  # nothing outside the roots
    result = lightning("fit", *common, "--trainer.default_root_dir", "run_b", "--trainer.max_epochs", "2",
                       "--ckpt_path", "last", cwd=tmp_path)
    assert f"{tmp_path / 'run_b' / 'checkpoints'}" in result.stdout + result.stderr
    resumed = torch.load(tmp_path / "run_b/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert resumed["global_step"] == 4
    assert torch.load(tmp_path / "run_a/checkpoints/last.ckpt", map_location="cpu",
                      weights_only=True)["global_step"] == 2


def test_schedule_length_follows_the_trainer_and_safety_can_be_switched_off(tmp_path: Path, lightning) -> None:
    root = tmp_path / "coco"
    generate_coco(root, DetectionSpec(train_images=4, val_images=2, min_side=96, max_side=128, min_object=40,
                                      max_object=90, max_objects=2, empty_fraction=0.0, crowd_fraction=0.0, seed=4))
    config = REPO / "configs/ssdlite_mobilenet_v3_small_coco.yaml"
    printed = yaml.safe_load(lightning("fit", "-c", str(config), "--print_config", cwd=tmp_path).stdout)
    assert printed["trainer"]["devices"] == "auto" and printed["safety_callbacks"] is True
    result = lightning("fit", "-c", str(config), "--data.root", str(root), "--data.num_classes", "5",
                       "--data.batch_size", "2", "--model.init_args.model.init_args.width_mult", "0.5",
                       "--trainer.default_root_dir", "det", "--safety_callbacks", "false", *QUICK, cwd=tmp_path)
    assert "T_max 660 -> 1 (= trainer.max_epochs)" in result.stderr
    ckpt = torch.load(tmp_path / "det/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["lr_schedulers"][0]["T_max"] == 1
    assert ckpt[RECORD_KEY]["task"] == "detect" and ckpt[RECORD_KEY]["init_args"]["num_classes"] == 5
    assert "rng_states" not in ckpt  # --safety_callbacks false: no ResumeState


def test_auto_precision_follows_the_card(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Card")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert auto_precision("auto")[0] == auto_precision("gpu")[0] == "bf16-mixed"
    assert auto_precision("cpu")[0] == "32-true"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    assert auto_precision("cuda") == ("16-mixed", "Card has no bf16: fp16 with a gradient scaler")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert auto_precision("auto")[0] == "32-true"
