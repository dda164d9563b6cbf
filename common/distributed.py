"""Process-group setup that works under torchrun, srun and plain python, plus rank-0 logging.

- ``torchrun`` sets RANK / WORLD_SIZE / LOCAL_RANK / LOCAL_WORLD_SIZE / MASTER_ADDR / MASTER_PORT.
- ``srun python script.py`` (one task per GPU) sets SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID; the
  head node comes from SLURM_JOB_NODELIST and the port from the job id.
- plain ``python script.py`` is a world of one: no process group is created.

Device and backend are chosen automatically (CUDA -> NCCL, CPU -> gloo). On CPU every process gets
``cores / processes on this node`` threads: oversubscribed OpenMP threads spin-wait for each other
and made a trainer 6x slower on a 2-core machine.
"""

from __future__ import annotations

import logging
import os
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


def pick_device(requested: str, local_rank: int) -> torch.device:
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {requested!r}")
    # A Slurm GPU request sets CUDA_VISIBLE_DEVICES even where no driver exists: ask CUDA itself.
    has_cuda = torch.cuda.is_available() and torch.cuda.device_count() > 0
    if requested == "cuda" and not has_cuda:
        raise UserError("--device cuda was requested but no CUDA GPU is usable here "
                        "(torch.cuda.is_available() is False); use --device cpu or auto")
    if requested == "cpu" or not has_cuda:
        return torch.device("cpu")
    n = torch.cuda.device_count()
    if local_rank >= n:
        raise UserError(f"local rank {local_rank} has no GPU: {n} visible on this node; "
                        f"launch at most {n} processes per node")
    return torch.device("cuda", local_rank)


def set_cpu_threads(local_world_size: int, threads: int = 0) -> int:
    """Give each process an equal share of this node's cores (or ``threads`` if given)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    n = threads or max(1, cores // max(1, local_world_size))
    torch.set_num_threads(n)
    return n


def init(device: str = "auto", backend: str | None = None, timeout_s: int = 600, threads: int = 0) -> DistInfo:
    """Set up this process: ranks, device, threads, and the process group when world_size > 1."""
    rank, world, local_rank, local_world = env_ranks()
    setup_logging(rank)
    dev = pick_device(device, local_rank)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    else:
        set_cpu_threads(local_world, threads)
    info = DistInfo(rank, world, local_rank, local_world, dev, backend)
    if world > 1 and not dist.is_initialized():
        if "RANK" not in os.environ:
            _slurm_rendezvous()
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local_rank))
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s),
                                device_id=dev if dev.type == "cuda" else None)
    return info


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
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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
