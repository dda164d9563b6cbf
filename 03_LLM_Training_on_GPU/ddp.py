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
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig  # noqa: E402
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


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg, strategy="ddp")
    model = build_model(run)
    ddp_model = model
    if run.info.world_size > 1:
        device_ids = [run.info.device.index] if run.info.device.type == "cuda" else None
        ddp_model = DDP(model, device_ids=device_ids)
    if cfg.compile:
        ddp_model = torch.compile(ddp_model)
    optimizer = build_optimizer(model, cfg)

    def forward_backward(x, y, scaler) -> float:
        total = 0.0
        n = run.accum_steps
        for i, (xb, yb) in enumerate(micro_batches(x, y, n)):
            last = i == n - 1
            # no_sync: accumulate locally, all-reduce only once, on the last micro-batch
            sync = nullcontext() if last or ddp_model is model else ddp_model.no_sync()
            with sync:
                with run.precision.autocast():
                    loss = loss_fn(ddp_model(xb), yb) / n
                scaler.scale(loss).backward()
            total += loss.item()
        return total

    return train(run, ddp_model, optimizer, forward_backward, raw_model=model,
                 sample=lambda: sample_text(model, run))


if __name__ == "__main__":
    run_main(main, __doc__)
