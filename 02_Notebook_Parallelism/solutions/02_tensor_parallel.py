"""Solution to the exercise of ``02_tensor_parallel.ipynb``: Megatron's f and g as autograd functions.

Each function takes one tensor per simulated rank and returns one per rank. ``tests/test_notebooks.py`` runs the
notebook's check cell against the stub (it must fail) and against this file (it must pass).
"""

import torch


class CopyToTP(torch.autograd.Function):  # Megatron's f
    @staticmethod
    def forward(ctx, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(x.clone() for x in xs)  # identity: every rank already holds the whole input

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total = sum(grads)  # all-reduce: each rank's gradient covers only its slice of the hidden features
        return tuple(total.clone() for _ in grads)


class ReduceFromTP(torch.autograd.Function):  # Megatron's g
    @staticmethod
    def forward(ctx, *partials: torch.Tensor) -> tuple[torch.Tensor, ...]:
        total = sum(partials)  # all-reduce: every rank gets the sum of the row-parallel partial outputs
        return tuple(total.clone() for _ in partials)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return grads  # identity: each rank's partial output receives the gradient of its own (replicated) output
