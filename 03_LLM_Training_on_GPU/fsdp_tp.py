"""2-D parallelism: tensor parallel inside a node, FSDP across nodes, on one named mesh ("dp", "tp").

TP's two all-reduces per block need NVLink bandwidth, so each TP group is the GPUs of one node (the
inner, fastest-varying mesh dimension: ranks 0..tp-1 are one group). FSDP's all-gather and
reduce-scatter happen once per block and overlap with compute, so they tolerate the slower network
between nodes. Order matters: first ``apply_tp`` (tp.py) on mesh["tp"], then ``apply_fsdp``
(fsdp.py) on mesh["dp"]; every parameter becomes a DTensor sharded over both dimensions.

Data: the dp groups take different slices of the global batch (rank r reads slice r // tp); the
ranks of one TP group read the same slice.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/fsdp_tp.py --tp 1                              # one process
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/fsdp_tp.py --tp 2   # CPU: 2 x 2, gloo
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 \\
        03_LLM_Training_on_GPU/fsdp_tp.py --tp 4 --preset llama-1b --sequence-parallel   # 2 nodes x 4 GPUs
    sbatch -N 2 03_LLM_Training_on_GPU/fsdp_tp_multinode.slurm                  # Slurm: dp = nodes, tp = GPUs/node
Options: ``--help``; this script adds --tp, --sequence-parallel, --loss-parallel, --cpu-offload,
--activation-checkpointing. The number of processes must be a multiple of --tp.
"""

import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling scripts fsdp.py and tp.py

import fsdp  # noqa: E402
import tp as tensor_parallel  # noqa: E402

from common.config import TrainConfig, UserError, script_options  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.parallel import clip_grad_norm_  # noqa: E402
from common.trainer import build_model, build_optimizer, loss_fn, micro_batches, run_main, setup, train  # noqa: E402

OPTIONS = {
    "tp": (2, "tensor-parallel degree (GPUs per node, typically); data-parallel degree = processes / tp"),
    **tensor_parallel.OPTIONS,
    "cpu_offload": fsdp.OPTIONS["cpu_offload"],
    "activation_checkpointing": fsdp.OPTIONS["activation_checkpointing"],
}


def dp_degree(cfg: TrainConfig, world: int, tp: int, sequence_parallel: bool) -> int:
    """Check the 2-D layout against the world size (before any collective); returns the dp degree."""
    if tp < 1 or world % tp:
        raise UserError(f"--tp {tp} does not divide the {world} launched processes: the mesh is dp x tp = world "
                        f"size; launch a multiple of {tp} processes (torchrun --nproc_per_node) or change --tp")
    tensor_parallel.check_tp(cfg, tp, sequence_parallel)
    return world // tp


def main(cfg: TrainConfig) -> dict:
    opt = script_options(cfg, OPTIONS)
    run = setup(cfg, strategy="fsdp_tp", dp_size=lambda world: dp_degree(cfg, world, opt.tp, opt.sequence_parallel))
    dp, tp = run.dp_size, opt.tp
    model = build_model(run)
    lp = opt.loss_parallel and tp > 1
    if opt.activation_checkpointing:
        fsdp.apply_activation_checkpointing(model)
    if run.info.world_size > 1:
        mesh = make_mesh(run.info, dp=dp, tp=tp)  # tp = inner dimension: consecutive ranks, one node
        if tp > 1:
            tensor_parallel.apply_tp(model, mesh["tp"], opt.sequence_parallel, lp)
        if dp > 1:
            fsdp.apply_fsdp(model, mesh["dp"], fsdp.mixed_precision(run.precision), opt.cpu_offload)
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        log.info(f"fsdp_tp: mesh dp={dp} x tp={tp}; {model.num_params():,} parameters, {local:,} on each rank")
    run.extra["fsdp_tp"] = dict(dp=dp, **vars(opt))
    optimizer = build_optimizer(model, cfg)
    compute = model if not cfg.compile else torch.compile(model)
    loss_context = torch.distributed.tensor.parallel.loss_parallel if lp else tensor_parallel.nullcontext
    autocast = tensor_parallel.nullcontext if dp > 1 else run.precision.autocast  # FSDP's policy casts

    def forward_backward(x, y, scaler) -> float:
        total = 0.0
        n = run.accum_steps
        for i, (xb, yb) in enumerate(micro_batches(x, y, n)):
            if dp > 1:
                model.set_requires_gradient_sync(i == n - 1)
            with loss_context():
                with autocast():
                    loss = loss_fn(compute(xb), yb) / n
                scaler.scale(loss).backward()
            total += tensor_parallel.scalar(loss)
        return total

    def eval_loss(x, y) -> float:
        with loss_context():
            return tensor_parallel.scalar(loss_fn(compute(x), y))

    return train(run, model, optimizer, forward_backward, eval_loss=eval_loss,
                 clip_grad=lambda max_norm: clip_grad_norm_(list(model.parameters()), max_norm), raw_model=model)


if __name__ == "__main__":
    run_main(main, __doc__, options=OPTIONS)
