"""scripts/benchmark.py times each contender in a process of its own, in rounds (A B C A B C ...), and
reports the spread; ``--in-process`` is the old interleaved timing in one process. Speed itself is
never asserted: only that the figures are there, consistent, and the outputs still agree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["scripts/benchmark.py", "--quick", "--tasks", "classify", "--arch", "small", "--no-int8", "--no-executorch",
         "--threads", "1"]


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_each_contender_is_timed_in_its_own_process_in_rounds(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    proc = run(*QUICK, "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out)
    assert [r["row"] for r in rows] == ["torchvision eager", "ours eager", "ours folded", "ours onnxruntime"]
    for r in rows:
        assert r["timing"] == "own process per contender and round"
        assert r["rounds"] == 2 and r["runs"] == 3 and len(r["round_medians_ms"]) == 2
        assert min(r["round_medians_ms"]) > 0 and r["ratio_min"] <= r["ratio_max"]
    assert rows[0]["ratio"] == rows[0]["ratio_min"] == rows[0]["ratio_max"] == 1.0
    # Each process rebuilt its contender from the same saved weights: the outputs agree.
    assert all(r["max_diff"] is not None and r["max_diff"] < 1e-3 for r in rows[1:])
    assert "each contender in its own process, 2 rounds" in proc.stdout and "rounds min-max" in proc.stdout
    assert not list(tmp_path.glob("*.partial"))


def test_in_process_timing_is_still_available(tmp_path: Path) -> None:
    out = tmp_path / "bench.jsonl"
    proc = run(*QUICK, "--in-process", "--rounds", "1", "--json", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = rows_of(out)
    assert len(rows) == 4 and {r["timing"] for r in rows} == {"one process, interleaved"}
    assert all(r["rounds"] == 1 and r["max_diff"] < 1e-3 for r in rows[1:])


def test_bad_options_stop_before_any_work(tmp_path: Path) -> None:
    for bad, message in ((["--rounds", "0"], "--rounds must be at least 1"),
                         (["--reuse-exports"], "--reuse-exports needs --keep-onnx")):
        out = tmp_path / "x.jsonl"
        proc = run("scripts/benchmark.py", *bad, "--json", str(out))
        assert proc.returncode == 2 and message in proc.stderr, (bad, proc.stderr[-500:])
        assert not out.exists()
