"""Streaming against files, per loader worker, on the generated demo datasets; and the preparation time.

    python scripts/benchmark_streaming.py --workdir /tmp/bench_streaming [--tasks classify detect segment]
        [--turns 5] [--samples 300] [--prepare-workers 2] [--json out.json] [--quick]

Per task, on the datasets ``scripts/make_demo_data.py`` writes at its default sizes (generated into
``--workdir`` once, reused afterwards; ``--quick``: its ``--tiny`` sizes, a smoke test whose figures mean nothing):

- **preparation**: the data module is set up as ``lightning fit`` does, then each split is written as LitData
  chunks with ``--prepare-workers`` processes (``mbv3_dense.data.streaming.write.write_chunks``, what
  ``scripts/prepare_streaming.py`` runs): seconds, items/s, and the bytes of the chunks against the files'.
- **per worker**: images/s of the training dataset's ``dataset[key]`` (decode + the demo config's augmentation)
  in one process with one torch thread and no OpenCV threads (a loader worker's settings,
  ``mbv3_dense.data.sampling.worker_init``), for the keys of an epoch in the sampler's order (``SeededSampler``, the
  first ``--samples``): from the files and from the chunk folder. ``read`` is the bytes alone
  (``Path.read_bytes`` of the sample's files against the chunk item). Turns are interleaved (files, chunks,
  chunks, files, ...) after an untimed one each; each figure is the median turn. (A URL is read from the
  node's copy of its chunks, the same folder reading: ``mbv3_dense.data.streaming.stage.stage_chunks``.)

Prints a table; ``--json OUT`` writes ``{"meta": {...}, "rows": [...]}``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TASKS = ("classify", "detect", "segment")
# The task's config and the demo's overlay: the data module and the augmentation the demo trains with.
CONFIGS = {"classify": ("configs/mobilenet_v3_small_imagenet.yaml", "configs/demo/classify.yaml"),
           "detect": ("configs/ssdlite_mobilenet_v3_small_coco.yaml", "configs/demo/detect.yaml"),
           "segment": ("configs/lraspp_mobilenet_v3_small_cityscapes.yaml", "configs/demo/segment.yaml")}


def generate(task: str, root: Path, quick: bool) -> Path:
    """The demo dataset of ``task`` in ``root`` (written when ``root`` does not exist yet)."""
    if root.exists():
        return root
    sys.path.insert(0, str(REPO / "scripts"))
    import make_demo_data

    make_demo_data.main([task, "--out", str(root), *(["--tiny"] if quick else [])])
    return root


def data_module(task: str, root: Path, streaming: str | None = None):
    """The demo's data module for ``task`` (the config's, with the demo overlay's arguments), over ``root`` or
    ``streaming``."""
    base, overlay = (yaml.safe_load((REPO / path).read_text())["data"] for path in CONFIGS[task])
    module, _, name = overlay.get("class_path", base["class_path"]).rpartition(".")
    init_args = {**base.get("init_args", {}), **overlay["init_args"], "root": str(root), "num_workers": 0,
                 "streaming": streaming}
    return getattr(importlib.import_module(module), name)(**init_args)


def folder_bytes(paths: list[Path]) -> int:
    return sum(p.stat().st_size for p in paths)


def prepare(task: str, root: Path, out: Path, workers: int) -> list[dict]:
    """Write both splits; a row per split."""
    from mbv3_dense.data.streaming.write import remove_folder, write_chunks

    dm = data_module(task, root)
    start = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - start
    rows = []
    for split in ("train", "val"):
        remove_folder(out / split)
        source = dm.chunk_source(split)
        start = time.perf_counter()
        write_chunks(source, out / split, num_workers=workers)
        seconds = time.perf_counter() - start
        chunks = sorted((out / split).glob("chunk-*.bin"))
        files = sample_files(task, source.samples)
        rows.append({"task": task, "split": split, "items": source.record.count, "seconds": round(seconds, 2),
                     "items_per_s": round(source.record.count / seconds, 1), "setup_s": round(setup_s, 2),
                     "workers": workers, "chunks": len(chunks), "chunk_mb": round(folder_bytes(chunks) / 1e6, 2),
                     "file_mb": round(folder_bytes(files) / 1e6, 2)})
    return rows


def sample_files(task: str, samples: list) -> list[Path]:
    """The files a dataset's samples read (for the bytes of the files, and ``read``)."""
    if task == "classify":
        return [path for path, _ in samples]
    if task == "detect":
        return [rec.path for rec in samples]
    return [path for pair in samples for path in pair[:2]]


def timed_turns(calls: dict[str, Callable[[], object]], *, items: int, turns: int) -> dict[str, float]:
    """Items/s of each call, median over ``turns`` turns taken in alternating order after one untimed turn each."""
    from mbv3_dense.training.progress import progress

    times: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for turn in progress(range(turns + 1), desc="turns", unit="turn"):
        for name in names if turn % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            calls[name]()
            if turn:
                times[name].append(time.perf_counter() - start)
    return {name: items / statistics.median(values) for name, values in times.items()}


def per_worker(task: str, root: Path, chunks: Path, samples: int, turns: int) -> dict:
    """Images/s per loader worker: files against the chunk folder."""
    from mbv3_dense.data.sampling import SeededSampler, worker_init

    worker_init(0)
    files = data_module(task, root)
    local = data_module(task, root, str(chunks))
    for dm in (files, local):
        dm.setup("fit")
    keys = list(SeededSampler(files.train_set, seed=0))[:samples]
    datasets = {"files": files.train_set, "chunks": local.train_set}
    rates = timed_turns({name: (lambda d=d: [d[k] for k in keys]) for name, d in datasets.items()},
                        items=len(keys), turns=turns)
    paths = sample_files(task, files.train_set.samples if task == "classify" else
                         files.train_set.records if task == "detect" else files.train_set.pairs)
    per_sample = len(paths) // len(files.train_set)
    reads = timed_turns({"files": lambda: [p.read_bytes() for k in keys
                                           for p in paths[k.index * per_sample:(k.index + 1) * per_sample]],
                         "chunks": lambda: [local.train_set.chunks[k.index] for k in keys]},
                        items=len(keys), turns=turns)
    return {"task": task, "samples": len(keys), "turns": turns,
            **{f"{name}_img_s": round(rate, 1) for name, rate in rates.items()},
            "chunks_vs_files": round(rates["chunks"] / rates["files"], 3),
            "read_files_per_s": round(reads["files"], 1), "read_chunks_per_s": round(reads["chunks"], 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True, help="generated data and chunks (reused)")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--samples", type=int, default=300, help="samples per turn (the first of an epoch)")
    parser.add_argument("--prepare-workers", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quick", action="store_true", help="tiny data, 1 turn: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.turns, args.samples = 1, 8
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    prepared, pipeline = [], []
    for task in args.tasks:
        root = generate(task, args.workdir / ("tiny" if args.quick else "data") / task, args.quick)
        chunks = args.workdir / ("tiny" if args.quick else "data") / f"{task}_chunks"
        prepared += prepare(task, root, chunks, args.prepare_workers)
        pipeline.append(per_worker(task, root, chunks, args.samples, args.turns))

    print(f"\npreparation (LitData optimize, {args.prepare_workers} workers)")
    print(f"{'task':9} {'split':5} {'items':>6} {'seconds':>8} {'items/s':>8} {'chunks':>6} {'chunk MB':>9} "
          f"{'file MB':>8}")
    for r in prepared:
        print(f"{r['task']:9} {r['split']:5} {r['items']:6d} {r['seconds']:8.2f} {r['items_per_s']:8.1f} "
              f"{r['chunks']:6d} {r['chunk_mb']:9.2f} {r['file_mb']:8.2f}")
    print("\nper loader worker (images/s of dataset[key], one thread)")
    print(f"{'task':9} {'files':>8} {'chunks':>8} {'ratio':>6} {'read files/s':>13} {'read chunks/s':>14}")
    for r in pipeline:
        print(f"{r['task']:9} {r['files_img_s']:8.1f} {r['chunks_img_s']:8.1f} {r['chunks_vs_files']:6.3f} "
              f"{r['read_files_per_s']:13.1f} {r['read_chunks_per_s']:14.1f}")
    if args.json:
        meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                "load_average": os.getloadavg(), "argv": sys.argv[1:]}
        args.json.write_text(json.dumps({"meta": meta, "prepare": prepared, "rows": pipeline}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
