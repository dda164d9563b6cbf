import pytest
import torch

from common import distributed
from common.errors import UserError


def test_env_ranks_torchrun_slurm_and_plain(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_STEP_ID"):
        monkeypatch.delenv(k, raising=False)
    assert distributed.env_ranks() == (0, 1, 0, 1)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NTASKS_PER_NODE", "4")
    assert distributed.env_ranks() == (0, 1, 0, 1)  # the batch script itself is no task of a step
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    assert distributed.env_ranks() == (5, 8, 1, 4)  # srun python ...
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed.env_ranks() == (3, 4, 1, 2)  # torchrun wins


def test_cpu_threads_are_shared_between_local_processes():
    before = torch.get_num_threads()
    try:
        cores = len(__import__("os").sched_getaffinity(0))
        assert distributed.set_cpu_threads(local_world_size=cores) == 1
        assert distributed.set_cpu_threads(local_world_size=1) == cores
        assert distributed.set_cpu_threads(local_world_size=1, threads=3) == 3 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_mesh_must_match_world_size():
    info = distributed.DistInfo(world_size=3)
    with pytest.raises(UserError, match=r"dp=2 x tp=2 needs 4 processes but 3 were launched"):
        distributed.make_mesh(info, dp=2, tp=2)


def test_plain_python_is_a_world_of_one(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "SLURM_NTASKS"):
        monkeypatch.delenv(k, raising=False)
    info = distributed.init("cpu")
    assert (info.rank, info.world_size, info.backend, info.device.type) == (0, 1, "gloo", "cpu")
    assert not info.initialized and distributed.all_reduce_mean(2.5, info) == 2.5
    assert distributed.any_rank(True, info)
