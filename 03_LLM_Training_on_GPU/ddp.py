"""Distributed data parallel (DDP): every process holds the whole model and a slice of the batch.

After ``backward`` DDP all-reduces (averages) the gradients across processes, bucket by bucket while
backward is still running, so every replica takes the same optimizer step. With gradient
accumulation, ``no_sync()`` skips that all-reduce on all but the last micro-batch.
One process is plain single-device training: the same script, no wrapper.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/ddp.py --preset tiny                        # one process
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/ddp.py    # CPU: 2 processes, gloo
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/ddp.py --preset gpt2-small  # 4 GPUs
    sbatch 03_LLM_Training_on_GPU/ddp.slurm                                   # one node on Slurm
    sbatch -N 2 03_LLM_Training_on_GPU/ddp_multinode.slurm                    # several nodes
Options: ``--help``. The global batch (``--batch-size``) is the same for any number of processes.
``--activation-checkpointing [full|selective]`` and ``--compile`` are applied to each block before DDP
wraps the model (the one order of ``common.parallelize``); both work with gradient accumulation.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig  # noqa: E402
from common.parallelize import parallelize  # noqa: E402
from common.trainer import Strategy, build_model, build_optimizer, run_main, sample_text, setup, train  # noqa: E402


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg, strategy="ddp")
    model = build_model(run)
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()
    replicated = run.info.world_size > 1  # one process is plain training: no wrapper
    # activation checkpointing -> compile (per block) -> DistributedDataParallel(model, device_ids=...)
    ddp_model = parallelize(model, cfg, data_parallel="ddp" if replicated else None, device=run.info.device)
    return train(run, Strategy(
        ddp_model, build_optimizer(model, cfg), flops, n_params,
        # accumulation: no_sync() skips the all-reduce on all but the last micro-batch
        grad_sync=lambda last: nullcontext() if last or not replicated else ddp_model.no_sync(),
        sample=lambda: sample_text(model, run)))


if __name__ == "__main__":
    run_main(main, __doc__)
