"""Images/s of ``lightning predict``'s detection step on each ``predict_backend`` against torchvision's plain loop.

    python scripts/benchmark_predict.py [--threads N] [--rounds 3] [--runs 20] [--json OUT]

SSDLite320-Large on one 480x640 image (uint8, as the predict loader gives it), end to end: to float,
resize to 320x320, normalise, network, decoding, NMS, boxes scaled back. Contenders: torchvision's
``ssdlite320_mobilenet_v3_large`` called as ``model([image])`` (the baseline), and
:meth:`DetectionModule.predict_step` with ``predict_backend`` ``torch``, ``folded``, ``onnxruntime`` and
``executorch`` (the module's own path; the exported files are written once, in this process, by the
same :func:`mbv3_dense.deploy.make_backend` the module calls, and each timing process loads them).
Every contender has the same weights (torchvision's random initialisation, batch-norm statistics
re-estimated on random images so that the features do not vanish, copied into ours), in two regimes:

- ``near-uniform``: the class predictors as drawn, class scores spread out (max about 0.04): every
  anchor and class passes the 0.001 score threshold, so decoding, top-k and NMS see the most
  candidates (the postprocess dominates);
- ``saturated``: the class predictors' weights and biases x ``--saturate-scale`` (100): the softmax is
  nearly one-hot per anchor and few candidates pass (the network dominates).

As ``scripts/benchmark.py``: each timing is a fresh process holding one contender (``--worker``), the
contenders taking turns over ``--rounds`` rounds (A B C A B C ...); the table gives the median of all
timed calls, the spread of the per-round medians, images/s, and the ratio of times to torchvision's
(below 1: faster) with its range over the rounds.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

BASELINE = "torchvision eager"
BACKENDS = ("torch", "folded", "onnxruntime", "executorch")
REGIMES = ("saturated", "near-uniform")
WORKER_TAG = "WORKER "
CLS_PREDICTOR = re.compile(r"head\.classification_head\.module_list\.\d+\.1\.(weight|bias)")


def torchvision_detector() -> torch.nn.Module:
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)


def make_state(seed: int, scale: float) -> dict:
    """torchvision's random weights with batch-norm statistics of random images, both regimes, and the image."""
    torch.manual_seed(seed)
    tv = torchvision_detector()
    for module in tv.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration batches
    tv.train()
    with torch.no_grad():
        for _ in range(2):
            tv.head(list(tv.backbone(torch.rand(4, 3, 320, 320) * 2 - 1).values()))
    uniform = tv.eval().state_dict()
    saturated = {k: v * scale if CLS_PREDICTOR.fullmatch(k) else v for k, v in uniform.items()}
    image = (torch.rand(3, 480, 640) * 255).to(torch.uint8)
    return {"near-uniform": uniform, "saturated": saturated, "image": image}


def build(regime: str, contender: str, state: dict, work: Path):
    """The zero-argument call of one contender (built in the timing process)."""
    import detection
    from detection.module import DetectionModule
    from detection.weights import from_torchvision_ssdlite
    from mbv3_dense.checkpoints.weights import load_state_dict_strict
    from mbv3_dense.data.predict import PredictBatch
    from mbv3_dense.deploy import ExecuTorchModel, OnnxModel

    image = state["image"]
    if contender == BASELINE:
        tv = torchvision_detector().eval()
        tv.load_state_dict(state[regime])
        return lambda: tv([image.float().div(255)])
    ours = detection.ssdlite_mobilenet_v3_large().eval()
    c4 = ours.backbone.feature_info["c4_expand"].index
    load_state_dict_strict(ours, from_torchvision_ssdlite(state[regime], c4), "torchvision ssdlite")
    backend = contender.removeprefix("ours ")
    module = DetectionModule(model=ours, predict_backend=backend).eval()
    threads = torch.get_num_threads()
    if backend == "onnxruntime":  # the file the module would export, loaded (the export is not timed)
        module._predict_nets[ours.image_size] = OnnxModel(export_path(work, regime, backend), threads=threads)
    elif backend == "executorch":
        module._predict_nets[ours.image_size] = ExecuTorchModel(export_path(work, regime, backend), task="detect",
                                                                threads=threads)
    batch = PredictBatch([image], None, [None], [None], [])
    return lambda: module.predict_step(batch, 0)


def export_path(work: Path, regime: str, backend: str) -> Path:
    return work / f"{regime}.{'onnx' if backend == 'onnxruntime' else 'pte'}"


def export(work: Path, regime: str, backend: str, state: dict) -> str:
    import detection
    from detection.weights import from_torchvision_ssdlite
    from mbv3_dense.checkpoints.weights import load_state_dict_strict
    from mbv3_dense.deploy import make_backend

    ours = detection.ssdlite_mobilenet_v3_large().eval()
    c4 = ours.backbone.feature_info["c4_expand"].index
    load_state_dict_strict(ours, from_torchvision_ssdlite(state[regime], c4), "torchvision ssdlite")
    example = ours.preprocess([torch.rand(3, *ours.image_size)])
    path = export_path(work, regime, backend)
    start = time.perf_counter()
    if backend == "onnxruntime":
        make_backend(backend, ours, example, onnx_path=path)
    else:
        make_backend(backend, ours, example, pte_path=path, task="detect")
    return f"{regime} {backend}: exported in {time.perf_counter() - start:.1f} s"


def contenders(executorch: bool) -> list[str]:
    return [BASELINE] + [f"ours {b}" for b in BACKENDS if executorch or b != "executorch"]


def worker(args: argparse.Namespace) -> int:
    regime, _, index = args.worker.partition(":")
    state = torch.load(args.work / "state.pt", weights_only=True)
    with torch.inference_mode():
        call = build(regime, contenders(args.executorch)[int(index)], state, args.work)
        for _ in range(args.warmup):
            call()
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            out = call()
            times.append((time.perf_counter() - start) * 1000.0)
    print(WORKER_TAG + json.dumps({"times": times, "detections": len(out[0]["boxes"])}), flush=True)
    return 0


def run_worker(args: argparse.Namespace, regime: str, index: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", f"{regime}:{index}", "--work", str(args.work),
           "--threads", str(args.threads), "--runs", str(args.runs), "--warmup", str(args.warmup)]
    if not args.executorch:
        cmd.append("--no-executorch")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = [line for line in proc.stdout.splitlines() if line.startswith(WORKER_TAG)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"timing process failed (exit {proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return json.loads(lines[-1][len(WORKER_TAG):])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=None, help="torch, ONNX Runtime and XNNPACK threads")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--runs", type=int, default=20, help="timed calls per contender and round")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--saturate-scale", type=float, default=100.0, help="class predictor factor of the saturated regime")
    p.add_argument("--no-executorch", dest="executorch", action="store_false")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write one JSON object per row here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.rounds, args.runs) < 1 or args.warmup < 0:
        p.error("--rounds and --runs must be at least 1, --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    if args.executorch:
        try:
            import executorch  # noqa: F401
        except ImportError:
            args.executorch = False
    if args.worker is not None:
        return worker(args)
    print(f"# {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}  threads {args.threads}  "
          f"torch {torch.__version__}  torchvision {torchvision.__version__}  batch 1, 480x640 uint8 image, "
          f"each contender in its own process, {args.rounds} rounds")
    print(f"# command: python {' '.join(sys.argv)}", flush=True)
    names = contenders(args.executorch)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        args.work = Path(tmp)
        state = make_state(args.seed, args.saturate_scale)
        torch.save(state, args.work / "state.pt")
        for regime in REGIMES:
            for backend in ("onnxruntime", "executorch")[: 2 if args.executorch else 1]:
                print("# " + export(args.work, regime, backend, state), flush=True)
        for regime in REGIMES:
            runs: dict[int, list[dict]] = {i: [] for i in range(len(names))}
            for _ in range(args.rounds):
                for i in range(len(names)):
                    runs[i].append(run_worker(args, regime, i))
            base = [statistics.median(r["times"]) for r in runs[0]]
            base_median = statistics.median([t for r in runs[0] for t in r["times"]])
            for i, name in enumerate(names):
                medians = [statistics.median(r["times"]) for r in runs[i]]
                median = statistics.median([t for r in runs[i] for t in r["times"]])
                ratios = [m / b for m, b in zip(medians, base, strict=True)]
                results.append({"regime": regime, "row": name, "median_ms": round(median, 2),
                                "round_medians_ms": [round(m, 2) for m in medians],
                                "images_per_s": round(1000.0 / median, 2), "ratio": round(median / base_median, 3),
                                "ratio_min": round(min(ratios), 3), "ratio_max": round(max(ratios), 3),
                                "detections": runs[i][0]["detections"], "threads": args.threads})
    header = f"{'regime':13} {'row':18} {'median ms':>9} {'rounds min-max':>15} {'images/s':>9} {'ratio':>6} " \
             f"{'ratio range':>12} {'detections':>10}"
    print(header)
    print("-" * len(header))
    for r in results:
        spread = f"{min(r['round_medians_ms']):.1f}-{max(r['round_medians_ms']):.1f}"
        print(f"{r['regime']:13} {r['row']:18} {r['median_ms']:9.1f} {spread:>15} {r['images_per_s']:9.1f} "
              f"{r['ratio']:6.2f} {r['ratio_min']:5.2f}-{r['ratio_max']:<6.2f} {r['detections']:10d}")
    for r in results:
        print("JSON " + json.dumps(r))
    if args.json is not None:
        args.json.write_text("".join(json.dumps(r) + "\n" for r in results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
