"""Solutions to the exercises of ``08_context_parallel.ipynb``: the zigzag split and its inverse, and the merge
of two normalised partial attention results (out, lse).

``tests/test_notebooks.py`` runs each of the notebook's check cells against its stub (it must fail) and
against this file (it must pass).
"""

import torch


def zigzag_split(x: torch.Tensor, n: int, dim: int) -> list[torch.Tensor]:
    # rank r gets chunks r and 2n-1-r of 2n equal chunks along dim, concatenated
    chunks = x.chunk(2 * n, dim=dim)
    return [torch.cat([chunks[r], chunks[2 * n - 1 - r]], dim=dim) for r in range(n)]


def zigzag_merge(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    # the inverse of zigzag_split
    halves = [p.chunk(2, dim=dim) for p in parts]  # rank r: (chunk r, chunk 2n-1-r)
    first = [h[0] for h in halves]  # chunks 0 .. n-1
    second = [h[1] for h in reversed(halves)]  # chunks n .. 2n-1
    return torch.cat(first + second, dim=dim)


def merge(out1: torch.Tensor, lse1: torch.Tensor, out2: torch.Tensor, lse2: torch.Tensor):
    # (out, lse) of attention over the keys of both parts
    lse = torch.logaddexp(lse1, lse2)  # log(exp(lse1) + exp(lse2)) without overflow
    return torch.exp(lse1 - lse) * out1 + torch.exp(lse2 - lse) * out2, lse
