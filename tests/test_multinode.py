"""Multi-node training on Lightning's DDP, tested on one machine (gloo, CPU, loopback addresses only).

- Two torchrun "nodes" (``torchrun --nnodes 2 --nproc-per-node 1 --node-rank R``, ``--trainer.num_nodes 2``)
  and a simulated SLURM job (``scripts/slurm/train.sbatch`` run as sbatch would run it, with stand-ins for
  ``srun`` and ``scontrol`` from ``tests/slurm_sim`` that start two tasks with the variables srun sets) train
  each task's demo config (``configs/<task>.yaml`` + ``configs/demo/<task>.yaml``) to weights bit-identical to
  one node with two devices (``--trainer.devices 2 --trainer.strategy ddp``). The learning rate is scaled by
  the global batch, nodes counted, and logged; checkpoints are written once (the torchrun nodes run in two
  folders, as on machines without a shared disk: only node 0's folder gets checkpoints).
- A lost node is not a lost run: one process of a 2-node torchrun run (``--max-restarts 1``, c10d rendezvous)
  is killed mid-epoch; the other stops (a gloo error, or its torchrun agent ends it), torchrun restarts both,
  ``--ckpt_path last`` resumes, and the finished weights and optimizer state equal the uninterrupted run's.
- A hung peer (SIGSTOP) makes the other process stop within the process-group timeout (20 s here, from the
  config's ``DDPStrategy``), with the explanation.

Every run uses one thread per process (``OMP_NUM_THREADS=1``): bit equality holds between runs with the same
thread count. Each test starts its processes in new sessions and kills what is left of them at the end. The launch
pitfalls refused before training: tests/test_multinode_launch.py.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TORCHRUN = str(BIN / "torchrun")
SLURM_SIM = REPO / "tests" / "slurm_sim"
LAUNCH_VARIABLES = re.compile(r"^(SLURM_|TORCHELASTIC_|PL_|MASTER_ADDR$|MASTER_PORT$|NODE_RANK$|RANK$|LOCAL_RANK$|"
                              r"WORLD_SIZE$|LOCAL_WORLD_SIZE$|GROUP_RANK$)")
# Without it torchrun's restarted processes wait for each other forever (pytorch/pytorch#135712).
TORCHRUN_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may themselves run under SLURM or torchrun)."""
    env = {k: v for k, v in os.environ.items() if not LAUNCH_VARIABLES.match(k)}
    env.update(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    popen: subprocess.Popen
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def processes() -> Iterator[list[Proc]]:
    """Start processes into the yielded list (:func:`start`); whatever is still running at the end is killed,
    with every process it started (torchrun starts its training processes in sessions of their own)."""
    started: list[Proc] = []
    try:
        yield started
    finally:
        running = [proc.popen.pid for proc in started if proc.popen.poll() is None]
        for pid in [pid for root in running for pid in descendants(root)] + running:
            for sig in (signal.SIGCONT, signal.SIGKILL):  # a stopped process gets its SIGKILL too
                with suppress(ProcessLookupError):
                    os.kill(pid, sig)
        for proc in started:
            proc.popen.wait()


def descendants(root: int) -> list[int]:
    """The processes below ``root``, children first found by their parent id in /proc."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, IndexError, ValueError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


def start(started: list[Proc], argv: list[str], cwd: Path, env: dict[str, str], log: Path) -> Proc:
    cwd.mkdir(parents=True, exist_ok=True)
    with log.open("w") as out:
        popen = subprocess.Popen(argv, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                 start_new_session=True)
    started.append(Proc(popen, log))
    return started[-1]


def wait_all(procs: list[Proc], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.popen.wait(max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running after {timeout:.0f} s: {proc.popen.args}\n{proc.text()[-3000:]}")


def assert_ok(proc: Proc) -> None:
    assert proc.popen.returncode == 0, f"{proc.popen.args} exited {proc.popen.returncode}:\n{proc.text()[-4000:]}"


def wait_for(path_glob: tuple[Path, str], procs: list[Proc], timeout: float) -> Path:
    folder, pattern = path_glob
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(folder.glob(pattern))
        if found:
            return found[0]
        dead = [p for p in procs if p.popen.poll() is not None]
        assert not dead, f"exited before {pattern} appeared:\n{dead[0].text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {pattern} in {folder} after {timeout:.0f} s"
        time.sleep(0.1)


# ---------------------------------------------------------------------------------------------- the runs
@dataclass(frozen=True)
class Task:
    base: str
    data: str  # the conftest fixture with the task's tiny dataset
    args: tuple[str, ...]  # the tiny run's sizes
    steps: int


TASKS = {
    # 18 images, 3 per device: 3 steps an epoch on 2 processes.
    "classify": Task("mobilenet_v3_small_imagenet", "tiny_imagefolder",
                     ("--data.batch_size", "3", "--model.init_args.lr_batch_size", "6"), 3),
    "detect": Task("ssdlite_mobilenet_v3_small_coco", "tiny_coco",
                   ("--data.batch_size", "2", "--data.val_batch_size", "2"), 3),
    "segment": Task("lraspp_cityscapes", "tiny_cityscapes",
                    ("--data.batch_size", "1", "--data.val_batch_size", "1", "--data.crop_size", "[64, 64]"), 2),
}


def fit_args(task: str, data: Path, steps: int, *extra: str) -> list[str]:
    """``fit`` on the task's demo config (stacked on its real config), tiny and on the CPU."""
    spec, configs = TASKS[task], REPO / "configs"
    return ["fit", "-c", str(configs / f"{spec.base}.yaml"), "-c", str(configs / "demo" / f"{task}.yaml"),
            "--data.root", str(data), "--data.num_workers", "0", *spec.args, "--trainer.accelerator", "cpu",
            "--trainer.max_steps", str(steps), "--checkpoints.every_n_train_steps", str(min(steps, 3)),
            "--trainer.limit_val_batches", "1", "--trainer.num_sanity_val_steps", "0",
            "--trainer.deterministic", "true", "--trainer.enable_progress_bar", "false",
            "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", "run", *extra]


def single_node(started: list[Proc], workdir: Path, args: list[str]) -> Proc:
    """One node, two devices: Lightning starts the second process itself."""
    return start(started, [sys.executable, "-m", "mbv3_dense", *args, "--trainer.devices", "2", "--trainer.strategy",
                           "ddp"], workdir, clean_env(), workdir / "log.txt")


def torchrun_nodes(started: list[Proc], folders: list[Path], args: list[str], *torchrun_args: str) -> list[Proc]:
    """Two torchrun agents, one process each, as two nodes would start them (``folders[r]``: node r's folder)."""
    port = free_port()
    rendezvous = list(torchrun_args) or ["--master-addr", "127.0.0.1", "--master-port", str(port)]
    return [start(started, [TORCHRUN, "--nnodes", "2", "--nproc-per-node", "1",
                            *([] if torchrun_args else ["--node-rank", str(rank)]), *rendezvous,
                            "-m", "mbv3_dense", *args, "--trainer.devices", "1", "--trainer.num_nodes", "2"],
                  folder, clean_env(**TORCHRUN_ENV), folder / f"log{rank}.txt")
            for rank, folder in enumerate(folders)]


def slurm_env(**extra: str) -> dict[str, str]:
    """What sbatch gives the batch script of a 2-node job with one task per node (no srun step variables)."""
    env = clean_env(SLURM_JOB_ID="4242", SLURM_JOB_NAME="mbv3-dense", SLURM_JOB_NODELIST="node[1-2]",
                    SLURM_NODELIST="node[1-2]", SLURM_NNODES="2", SLURM_JOB_NUM_NODES="2", SLURM_NTASKS="2",
                    SLURM_NPROCS="2", SLURM_NTASKS_PER_NODE="1", SLURM_TASKS_PER_NODE="1(x2)", SLURM_PROCID="0",
                    SLURM_LOCALID="0", SLURM_NODEID="0", SLURM_CPUS_ON_NODE="1")
    env.update(extra)
    return env


def slurm_job(started: list[Proc], workdir: Path, args: list[str]) -> Proc:
    """``scripts/slurm/train.sbatch`` as sbatch runs it, with the stand-ins for srun and scontrol on PATH."""
    env = slurm_env(PATH=f"{SLURM_SIM}{os.pathsep}{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
                    MASTER_PORT=str(free_port()))
    return start(started, ["bash", str(REPO / "scripts" / "slurm" / "train.sbatch"), *args[1:]], workdir, env,
                 workdir / "log.txt")


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def last_ckpt(folder: Path) -> dict:
    return load(folder / "run" / "checkpoints" / "last.ckpt")


def assert_same_weights(ours: dict, reference: dict, what: str) -> None:
    assert ours["global_step"] == reference["global_step"], what
    assert set(ours["state_dict"]) == set(reference["state_dict"]), what
    for key, value in reference["state_dict"].items():
        assert torch.equal(ours["state_dict"][key], value), f"{what}: {key} differs"


def assert_same_optimizer(ours: dict, reference: dict, what: str) -> None:
    ref, got = reference["optimizer_states"][0]["state"], ours["optimizer_states"][0]["state"]
    assert set(ref) == set(got), what
    for idx, state in ref.items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(got[idx][name]), torch.as_tensor(value)), (what, idx, name)
    assert ours["lr_schedulers"] == reference["lr_schedulers"], what


# ---------------------------------------------------------------------------------------------- the tests
@pytest.mark.multinode
@pytest.mark.parametrize("task", [
    "classify",
    pytest.param("detect", marks=pytest.mark.slow),
    pytest.param("segment", marks=pytest.mark.slow),
])
def test_two_nodes_under_torchrun_and_slurm_train_the_weights_of_one_node_with_two_devices(
        task: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    data = request.getfixturevalue(TASKS[task].data)
    args = fit_args(task, data, TASKS[task].steps)
    with processes() as started:
        reference = single_node(started, tmp_path / "one_node", args)
        wait_all([reference], 900)
        assert_ok(reference)
        nodes = torchrun_nodes(started, [tmp_path / "node0", tmp_path / "node1"], args)
        wait_all(nodes, 900)
        for node in nodes:
            assert_ok(node)
        job = slurm_job(started, tmp_path / "slurm", args)
        wait_all([job], 900)
        assert_ok(job)

    expected = last_ckpt(tmp_path / "one_node")
    assert expected["global_step"] == TASKS[task].steps
    assert_same_weights(last_ckpt(tmp_path / "node0"), expected, "torchrun, 2 nodes")
    assert_same_weights(last_ckpt(tmp_path / "slurm"), expected, "SLURM (simulated), 2 nodes")
    # Written once, by global rank 0: node 1, in a folder of its own, has no checkpoint.
    assert not list((tmp_path / "node1").rglob("*.ckpt")), sorted((tmp_path / "node1").rglob("*"))
    assert not list(tmp_path.rglob("*.tmp-*"))
    job_log = job.text()
    assert "MASTER_ADDR=127.0.0.1" in job_log and "SLURM auto-requeueing enabled" in job_log  # SLURMEnvironment
    for log in (nodes[0].text(), job_log):
        assert "DDP process-group timeout 300 s" in log
    if task == "classify":  # lr_batch_size 6 = the global batch: the LR as written, with the nodes counted
        assert re.search(r"learning rate 0\.001: 0\.001 per 6 images x global batch 6 \(3 per device x 2 devices "
                         r"x 1 nodes", reference.text())
        for log in (nodes[0].text(), job_log):
            assert re.search(r"global batch 6 \(3 per device x 1 devices x 2 nodes", log), log[-3000:]


@pytest.fixture(scope="module")
def imagefolder30(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 images, 3 per device on 2 processes: 5 steps an epoch, so a kill at step 3 is mid-epoch."""
    from mbv3_dense.classification.synthetic import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("imagefolder30"), num_classes=3, train_per_class=10,
                             val_per_class=1, size=40, seed=1)


@pytest.mark.multinode
def test_a_killed_node_restarts_under_torchrun_and_resumes_to_the_same_weights(imagefolder30: Path,
                                                                               tmp_path: Path) -> None:
    args = fit_args("classify", imagefolder30, 10)  # two epochs; last.ckpt every 3 steps
    slow = ["--trainer.callbacks+=tests.robustness_helpers.Throttle", "--trainer.callbacks.seconds", "1.0",
            "--trainer.callbacks+=tests.cluster_helpers.RecordPid", "--trainer.callbacks.folder", "pids"]
    killed = tmp_path / "killed"
    with processes() as started:
        reference = single_node(started, tmp_path / "one_node", args)
        wait_all([reference], 900)
        assert_ok(reference)
        endpoint = f"127.0.0.1:{free_port()}"
        nodes = torchrun_nodes(started, [killed, killed], [*args, *slow, "--ckpt_path", "last"], "--max-restarts", "1",
                               "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", "killed-node")
        wait_for((killed / "run" / "checkpoints", "last.ckpt"), nodes, 600)
        victim = int((killed / "pids" / "rank1.pid").read_text())
        os.kill(victim, signal.SIGKILL)  # the training process of one node, mid-epoch (step 3 of 5)
        wait_all(nodes, 900)
        for node in nodes:
            assert_ok(node)

    logs = nodes[0].text() + nodes[1].text()
    assert int((killed / "pids" / "rank1.pid").read_text()) != victim, "the killed process was not restarted"
    assert "resuming epoch 0 after its first 3 batches" in logs, logs[-4000:]
    expected, resumed = last_ckpt(tmp_path / "one_node"), last_ckpt(killed)
    assert expected["global_step"] == 10
    assert_same_weights(resumed, expected, "killed node, restarted by torchrun, resumed")
    assert_same_optimizer(resumed, expected, "killed node, restarted by torchrun, resumed")


@pytest.mark.multinode
def test_a_hung_node_makes_the_other_stop_within_the_process_group_timeout(tiny_imagefolder: Path,
                                                                          tmp_path: Path) -> None:
    timeout_s = 20
    args = fit_args("classify", tiny_imagefolder, 30,
                    "--trainer.strategy", "lightning.pytorch.strategies.DDPStrategy",
                    "--trainer.strategy.timeout", str(timedelta(seconds=timeout_s)),
                    "--trainer.callbacks+=tests.robustness_helpers.Throttle", "--trainer.callbacks.seconds", "0.5",
                    "--trainer.callbacks+=tests.cluster_helpers.RecordPid", "--trainer.callbacks.folder", "pids")
    with processes() as started:
        nodes = torchrun_nodes(started, [tmp_path, tmp_path], args)
        wait_for((tmp_path / "run" / "checkpoints", "last.ckpt"), nodes, 600)
        os.kill(int((tmp_path / "pids" / "rank1.pid").read_text()), signal.SIGSTOP)  # alive, but not answering
        stopped = time.monotonic()
        survivor = int((tmp_path / "pids" / "rank0.pid").read_text())
        while pid_alive(survivor) and time.monotonic() - stopped < timeout_s + 120:
            time.sleep(0.2)
        waited = time.monotonic() - stopped
        assert not pid_alive(survivor), f"rank 0 still running {waited:.0f} s after its peer hung"

    log = nodes[0].text() + nodes[1].text()
    assert "DDP process-group timeout 20 s (trainer.strategy's own)" in log, log[-3000:]
    assert f"process-group timeout ({timeout_s} s)" in log and "Timed out" in log, log[-4000:]
    # It waited for the timeout (nothing else ends a wait on a stopped peer), then stopped.
    assert timeout_s * 0.8 <= waited, waited


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"  # a zombie has exited
    except (FileNotFoundError, IndexError):
        return False
