"""Collectives 101: every collective once, on real processes, recording what each rank holds before and after.

Each rank starts from a small tensor it can recognise (rank r holds r*10 + 0, 1, 2, ...), runs one
collective, and all ranks' before/after tensors are saved by rank 0 for the notebook
``00b_collectives.ipynb`` to check and draw. Covered: broadcast, all-reduce, reduce, all-gather,
reduce-scatter, send/recv around a ring, and sub-groups (``new_group`` and a 2-D ``DeviceMesh``).

    torchrun --nproc_per_node=4 02_Notebook_Parallelism/collectives.py --out /tmp/coll.pt   # CPU, gloo
"""

import argparse
import datetime

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

ELEMS = 4  # elements per rank: divisible by the world size (2 or 4) for reduce-scatter


def start(rank: int) -> torch.Tensor:
    return torch.arange(ELEMS, dtype=torch.float32) + 10 * rank


def run_all(rank: int, world: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{collective: (what this rank held before, what it holds after)}."""
    out = {}

    x = start(rank)
    before = x.clone()
    dist.broadcast(x, src=0)  # everyone gets rank 0's tensor
    out["broadcast"] = before, x

    x = start(rank)
    dist.all_reduce(x, op=dist.ReduceOp.SUM)  # everyone gets the element-wise sum
    out["all_reduce"] = start(rank), x

    x = start(rank)
    dist.reduce(x, dst=0, op=dist.ReduceOp.SUM)  # only rank 0's result is defined
    out["reduce"] = start(rank), x if rank == 0 else torch.full((ELEMS,), float("nan"))

    gathered = torch.empty(world * ELEMS)
    dist.all_gather_into_tensor(gathered, start(rank))  # everyone gets every rank's tensor, concatenated
    out["all_gather"] = start(rank), gathered

    piece = torch.empty(ELEMS // world)
    dist.reduce_scatter_tensor(piece, start(rank), op=dist.ReduceOp.SUM)  # rank r: chunk r of the sum
    out["reduce_scatter"] = start(rank), piece

    # send/recv around a ring: rank r sends to r+1 and receives from r-1. Non-blocking isend/irecv: with
    # blocking send() first on every rank, large messages would deadlock (everyone waits for a receiver).
    received = torch.empty(ELEMS)
    ops = [dist.P2POp(dist.isend, start(rank), (rank + 1) % world),
           dist.P2POp(dist.irecv, received, (rank - 1) % world)]  # fmt: skip
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    out["send_recv"] = start(rank), received

    # sub-groups: even and odd ranks all-reduce separately (every rank must call new_group for every group)
    groups = [dist.new_group([r for r in range(world) if r % 2 == parity]) for parity in (0, 1)]
    x = start(rank)
    dist.all_reduce(x, group=groups[rank % 2])
    out["all_reduce_subgroup"] = start(rank), x

    if world == 4:  # a 2 x 2 mesh: ranks [[0, 1], [2, 3]]; "dp" runs down the columns, "tp" along the rows
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
        for dim in ("dp", "tp"):
            x = start(rank)
            dist.all_reduce(x, group=mesh.get_group(dim))
            out[f"all_reduce_mesh_{dim}"] = start(rank), x
    return out


def main(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=2))
    rank, world = dist.get_rank(), dist.get_world_size()
    assert ELEMS % world == 0, f"run on a world size that divides {ELEMS}"
    mine = run_all(rank, world)
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)  # pickled Python objects: fine for results, slow for tensors
    if rank == 0:
        table = {name: {"before": torch.stack([everyone[r][name][0] for r in range(world)]),
                        "after": torch.stack([everyone[r][name][1] for r in range(world)])}
                 for name in mine}  # fmt: skip
        torch.save({"world": world, "results": table}, args.out)
        print(f"rank 0: {len(table)} collectives on {world} processes saved to {args.out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="file rank 0 saves every rank's before/after tensors to")
    main(p.parse_args())
