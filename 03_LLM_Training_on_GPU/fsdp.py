"""Fully sharded data parallel (FSDP2): every process holds 1/N of the weights, gradients and Adam state.

``fully_shard`` turns each parameter into a DTensor sharded along dim 0 over the data-parallel ranks.
Before a block runs forward (and again in backward) FSDP all-gathers that block's full weights, and
frees them right after; after backward it reduce-scatters the gradients, so each rank keeps the
gradient of its own shard only, and the optimizer updates only that shard. Wrapping each transformer
block separately (then the root for the embedding, final norm and head) keeps only a block's full
weights alive at a time, two while the all-gather of block i+1 (prefetched) overlaps the compute of
block i.

Per-rank memory for parameters + gradients + AdamW state drops from 16 bytes/param (fp32) to 16/N.
Mixed precision: the policy casts the gathered weights to bf16 (A100) or fp16 (V100) for compute and
reduces gradients in fp32; the sharded master weights stay fp32. fp16 needs loss scaling:
``torch.amp.GradScaler`` works with sharded DTensor gradients (it reduces its inf/NaN check over the
mesh, so every rank skips the same steps). One process is plain single-device training.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/fsdp.py --preset tiny                        # one process
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/fsdp.py    # CPU: 2 processes, gloo
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/fsdp.py --preset llama-1b \\
        --activation-checkpointing --compile                                    # 4 GPUs
    sbatch 03_LLM_Training_on_GPU/fsdp.slurm                                   # one node on Slurm
    sbatch -N 2 03_LLM_Training_on_GPU/fsdp_multinode.slurm                    # several nodes
Options: ``--help``; FSDP's own: --cpu-offload, --no-reshard-after-forward; with --activation-checkpointing
[full|selective] and --compile applied to each block before ``fully_shard`` (``common.parallelize``).
Checkpoints are sharded (torch.distributed.checkpoint): each rank writes its shard; they load back
under any number of processes, or into one process for evaluation and export.
"""

import sys
from contextlib import contextmanager, nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.parallelize import parallelize  # noqa: E402
from common.trainer import Strategy, build_model, build_optimizer, run_main, sample_text, setup, train  # noqa: E402


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg, strategy="fsdp")
    sharded = run.info.world_size > 1  # one process is plain training: no wrapper
    # CPU offload: FSDP moves the shards to the CPU itself; build on the training device as usual
    model = build_model(run)
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()
    mesh = make_mesh(run.info, dp=run.info.world_size) if sharded else None
    # activation checkpointing -> compile (per block) -> fully_shard(block) for each block, then the root
    parallelize(model, cfg, dp_mesh=mesh, data_parallel="fsdp" if sharded else None,
                param_dtype=run.precision.dtype)
    if sharded:
        per_rank = sum(p.to_local().numel() for p in model.parameters())
        log.info(f"fsdp: {n_params:,} parameters, {per_rank:,} on each rank (cpu offload {cfg.cpu_offload}, "
                 f"activation checkpointing {cfg.activation_checkpointing}, compile {cfg.compile})")
    run.facts["fsdp"] = dict(cpu_offload=cfg.cpu_offload, reshard_after_forward=cfg.reshard_after_forward,
                             activation_checkpointing=cfg.activation_checkpointing)

    @contextmanager
    def grad_sync(last: bool):  # accumulation: reduce-scatter the gradients only after the last micro-batch
        if sharded:
            model.set_requires_gradient_sync(last)
        yield

    return train(run, Strategy(
        model, build_optimizer(model, cfg), flops, n_params, grad_sync=grad_sync,
        # FSDP's mixed-precision policy casts the gathered weights; autocast is for the one-process run
        autocast=nullcontext if sharded else None, sample=lambda: sample_text(model, run)))


if __name__ == "__main__":
    run_main(main, __doc__)
