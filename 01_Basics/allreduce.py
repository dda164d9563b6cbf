"""All-reduce smoke test, bus bandwidth and a message-size sweep: the first thing to run when NCCL hangs.

Every process adds its rank into one buffer with ``all_reduce``; the result is checked, then the
collective is timed. Bus bandwidth is the number to compare with the hardware
(NVLink, InfiniBand): for all-reduce, busbw = size / time * 2 * (n - 1) / n.
``--sizes-mb`` times several sizes, one line each: small messages cost the latency α, large ones
the bandwidth β (t ≈ α + 2(n-1)/n · size / busbw; chapter 02's collectives notebook fits this).

    torchrun --nproc_per_node=4 01_Basics/allreduce.py              # one node
    sbatch 01_Basics/allreduce.slurm                                # two nodes
    torchrun --nproc_per_node=2 01_Basics/allreduce.py --device cpu # laptop, gloo
    torchrun --nproc_per_node=2 01_Basics/allreduce.py --device cpu --sizes-mb 0.001 0.01 0.1 1 10

NCCL is used on GPUs, gloo on CPU. ``NCCL_DEBUG=INFO`` shows which network NCCL picked.
"""

import argparse
import datetime
import json
import os
import socket
import time

import torch
import torch.distributed as dist


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size-mb", type=float, default=256.0, help="buffer size in MiB")
    p.add_argument(
        "--sizes-mb",
        type=float,
        nargs="+",
        default=None,
        help="sweep these buffer sizes in MiB instead of --size-mb (one result line each)",
    )
    p.add_argument("--iters", type=int, default=20, help="timed iterations (more for small sizes in a sweep)")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first")
    p.add_argument("--json", default=None, help="rank 0 writes the results to this JSON file")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda"],
        default=os.environ.get("LLM_DEVICE", "auto"),
        help="auto: cuda when available (default from env LLM_DEVICE)",
    )
    return p.parse_args(argv)


def time_all_reduce(size_mb: float, iters: int, warmup: int, device: torch.device) -> dict:
    """Median time of ``iters`` all-reduces of one fp32 buffer after ``warmup``; returns one result."""
    world = dist.get_world_size()
    n = max(1, int(size_mb * 2**20) // 4)  # float32 elements
    buf = torch.ones(n, device=device)
    for _ in range(warmup):
        dist.all_reduce(buf)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dist.barrier()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        dist.all_reduce(buf)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    seconds = sorted(times)[len(times) // 2]  # the median: robust to a busy machine's outliers
    size = n * 4
    algbw = size / seconds / 1e9
    return dict(world=world, bytes=size, seconds=seconds, algbw=algbw, busbw=algbw * 2 * (world - 1) / world)


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

    results = []
    for size_mb in args.sizes_mb or [args.size_mb]:
        # small messages take microseconds: repeat them more (the same count on every rank)
        iters = args.iters
        if args.sizes_mb is not None:
            iters = max(args.iters, min(200, int(args.iters * 4 / max(size_mb, 0.02))))
        r = time_all_reduce(size_mb, iters, args.warmup, device)
        results.append(r)
        if rank == 0:
            print(
                f"all_reduce ok | world {world} | size {r['bytes'] / 2**20:.4f} MiB | "
                f"time {r['seconds'] * 1e3:.4f} ms | algbw {r['algbw']:.3f} GB/s | busbw {r['busbw']:.3f} GB/s",
                flush=True,
            )
    if rank == 0 and args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()
    return results[-1]["busbw"]


if __name__ == "__main__":
    main(parse_args())
