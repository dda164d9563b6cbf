"""Solution to the exercise of ``01_data_parallel.ipynb``: data parallelism with uneven token counts.

``tests/test_notebooks.py`` runs the notebook's check cell against the stub (it must fail) and against this
file (it must pass).
"""

import copy

import torch
import torch.nn.functional as F


def dp_gradients(model: torch.nn.Module, slices: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    # slices: one (inputs, targets) per rank, of different sizes; targets of -100 are padding
    replicas = [copy.deepcopy(model) for _ in slices]  # every rank: the same weights
    n_valid = sum(int((y != -100).sum()) for _, y in slices)  # an all-reduce of one number per rank
    for replica, (x, y) in zip(replicas, slices):
        # the sum over this rank's valid targets, divided by the global count; times the world size,
        # because DDP's all-reduce below divides by it
        loss = F.cross_entropy(replica(x).flatten(0, 1), y.flatten(), reduction="sum") / n_valid * len(slices)
        loss.backward()
    # DDP's all-reduce: the sum of the ranks' gradients divided by the world size (keep these two lines)
    params = [dict(r.named_parameters()) for r in replicas]
    return {n: sum(p[n].grad for p in params) / len(replicas) for n, _ in model.named_parameters()}
