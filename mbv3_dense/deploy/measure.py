"""Load time, latency and peak memory of one ``.pte``, measured in a process of its own.

    python -m mbv3_dense.deploy.measure FILE --threads 1 16 --size H W [--runs 20] [--warmup 5]

prints one JSON object: load time, latency median and p90 at each thread count (in the order given), and
peak resident memory. Each program is timed in a fresh process: XNNPACK's and torch's thread pools keep
spinning after a call and slow down whatever runs next in the same process, and a fresh process's peak
resident memory is the program's own plus the runtime's. :func:`measure_program` runs it and reads the result.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _status_mb(key: str) -> float | None:
    """A ``/proc/self/status`` size of this process (``VmRSS``, ``VmHWM``), MB; ``None`` where not readable."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _reset_peak() -> bool:
    """Reset the process's peak resident size to its current one (Linux: ``clear_refs`` 5), so that the peak read
    later is that of loading and running the program, not of importing the libraries."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(path: str | Path, *, threads: list[int], size: tuple[int, int], runs: int = 20, warmup: int = 5) -> dict:
    """Measure in this process (call it in a fresh one: see the module's docstring)."""
    import torch
    from executorch.runtime import Runtime

    from mbv3_dense.deploy.executorch_runtime import ExecuTorchModel, set_threads

    torch.set_num_threads(threads[0])
    Runtime.get()  # the runtime and its kernels are loaded before the clock and the baseline
    set_threads(threads[0])
    baseline = _status_mb("VmRSS") or 0.0
    reset = _reset_peak()
    start = time.perf_counter()
    model = ExecuTorchModel(path, threads=threads[0])
    load_ms = (time.perf_counter() - start) * 1000
    x = torch.rand(model.input_shape[0], model.input_shape[1], *size, generator=torch.Generator().manual_seed(0))
    if not model.takes_image:
        x = (x - 0.45) / 0.225  # values in the range a normalised image has
    latency = {}
    for count in threads:
        torch.set_num_threads(count)
        set_threads(count)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t) * 1000)
        times.sort()
        latency[str(count)] = {"median_ms": round(statistics.median(times), 3),
                               "p90_ms": round(times[min(len(times) - 1, round(0.9 * (len(times) - 1)))], 3),
                               "runs": runs}
    # The peak since the reset; where it cannot be reset, the process's lifetime peak (imports included).
    peak = (_status_mb("VmHWM") if reset else None) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"input": list(size), "load_ms": round(load_ms, 2), "latency": latency,
            "peak_rss_mb": round(peak, 1), "baseline_rss_mb": round(baseline, 1),
            "peak_over_baseline_mb": round(peak - baseline, 1)}


def measure_program(path: str | Path, *, threads: list[int], size: tuple[int, int], runs: int = 20, warmup: int = 5,
                    timeout: float = 1800) -> dict:
    """:func:`measure` in a fresh Python process; raises ``RuntimeError`` with its stderr when it fails."""
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", "mbv3_dense.deploy.measure", str(path), "--threads", *map(str, threads),
           "--size", str(size[0]), str(size[1]), "--runs", str(runs), "--warmup", str(warmup)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring {path} failed (exit {proc.returncode}): {proc.stderr.strip()[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", type=Path)
    parser.add_argument("--threads", type=int, nargs="+", required=True, help="thread counts, timed in turn")
    parser.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"))
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    args = parser.parse_args(argv)
    result = measure(args.path, threads=list(args.threads), size=tuple(args.size), runs=args.runs, warmup=args.warmup)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
