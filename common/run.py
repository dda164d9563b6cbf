"""Setting up a run: processes, precision, data, the run folder, the model and its optimizer.

``setup`` checks a script's flags and layout before any process group exists (a bad layout cannot
hang), starts the processes, picks the precision, takes the run folder (one writer: ``common.runlock``)
and prepares the token shards. ``build_model`` / ``build_optimizer`` give every rank the same start.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from common import distributed, runlock
from common.config import TrainConfig, UserError, load_config, to_toml
from common.data import TokenData, prepare
from common.distributed import DistInfo, log
from common.metrics import restart_count
from common.model import GPT
from common.parallelize import check_flags
from common.precision import Precision, choose_precision, describe


@dataclass
class Run:
    """What a script sets up before training."""

    cfg: TrainConfig
    info: DistInfo
    precision: Precision
    data: TokenData | None  # the token shards of a pretraining run (None: the script brings its own data)
    strategy: str
    out_dir: Path
    dp_rank: int = 0  # this rank's index among data-parallel replicas
    dp_size: int = 1  # number of data-parallel replicas (each gets batch_size / dp_size)
    facts: dict = field(default_factory=dict)  # strategy facts for the summary
    lock: runlock.RunLock | None = None  # held by rank 0 while the run writes out_dir

    @property
    def per_rank_batch(self) -> int:
        return self.cfg.batch_size // self.dp_size

    @property
    def micro_batch(self) -> int:
        """Largest divisor of the per-rank batch not above --micro-batch-size."""
        return max(d for d in range(1, self.per_rank_batch + 1)
                   if self.per_rank_batch % d == 0 and d <= self.cfg.micro_batch_size)

    @property
    def accum_steps(self) -> int:
        return self.per_rank_batch // self.micro_batch


def setup(cfg: TrainConfig, strategy: str, dp_size: Callable[[int], int] = lambda world: world,
          token_data: bool = True) -> Run:
    """Check the flags and layout, then initialise processes, precision and (``token_data``) the token shards.
    ``dp_size(world)`` = number of data-parallel replicas (it may raise a layout error)."""
    check_flags(cfg, strategy)  # before any collective can hang
    _, world, _, _ = distributed.env_ranks()
    dp = dp_size(world)
    if cfg.batch_size % dp:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {dp} data-parallel ranks; "
                        f"use a multiple of {dp}")
    out_dir = Path(cfg.out_dir or f"{os.environ.get('LLM_RUNS', 'runs')}/{strategy}-{cfg.preset}")
    runlock.check_fresh(out_dir, cfg.resume, cfg.overwrite, restart_count() > 0)
    runlock.check_writable(out_dir)
    info = distributed.init(cfg.device, timeout_s=cfg.timeout_s, threads=cfg.threads)
    precision = choose_precision(cfg.precision, info.device)
    if info.device.type == "cuda":  # TF32 for fp32 matmuls (Ampere+; no effect on a V100) unless --no-tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    lock = runlock.RunLock(out_dir)
    problem = None
    if info.is_main:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            problem = lock.acquire()
        except OSError as e:
            problem = f"cannot write the run folder {out_dir}: {e.strerror or e}; choose a writable --out-dir"
    problem = _from_rank0(problem, info)  # every rank stops alike: nothing hangs
    if problem:
        raise UserError(problem)
    if info.is_main:
        if cfg.overwrite:
            runlock.clear(out_dir)
        (out_dir / "config.toml").write_text(to_toml(cfg))
    data = prepare(cfg.data, cfg.data_dir, cfg.tokenizer, cfg.vocab_size, progress=info.is_main) if token_data else None
    distributed.barrier(info)
    log.info(f"{strategy}: {info.world_size} process(es) on {info.device.type} ({info.backend}), "
             f"{torch.get_num_threads()} CPU thread(s) each | {describe(precision)}")
    if data is not None:
        log.info(f"data: {data.dir} ({len(data.train):,} train tokens, vocab {data.vocab_size})")
    log.info(f"run folder: {out_dir}" + (" (from $LLM_RUNS)" if not cfg.out_dir and "LLM_RUNS" in os.environ else ""))
    # data-parallel index for meshes with dp as the outer dimension (rank = dp_rank * inner + inner_rank)
    dp_rank = info.rank // (info.world_size // dp)
    return Run(cfg, info, precision, data, strategy, out_dir, dp_rank=dp_rank, dp_size=dp, lock=lock)


def _from_rank0(value, info: DistInfo):
    if info.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def padded_vocab(n: int, multiple: int = 64) -> int:
    return multiple * math.ceil(n / multiple)


def build_model(run: Run, device: torch.device | str | None = None) -> GPT:
    """The same initial weights on every rank and for any world size (seeded before construction)."""
    torch.manual_seed(run.cfg.seed)
    with torch.device(device or run.info.device):
        return GPT(run.cfg.model_config(vocab_size=padded_vocab(run.data.vocab_size)))


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not norms). No empty group (LoRA trains matrices only):
    a sharded checkpoint cannot name an empty group, so loading it would fail."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    # fused: one kernel for all tensors, on CUDA and CPU (the tiny preset's step: 7.6 -> 1.6 ms on one CPU
    # thread), and it can skip an update on the device (``common.strategy.step_unless``)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, fused=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def sample_text(model: GPT, run: Run, prompt: str = "ROMEO:\n") -> str:
    """Generate ``cfg.sample_tokens`` tokens from ``prompt`` (same seed, same text on every rank)."""
    tok = run.data.tokenizer
    ids = torch.tensor([tok.encode(prompt) or [tok.eot_id]], device=run.info.device)
    gen = torch.Generator(device=run.info.device).manual_seed(run.cfg.seed)
    ctx = run.precision.autocast() if run.info.device.type == "cuda" else nullcontext()
    model.eval()
    with ctx:
        out = model.generate(ids, run.cfg.sample_tokens, generator=gen)
    model.train()
    return tok.decode(out[0].tolist())

def run_main(main: Callable[[TrainConfig], dict], description: str, argv: list[str] | None = None,
             cls: type = TrainConfig) -> None:
    """Command-line entry point: parse into ``cls``, run, print bad input as one line (exit 2), tear down."""
    try:
        main(load_config(argv, description, cls=cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        sys.exit(2)
    distributed.teardown()
