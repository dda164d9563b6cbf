"""All-reduce smoke test and bus-bandwidth measurement: the first thing to run when NCCL hangs.

Every process adds its rank into one buffer with ``all_reduce``; the result is checked, then the
collective is timed. Bus bandwidth is the number to compare with the hardware
(NVLink, InfiniBand): for all-reduce, busbw = size / time * 2 * (n - 1) / n.

    torchrun --nproc_per_node=4 01_Basics/allreduce.py              # one node
    sbatch 01_Basics/allreduce.slurm                                # two nodes
    torchrun --nproc_per_node=2 01_Basics/allreduce.py --device cpu # laptop, gloo

NCCL is used on GPUs, gloo on CPU. ``NCCL_DEBUG=INFO`` shows which network NCCL picked.
"""

import argparse
import datetime
import os
import socket
import time

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=256.0, help="buffer size in MiB")
    p.add_argument("--iters", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=os.environ.get("LLM_DEVICE", "auto"),
        help="auto: cuda when available (default from env LLM_DEVICE)",
    )
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> float:
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if use_cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    backend = "nccl" if use_cuda else "gloo"
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    rank, world = dist.get_rank(), dist.get_world_size()
    print(f"rank {rank}/{world} on {socket.gethostname()} device {device} backend {backend}", flush=True)

    # correctness: sum of ranks 0..n-1 everywhere
    x = torch.full((1024,), float(rank), device=device)
    dist.all_reduce(x)
    expected = world * (world - 1) / 2
    if not torch.all(x == expected):
        raise RuntimeError(f"rank {rank}: all_reduce gave {x[0].item()}, expected {expected}")

    # bandwidth
    n = max(1, int(args.size_mb * 2**20) // 4)  # float32 elements
    buf = torch.ones(n, device=device)
    for _ in range(args.warmup):
        dist.all_reduce(buf)
    if use_cuda:
        torch.cuda.synchronize()
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        dist.all_reduce(buf)
    if use_cuda:
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / args.iters
    size = n * 4
    algbw = size / seconds / 1e9
    busbw = algbw * 2 * (world - 1) / world
    if rank == 0:
        print(
            f"all_reduce ok | world {world} | size {size / 2**20:.1f} MiB | "
            f"time {seconds * 1e3:.2f} ms | algbw {algbw:.3f} GB/s | busbw {busbw:.3f} GB/s",
            flush=True,
        )
    dist.destroy_process_group()
    return busbw


if __name__ == "__main__":
    main(parse_args())
