"""Helpers shared by the sharded strategies (FSDP, TP, 2D): gradient clipping over DTensors.

``torch.nn.utils.clip_grad_norm_`` needs all gradients on one device mesh. Under tensor parallelism
some parameters are DTensors on the TP mesh while others (norm weights without sequence parallelism)
are plain tensors; under FSDP + TP some live on the 2-D mesh and some only on the data-parallel one.
Here each group's norm is reduced over its own mesh, then the groups are combined.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor


@torch.no_grad()
def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, the same number on every rank."""
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)  # a DTensor norm is reduced over its mesh
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float().pow(2))
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    total = grad_norm(params)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return total
