"""Solution to the exercise of ``04_fsdp_and_zero.ipynb``: one ZeRO-2 step on simulated ranks.

``tests/test_notebooks.py`` runs the notebook's check cell against the stub (it must fail) and against this
file (it must pass).
"""

import torch
from torch import nn


def zero2_step(replicas: list[nn.Module], lr: float, weight_decay: float) -> list[torch.optim.Optimizer]:
    # replicas[r]: rank r's full copy of the model, .grad holding its local gradients; returns each rank's AdamW
    n = len(replicas)
    params = [dict(r.named_parameters()) for r in replicas]  # params[r][name]: rank r's full tensor
    shards, optimizers = [], []
    for r in range(n):
        mine = {}
        for name, p in params[r].items():
            mine[name] = nn.Parameter(p.detach().chunk(n, dim=0)[r].clone())  # rank r's row block
            # reduce-scatter: rank r receives the mean over ranks of row block r of the gradient
            mine[name].grad = torch.stack([params[q][name].grad.chunk(n, dim=0)[r] for q in range(n)]).mean(0)
        optimizer = torch.optim.AdamW(mine.values(), lr=lr, weight_decay=weight_decay)  # moments for the shard only
        optimizer.step()
        shards.append(mine)
        optimizers.append(optimizer)
    with torch.no_grad():
        for name in params[0]:
            full = torch.cat([shards[q][name] for q in range(n)])  # all-gather of the updated shards
            for r in range(n):
                params[r][name].copy_(full)
                params[r][name].grad = None  # ZeRO-2 keeps no full gradient
    return optimizers
