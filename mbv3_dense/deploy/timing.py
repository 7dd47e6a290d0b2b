"""Timing helpers (no Lightning import): :func:`measure_latency` of one call, and interleaved timing of
several implementations measured in turns (A B C A B C ...) in one process.

Interleaving spreads slow phases of a shared machine (other processes, thermal state) over all
contenders instead of charging them to whichever ran at that moment, so ratios measured in one run
are meaningful even when absolute times drift. ONNX Runtime sessions must be created with spinning
off (:func:`mbv3_dense.deploy.create_session`) or their idle threads slow the next contender down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Latency:
    """Timing of one input shape: milliseconds per call at batch 1."""

    median_ms: float
    p90_ms: float
    runs: int
    device: str
    threads: int


def _percentile(sorted_times: list[float], q: float) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(round(q * (len(sorted_times) - 1))))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_latency(fn: Callable[[Tensor], object], example: Tensor, *, warmup: int = 5,
                    runs: int = 20) -> Latency:
    """Median and 90th percentile wall time of ``fn(example)``, after ``warmup`` calls.

    CUDA work is synchronised before each clock read.
    """
    device = example.device
    for _ in range(warmup):
        fn(example)
    _sync(device)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(example)
        _sync(device)
        times.append((time.perf_counter() - start) * 1000.0)
    times.sort()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return Latency(statistics.median(times), _percentile(times, 0.9), runs, name, torch.get_num_threads())


def interleaved_latency(calls: Mapping[str, Callable[[], object]], *, warmup: int = 3,
                        runs: int = 20) -> dict[str, Latency]:
    """Time every zero-argument call ``runs`` times in turns, after ``warmup`` untimed turns.

    Returns per name the median and 90th percentile in milliseconds (the same convention as
    :func:`measure_latency`), on the CPU with ``torch.get_num_threads()`` threads.
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for _ in range(warmup):
            for call in calls.values():
                call()
        for _ in range(runs):
            for name, call in calls.items():
                start = time.perf_counter()
                call()
                times[name].append((time.perf_counter() - start) * 1000.0)
    threads = torch.get_num_threads()
    out = {}
    for name, values in times.items():
        values.sort()
        out[name] = Latency(statistics.median(values), _percentile(values, 0.9), runs, "cpu", threads)
    return out
