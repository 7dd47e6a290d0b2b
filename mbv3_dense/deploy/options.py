"""The runtime options the evaluation scripts share: backend, int8 and its calibration images, a ready ``.pte``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import numpy as np

from mbv3_dense.data.listing import IMAGE_EXTENSIONS
from mbv3_dense.deploy.backend import BACKENDS

log = logging.getLogger(__name__)
# Fewer calibration images than this gave int8 ranges that cost the demo classifier up to 12.7 points of top-1
# (one image); 4 spread images cost none (docs/benchmark.md, "PTQ calibrated on one image").
MIN_CALIBRATION_IMAGES = 4


def add_backend_arguments(parser: argparse.ArgumentParser) -> None:
    """``--backend``, ``--int8``, ``--calibration-images``, ``--calibration-count``, ``--pte``, ``--threads``."""
    group = parser.add_argument_group("runtime")
    group.add_argument("--backend", choices=BACKENDS, default="torch",
                       help="runtime of the network: torch (eager), onnxruntime, or executorch (.pte lowered to "
                            "XNNPACK); the last two run on the CPU")
    group.add_argument("--int8", action="store_true",
                       help="onnxruntime/executorch: quantize to int8 (ORT static QDQ, or PT2E with the XNNPACK "
                            "quantizer), calibrated on --calibration-images")
    group.add_argument("--calibration-images", type=Path, default=None,
                       help="folder of .jpg/.png images (searched recursively) for int8 calibration, e.g. the "
                            "training split")
    group.add_argument("--calibration-count", type=int, default=16, help="images used for int8 calibration")
    group.add_argument("--pte", type=Path, default=None,
                       help="executorch: run this .pte (from scripts/export.py --format executorch) instead of "
                            "exporting --weights; it must be built for this task and input size")
    group.add_argument("--threads", type=int, default=None,
                       help="onnxruntime/executorch threads (default: torch's thread count)")


def add_dynamic_size_argument(parser: argparse.ArgumentParser) -> None:
    """``--dynamic-size MIN:MAX`` (detect and segment evaluation): export one program for every size in the range."""
    parser.add_argument("--dynamic-size", default=None, metavar="MIN:MAX",
                        help="executorch: export one .pte taking any height and width in MIN..MAX (instead of one "
                             "per size); a --pte exported so is used for every size in its range")


def check_backend_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Reject combinations that cannot work, before any model is built."""
    if args.int8 and args.backend == "torch":
        parser.error("--int8 needs --backend onnxruntime or executorch")
    if args.pte is not None and args.backend != "executorch":
        parser.error("--pte needs --backend executorch")
    if args.pte is not None and args.int8:
        parser.error("--pte runs the file as it is (int8 or not): drop --int8")
    if args.pte is not None and not args.pte.is_file():
        parser.error(f"--pte {args.pte}: no such file")
    if args.int8 and args.calibration_images is None:
        parser.error("--int8 needs --calibration-images DIR (images like the evaluation data, e.g. the training split)")
    if args.calibration_images is not None and not args.calibration_images.is_dir():
        parser.error(f"--calibration-images {args.calibration_images}: not a folder")
    if args.calibration_count < 1:
        parser.error("--calibration-count must be at least 1")
    if getattr(args, "dynamic_size", None) is not None:
        from mbv3_dense.deploy.dynamic import DynamicSizeError, parse_size_range

        if args.backend != "executorch" or args.pte is not None:
            parser.error("--dynamic-size exports a program: it needs --backend executorch and no --pte")
        try:
            args.dynamic_size = parse_size_range(args.dynamic_size)
        except DynamicSizeError as err:
            parser.error(f"--dynamic-size: {err}")


def require_cpu(backend: str, device: object) -> None:
    """Stop (``SystemExit`` with the one line) when a CPU-only ``backend`` is asked to run on another device."""
    if backend != "torch" and str(device).split(":")[0] != "cpu":
        raise SystemExit(f"--backend {backend} runs on the CPU: use --device cpu")


def calibration_files(folder: str | Path, count: int) -> list[Path]:
    """``count`` image files spread over ``folder`` (searched recursively, sorted; classes are usually sorted)."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_EXTENSIONS)}) for int8 calibration")
    step = max(1, len(files) // count)
    chosen = files[::step][:count]
    if len(chosen) < MIN_CALIBRATION_IMAGES:
        log.warning("int8 calibration on %d image(s) of %s: ranges from so few images can cost many points of "
                    "accuracy; calibrate on %d or more from several classes, and check with --gate",
                    len(chosen), folder, MIN_CALIBRATION_IMAGES)
    return chosen


def calibration_images(folder: str | Path, count: int) -> list[np.ndarray]:
    """``count`` RGB ``uint8 [H, W, 3]`` images read from ``folder`` (see :func:`calibration_files`)."""
    from mbv3_dense.data.image_io import read_image_rgb

    return [read_image_rgb(path) for path in calibration_files(folder, count)]


def backend_label(backend: str, network: object) -> tuple[str, bool]:
    """``("executorch int8", True)``-style label of what ran, and whether it was int8."""
    int8 = bool(getattr(network, "int8", False)) or "int8" in str(getattr(network, "path", ""))
    return (f"{backend} int8" if int8 else backend), int8
