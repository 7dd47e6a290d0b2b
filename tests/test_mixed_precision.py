"""The GPU settings, checked where they can be on a CPU: bf16 autocast with the losses in fp32,
channels-last weights and batches, and ``torch.compile``, through ``lightning fit`` on the users'
configs. (On a GPU: ``bash scripts/gpu_check.sh``.)"""

from __future__ import annotations

from pathlib import Path

import torch

from detection import ssdlite_mobilenet_v3_small
from detection.module import DetectionModule
from mbv3_dense import mobilenet_v3_small
from mbv3_dense.checkpoints.model_record import build_from_record, read_model_record
from mbv3_dense.classification.data import ClassificationBatch
from mbv3_dense.classification.module import ClassificationModule
from segmentation import lraspp_mobilenet_v3_small
from segmentation.module import SegmentationModule

REPO = Path(__file__).resolve().parents[1]
TINY = ["--data.batch_size", "4", "--data.crop_size", "32", "--data.val_resize_size", "32", "--data.num_workers", "0",
        "--model.init_args.model.init_args.width_mult", "0.5", "--trainer.accelerator", "cpu",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.num_sanity_val_steps", "0", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--trainer.callbacks", "[]"]


def test_losses_are_fp32_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    classify = ClassificationModule(model=mobilenet_v3_small(num_classes=3, width_mult=0.5))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    detect = DetectionModule(model=ssdlite_mobilenet_v3_small(num_classes=3, width_mult=0.5))
    segment = SegmentationModule(model=lraspp_mobilenet_v3_small(num_classes=19))
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 40.0]]), "labels": torch.tensor([1])}] * 2
    batches = {
        classify: ClassificationBatch(images, torch.tensor([0, 2]), torch.tensor(0)),
        detect: (torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8), targets),
        segment: (torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8), torch.randint(0, 19, (2, 32, 32))),
    }
    for module, batch in batches.items():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = module.training_step(module.batch_to_input(batch), 0)
        assert loss.dtype == torch.float32 and torch.isfinite(loss), type(module).__name__


def test_bf16_channels_last_and_compile_through_the_cli(tiny_imagefolder: Path, tmp_path: Path, lightning) -> None:
    config = str(REPO / "configs/mobilenet_v3_small_imagenet.yaml")
    result = lightning("fit", "-c", config, "--data.root", str(tiny_imagefolder), *TINY,
                       "--trainer.precision", "bf16-mixed", "--model.init_args.channels_last", "true",
                       "--model.init_args.compile", "true", "--trainer.default_root_dir", "run", cwd=tmp_path)
    assert "channels-last memory format" in result.stderr and "network compiled" in result.stderr
    ckpt = torch.load(tmp_path / "run/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 2
    # The state dict is the network's own: no compile prefix, it loads strictly into a fresh network.
    network = build_from_record(read_model_record(ckpt))
    network.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()
                             if k.startswith("model.")})
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_channels_last_reaches_weights_batches_and_the_latency_input() -> None:
    module = ClassificationModule(model=mobilenet_v3_small(num_classes=3, width_mult=0.5), ema_decay=0.99,
                                  channels_last=True)
    module.configure_model()
    conv = next(m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    ema_conv = next(m for m in module.model_ema.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3))
    assert ema_conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = module.images_to_input(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert module.example_input(16, 16).is_contiguous(memory_format=torch.channels_last)
    plain = ClassificationModule(model=mobilenet_v3_small(num_classes=3, width_mult=0.5))
    plain.configure_model()  # null: channels-last only on a CUDA device
    assert plain.images_to_input(torch.zeros(2, 3, 16, 16, dtype=torch.uint8)).is_contiguous()
