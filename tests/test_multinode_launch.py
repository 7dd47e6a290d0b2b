"""Multi-node launch pitfalls, refused before training with what to do (mbv3_dense.training.cluster).

python instead of srun (one run, started as sbatch's batch step would), SLURM_NTASKS not nodes x devices,
MASTER_ADDR unset, torchrun's world size, restarts with the shared rendezvous store; the DDP strategy the
trainer gets (the process-group timeout) and the failure report's recognition of collective errors. The
multi-process runs themselves are tests/test_multinode.py's.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from mbv3_dense.training.cluster import (
    DDP_TIMEOUT,
    ClusterLaunchError,
    DistributedFailureReport,
    Layout,
    devices_per_node,
    launch_problems,
    prepare_trainer,
)
from tests.test_multinode import LAUNCH_VARIABLES, fit_args, free_port, slurm_env


def test_python_instead_of_srun_stops_before_training_with_what_to_do(tiny_imagefolder: Path,
                                                                      tmp_path: Path) -> None:
    """Inside a 2-task allocation, started without srun: Lightning would wait for a rank 1 nobody starts."""
    proc = subprocess.run([sys.executable, "-m", "mbv3_dense", *fit_args("classify", tiny_imagefolder, 3),
                           "--trainer.devices", "1", "--trainer.num_nodes", "2"],
                          cwd=tmp_path, env=slurm_env(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: this run cannot start as launched" in proc.stderr, proc.stderr[-3000:]
    assert "started with python instead of srun" in proc.stderr and "Traceback" not in proc.stderr
    assert "Initializing distributed" not in proc.stdout + proc.stderr
    assert not list(tmp_path.rglob("*.ckpt"))


SRUN_TASK = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train", "SLURM_NTASKS": "4", "SLURM_NNODES": "2",
             "SLURM_NTASKS_PER_NODE": "2", "SLURM_PROCID": "3", "SLURM_STEP_NUM_TASKS": "4"}


def test_srun_tasks_matching_the_trainer_pass() -> None:
    assert launch_problems(Layout(2, 2), SRUN_TASK) == []


def test_python_in_the_batch_step_is_named() -> None:
    batch_step = {k: v for k, v in SRUN_TASK.items() if not k.startswith("SLURM_STEP")} | {"SLURM_PROCID": "0"}
    problems = launch_problems(Layout(2, 2), batch_step)
    assert len(problems) == 1 and "started with python instead of srun" in problems[0]
    assert "SLURM_STEP_NUM_TASKS is unset" in problems[0] and "srun python -m mbv3_dense fit" in problems[0]
    one_task_step = {**SRUN_TASK, "SLURM_STEP_NUM_TASKS": "1"}  # e.g. `srun -n 1` inside a 4-task allocation
    assert "its job step has 1 task(s)" in launch_problems(Layout(2, 2), one_task_step)[0]


@pytest.mark.parametrize(("env", "layout"), [
    # Lightning issue #20391: one task, two per node asked; Lightning checks per node and nodes only.
    ({"SLURM_NTASKS": "1", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2", "SLURM_STEP_NUM_TASKS": "1"},
     Layout(1, 2)),
    # 8 tasks for a 2 x 2 trainer.
    ({"SLURM_NTASKS": "8", "SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "4", "SLURM_STEP_NUM_TASKS": "8"},
     Layout(2, 2)),
])
def test_slurm_tasks_other_than_nodes_times_devices_are_named(env: dict, layout: Layout) -> None:
    problems = launch_problems(layout, {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "train", **env})
    assert len(problems) == 1, problems
    assert f"SLURM_NTASKS={env['SLURM_NTASKS']}" in problems[0] and "#18650, #20391" in problems[0]
    assert f"--ntasks-per-node={layout.devices}" in problems[0]


def test_multi_node_without_a_launcher_needs_master_addr_port_and_node_rank() -> None:
    problems = launch_problems(Layout(2, 1), {})
    assert len(problems) == 1 and "MASTER_ADDR, MASTER_PORT, NODE_RANK are not set" in problems[0]
    assert "torchrun" in problems[0] and "srun" in problems[0]
    assert "MASTER_ADDR is not set" in launch_problems(Layout(2, 1), {"MASTER_PORT": "1", "NODE_RANK": "1"})[0]
    assert launch_problems(Layout(2, 1), {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "1", "NODE_RANK": "1"}) == []
    assert launch_problems(Layout(1, 2), {}) == []  # one node: Lightning starts the devices' processes itself
    # An interactive shell in an allocation: Lightning ignores SLURM, and the message points to srun.
    interactive = {**SRUN_TASK, "SLURM_JOB_NAME": "interactive"}
    assert "start it with srun" in launch_problems(Layout(2, 2), interactive)[0]


def test_torchrun_world_size_and_restarts_with_the_shared_store() -> None:
    torchrun = {"TORCHELASTIC_RUN_ID": "job", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "SLURM_NTASKS": "1"}
    assert launch_problems(Layout(2, 1), torchrun) == []  # torchrun inside SLURM: Lightning takes torchrun's
    problems = launch_problems(Layout(1, 1), torchrun)
    assert len(problems) == 1 and "--nnodes 2 --nproc-per-node 1" in problems[0]
    restarts = {**torchrun, "TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in launch_problems(Layout(2, 1), restarts)[0]
    assert launch_problems(Layout(2, 1), {**restarts, "TORCHELASTIC_USE_AGENT_STORE": "False"}) == []


def test_devices_per_node_counts_as_lightning_does_before_the_trainer_exists() -> None:
    assert devices_per_node("auto", "cpu") == 1
    assert devices_per_node(2, "cpu") == 2
    assert devices_per_node("3", "cpu") == 3
    assert devices_per_node(2, "tpu") is None  # not told before the trainer is built: no check
    if not torch.cuda.is_available():
        assert devices_per_node("auto", "auto") == 1


def test_ddp_by_name_gets_the_timeout_and_an_own_strategy_keeps_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.pytorch.strategies import DDPStrategy

    for name in [k for k in os.environ if LAUNCH_VARIABLES.match(k)]:
        monkeypatch.delenv(name)
    for strategy, find_unused in (("ddp", False), ("ddp_find_unused_parameters_true", True), ("auto", False)):
        config = {"strategy": strategy, "devices": 2, "accelerator": "cpu", "num_nodes": 1}
        callbacks = prepare_trainer(config, [])
        assert isinstance(config["strategy"], DDPStrategy) and config["strategy"]._timeout == DDP_TIMEOUT
        assert config["strategy"]._ddp_kwargs.get("find_unused_parameters", False) is find_unused
        assert [type(c) for c in callbacks] == [DistributedFailureReport]
    single = {"strategy": "auto", "devices": 1, "accelerator": "cpu", "num_nodes": 1}
    prepare_trainer(single, [])
    assert single["strategy"] == "auto"  # one process: no process group
    own = DDPStrategy(timeout=timedelta(minutes=20))
    config = {"strategy": own, "devices": 2, "accelerator": "cpu"}
    prepare_trainer(config, [])
    assert config["strategy"] is own and own._timeout == timedelta(minutes=20)
    with pytest.raises(ClusterLaunchError, match="MASTER_ADDR"):
        prepare_trainer({"strategy": "ddp", "devices": 1, "accelerator": "cpu", "num_nodes": 2}, [])


def test_the_failure_report_recognises_collective_errors_only() -> None:
    gloo = RuntimeError("[gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 20000ms for recv operation")
    assert DistributedFailureReport.is_distributed_failure(gloo)
    assert DistributedFailureReport.is_distributed_failure(torch.distributed.DistBackendError("NCCL watchdog"))
    assert not DistributedFailureReport.is_distributed_failure(ValueError("bad config"))
    assert not DistributedFailureReport.is_distributed_failure(RuntimeError("CUDA out of memory"))
