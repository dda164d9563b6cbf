"""Solution to the exercise of ``00b_collectives.ipynb``: the ring reduce-scatter on simulated ranks.

``tests/test_notebooks.py`` runs the notebook's check cell against the stub (it must fail) and against this
file (it must pass).
"""

import torch


def ring_reduce_scatter(buffers: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    # rank r ends with chunk r of the sum; returns those chunks and the number of elements each rank sent
    n = len(buffers)
    chunks = [list(b.clone().chunk(n)) for b in buffers]  # chunks[r][c]: rank r's running copy of chunk c
    sent = [0] * n
    for step in range(n - 1):
        # all sends of a step happen at once: take the messages first, then deliver them
        messages = [(r, (r - step - 1) % n, chunks[r][(r - step - 1) % n].clone()) for r in range(n)]
        for r, c, payload in messages:
            chunks[(r + 1) % n][c] += payload  # the right neighbour adds what it received
            sent[r] += payload.numel()
    return [chunks[r][r] for r in range(n)], sent
