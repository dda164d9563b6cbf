"""2-D parallelism: tensor parallel inside a node, FSDP across nodes, on one named mesh ("dp", "tp").

TP's two all-reduces per block need NVLink bandwidth, so each TP group is the GPUs of one node (the
inner, fastest-varying mesh dimension: ranks 0..tp-1 are one group). FSDP's all-gather and
reduce-scatter happen once per block and overlap with compute, so they tolerate the slower network
between nodes. Order matters, and ``common.parallelize.parallelize`` fixes it: ``apply_tp`` on
mesh["tp"], then activation checkpointing, then compile, then ``apply_fsdp`` on mesh["dp"]; every
parameter becomes a DTensor sharded over both dimensions.

Data: the dp groups take different slices of the global batch (rank r reads slice r // tp); the
ranks of one TP group read the same slice.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/fsdp_tp.py --tp 1                              # one process
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/fsdp_tp.py --tp 2   # CPU: 2 x 2, gloo
    torchrun --nnodes=2 --nproc_per_node=4 --rdzv_backend=c10d --rdzv_endpoint=HEAD:29500 \\
        03_LLM_Training_on_GPU/fsdp_tp.py --tp 4 --preset llama-1b --sequence-parallel   # 2 nodes x 4 GPUs
    sbatch -N 2 03_LLM_Training_on_GPU/fsdp_tp_multinode.slurm                  # Slurm: dp = nodes, tp = GPUs/node
Options: ``--help``; this script adds --tp; every flag of tp.py and fsdp.py works here too
(--sequence-parallel, --loss-parallel, --cpu-offload, --activation-checkpointing, --compile,
--no-reshard-after-forward). The number of processes must be a multiple of --tp.
"""

import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling script tp.py

import tp as tensor_parallel  # noqa: E402

from common.config import TrainConfig, UserError, doc  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.parallelize import parallelize  # noqa: E402
from common.trainer import Strategy, build_model, build_optimizer, run_main, setup, train  # noqa: E402


@dataclass
class Config(TrainConfig):
    tp: int = doc("tensor-parallel degree (GPUs per node, typically); data-parallel degree = processes / tp", 2)


def dp_degree(cfg: Config, world: int) -> int:
    """Check the 2-D layout against the world size (before any collective); returns the dp degree."""
    if cfg.tp < 1 or world % cfg.tp:
        raise UserError(f"--tp {cfg.tp} does not divide the {world} launched processes: the mesh is dp x tp = world "
                        f"size; launch a multiple of {cfg.tp} processes (torchrun --nproc_per_node) or change --tp")
    tensor_parallel.check_tp(cfg, cfg.tp)
    return world // cfg.tp


def main(cfg: Config) -> dict:
    run = setup(cfg, strategy="fsdp_tp", dp_size=lambda world: dp_degree(cfg, world))
    dp, tp = run.dp_size, cfg.tp
    model = build_model(run)
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()
    lp = cfg.loss_parallel and tp > 1
    mesh = make_mesh(run.info, dp=dp, tp=tp) if run.info.world_size > 1 else None  # tp inner: one node
    # apply_tp on mesh["tp"] -> activation checkpointing -> compile -> fully_shard on mesh["dp"]
    parallelize(model, cfg, tp_mesh=mesh["tp"] if tp > 1 else None, dp_mesh=mesh["dp"] if dp > 1 else None,
                data_parallel="fsdp" if dp > 1 else None, param_dtype=run.precision.dtype)
    if mesh is not None:
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        log.info(f"fsdp_tp: mesh dp={dp} x tp={tp}; {n_params:,} parameters, {local:,} on each rank")
    run.facts["fsdp_tp"] = dict(dp=dp, tp=tp, sequence_parallel=cfg.sequence_parallel, loss_parallel=lp,
                                cpu_offload=cfg.cpu_offload, activation_checkpointing=cfg.activation_checkpointing)

    @contextmanager
    def grad_sync(last: bool):  # accumulation: reduce-scatter over dp only after the last micro-batch
        if dp > 1:
            model.set_requires_gradient_sync(last)
        yield

    return train(run, Strategy(
        model, build_optimizer(model, cfg), flops, n_params, grad_sync=grad_sync,
        autocast=nullcontext if dp > 1 else None,  # FSDP's policy casts the weights
        loss_context=loss_parallel if lp else nullcontext,
        sample=lambda: tensor_parallel.tp_sample(model, run, tp)))


if __name__ == "__main__":
    run_main(main, __doc__, cls=Config)
