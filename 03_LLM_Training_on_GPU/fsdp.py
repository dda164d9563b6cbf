"""Fully sharded data parallel (FSDP2): every process holds 1/N of the weights, gradients and Adam state.

``fully_shard`` turns each parameter into a DTensor sharded along dim 0 over the data-parallel ranks.
Before a block runs forward (and again in backward) FSDP all-gathers that block's full weights, and
frees them right after; after backward it reduce-scatters the gradients, so each rank keeps the
gradient of its own shard only, and the optimizer updates only that shard. Wrapping each transformer
block separately (then the root for the embedding, final norm and head) keeps only one block's full
weights alive at a time and lets the all-gather of block i+1 overlap the compute of block i.

Per-rank memory for parameters + gradients + AdamW state drops from 16 bytes/param (fp32) to 16/N.
Mixed precision: the policy casts the gathered weights to bf16 (A100) or fp16 (V100) for compute and
reduces gradients in fp32; the sharded master weights stay fp32. fp16 needs loss scaling:
``torch.amp.GradScaler`` works with sharded DTensor gradients (it reduces its inf/NaN check over the
mesh, so every rank skips the same steps). One process is plain single-device training.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/fsdp.py --preset tiny                        # one process
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/fsdp.py    # CPU: 2 processes, gloo
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/fsdp.py --preset llama-1b \\
        --activation-checkpointing                                              # 4 GPUs
    sbatch 03_LLM_Training_on_GPU/fsdp.slurm                                   # one node on Slurm
    sbatch -N 2 03_LLM_Training_on_GPU/fsdp_multinode.slurm                    # several nodes
Options: ``--help``; this script adds --cpu-offload, --activation-checkpointing, --no-reshard-after-forward.
Checkpoints are sharded (torch.distributed.checkpoint): each rank writes its shard; they load back
under any number of processes, or into one process for evaluation and export.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig, script_options  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.model import GPT  # noqa: E402
from common.precision import Precision  # noqa: E402
from common.trainer import (  # noqa: E402
    build_model,
    build_optimizer,
    loss_fn,
    micro_batches,
    run_main,
    sample_text,
    setup,
    train,
)

OPTIONS = {
    "cpu_offload": (False, "keep sharded parameters, gradients and optimizer state in CPU memory (GPU: saves "
                           "memory, costs PCIe traffic; the optimizer step runs on the CPU)"),
    "activation_checkpointing": (False, "recompute each block's activations in backward instead of storing them"),
    "reshard_after_forward": (True, "free gathered weights after forward (ZeRO-3); --no-reshard-after-forward "
                                    "keeps them until backward (ZeRO-2-like: more memory, one all-gather less)"),
}


def mixed_precision(precision: Precision) -> MixedPrecisionPolicy:
    """Compute in the policy's dtype (fp32 on CPU); always reduce gradients in fp32."""
    return MixedPrecisionPolicy(param_dtype=precision.dtype, reduce_dtype=torch.float32)


def apply_activation_checkpointing(model: GPT) -> GPT:
    """Wrap every block: its activations are recomputed in backward (more compute, much less memory)."""
    for key, block in model.layers.items():
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False)
    return model


def apply_fsdp(model: nn.Module, mesh, mp_policy: MixedPrecisionPolicy, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each block, then the root (embedding, final norm, head and what is left)."""
    kw = dict(mesh=mesh, mp_policy=mp_policy, reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **kw)
    # the root's parameters are needed first in backward (head) and last in forward: keep them gathered
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    return model


def main(cfg: TrainConfig) -> dict:
    opt = script_options(cfg, OPTIONS)
    run = setup(cfg, strategy="fsdp")
    sharded = run.info.world_size > 1
    # CPU offload: FSDP moves the shards to the CPU itself; build on the training device as usual
    model = build_model(run)
    if opt.activation_checkpointing:
        apply_activation_checkpointing(model)
    if sharded:
        mesh = make_mesh(run.info, dp=run.info.world_size)
        apply_fsdp(model, mesh, mixed_precision(run.precision), opt.cpu_offload, opt.reshard_after_forward)
        per_rank = sum(p.to_local().numel() for p in model.parameters())
        log.info(f"fsdp: {model.num_params():,} parameters, {per_rank:,} on each rank "
                 f"(cpu offload {opt.cpu_offload}, activation checkpointing {opt.activation_checkpointing})")
    run.extra["fsdp"] = vars(opt)
    optimizer = build_optimizer(model, cfg)
    # FSDP's policy already casts the weights for compute; autocast is for the one-process run
    autocast = nullcontext if sharded else run.precision.autocast
    compute = model if not cfg.compile else torch.compile(model)

    def forward_backward(x, y, scaler) -> float:
        total = 0.0
        n = run.accum_steps
        for i, (xb, yb) in enumerate(micro_batches(x, y, n)):
            if sharded:  # reduce-scatter gradients only after the last micro-batch
                model.set_requires_gradient_sync(i == n - 1)
            with autocast():
                loss = loss_fn(compute(xb), yb) / n
            scaler.scale(loss).backward()
            total += loss.item()
        return total

    return train(run, model, optimizer, forward_backward, raw_model=model, sample=lambda: sample_text(model, run))


if __name__ == "__main__":
    run_main(main, __doc__, options=OPTIONS)
