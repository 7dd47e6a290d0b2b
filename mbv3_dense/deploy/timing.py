"""Interleaved timing: several implementations measured in turns (A B C A B C ...) in one process.

Interleaving spreads slow phases of a shared machine (other processes, thermal state) over all
contenders instead of charging them to whichever ran at that moment, so ratios measured in one run
are meaningful even when absolute times drift. ONNX Runtime sessions must be created with spinning
off (:func:`mbv3_dense.deploy.create_session`) or their idle threads slow the next contender down.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # mbv3_dense.latency imports lightning, a 5 s import the deploy tools do not need
    from mbv3_dense.latency import Latency


def _percentile(sorted_times: list[float], q: float) -> float:
    return sorted_times[min(len(sorted_times) - 1, int(round(q * (len(sorted_times) - 1))))]


def interleaved_latency(calls: Mapping[str, Callable[[], object]], *, warmup: int = 3,
                        runs: int = 20) -> dict[str, Latency]:
    """Time every zero-argument call ``runs`` times in turns, after ``warmup`` untimed turns.

    Returns per name the median and 90th percentile in milliseconds (the same convention as
    :func:`mbv3_dense.latency.measure_latency`), on the CPU with ``torch.get_num_threads()`` threads.
    """
    from mbv3_dense.latency import Latency

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
