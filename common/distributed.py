"""Process-group setup that works under torchrun, srun and plain python, plus rank-0 logging.

- ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
- ``srun python script.py`` (one task per GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the
  head node comes from SLURM_JOB_NODELIST and the port from the job id.
- plain ``python script.py`` is a world of one: no process group is created.

Device and backend are chosen automatically (CUDA -> NCCL, CPU -> gloo), loudly: GPUs that were asked
for (``--device cuda``, or a Slurm GPU grant with ``--device auto``) but that torch cannot use stop the
run with one line that names the cause and the fix, instead of a silent CPU run. Every process gets
``allocated cores / processes on this node`` threads, on GPU nodes too: oversubscribed OpenMP threads
spin-wait for each other (a trainer ran 6x slower on a 2-core machine), and one thread per process
(torchrun's default) starves CPU work such as an offloaded optimizer. ``kill -USR2 <pid>`` makes any
process print its Python stacks (docs/debugging.md).
"""

from __future__ import annotations

import faulthandler
import gc
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from common.errors import UserError

log = logging.getLogger("llm")


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str = "gloo"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def initialized(self) -> bool:
        return dist.is_available() and dist.is_initialized()


def env_ranks() -> tuple[int, int, int, int]:
    """(rank, world_size, local_rank, local_world_size) from torchrun's or Slurm's environment."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        return int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)), local_world
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "SLURM_STEP_ID" in env:
        world = int(env["SLURM_NTASKS"])
        local_world = int(env.get("SLURM_NTASKS_PER_NODE", env.get("SLURM_TASKS_PER_NODE", "1")).split("(")[0])
        return int(env["SLURM_PROCID"]), world, int(env.get("SLURM_LOCALID", 0)), local_world
    return 0, 1, 0, 1


def _slurm_rendezvous() -> None:
    """MASTER_ADDR/PORT for ``srun python …`` without torchrun."""
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", 0)) % 1000))


def slurm_gpu_grant() -> str | None:
    """The Slurm variable that says this job or step was granted GPUs (e.g. ``SLURM_GPUS_ON_NODE=4``), else None.

    CUDA_VISIBLE_DEVICES alone proves nothing (the local test cluster sets it for device files without a
    driver; a user may export it by hand), so it is not consulted."""
    for var in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):  # GPU indices, indices, a count
        value = os.environ.get(var, "").strip()
        if value and value not in ("(null)", "N/A") and not (var == "SLURM_GPUS_ON_NODE" and value == "0"):
            return f"{var}={value}"
    return None


def cuda_problem() -> str:
    """Why torch cannot use a GPU here, and the fix, as part of one line."""
    if torch.version.cuda is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build: build the GPU environment on the login "
                f"node with `bash scripts/setup.sh --cuda cu126` (or point LLM_VENV/LLM_CONDA_ENV in "
                f"01_Basics/site.env at a CUDA environment)")
    try:
        torch.cuda.init()
        reason = f"torch.cuda.device_count() is {torch.cuda.device_count()}"
    except Exception as e:  # no driver, a driver too old for this CUDA build, no device node
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return (f"torch {torch.__version__} (built for CUDA {torch.version.cuda}) cannot use a GPU ({reason}): "
            f"check `nvidia-smi` on the node; a driver older than CUDA {torch.version.cuda} needs must be "
            f"updated, or the environment rebuilt for an older CUDA (`bash scripts/setup.sh --cuda cuXYZ`)")


def pick_device(requested: str, local_rank: int) -> torch.device:
    """cpu or cuda:N for this process; a GPU that was asked for (by --device cuda, or by Slurm granting
    GPUs with --device auto) but cannot be used is an error, never a silent CPU run."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {requested!r}")
    if requested == "cpu":
        return torch.device("cpu")
    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    grant = slurm_gpu_grant()
    if not has_cuda:
        if requested == "cuda":
            raise UserError(f"--device cuda was requested but {cuda_problem()}")
        if grant:
            raise UserError(f"Slurm granted GPUs ({grant}) but {cuda_problem()}; to train on the CPU on "
                            f"purpose pass --device cpu (or export LLM_DEVICE=cpu)")
        log.info("device auto -> cpu: torch sees no GPU and Slurm granted none")
        return torch.device("cpu")
    n = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if "TORCHELASTIC_RUN_ID" in os.environ and local_world > n:
        # torchrun starts every local process with the same visible GPUs: they must be enough
        raise UserError(f"torchrun started {local_world} processes on this node but only {n} GPU(s) are "
                        f"visible: use --nproc_per_node={n} (or NPROC_PER_NODE={n})")
    if n == 1:
        index, why = 0, "one GPU visible to this process (e.g. srun --gpus-per-task=1)"
    elif local_rank < n:
        index, why = local_rank, f"local rank {local_rank} of {n} visible GPUs"
    else:
        raise UserError(f"local rank {local_rank} has no GPU: {n} visible on this node; "
                        f"launch at most {n} processes per node")
    if requested == "auto":
        log.info(f"device auto -> cuda:{index}: {why}")
    return torch.device("cuda", index)


def cpu_budget() -> int:
    """Cores the processes of this launch may use on this node: the CPU affinity, capped by what Slurm
    allocated (a site that binds no cores shows the whole node as the affinity)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    for var in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        if os.environ.get(var, "").isdigit():
            return max(1, min(cores, int(os.environ[var])))
    return cores


def set_cpu_threads(local_world_size: int, threads: int = 0) -> int:
    """Give each process an equal share of the cores it may use (or ``threads`` if given).

    Also on GPU nodes: CPU work (data, ``--cpu-offload``'s optimizer) should not run on one thread, which
    is what torchrun's OMP_NUM_THREADS=1 would give."""
    n = threads or max(1, cpu_budget() // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def init(device: str = "auto", backend: str | None = None, timeout_s: int = 600, threads: int = 0) -> DistInfo:
    """Set up this process: ranks, device, threads, and the process group when world_size > 1."""
    rank, world, local_rank, local_world = env_ranks()
    setup_logging(rank)
    if hasattr(signal, "SIGUSR2") and sys.__stderr__ is not None:  # (SIGUSR1 is Slurm's time-limit warning)
        # `kill -USR2 <pid>` prints this process's Python stacks to stderr, even from inside a hung collective
        faulthandler.register(signal.SIGUSR2, file=sys.__stderr__, all_threads=True)
    dev = pick_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    # in a Slurm task of several, the task's own CPUs are its share (local_world already divided them)
    slurm_task = "TORCHELASTIC_RUN_ID" not in os.environ and "SLURM_STEP_ID" in os.environ and world > 1
    set_cpu_threads(1 if slurm_task and os.environ.get("SLURM_CPUS_PER_TASK") else local_world, threads)
    info = DistInfo(rank, world, local_rank, local_world, dev, backend)
    if world > 1 and not dist.is_initialized():
        if "RANK" not in os.environ:
            _slurm_rendezvous()
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None,
                                **_restart_store(rank, world, timeout_s))
    return info


def _restart_store(rank: int, world: int, timeout_s: int) -> dict:
    """After a torchrun restart (--max-restarts) the agent's key-value store still holds the keys of the
    killed processes -- among them gloo's listening addresses, which the new processes would read and
    connect to ("connectFullMesh failed ... Connection refused"). Each restart gets its own key prefix."""
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if not restart or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return {}
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size=world,
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    return {"store": dist.PrefixStore(f"llm-restart-{restart}", store), "rank": rank, "world_size": world}


def make_mesh(info: DistInfo, **dims: int):
    """A named DeviceMesh, e.g. ``make_mesh(info, dp=2, tp=2)``, checked against the world size."""
    from torch.distributed.device_mesh import init_device_mesh

    size = 1
    for n in dims.values():
        size *= n
    layout = " x ".join(f"{k}={v}" for k, v in dims.items())
    if size != info.world_size:
        raise UserError(f"the parallel layout {layout} needs {size} processes but {info.world_size} were "
                        f"launched: use torchrun --nproc_per_node={size} (or change the layout)")
    return init_device_mesh(info.device.type, tuple(dims.values()), mesh_dim_names=tuple(dims))


def all_reduce_mean(value: float, info: DistInfo) -> float:
    if info.world_size == 1:
        return float(value)
    t = torch.tensor([float(value)], dtype=torch.float64, device=info.device)
    dist.all_reduce(t)
    return t.item() / info.world_size


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True on every rank if ``flag`` is True on at least one (e.g. a signal arrived)."""
    if info.world_size == 1:
        return flag
    t = torch.tensor([int(flag)], device=info.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(info: DistInfo) -> None:
    if info.initialized:
        dist.barrier()


def teardown() -> None:
    """Collect garbage, then destroy the process groups, while the interpreter is fully alive: a sharded
    model left in a reference cycle can hold gloo work objects with tensors, and freeing those during the
    interpreter's shutdown aborts the process ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
    gc.collect()


class _RankFilter(logging.Filter):
    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or getattr(record, "all_ranks", False)


def setup_logging(rank: int) -> None:
    """``log.info`` prints on rank 0 only; pass ``extra={"all_ranks": True}`` to print everywhere."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for h in list(log.handlers):
        log.removeHandler(h)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    handler.addFilter(_RankFilter(rank))
    log.addHandler(handler)
