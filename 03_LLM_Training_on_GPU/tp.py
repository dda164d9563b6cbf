"""Tensor parallel (TP): every process holds a slice of every weight matrix and sees the same batch.

Megatron-style pairs: a column-parallel linear (each rank computes some output features) followed by a
row-parallel linear (each rank multiplies its slice of the inputs; the partial sums are all-reduced).
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
Options: ``--help``. All processes form one TP group (data-parallel size 1): --batch-size is the batch
of every rank. n_heads and n_kv_heads must be divisible by the number of processes.
"""

import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common.config import TrainConfig, UserError, script_options  # noqa: E402
from common.distributed import log, make_mesh  # noqa: E402
from common.model import GPT  # noqa: E402
from common.parallel import clip_grad_norm_  # noqa: E402
from common.trainer import (  # noqa: E402
    build_model,
    build_optimizer,
    loss_fn,
    micro_batches,
    padded_vocab,
    run_main,
    sample_text,
    setup,
    train,
)

OPTIONS = {
    "sequence_parallel": (False, "split norms and the residual stream along the sequence (less activation memory)"),
    "loss_parallel": (False, "cross-entropy on vocabulary-sharded logits (never gathers the full logits)"),
}


def check_tp(cfg: TrainConfig, tp: int, sequence_parallel: bool) -> None:
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
    if sequence_parallel and cfg.seq_len % tp:
        raise UserError(f"--sequence-parallel splits the sequence: --seq-len {cfg.seq_len} must be divisible by "
                        f"the tensor-parallel degree {tp}")


class ReplicateParallel(ParallelStyle):
    """A module every rank runs in full on replicated inputs (the norms without SP).

    Its parameters become replicated DTensors, so that *all* parameters are DTensors: the fp16 loss
    scaler and gradient clipping cannot mix plain tensors and DTensors. No communication.
    """

    def _apply(self, module: nn.Module, mesh) -> nn.Module:
        return distribute_module(
            module, mesh,  # no partition_fn: parameters are replicated
            input_fn=lambda mod, inputs, mesh: tuple(
                DTensor.from_local(x, mesh, [Replicate()], run_check=False) for x in inputs),
            output_fn=lambda mod, out, mesh: out.to_local())


def apply_tp(model: GPT, mesh, sequence_parallel: bool = False, loss_parallel: bool = False) -> GPT:
    """Shard the model over the 1-D ``mesh`` with the plan below (in place)."""
    # Layout of the residual stream between the TP regions: replicated, or split along the sequence (SP)
    residual = Shard(1) if sequence_parallel else Replicate()
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),  # each rank: its heads' queries
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),  # partial sums -> all-reduce (or RS)
            "feed_forward.w1": ColwiseParallel(),  # gate
            "feed_forward.w3": ColwiseParallel(),  # up
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),  # down
        }
        if not sequence_parallel:
            plan |= {"attention_norm": ReplicateParallel(), "ffn_norm": ReplicateParallel()}
        else:
            plan |= {
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # all-gather the sequence before the column-parallel projections (rope passes through)
                "attention": PrepareModuleInput(input_layouts=(Shard(1), None),
                                                desired_input_layouts=(Replicate(), None), use_local_output=True),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),),
                                                   use_local_output=True),
            }
        parallelize_module(block, mesh, plan)
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    }
    root_plan["norm"] = SequenceParallel() if sequence_parallel else ReplicateParallel()
    parallelize_module(model, mesh, root_plan)
    if model.cfg.tie_embeddings:  # both are sharded along the vocabulary: share the one DTensor again
        model.output.weight = model.tok_embeddings.weight
    return model


def scalar(t: torch.Tensor) -> float:
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def gathered_logits(model: nn.Module):
    """A context for generation: full logits even when the head's output stays vocabulary-sharded."""
    hook = model.output.register_forward_hook(lambda m, i, out: out.full_tensor() if isinstance(out, DTensor)
                                              else out)
    return hook


def main(cfg: TrainConfig) -> dict:
    opt = script_options(cfg, OPTIONS)
    run = setup(cfg, strategy="tp", dp_size=lambda world: check_tp(cfg, world, opt.sequence_parallel) or 1)
    tp = run.info.world_size
    model = build_model(run)
    lp = opt.loss_parallel and tp > 1
    if tp > 1:
        apply_tp(model, make_mesh(run.info, tp=tp), opt.sequence_parallel, lp)
        local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
        log.info(f"tp: {model.num_params():,} parameters, {local:,} on each rank; {model.cfg.n_heads // tp} of "
                 f"{model.cfg.n_heads} heads per rank | sequence parallel {opt.sequence_parallel}, "
                 f"loss parallel {lp}")
    run.extra["tp"] = dict(degree=tp, **vars(opt))
    optimizer = build_optimizer(model, cfg)
    compute = model if not cfg.compile else torch.compile(model)
    loss_context = loss_parallel if lp else nullcontext

    def forward_backward(x, y, scaler) -> float:
        total = 0.0
        n = run.accum_steps
        for xb, yb in micro_batches(x, y, n):
            with loss_context():
                with run.precision.autocast():
                    loss = loss_fn(compute(xb), yb) / n
                scaler.scale(loss).backward()
            total += scalar(loss)
        return total

    def eval_loss(x, y) -> float:
        with loss_context():
            return scalar(loss_fn(compute(x), y))

    def sample() -> str:
        if opt.sequence_parallel and tp > 1:
            return "(no sample: generation grows the sequence one token at a time, SP needs it divisible by tp)"
        hook = gathered_logits(model)
        try:
            return sample_text(model, run)
        finally:
            hook.remove()

    return train(run, model, optimizer, forward_backward, eval_loss=eval_loss,
                 clip_grad=lambda max_norm: clip_grad_norm_(list(model.parameters()), max_norm),
                 raw_model=model, sample=sample)


if __name__ == "__main__":
    run_main(main, __doc__, options=OPTIONS)
