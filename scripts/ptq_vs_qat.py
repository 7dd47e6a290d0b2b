"""Post-training int8 against quantization-aware int8 on a trained classifier, through the deployed ``.pte``.

    python scripts/ptq_vs_qat.py --weights RUN.ckpt --data DIR --out OUT [--image-size 64]
        [--calibration 1 4] [--calibration-seed 1 2 3] [--schemes per-channel per-tensor] [--qat per-tensor]
        [--seed 0]
        [--config configs/mobilenet_v3_small_imagenet.yaml --config configs/demo/classify.yaml]
        [--fit-arg=--data.num_workers --fit-arg=1]

Every figure is ``scripts/eval_classify.py``'s top-1 on ``DIR/val``, run with ExecuTorch (XNNPACK):

- **fp32**: the float network exported to a ``.pte`` (``--backend executorch``).
- **PTQ int8**, per scheme (per-channel or per-tensor weights) and per calibration size N:
  :func:`mbv3_dense.deploy.qat.ptq_pte` (the same quantizer as QAT, PT2E + ``XNNPACKQuantizer``, min/max
  weight ranges, histogram activation ranges) calibrated on N images of ``DIR/train``, spread over the
  sorted files as ``scripts/export.py`` picks them, or drawn at random with each ``--calibration-seed``,
  each prepared as evaluation prepares its images (resize, centre crop); ``OUT/ptq_<scheme>_<N>[_s<seed>].pte``.
- **QAT int8**, per scheme of ``--qat``: ``lightning fit`` with ``--config`` files and ``configs/qat/classify.yaml``
  from ``--weights`` (fine-tuning on ``DIR/train``, seed ``--seed``) into ``OUT/qat_<scheme>/``, which
  writes ``qat_int8.pte`` (and ``ptq_int8.pte``, calibrated on 4 training batches).

Prints a Markdown table and writes ``OUT/results.json``; existing ``.pte`` files and finished QAT runs are
reused (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCHEMES = ("per-channel", "per-tensor")
DEMO_CONFIGS = ["configs/mobilenet_v3_small_imagenet.yaml", "configs/demo/classify.yaml"]


def say(text: str) -> None:
    print(f"[ptq_vs_qat {time.strftime('%H:%M:%S')}] {text}", flush=True)


def run(cmd: list[str]) -> None:
    say("$ " + " ".join(cmd))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        raise SystemExit(f"step failed: {' '.join(cmd)}")


def top1(args: argparse.Namespace, pte: Path | None, name: str) -> float:
    """``eval_classify.py``'s top-1 of the fp32 export (``pte`` None) or of the ``.pte`` file."""
    summary = args.out / f"eval_{name}.json"
    if not summary.exists():
        cmd = [sys.executable, "scripts/eval_classify.py", "--weights", str(args.weights), "--root", str(args.data),
               "--image-size", str(args.image_size), "--backend", "executorch", "--latency-runs", "3",
               "--json", str(summary)]
        run(cmd + (["--pte", str(pte)] if pte is not None else []))
    value = json.loads(summary.read_text())["top1"]
    say(f"{name}: top-1 {value:.4f}")
    return value


def calibration_files(args: argparse.Namespace, count: int, seed: int | None) -> list[Path]:
    """``count`` training images: spread over the sorted files (``seed`` None) or drawn at random."""
    from mbv3_dense.deploy import options

    if seed is None:
        return options.calibration_files(args.data / "train", count)
    files = sorted(p for p in (args.data / "train").rglob("*") if p.suffix.lower() in options.IMAGE_EXTENSIONS)
    return random.Random(seed).sample(files, count)


def ptq(args: argparse.Namespace, scheme: str, count: int, seed: int | None) -> Path:
    """The PTQ ``.pte`` of ``--weights`` with ``scheme`` weights, calibrated on ``count`` training images."""
    import torch

    from mbv3_dense.checkpoints.resolve import resolve_model
    from mbv3_dense.classification.transforms import eval_transform
    from mbv3_dense.data.image_io import read_image_rgb
    from mbv3_dense.deploy.qat import ptq_pte

    path = args.out / f"ptq_{scheme}_{count}{'' if seed is None else f'_s{seed}'}.pte"
    if path.exists():
        return path
    model = resolve_model("classify", args.weights).model.eval()
    files = calibration_files(args, count, seed)
    transform = eval_transform(resize_size=round(args.image_size * 256 / 224), crop_size=args.image_size)
    inputs = [model.normalize(transform(torch.from_numpy(a).permute(2, 0, 1).contiguous())[None].float() / 255)
              for a in map(read_image_rgb, files)]
    say(f"PTQ, {scheme} weights, {len(inputs)} calibration images ({', '.join(f.name for f in files[:4])}"
        f"{', ...' if len(files) > 4 else ''}) -> {path}")
    result = ptq_pte(model, inputs, path, task="classify", per_channel=scheme == "per-channel")
    say(f"wrote {path} ({result.seconds:.0f} s)")
    return path


def qat(args: argparse.Namespace, scheme: str) -> Path:
    """The run folder of a QAT fine-tuning of ``--weights`` with ``scheme`` weights (skipped when done)."""
    run_dir = args.out / f"qat_{scheme}"
    if (run_dir / "qat_int8.pte").exists():
        return run_dir
    cmd = [sys.executable, "-m", "mbv3_dense", "fit"]
    for config in [*args.config, "configs/qat/classify.yaml"]:
        cmd += ["-c", config]
    cmd += ["--model.init_args.model.init_args.weights", str(args.weights), "--seed_everything", str(args.seed),
            "--data.root", str(args.data), "--trainer.default_root_dir", str(run_dir),
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(run_dir),
            "--trainer.callbacks.init_args.per_channel", str(scheme == "per-channel").lower(), *args.fit_arg]
    run(cmd)
    return run_dir


def table(results: dict) -> str:
    lines = ["| weights | calibration | fp32 | PTQ int8 | PTQ - fp32 | QAT int8 | QAT - fp32 |",
             "|---|---|---|---|---|---|---|"]
    fp32 = results["fp32"]
    for row in results["rows"]:
        q = row.get("qat")
        lines.append(f"| {row['scheme']} | {row['calibration']} | {fp32:.4f} | {row['ptq']:.4f} | "
                     f"{100 * (row['ptq'] - fp32):+.2f} pt | " + (f"{q:.4f} | {100 * (q - fp32):+.2f} pt |"
                                                                  if q is not None else "- | - |"))
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", type=Path, required=True, help="the trained classifier's .ckpt")
    p.add_argument("--data", type=Path, required=True, help="image folder with train/ and val/")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--calibration", type=int, nargs="+", default=[1, 4, 128], help="PTQ calibration image counts")
    p.add_argument("--schemes", nargs="*", choices=SCHEMES, default=list(SCHEMES), help="PTQ weight schemes")
    p.add_argument("--calibration-seed", type=int, nargs="+", default=None,
                   help="draw the calibration images at random with each of these seeds (default: spread over "
                        "the sorted files, as scripts/export.py does)")
    p.add_argument("--qat", nargs="*", choices=SCHEMES, default=["per-tensor"],
                   help="QAT runs, one per scheme (the flag alone: none)")
    p.add_argument("--seed", type=int, default=0, help="the QAT run's seed_everything")
    p.add_argument("--config", action="append", default=None, help="fit configs before configs/qat/classify.yaml "
                   "(default: the demo's, " + ", ".join(DEMO_CONFIGS) + ")")
    p.add_argument("--fit-arg", action="append", default=[], help="one more argument of the QAT fit (repeat)")
    args = p.parse_args(argv)
    args.config = args.config or DEMO_CONFIGS
    args.weights, args.data = args.weights.resolve(), args.data.resolve()
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.out = args.out.resolve()
    results = {"weights": str(args.weights), "data": str(args.data), "image_size": args.image_size,
               "seed": args.seed, "fp32": top1(args, None, "fp32"), "rows": []}
    for scheme in args.schemes:
        for count in args.calibration:
            for seed in args.calibration_seed or [None]:
                pte = ptq(args, scheme, count, seed)
                value = top1(args, pte, pte.stem)
                drawn = "spread over the sorted files" if seed is None else f"drawn with seed {seed}"
                images = f"{count} image{'s' if count > 1 else ''}"
                results["rows"].append({"scheme": scheme, "calibration": f"{images}, {drawn}", "ptq": value})
    for scheme in args.qat:
        run_dir = qat(args, scheme)
        results["rows"].append({"scheme": scheme, "calibration": "4 training batches (the QAT run's baseline)",
                                "ptq": top1(args, run_dir / "ptq_int8.pte", f"qat_{scheme}_baseline"),
                                "qat": top1(args, run_dir / "qat_int8.pte", f"qat_{scheme}")})
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))
    say(f"results in {args.out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
