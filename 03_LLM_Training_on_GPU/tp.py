"""Tensor parallel (TP): every process holds a slice of every weight matrix and sees the same batch.

Megatron-style pairs (the plan: ``apply_tp`` in ``common/parallelize.py``, via ``parallelize_module``):
a column-parallel linear (each rank computes some output features) followed by a row-parallel linear
(each rank multiplies its slice of the inputs; the partial sums are all-reduced).
- attention: wq, wk, wv column-parallel = each rank owns n_heads / tp heads; wo row-parallel;
- feed-forward (SwiGLU): w1, w3 (gate, up) column-parallel; w2 (down) row-parallel;
- embedding: split along the vocabulary; output head: column-parallel (vocabulary split).
Two all-reduces per block in forward, two in backward: TP needs a fast interconnect (NVLink), so it
stays inside one node. The model is untouched: attention derives its local head count from the
sharded projection's output (``view(B, T, -1, head_dim)``).

``--sequence-parallel``: between the TP regions (norms, residual stream) the activations are split
along the sequence instead of replicated; each all-reduce becomes a reduce-scatter + all-gather (same
traffic) and activation memory outside attention/MLP drops by tp. ``--loss-parallel`` computes the
cross-entropy on the vocabulary-sharded logits, never gathering the (B, T, vocab) tensor.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/tp.py --preset tiny                           # one process (no TP)
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/tp.py       # CPU: 2 processes, gloo
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/tp.py --preset gpt2-small \\
        --sequence-parallel --loss-parallel                                       # 4 GPUs of one node
    sbatch 03_LLM_Training_on_GPU/tp.slurm                                      # one node on Slurm
Options: ``--help``. ``--activation-checkpointing`` wraps the blocks *after* they are sharded
(``common.parallelize``: TP -> checkpointing -> compile). All processes form one TP group
(data-parallel size 1): --batch-size is the batch of every rank. n_heads and n_kv_heads must be
divisible by the number of processes.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

from torch.distributed.tensor import DTensor
from torch.distributed.tensor.parallel import loss_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig, UserError  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.parallelize import parallelize  # noqa: E402
from common.trainer import (  # noqa: E402
    Strategy,
    build_model,
    build_optimizer,
    padded_vocab,
    run_main,
    sample_text,
    setup,
    train,
)


def check_tp(cfg: TrainConfig, tp: int) -> None:
    """Layout errors as one line each, before any process group exists (nothing can hang)."""
    m = cfg.model_config()
    hint = f"use a tensor-parallel degree that divides {m.n_heads} and {m.kv_heads}"
    if m.n_heads % tp:
        raise UserError(f"n_heads={m.n_heads} ({cfg.preset}) is not divisible by the tensor-parallel degree {tp}; "
                        + hint)
    if m.kv_heads % tp:
        raise UserError(f"n_kv_heads={m.kv_heads} ({cfg.preset}) is not divisible by the tensor-parallel degree "
                        f"{tp}; " + hint)
    for name, n in (("ffn hidden width", m.hidden_dim), ("padded vocabulary", padded_vocab(cfg.vocab_size))):
        if n % tp:
            raise UserError(f"{name} {n} is not divisible by the tensor-parallel degree {tp}")
    if cfg.sequence_parallel and cfg.seq_len % tp:
        raise UserError(f"--sequence-parallel splits the sequence: --seq-len {cfg.seq_len} must be divisible by "
                        f"the tensor-parallel degree {tp}")


def tp_sample(model, run, tp: int) -> str:
    """Generated text; the head's output may stay vocabulary-sharded, so gather it while generating."""
    if run.cfg.sequence_parallel and tp > 1:
        return "(no sample: generation grows the sequence one token at a time, SP needs it divisible by tp)"
    hook = model.output.register_forward_hook(lambda m, i, out: out.full_tensor() if isinstance(out, DTensor)
                                              else out)
    try:
        return sample_text(model, run)
    finally:
        hook.remove()


def main(cfg: TrainConfig) -> dict:
    run = setup(cfg, strategy="tp", dp_size=lambda world: check_tp(cfg, world) or 1)
    tp = run.info.world_size
    model = build_model(run)
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()
    lp = cfg.loss_parallel and tp > 1
    # parallelize_module(block, mesh, plan) per block -> activation checkpointing -> compile (per block)
    parallelize(model, cfg, tp_mesh=make_mesh(run.info, tp=tp) if tp > 1 else None)
    if tp > 1:
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        log.info(f"tp: {n_params:,} parameters, {local:,} on each rank; {model.cfg.n_heads // tp} of "
                 f"{model.cfg.n_heads} heads per rank | sequence parallel {cfg.sequence_parallel}, loss parallel {lp}")
    run.facts["tp"] = dict(degree=tp, sequence_parallel=cfg.sequence_parallel, loss_parallel=lp)
    return train(run, Strategy(
        model, build_optimizer(model, cfg), flops, n_params,
        loss_context=loss_parallel if lp else nullcontext,  # cross-entropy on vocabulary-sharded logits
        sample=lambda: tp_sample(model, run, tp)))


if __name__ == "__main__":
    run_main(main, __doc__)
