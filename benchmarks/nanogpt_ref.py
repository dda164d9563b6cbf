"""A nanoGPT-style reference trainer for ``benchmarks/race.py`` (CPU, fp32, 1 or more gloo processes).

karpathy/nanoGPT cannot be installed here (it is not on PyPI and only the package registries are
reachable), so this file re-implements what its ``train.py`` step runs, written for this benchmark:
the GPT-2 block (LayerNorm with bias, fused q/k/v projection, SDPA causal attention, GELU MLP of 4x width,
learned positions, tied embedding), random windows from the token array, ``no_sync`` for all but the last
micro-batch, ``clip_grad_norm_``, AdamW with nanoGPT's choice (fused only on CUDA: on the CPU torch's
default, the per-tensor loop), DDP's default buckets, and the loss read on the host only at log steps.

    torchrun --nproc-per-node 2 benchmarks/nanogpt_ref.py --steps 60 --data-dir data
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.data import prepare  # noqa: E402  (the same byte-level tokens as the project's run)


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.c_attn(self.ln_1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.c_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, seq: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)
        self.lm_head.weight = self.wte.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers) if name.endswith("proj.weight") else 0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=16, help="global batch in sequences")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--log-interval", type=int, default=10)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="", help="write {'tokens_per_s': ...} here (rank 0)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (nanoGPT's default)")
    a = p.parse_args()
    torch.set_num_threads(1)
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    if world > 1:
        dist.init_process_group("gloo")
    data = prepare("shakespeare", a.data_dir, "bpe", 257, progress=False)
    tokens = np.asarray(data.train)
    torch.manual_seed(1337)
    model = GPT(257, a.dim, a.layers, a.heads, a.seq_len)
    if a.compile:
        model = torch.compile(model)
    if world > 1:
        model = nn.parallel.DistributedDataParallel(model)
    decay = [q for q in model.parameters() if q.dim() >= 2]
    rest = [q for q in model.parameters() if q.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    per_rank, gen = a.batch_size // world, np.random.default_rng(1337 + rank)
    t0, timed = None, 0
    for step in range(a.steps):
        if step == 1:  # the first step is warm-up, as in the project's tokens/s
            t0 = time.perf_counter()
        ix = gen.integers(0, len(tokens) - a.seq_len - 1, per_rank)
        x = torch.from_numpy(np.stack([tokens[i:i + a.seq_len] for i in ix]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[i + 1:i + 1 + a.seq_len] for i in ix]).astype(np.int64))
        loss = model(x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % a.log_interval == 0 and rank == 0:
            print(f"step {step}: loss {loss.item():.4f}", flush=True)
        timed += step >= 1
    seconds = time.perf_counter() - t0
    if rank == 0 and a.out:
        Path(a.out).write_text(json.dumps({"tokens_per_s": timed * a.batch_size * a.seq_len / seconds}))
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
