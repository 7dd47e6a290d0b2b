"""Runs on several machines, on Lightning's DDP: checks before the run starts, and a bounded wait for a lost peer.

Three ways start the processes of a multi-node run, and Lightning reads each from the environment:

- ``torchrun`` (``TorchElasticEnvironment``): ``torchrun --nnodes N --nproc-per-node D ... -m mbv3_dense fit -c
  CONFIG --trainer.num_nodes N --trainer.devices D``; torchrun sets ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``...
- SLURM's ``srun`` (``SLURMEnvironment``): one task per device, ``#SBATCH --nodes N --ntasks-per-node D``;
  Lightning takes the world size from ``SLURM_NTASKS`` and the rank from ``SLURM_PROCID``
  (``scripts/slurm/train.sbatch``);
- by hand (``LightningEnvironment``): ``MASTER_ADDR``, ``MASTER_PORT`` and ``NODE_RANK`` on every node, and
  Lightning starts the devices' processes itself.

Each has a way to be started wrong that Lightning does not catch, or catches only after the processes have
waited for each other until the process-group timeout. :func:`launch_problems` names them before the Trainer is
built, and :func:`prepare_trainer` (called by the CLI) stops the run with :class:`ClusterLaunchError` saying what
is wrong and what to do:

- started with ``python`` instead of ``srun`` inside a SLURM allocation: every SLURM variable says rank 0 of N,
  and the process would wait for N - 1 peers that nobody started;
- ``SLURM_NTASKS`` not equal to nodes x devices (Lightning issues #18650, #20391): Lightning checks tasks per
  node and nodes, not the total, and a mismatch trains on fewer devices than asked or waits forever;
- ``torchrun``'s world size not equal to ``trainer.num_nodes`` x ``trainer.devices`` (Lightning would also say
  so, once the run has started);
- ``torchrun --max-restarts`` with the rendezvous store shared with the training processes (torch's default):
  the restarted processes wait for each other until the process-group timeout (pytorch/pytorch#135712);
- a hand-started multi-node run without ``MASTER_ADDR`` (each node would wait on its own ``127.0.0.1``),
  ``MASTER_PORT`` (each node would pick a random port) or ``NODE_RANK``. Under SLURM an unset ``MASTER_ADDR`` is
  taken from the first host of ``SLURM_NODELIST``: that works, and is logged.

The process-group timeout. A collective (the gradient all-reduce of every step, a barrier) waits for every
process. When one process dies or hangs, the others wait in it; with torch's default they wait 30 minutes, and
with NCCL a dead peer is noticed only by that timeout. :func:`prepare_trainer` gives a multi-process DDP run
:data:`DDP_TIMEOUT` (5 minutes): long enough for the longest legitimate wait of these configs (rank 0 alone
exporting the network for the ExecuTorch latency entry, about a minute on a 2-core CPU; writing a checkpoint),
short enough that a lost node costs minutes of the other nodes' time, not half an hour. The survivors then stop
with an error, and :class:`DistributedFailureReport` logs what happened and how the run resumes. A config that
names its own ``DDPStrategy`` keeps that strategy's ``timeout`` (``trainer.strategy.init_args.timeout: "0:10:00"``).

Why here and not in the configs' ``trainer.strategy``: the configs say ``strategy: auto`` so that one file runs on
one device (no process group at all), on the devices of one node and on several nodes; a ``DDPStrategy`` written
into every config would start a process group on a single CPU and repeat the same lines in seven files. The
value belongs to the CLI's wiring, like the checkpoints and the safety callbacks.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from mbv3_dense.errors import InputError

log = logging.getLogger(__name__)

# How long a process waits in a collective for a peer that died or hangs, then stops with an error.
DDP_TIMEOUT = timedelta(minutes=5)
# Job names with which Lightning ignores SLURM (an interactive shell inside an allocation).
SLURM_INTERACTIVE_NAMES = ("bash", "interactive")
SBATCH_TEMPLATE = "scripts/slurm/train.sbatch"


class ClusterLaunchError(InputError):
    """A multi-process run that was started in a way that cannot work; the message says why and what to do
    (the command line shows it as one line, ``error: ...``, exit status 2)."""


@dataclass(frozen=True)
class Layout:
    """What the trainer is set to run: ``num_nodes`` x ``devices`` processes."""

    num_nodes: int
    devices: int

    @property
    def processes(self) -> int:
        return self.num_nodes * self.devices


def launcher(environ: Mapping[str, str] = os.environ) -> str:
    """Who started this process, as Lightning will see it: ``"torchrun"``, ``"slurm"`` or ``"none"``.

    The order is Lightning's (torchrun first: it may run inside a SLURM job); SLURM counts only when Lightning
    detects it (``SLURM_NTASKS`` set and the job not named ``bash`` or ``interactive``).
    """
    if environ.get("TORCHELASTIC_RUN_ID") is not None:
        return "torchrun"
    if "SLURM_NTASKS" in environ and environ.get("SLURM_JOB_NAME") not in SLURM_INTERACTIVE_NAMES:
        return "slurm"
    return "none"


def devices_per_node(devices: Any, accelerator: Any) -> int | None:
    """The processes per node that ``trainer.devices`` asks for (``"auto"``: the visible CUDA devices on a GPU
    run, 1 on a CPU, as Lightning counts them); ``None`` when it cannot be told before the trainer is built."""
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    if not isinstance(accelerator, str) or accelerator not in ("auto", "cpu", "gpu", "cuda"):
        return None
    cuda = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    kind = CUDAAccelerator if cuda else CPUAccelerator
    if devices in ("auto", -1, "-1", None):
        return kind.auto_device_count()
    try:
        parsed = kind.parse_devices(devices)
    except Exception:
        return None
    if isinstance(parsed, (list, tuple)):
        return len(parsed)
    return int(parsed) if isinstance(parsed, int) else None


def _int(environ: Mapping[str, str], name: str) -> int | None:
    try:
        return int(environ[name])
    except (KeyError, ValueError):
        return None


def launch_problems(layout: Layout, environ: Mapping[str, str] = os.environ) -> list[str]:
    """What is wrong with starting ``layout`` from this process's environment; empty when nothing is."""
    kind = launcher(environ)
    problems: list[str] = []
    wanted = (f"the trainer is set for trainer.num_nodes {layout.num_nodes} x trainer.devices {layout.devices} "
              f"= {layout.processes} processes")
    if kind == "torchrun":
        world, local = _int(environ, "WORLD_SIZE"), _int(environ, "LOCAL_WORLD_SIZE")
        if world is not None and world != layout.processes:
            nodes = world // local if local else "?"
            problems.append(
                f"torchrun started {world} processes (WORLD_SIZE; {local} per node: --nnodes {nodes} "
                f"--nproc-per-node {local}) but {wanted}. Pass --trainer.num_nodes equal to torchrun's --nnodes and "
                "--trainer.devices equal to its --nproc-per-node.")
        restarts = _int(environ, "TORCHELASTIC_MAX_RESTARTS") or 0
        if restarts > 0 and environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
            problems.append(
                f"torchrun restarts failed processes (--max-restarts {restarts}) and shares its rendezvous store with "
                "them (TORCHELASTIC_USE_AGENT_STORE=True): after one node's processes restart, the nodes disagree on "
                "the restart count and the new processes wait for each other until the process-group timeout "
                "(pytorch/pytorch#135712; seen here with torch 2.14). Start torchrun with "
                "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in its environment and --rdzv-backend c10d.")
        return problems
    if kind == "slurm":
        ntasks = _int(environ, "SLURM_NTASKS") or 1
        step_tasks = environ.get("SLURM_STEP_NUM_TASKS")
        job = environ.get("SLURM_JOB_ID", "?")
        if ntasks > 1 and step_tasks != str(ntasks):
            how = "SLURM_STEP_NUM_TASKS is unset" if step_tasks is None else f"its job step has {step_tasks} task(s)"
            problems.append(
                f"this process runs inside SLURM job {job}, whose allocation has SLURM_NTASKS={ntasks} tasks, but it "
                f"was not started as one of them by srun ({how}): started with python instead of srun. Lightning "
                f"takes its rank ({environ.get('SLURM_PROCID', '?')}) and the world size ({ntasks}) from SLURM's "
                f"variables and would wait for {ntasks - 1} processes that nobody started. Start the command with "
                f"srun, one task per device (`srun python -m mbv3_dense fit ...`, as {SBATCH_TEMPLATE} does).")
        if ntasks != layout.processes:
            problems.append(
                f"SLURM runs SLURM_NTASKS={ntasks} tasks (SLURM_NNODES={environ.get('SLURM_NNODES', '?')}, "
                f"SLURM_NTASKS_PER_NODE={environ.get('SLURM_NTASKS_PER_NODE', 'unset')}) but {wanted}. Lightning "
                "takes the world size from SLURM_NTASKS and checks only tasks per node and nodes (Lightning issues "
                "#18650, #20391): the run would wait for processes that do not exist or train on fewer devices "
                f"than asked. Ask SLURM for one task per device: #SBATCH --nodes={layout.num_nodes} and "
                f"--ntasks-per-node={layout.devices} (no --ntasks), or set --trainer.num_nodes / --trainer.devices "
                "to the allocation.")
        return problems
    if layout.num_nodes > 1:
        missing = [name for name in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK") if not environ.get(name)]
        if missing:
            inside = (f" This process runs inside SLURM job {environ['SLURM_JOB_ID']} but SLURM is not in charge "
                      f"(job name {environ.get('SLURM_JOB_NAME')!r}): start it with srun ({SBATCH_TEMPLATE})."
                      if environ.get("SLURM_JOB_ID") else "")
            problems.append(
                f"trainer.num_nodes is {layout.num_nodes} but neither torchrun nor SLURM started this process, and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: each node would wait for the "
                "others at its own address and port. Start every node with torchrun (--nnodes "
                f"{layout.num_nodes} --node-rank R --master-addr HOST --master-port PORT), with srun under SLURM, or "
                "set MASTER_ADDR (node 0's address), MASTER_PORT (a free port there) and NODE_RANK (0..N-1) on every "
                f"node.{inside}")
    return problems


def _timed_strategy(strategy: Any, layout: Layout | None, accelerator: Any) -> Any:
    """``strategy`` with :data:`DDP_TIMEOUT` when it is a DDP strategy by name (or ``auto`` for several processes)."""
    if not isinstance(strategy, str):
        if isinstance(strategy, DDPStrategy):
            _log_rank_zero("DDP process-group timeout %.0f s (trainer.strategy's own)",
                           strategy._timeout.total_seconds() if strategy._timeout else float("nan"))
        return strategy
    name = strategy
    if name == "auto":
        if layout is None or layout.processes <= 1 or accelerator not in ("auto", "cpu", "gpu", "cuda"):
            return strategy
        name = "ddp"
    entry = dict.get(StrategyRegistry, name)  # the registry's own ``get`` would build the strategy
    if entry is None or entry["strategy"] is not DDPStrategy:
        return strategy
    _log_rank_zero("DDP process-group timeout %.0f s (mbv3_dense.training.cluster.DDP_TIMEOUT; torch's default is "
                   "1800 s): a "
                   "process whose peer died or hangs stops with an error after at most this long",
                   DDP_TIMEOUT.total_seconds())
    return DDPStrategy(**entry["init_params"], timeout=DDP_TIMEOUT)


@rank_zero_only
def _log_rank_zero(message: str, *args: object) -> None:
    log.info(message, *args)


class DistributedFailureReport(Callback):
    """When a run stops on an error inside a collective, log what that means and how the run resumes."""

    # Words of the errors gloo and NCCL raise when a peer died (connection closed or reset) or hung (timed out).
    MARKERS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe", "watchdog",
               "tcpstore")

    @staticmethod
    def is_distributed_failure(exception: BaseException) -> bool:
        dist_error = getattr(torch.distributed, "DistError", None)
        if dist_error is not None and isinstance(exception, dist_error):
            return True
        text = str(exception).lower()
        return isinstance(exception, RuntimeError) and any(marker in text for marker in
                                                           DistributedFailureReport.MARKERS)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if trainer.world_size <= 1 or not self.is_distributed_failure(exception):
            return
        timeout = getattr(trainer.strategy, "_timeout", None)
        waited = f"{timeout.total_seconds():.0f} s" if isinstance(timeout, timedelta) else "its timeout"
        first_line = str(exception).strip().splitlines()[0][:300] if str(exception).strip() else type(exception)
        log.error(
            "rank %d of %d (node %d) stops: a collective with the other processes failed at global step %d "
            "(%s: %s). Another process of this run died or stopped answering; a process waits at most the "
            "process-group timeout (%s) for it. The last checkpoint stays; the run resumes from it with the same "
            "command and --ckpt_path last (torchrun --max-restarts and %s's requeue do that by themselves).",
            trainer.global_rank, trainer.world_size, trainer.node_rank, trainer.global_step, type(exception).__name__,
            first_line, waited, SBATCH_TEMPLATE)


def prepare_trainer(config: dict[str, Any], callbacks: list[Callback]) -> list[Callback]:
    """Check how the processes of this run were started and bound the wait for a lost peer, before the Trainer
    is built (the CLI calls it with the trainer's arguments).

    Raises :class:`ClusterLaunchError` naming every problem of :func:`launch_problems`. Replaces a DDP strategy
    given by name (``ddp``, ``ddp_find_unused_parameters_true``, ..., or ``auto`` on several CPU/CUDA processes)
    by the same ``DDPStrategy`` with :data:`DDP_TIMEOUT`, and adds :class:`DistributedFailureReport`. Returns the
    callbacks to hand to the Trainer.
    """
    num_nodes = config.get("num_nodes", 1)
    devices = devices_per_node(config.get("devices", "auto"), config.get("accelerator", "auto"))
    layout = Layout(int(num_nodes), devices) if isinstance(num_nodes, int) and devices is not None else None
    if layout is not None:
        problems = launch_problems(layout)
        if problems:
            raise ClusterLaunchError("this run cannot start as launched:\n" + "\n".join(f"- {p}" for p in problems))
        if launcher() == "slurm" and layout.num_nodes > 1 and not os.environ.get("MASTER_ADDR"):
            from lightning.fabric.plugins.environments import SLURMEnvironment

            _log_rank_zero("MASTER_ADDR is unset: Lightning takes the first host of SLURM_NODELIST, %s; set "
                           "MASTER_ADDR where that name does not reach node 0 over the network the nodes share (%s "
                           "does)", SLURMEnvironment.resolve_root_node_address(os.environ.get("SLURM_NODELIST", "")),
                           SBATCH_TEMPLATE)
    config["strategy"] = _timed_strategy(config.get("strategy", "auto"), layout, config.get("accelerator", "auto"))
    if not any(isinstance(c, DistributedFailureReport) for c in [*(config.get("callbacks") or []), *callbacks]):
        callbacks = [*callbacks, DistributedFailureReport()]
    return callbacks
