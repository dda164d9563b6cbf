"""FSDP x TP on a 2-D mesh: which block of each weight every rank holds, measured.

Builds the tiny GPT the way ``03_LLM_Training_on_GPU/fsdp_tp.py`` does -- ``common.distributed.make_mesh``
with dp outer and tp inner, then ``common.parallelize.parallelize`` (``apply_tp`` on mesh["tp"], then
``apply_fsdp`` on mesh["dp"]) -- after filling every weight with ``arange(numel).view(shape)``. Each value
then names its own position, so a rank's local shard tells exactly which rows and columns of the full
matrix it holds. Rank 0 writes, for a few weights, every rank's mesh coordinate, process groups, DTensor
placements, local shape and row/column ranges as JSON (``02_tensor_parallel.ipynb`` predicts and draws them).

    torchrun --standalone --nproc_per_node=4 02_Notebook_Parallelism/mesh_2d.py --out /tmp/mesh_2d.json   # CPU, gloo
"""

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.config import TrainConfig  # noqa: E402
from common.distributed import init, make_mesh  # noqa: E402
from common.model import GPT, MODEL_PRESETS  # noqa: E402
from common.parallelize import parallelize  # noqa: E402

WEIGHTS = ("layers.0.attention.wq.weight", "layers.0.attention.wo.weight", "layers.0.feed_forward.w1.weight",
           "tok_embeddings.weight")  # column-parallel, row-parallel, column-parallel, vocabulary-parallel


def block_of(local: torch.Tensor, shape: tuple[int, int]) -> tuple[list[int], list[int]]:
    """The [start, stop) rows and columns of the arange-filled full matrix that ``local`` is, checked exactly."""
    rows, cols = (local // shape[1]).long(), (local % shape[1]).long()
    r0, r1, c0, c1 = int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1
    expected = torch.arange(shape[0] * shape[1], dtype=local.dtype).view(shape)[r0:r1, c0:c1]
    if not torch.equal(local, expected):
        raise RuntimeError(f"a local shard of shape {tuple(local.shape)} is not one contiguous block")
    return [r0, r1], [c0, c1]


def main(out: str, dp: int, tp: int) -> None:
    info = init("cpu", threads=1)
    # full_tensor() of a weight split twice along dim 0 gathers in two steps: torch warns, correctly, about speed
    logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
    cfg = TrainConfig(preset="tiny", device="cpu")  # defaults: no SP, no AC, no compile, fp32
    torch.manual_seed(cfg.seed)
    model = GPT(MODEL_PRESETS["tiny"])
    with torch.no_grad():  # every value names its own position in its matrix (exact in fp32: < 2**24)
        for p in model.parameters():
            p.copy_(torch.arange(p.numel(), dtype=p.dtype).view(p.shape))
    mesh = make_mesh(info, dp=dp, tp=tp)  # tp inner: ranks 0..tp-1 are one TP group
    parallelize(model, cfg, tp_mesh=mesh["tp"], dp_mesh=mesh["dp"], data_parallel="fsdp")
    params = dict(model.named_parameters())
    mine = {}
    for name in WEIGHTS:
        p = params[name]
        full = p.full_tensor()  # a collective: every rank calls it
        assert torch.equal(full, torch.arange(full.numel(), dtype=full.dtype).view(full.shape)), name
        local = p.to_local()
        rows, cols = block_of(local, tuple(full.shape))
        mine[name] = dict(shape=list(full.shape), placements=[str(pl) for pl in p.placements],
                          local_shape=list(local.shape), rows=rows, cols=cols)
    me = dict(rank=info.rank, coordinate=dict(zip(mesh.mesh_dim_names, mesh.get_coordinate())),
              groups={d: dist.get_process_group_ranks(mesh[d].get_group()) for d in mesh.mesh_dim_names},
              weights=mine)
    everyone = [None] * info.world_size
    dist.all_gather_object(everyone, me)
    if info.rank == 0:
        result = dict(dp=dp, tp=tp, mesh=mesh.mesh.tolist(), dim_names=list(mesh.mesh_dim_names), ranks=everyone)
        Path(out).write_text(json.dumps(result, indent=1))
        print(f"saved {out}: {len(WEIGHTS)} weights on a dp={dp} x tp={tp} mesh {mesh.mesh.tolist()}")
    dist.destroy_process_group()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="mesh_2d.json")
    ap.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (inner mesh dimension)")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", 1))
    main(args.out, world // args.tp, args.tp)
