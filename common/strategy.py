"""What a chapter script hands the trainer: its parallelized model and how one step runs on it.

``Strategy`` holds the model, optimizer, loss scaler, FLOPs and parameter counts, and -- where the
strategy differs from plain data parallelism -- how a micro-batch syncs its gradients, how backward,
clipping, the update, evaluation and checkpoints run. ``accumulate`` is the one micro-batch loop;
``clip_and_step`` the one update (unscale, clip, non-finite check, step).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from common import checkpoint
from common.distributed import DistInfo
from common.metrics import memory_breakdown
from common.parallelize import clip_grad_norm_

if TYPE_CHECKING:
    from common.run import Run


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole value of a (replicated or sharded) DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class DCPCheckpointer:
    """Sharded checkpoints of model + optimizer with torch.distributed.checkpoint (common.checkpoint)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, keep: int = 0):
        self.model, self.optimizer, self.info, self.keep = model, optimizer, info, keep

    def latest(self, out_dir: Path) -> Path | None:
        return checkpoint.latest(out_dir)

    def save(self, out_dir: Path, step: int, state: dict) -> Path:
        return checkpoint.save(out_dir, step, self.model, self.optimizer, self.info, state, keep=self.keep)

    def load(self, path: Path) -> dict:
        return checkpoint.load(path, self.model, self.optimizer, self.info)


def _no_context(*args) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Strategy:
    """What a chapter script hands ``train``: its parallelized model and how one step runs on it.

    Only ``model``, ``optimizer``, ``flops_per_token`` and ``num_params`` are required; the defaults
    are plain data-parallel training. ``grad_sync(last)`` is the context each micro-batch runs in
    (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``), so gradients are reduced once per step.
    """

    model: nn.Module  # tokens -> logits, wrapped or sharded as the strategy needs
    optimizer: torch.optim.Optimizer
    flops_per_token: float | Callable[[int], float]  # training FLOPs per token of the whole model (for MFU),
    # or a function of the sequence length when it varies from batch to batch (fine-tuning)
    num_params: int  # parameters of the whole model (not this rank's shard or stage)
    scaler: torch.amp.GradScaler | None = None  # default: the precision's (enabled for fp16 only)
    autocast: Callable[[], AbstractContextManager] | None = None  # default: the precision's autocast
    loss_context: Callable[[], AbstractContextManager] = nullcontext  # e.g. tensor parallel's loss_parallel
    grad_sync: Callable[[bool], AbstractContextManager] = _no_context
    backward: Callable[[torch.Tensor], None] | None = None  # default: scaler.scale(loss).backward()
    loss_of: Callable[..., torch.Tensor] | None = None  # one micro-batch's share of the loss; default: LM loss / n
    forward_backward: Callable[..., torch.Tensor] | None = None  # one rank's batch -> mean loss; default: accumulate
    eval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # default: loss of model(x)
    clip: Callable[[float], torch.Tensor] | None = None  # default: clip the global norm of model's gradients
    update: Callable[[float, torch.Tensor], tuple] | None = None  # (max_norm, bad_loss) -> (norm, applied?);
    # default: clip_and_step
    zero_grad: Callable[[], None] | None = None
    memory: Callable[[], dict] | None = None  # bytes held for params / grads / optimizer state on this rank
    checkpointer: object | None = None  # save / latest / load; default: DCPCheckpointer
    sample: Callable[[], str] | None = None  # text generated at the end

    def bind(self, run: Run) -> Strategy:
        """Fill in the defaults that need the run."""
        self.scaler = self.scaler or run.precision.scaler()
        self.autocast = self.autocast or run.precision.autocast
        self.backward = self.backward or (lambda loss: self.scaler.scale(loss).backward())
        self.loss_of = self.loss_of or (lambda x, y: loss_fn(self.model(x), y) / run.accum_steps)
        self.forward_backward = self.forward_backward or (lambda *batch: accumulate(self, run.accum_steps, batch))
        self.eval_loss = self.eval_loss or (lambda x, y: full(loss_fn(self.model(x), y)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = self.clip or (lambda max_norm: clip_grad_norm_(params, max_norm))
        self.update = self.update or (lambda max_norm, bad_loss: clip_and_step(self, max_norm, bad_loss))
        self.zero_grad = self.zero_grad or (lambda: self.optimizer.zero_grad(set_to_none=True))
        self.memory = self.memory or (lambda: memory_breakdown(self.model, self.optimizer))
        self.checkpointer = self.checkpointer or DCPCheckpointer(self.model, self.optimizer, run.info,
                                                                 run.cfg.keep_checkpoints)
        return self


def accumulate(s: Strategy, n: int, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """This rank's share of the global batch in ``n`` micro-batches; gradients add up, and are reduced
    across ranks only in the last one. Returns the summed loss (a tensor on the device: no host sync)."""
    total = torch.zeros((), device=batch[0].device)
    for i, micro in enumerate(zip(*(t.chunk(n) for t in batch))):
        with s.grad_sync(i == n - 1), s.loss_context():
            with s.autocast():
                loss = s.loss_of(*micro)
            s.backward(loss)
        total += full(loss.detach()).float()
    return total


def clip_and_step(s: Strategy, max_norm: float, bad_loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscale (fp16), clip the global gradient norm, step; returns (norm, applied) as device tensors.

    A non-finite loss (all-reduced: every rank agrees) or gradient norm (global) skips the update on every
    rank alike -- except that with fp16 an overflowing gradient is the loss scaler's job: it skips the step
    itself and lowers the scale. The skip is decided on the device (``step_unless``), so the host never
    waits here for the step to finish; only fp16 reads ``bad_loss`` on the host (its scaler must not see a
    step whose loss was not finite)."""
    if s.scaler.is_enabled():
        if bool(bad_loss):
            return torch.full_like(bad_loss, math.nan, dtype=torch.float32), torch.zeros_like(bad_loss)
        s.scaler.unscale_(s.optimizer)
        norm = s.clip(max_norm)
        s.scaler.step(s.optimizer)
        s.scaler.update()
        return norm, torch.ones_like(bad_loss)
    norm = s.clip(max_norm).to(bad_loss.device)
    skip = bad_loss | ~torch.isfinite(norm)
    step_unless(s.optimizer, skip)
    return norm, ~skip


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """``optimizer.step()`` unless ``skip`` (a bool tensor). Fused AdamW (``build_optimizer``) takes the flag
    as ``found_inf`` -- the same hook ``GradScaler`` uses -- and skips the update and its step count on the
    device, with no host sync; any other optimizer reads the flag on the host."""
    if getattr(optimizer, "_step_supports_amp_scaling", False):
        optimizer.grad_scale, optimizer.found_inf = None, skip.float().reshape(())  # shaped like the step counts
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf
    elif not bool(skip):
        optimizer.step()
