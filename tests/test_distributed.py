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


GPU_VARS = ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE", "TORCHELASTIC_RUN_ID", "LOCAL_WORLD_SIZE")


@pytest.fixture
def no_gpu(monkeypatch):
    """A CPU-only torch (as here), and no Slurm GPU variables unless a test sets them."""
    for k in GPU_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.version, "cuda", None)
    return monkeypatch


@pytest.mark.parametrize("var,value", [("SLURM_GPUS_ON_NODE", "4"), ("SLURM_JOB_GPUS", "0,1"),
                                       ("SLURM_STEP_GPUS", "2"), ("SLURM_JOB_GPUS", "0")])
def test_slurm_gpu_grant_without_usable_gpu_is_one_line_error(no_gpu, var, value):
    no_gpu.setenv(var, value)
    with pytest.raises(UserError) as e:
        distributed.pick_device("auto", 0)
    msg = str(e.value)
    assert "\n" not in msg and f"Slurm granted GPUs ({var}={value})" in msg
    assert "CPU-only build" in msg and "scripts/setup.sh --cuda cu126" in msg and "--device cpu" in msg
    assert distributed.pick_device("cpu", 0).type == "cpu"  # CPU on purpose is fine


def test_cuda_visible_devices_alone_is_not_a_gpu(no_gpu, caplog):
    no_gpu.setenv("CUDA_VISIBLE_DEVICES", "0,1")  # the local test cluster's fake GPUs set only this
    no_gpu.setenv("SLURM_GPUS_ON_NODE", "0")
    assert distributed.pick_device("auto", 0).type == "cpu"


def test_device_cuda_without_gpu_names_the_cause(no_gpu):
    with pytest.raises(UserError, match=r"^--device cuda was requested but this torch .* is a CPU-only build"):
        distributed.pick_device("cuda", 0)
    no_gpu.setattr(torch.version, "cuda", "12.6")  # a CUDA build without a driver
    no_gpu.setattr(torch.cuda, "init", lambda: (_ for _ in ()).throw(RuntimeError("Found no NVIDIA driver\nmore")))
    with pytest.raises(UserError) as e:
        distributed.pick_device("cuda", 0)
    assert "(Found no NVIDIA driver)" in str(e.value) and "nvidia-smi" in str(e.value) and "\n" not in str(e.value)


def fake_gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_one_visible_gpu_per_task_is_cuda_0(no_gpu):
    fake_gpus(no_gpu, 1)
    no_gpu.setenv("SLURM_GPUS_ON_NODE", "4")
    for local_rank in range(4):  # srun --gpus-per-task=1: SLURM_LOCALID up to 3, one GPU visible each
        assert distributed.pick_device("auto", local_rank) == torch.device("cuda", 0)


def test_gpus_by_local_rank_and_too_few_for_torchrun(no_gpu):
    fake_gpus(no_gpu, 4)
    assert distributed.pick_device("auto", 3) == torch.device("cuda", 3)
    with pytest.raises(UserError, match="local rank 4 has no GPU: 4 visible"):
        distributed.pick_device("cuda", 4)
    fake_gpus(no_gpu, 1)
    no_gpu.setenv("TORCHELASTIC_RUN_ID", "x")
    no_gpu.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun --nproc_per_node=2 on a 1-GPU node
    with pytest.raises(UserError, match=r"started 2 processes on this node but only 1 GPU\(s\) are visible"):
        distributed.pick_device("auto", 1)


def test_auto_says_what_it_chose(no_gpu, capsys):
    distributed.setup_logging(0)
    distributed.pick_device("auto", 0)
    assert "device auto -> cpu: torch sees no GPU and Slurm granted none" in capsys.readouterr().out


def test_cpu_threads_follow_the_slurm_allocation(monkeypatch):
    before = torch.get_num_threads()
    cores = len(__import__("os").sched_getaffinity(0))
    try:
        monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
        monkeypatch.setenv("SLURM_CPUS_ON_NODE", "1")  # fewer CPUs allocated than the affinity shows
        assert distributed.cpu_budget() == 1 and distributed.set_cpu_threads(1) == 1
        monkeypatch.setenv("SLURM_CPUS_PER_TASK", "1000")  # never more than the cores there are
        assert distributed.cpu_budget() == cores
    finally:
        torch.set_num_threads(before)
