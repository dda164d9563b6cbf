"""Tensor-parallel layers with PyTorch's API, saved for the notebook to compare with its hand-built version.

Builds (seeded, identical on every rank) a column-parallel and a row-parallel ``nn.Linear`` and the
SwiGLU feed-forward of ``common.model``, shards them with ``parallelize_module`` (ColwiseParallel /
RowwiseParallel, the Megatron MLP plan), runs forward and backward on a fixed input, and rank 0 saves
the outputs, input gradients, and every rank's weight shards and weight-gradient shards to ``--out``.

    torchrun --standalone --nproc_per_node=2 02_Notebook_Parallelism/tp_layer_check.py --out tp.pt
    sbatch --wrap "torchrun --nproc_per_node=4 02_Notebook_Parallelism/tp_layer_check.py --out tp.pt"
"""

import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.model import FeedForward, ModelConfig  # noqa: E402

CFG = ModelConfig(dim=32, n_heads=4, ffn_hidden=64)  # small: the point is equality, not speed


def inputs():
    """The modules and the input, the same on every rank (same seed)."""
    torch.manual_seed(0)
    col, row, ffn = nn.Linear(32, 48, bias=True), nn.Linear(48, 32, bias=True), FeedForward(CFG)
    x = torch.randn(4, 6, 32)  # (batch, sequence, features)
    return col, row, ffn, x


def plain(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor copy (outputs of collectives may be wrapped in async tensor subclasses)."""
    return torch.empty(t.shape, dtype=t.dtype).copy_(t.detach())


def shards(module: nn.Module) -> dict:
    """name -> [shard of rank 0, shard of rank 1, ...] for weights and weight gradients."""
    out = {}
    for name, p in module.named_parameters():
        for kind, t in (("param", p), ("grad", p.grad)):
            local = t.to_local().contiguous()
            gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, local)
            out[f"{kind}:{name}"] = gathered
    return out


def main(out: str) -> None:
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    col, row, ffn, x = inputs()
    parallelize_module(col, mesh, ColwiseParallel())  # output features split: output sharded on the last dim
    # input features split (the full input arrives, each rank takes its slice): partial sums all-reduced
    parallelize_module(row, mesh, RowwiseParallel(input_layouts=Replicate()))
    parallelize_module(ffn, mesh, {"w1": ColwiseParallel(), "w3": ColwiseParallel(), "w2": RowwiseParallel()})
    x_row = torch.randn(4, 6, 48, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, module, inp in (("col", col, x), ("row", row, x_row), ("ffn", ffn, x)):
        inp = inp.clone().requires_grad_(True)
        y = module(inp)  # col: this rank's output features; row and ffn: the full output (all-reduced)
        y.pow(2).sum().backward()  # col: the loss of this rank's features; their sum over ranks is the full loss
        if name == "col":  # gather the output features to compare with the full layer
            parts = [torch.empty_like(y) for _ in range(dist.get_world_size())]
            dist.all_gather(parts, y.detach().contiguous())
            y = torch.cat(parts, dim=-1)
        results[name] = dict(input=plain(inp), output=plain(y), input_grad=plain(inp.grad), **shards(module))
    if dist.get_rank() == 0:
        torch.save(dict(world_size=dist.get_world_size(), results=results), out)
        print(f"saved {out}: {', '.join(results)} on {dist.get_world_size()} ranks")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=os.environ.get("TP_CHECK_OUT", "tp_layer_check.pt"))
    main(p.parse_args().out)
