"""Memory planner: how many bytes each GPU needs for a preset x strategy x GPUs x micro-batch x precision.

    python -m common.memory --preset llama-1b --strategy fsdp --gpus 4 --micro-batch 2 --precision bf16
    python -m common.memory --table            # what fits where: every preset x strategy on 4 GPUs

Per GPU = weights + gradients + AdamW state (each divided by what the strategy shards them over)
+ activations of one micro-batch (what backward needs; activation checkpointing keeps only each block's
input, plus one block's worth while it is recomputed) + temporaries (FSDP: two gathered blocks, the
prefetch; autocast: low-precision copies of the weights) + the runtime (CUDA context, NCCL: ~1 GiB).

The activation count is this model's (``common/model.py``), tensor by tensor (fp32 elements per token):
a block saves 8h + 2·kv + 4·ffn + heads + 2 (norm inputs/outputs and statistics, the SDPA inputs, output
and log-sum-exp, SwiGLU's four tensors; RoPE saves nothing but its table), the head 3h + 1 + vocab
(the log-softmax). In fp32 it is tested within 1% of the bytes autograd saves on CPU, with and without
full checkpointing (tests/test_memory.py). In bf16/fp16 (autocast) the matmul and SDPA tensors
take 2 bytes while the residual stream, the norms' internals and the log-softmax stay fp32: an
estimate until measured on a GPU; selective checkpointing is estimated as well. Weights, gradients
and optimizer state are tested equal to what a run's ``memory_per_rank`` reports.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

import torch

from common.config import TRAIN_PRESETS
from common.model import GPT, ModelConfig, model_config

GiB = 2**30
RUNTIME = 1.0 * GiB  # CUDA context + NCCL buffers + allocator slack, per GPU (typical)
GPUS = {"V100-16": 16, "V100-32": 32, "A100-40": 40, "A100-80": 80, "H100-80": 80, "H200-141": 141}
STRATEGIES = ("ddp", "fsdp", "tp", "fsdp_tp", "pp", "zero1", "zero2", "zero3")


@dataclass
class Plan:
    params: int
    grads: int
    optim: int
    activations: int
    temporaries: int
    runtime: int

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optim + self.activations + self.temporaries + self.runtime


def shapes(cfg: ModelConfig) -> list[tuple[str, torch.Size]]:
    with torch.device("meta"):
        model = GPT(cfg)
    return [(n, p.shape) for n, p in model.named_parameters()]


def fsdp_shard(shape: torch.Size, g: int) -> int:
    """Elements of rank 0's FSDP2 shard: dim 0 cut in g chunks (torch.chunk: ceil(d0 / g) rows first)."""
    rows = math.ceil(shape[0] / g)
    return rows * (math.prod(shape[1:]) if len(shape) > 1 else 1)


def activation_bytes(cfg: ModelConfig, tokens: int, layers: int, ac: str, low: bool, head: bool = True) -> int:
    """Bytes autograd keeps for ``tokens`` tokens of one micro-batch through ``layers`` blocks (+ the head),
    plus, with activation checkpointing, one block's worth while it is recomputed in backward."""
    h, kv, ffn, heads = cfg.dim, cfg.kv_heads * cfg.head_dim, cfg.hidden_dim, cfg.n_heads
    if low:  # autocast: fp32 residual stream and norm internals, 2-byte matmul/SDPA tensors, fp32 log-softmax
        block, final = 24 * h + 4 * kv + 8 * ffn + 4 * heads + 8, 10 * h + 4 + 4 * cfg.vocab_size
    else:
        block, final = 4 * (8 * h + 2 * kv + 4 * ffn + heads + 2), 4 * (3 * h + 1 + cfg.vocab_size)
    final = final if head else 0
    if ac == "none":
        return tokens * (layers * block + final)
    # each block keeps its input (the fp32 residual stream); selective also its seven matmul outputs and SDPA's
    # output (4h + 2kv + 2ffn) and fp32 log-sum-exp (heads) -- equal to the CPU allocator's count in fp32
    # (02_Notebook_Parallelism/06_activation_memory.ipynb)
    kept = 4 * h + (0 if ac == "full" else (2 if low else 4) * (4 * h + 2 * kv + 2 * ffn) + 4 * heads)
    return tokens * (layers * kept + final + block)


def plan(preset: str, strategy: str, gpus: int, micro_batch: int | None = None, seq_len: int | None = None,
         precision: str = "bf16", ac: str = "none", tp: int = 0, vocab_size: int | None = None) -> Plan:
    train = TRAIN_PRESETS[preset]
    micro_batch = micro_batch or train["micro_batch_size"]
    seq_len = seq_len or train["seq_len"]
    vocab = vocab_size or 64 * math.ceil(train.get("vocab_size", 4096) / 64)
    cfg = model_config(preset, vocab_size=vocab, max_seq_len=max(seq_len, 1))
    params = shapes(cfg)
    n = sum(math.prod(s) for _, s in params) - (vocab * cfg.dim if cfg.tie_embeddings else 0)
    tp = tp or (gpus if strategy == "tp" else 1)
    dp = gpus // tp if strategy in ("fsdp_tp", "tp") else gpus
    low = precision in ("bf16", "fp16")
    if strategy == "fsdp":
        local = sum(fsdp_shard(s, gpus) for name, s in params if name != "output.weight" or not cfg.tie_embeddings)
    elif strategy in ("tp", "fsdp_tp", "zero3"):
        local = math.ceil(n / (tp * dp if strategy != "zero3" else gpus))
    elif strategy == "pp":
        local = math.ceil(n / gpus)  # the stages' share (the embedding / head make the ends a little heavier)
    else:  # ddp, zero1, zero2: whole weights on every GPU
        local = n
    weights = 4 * local
    grads = 4 * (local if strategy not in ("zero2", "zero3") else math.ceil(n / gpus))
    optim = 8 * (local if not strategy.startswith("zero") else math.ceil(n / gpus)) + 4 * len(params)  # + steps
    if strategy.startswith("zero") and low:  # DeepSpeed: 2-byte weights in the model, fp32 masters in the optimizer
        weights, optim = weights // 2, optim + 4 * math.ceil(n / gpus)
    layers = cfg.n_layers // gpus if strategy == "pp" else cfg.n_layers
    tokens = micro_batch * seq_len * (gpus if strategy == "pp" else 1)  # PP (1F1B): up to p micro-batches alive
    activations = activation_bytes(cfg, tokens // (tp if strategy in ("tp", "fsdp_tp") else 1), layers, ac, low)
    act_bytes = 2 if low else 4
    block = sum(math.prod(s) for name, s in params if name.startswith("layers.0."))
    temporaries = 0
    if strategy in ("fsdp", "fsdp_tp", "zero3"):
        temporaries = 2 * block // tp * act_bytes + block // tp * 4  # two gathered blocks + one block's full grads
    elif low:
        temporaries = 2 * local  # autocast's low-precision copies of the weights, alive through forward
    return Plan(weights, grads, optim, activations, temporaries, int(RUNTIME) if strategy else 0)


def fits(p: Plan) -> dict[str, bool]:
    return {gpu: p.total <= size * GiB * 0.95 for gpu, size in GPUS.items()}  # 5% for fragmentation


def describe(p: Plan) -> str:
    parts = ", ".join(f"{k} {getattr(p, k) / GiB:.2f}" for k in
                      ("params", "grads", "optim", "activations", "temporaries", "runtime"))
    ok = [g for g, f in fits(p).items() if f]
    return f"{p.total / GiB:.1f} GiB per GPU ({parts} GiB); fits: {', '.join(ok) or 'none of ' + ', '.join(GPUS)}"


def table(gpus: int = 4, precision: str = "bf16") -> str:
    """Markdown: preset x strategy -> GiB per GPU and the smallest GPU it fits (default micro-batch)."""
    names = [s if s != "fsdp_tp" else "fsdp_tp (tp 2)" for s in STRATEGIES]
    rows = ["| preset (micro-batch x seq) | " + " | ".join(names) + " |", "|---" * (len(STRATEGIES) + 1) + "|"]
    for preset in ("gpt2-small", "gpt2-medium", "llama-1b"):
        t = TRAIN_PRESETS[preset]
        cells = []
        for s in STRATEGIES:
            cell = []
            for ac in ("none", "full"):
                p = plan(preset, s, gpus, precision=precision, ac=ac, tp=2 if s == "fsdp_tp" else 0)
                smallest = next((g for g, f in fits(p).items() if f), "none")
                cell.append(f"{p.total / GiB:.0f} ({smallest})")
            cells.append(" / ".join(cell))
        rows.append(f"| {preset} ({t['micro_batch_size']} x {t['seq_len']}) | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-small", choices=list(TRAIN_PRESETS))
    p.add_argument("--strategy", default="ddp", choices=STRATEGIES)
    p.add_argument("--gpus", type=int, default=4)
    p.add_argument("--micro-batch", type=int, default=0, help="sequences per forward pass (default: the preset's)")
    p.add_argument("--seq-len", type=int, default=0)
    p.add_argument("--precision", default="bf16", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full", "selective"])
    p.add_argument("--tp", type=int, default=0, help="fsdp_tp: tensor-parallel degree (default: all GPUs for tp)")
    p.add_argument("--table", action="store_true", help="what fits where: every preset x strategy")
    a = p.parse_args(argv)
    if a.table:
        print(f"GiB per GPU on {a.gpus} GPUs, {a.precision}, without / with activation checkpointing "
              f"(smallest GPU it fits):\n" + table(a.gpus, a.precision))
        return
    if a.strategy == "fsdp_tp" and not a.tp:
        p.error("--strategy fsdp_tp needs --tp")
    print(describe(plan(a.preset, a.strategy, a.gpus, a.micro_batch or None, a.seq_len or None, a.precision,
                        a.activation_checkpointing, a.tp)))


if __name__ == "__main__":
    main()
