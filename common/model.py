"""One readable Llama-style decoder: RMSNorm, RoPE, SwiGLU, causal SDPA attention, optional GQA.

The model knows nothing about parallelism. Strategies are applied from outside (chapter 03):
- data parallel / FSDP wrap it or its ``layers``;
- tensor parallel shards ``wq/wk/wv/wo`` and ``w1/w2/w3``; attention derives its local head count
  from the (possibly sharded) projection output, never from the config;
- pipeline parallel deletes layers and sets ``tok_embeddings``/``norm``/``output`` to ``None`` on
  the stages that do not own them. ``layers`` is a ``ModuleDict`` keyed by the global layer index, so
  parameter names stay the same on every stage.

Weight names and the rotary convention (rotate-half) match Hugging Face ``LlamaForCausalLM``, so
``common.hf`` exports and imports without permuting anything.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    dim: int = 128  # width of the residual stream
    n_layers: int = 4  # number of transformer blocks
    n_heads: int = 4  # attention (query) heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    vocab_size: int = 4096  # rows of the embedding; training sets it from the tokenizer
    ffn_hidden: int | None = None  # SwiGLU hidden width; None = Llama rule (8/3 * dim, rounded)
    multiple_of: int = 64  # round the SwiGLU hidden width up to this
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 10000.0  # RoPE base frequency
    max_seq_len: int = 256  # longest sequence (size of the RoPE table)
    tie_embeddings: bool = False  # share the input embedding and the output projection

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def hidden_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.dim / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def validate(self) -> None:
        if self.dim % self.n_heads:
            raise ValueError(f"dim={self.dim} is not divisible by n_heads={self.n_heads}")
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")


# Nominal vocabularies: the GPT-2 sized presets use GPT-2's padded vocabulary so their parameter
# counts are the familiar ones; training replaces vocab_size with the tokenizer's (padded) size.
MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(dim=128, n_layers=4, n_heads=4, vocab_size=4096, max_seq_len=256),
    "gpt2-small": ModelConfig(
        dim=768, n_layers=12, n_heads=12, vocab_size=50304, max_seq_len=1024, tie_embeddings=True
    ),
    "gpt2-medium": ModelConfig(
        dim=1024, n_layers=24, n_heads=16, vocab_size=50304, max_seq_len=1024, tie_embeddings=True
    ),
    "llama-1b": ModelConfig(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden=8192, vocab_size=50304,
        max_seq_len=2048, rope_theta=500000.0, tie_embeddings=True,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_table(head_dim: int, max_seq_len: int, theta: float) -> torch.Tensor:
    """cos and sin for every position, stacked: shape (2, max_seq_len, head_dim)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return torch.stack([angles.cos(), angles.sin()])


def apply_rope(x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
    """Rotate (B, T, H, D) by position; rotate-half convention as in Hugging Face Llama."""
    cos, sin = rope[0, : x.shape[1], None, :], rope[1, : x.shape[1], None, :]
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.shape
        # "-1" = the heads this process holds: all of them, or a shard under tensor parallelism.
        q = self.wq(x).view(bsz, seqlen, -1, self.head_dim)
        k = self.wk(x).view(bsz, seqlen, -1, self.head_dim)
        v = self.wv(x).view(bsz, seqlen, -1, self.head_dim)
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        # grouped-query attention: each kv head serves n_heads / n_kv_heads query heads (SDPA's enable_gqa
        # shares them without materialising the repeated K/V)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.shape[1] != q.shape[1])
        return self.wo(out.transpose(1, 2).reshape(bsz, seqlen, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.w1 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w3 = nn.Linear(cfg.dim, cfg.hidden_dim, bias=False)
        self.w2 = nn.Linear(cfg.hidden_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope)
        return x + self.feed_forward(self.ffn_norm(x))


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): Block(cfg) for i in range(cfg.n_layers)})
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.tie_weights()
        rope = rope_table(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope", rope, persistent=False)
        self.init_weights()

    def tie_weights(self) -> None:
        """Share the input embedding with the output projection (if the config says so); call again after
        something replaced the embedding's parameter (tensor parallelism shards it into a new one)."""
        if self.cfg.tie_embeddings and self.tok_embeddings is not None and self.output is not None:
            self.output.weight = self.tok_embeddings.weight

    def keep_only(self, layer_ids: list[int], embedding: bool, head: bool) -> GPT:
        """Drop what a pipeline stage does not own (in place): other layers, and the embedding or the final
        norm + head. Layers keep their global index, so parameter names are the same on every stage."""
        for i in list(self.layers.keys()):
            if int(i) not in layer_ids:
                del self.layers[i]
        if not embedding:
            self.tok_embeddings = None
        if not head:
            self.norm, self.output = None, None
        return self

    def stage_view(self, layer_ids: list[int], embedding: bool, head: bool) -> GPT:
        """A GPT that shares this one's modules but runs only some of them (one of several pipeline stages
        held by one process): same parameters, its own table of submodules."""
        view = copy.copy(self)
        view._modules = dict(self._modules)
        view.layers = nn.ModuleDict({str(i): self.layers[str(i)] for i in layer_ids})
        view.tok_embeddings = self.tok_embeddings if embedding else None
        view.norm, view.output = (self.norm, self.output) if head else (None, None)
        return view

    @torch.no_grad()
    def init_weights(self) -> None:
        """GPT-2 style init; residual output projections scaled by 1/sqrt(2 * n_layers)."""
        std, out_std = 0.02, 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)
        if self.rope.device.type != "meta":
            self.rope.copy_(rope_table(self.cfg.head_dim, self.cfg.max_seq_len, self.cfg.rope_theta))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) int64 -> logits (B, T, vocab). Pipeline stages pass hidden states instead."""
        if tokens.shape[1] > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {tokens.shape[1]} > max_seq_len {self.cfg.max_seq_len}")
        h = self.tok_embeddings(tokens) if self.tok_embeddings is not None else tokens
        for layer in self.layers.values():
            h = layer(h, self.rope)
        h = self.norm(h) if self.norm is not None else h
        return self.output(h) if self.output is not None else h

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())  # tied weights are counted once
        if non_embedding:
            n -= self.tok_embeddings.weight.numel()
        return n

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 * matmul parameters + attention scores (PaLM appendix B)."""
        cfg = self.cfg
        matmul_params = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2)
        matmul_params -= cfg.vocab_size * cfg.dim * (0 if cfg.tie_embeddings else 1)  # lookup, no matmul
        return 6 * matmul_params + 12 * cfg.n_layers * cfg.dim * seq_len

    @torch.no_grad()
    def generate(
        self, tokens: torch.Tensor, max_new_tokens: int, temperature: float = 0.8,
        top_k: int | None = 50, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Sample continuations of tokens (B, T); returns (B, T + max_new_tokens)."""
        for _ in range(max_new_tokens):
            logits = self(tokens[:, -self.cfg.max_seq_len :])[:, -1, :].float()
            if temperature <= 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
        return tokens


def model_config(preset: str, **overrides) -> ModelConfig:
    """A preset's ModelConfig with field overrides (unknown fields are an error)."""
    if preset not in MODEL_PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(MODEL_PRESETS)}")
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"unknown model fields {sorted(unknown)}; known: {sorted(known)}")
    return replace(MODEL_PRESETS[preset], **overrides)
