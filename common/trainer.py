"""The training loop every chapter-03 script shares; the strategy-specific part is passed in.

A script builds its (wrapped) model and hands ``train`` a ``forward_backward(x, y) -> loss`` that runs
this rank's share of the global batch (micro-batches, accumulation, backward). Everything else — the
learning-rate schedule, clipping, loss scaling, logging, validation, checkpoints, the Slurm time-limit
signal, the summary — lives here once, so the diff between two chapter scripts is the parallelism.
"""

from __future__ import annotations

import json
import math
import signal
import sys
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from common import checkpoint, distributed
from common.config import TrainConfig, UserError
from common.data import Sampler, TokenData, prepare
from common.distributed import DistInfo, log
from common.metrics import JsonlLog, Throughput, memory_breakdown, mfu, peak_memory_bytes, peak_tflops, plot_losses
from common.model import GPT
from common.precision import Precision, choose_precision, describe


@dataclass
class Run:
    """What a script sets up before training."""

    cfg: TrainConfig
    info: DistInfo
    precision: Precision
    data: TokenData
    strategy: str
    out_dir: Path
    dp_rank: int = 0  # this rank's index among data-parallel replicas
    dp_size: int = 1  # number of data-parallel replicas (each gets batch_size / dp_size)
    extra: dict = field(default_factory=dict)  # strategy facts for the summary

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


def setup(cfg: TrainConfig, strategy: str, dp_size: Callable[[int], int] = lambda world: world) -> Run:
    """Initialise processes, precision and data. ``dp_size(world)`` = number of data-parallel replicas."""
    _, world, _, _ = distributed.env_ranks()
    dp = dp_size(world)  # may raise a layout error: before any collective can hang
    if cfg.batch_size % dp:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by the {dp} data-parallel ranks; "
                        f"use a multiple of {dp}")
    info = distributed.init(cfg.device, timeout_s=cfg.timeout_s, threads=cfg.threads)
    precision = choose_precision(cfg.precision, info.device)
    out_dir = Path(cfg.out_dir or f"runs/{strategy}-{cfg.preset}")
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
    data = prepare(cfg.data, cfg.data_dir, cfg.tokenizer, cfg.vocab_size, progress=info.is_main)
    distributed.barrier(info)
    log.info(f"{strategy}: {info.world_size} process(es) on {info.device.type} ({info.backend}), "
             f"{torch.get_num_threads()} CPU thread(s) each | {describe(precision)}")
    log.info(f"data: {data.dir} ({len(data.train):,} train tokens, vocab {data.vocab_size})")
    # data-parallel index for meshes with dp as the outer dimension (rank = dp_rank * inner + inner_rank)
    dp_rank = info.rank // (info.world_size // dp)
    return Run(cfg, info, precision, data, strategy, out_dir, dp_rank=dp_rank, dp_size=dp)


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
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def micro_batches(x: torch.Tensor, y: torch.Tensor, n: int):
    return zip(x.chunk(n), y.chunk(n))


class Signals:
    """Remember SIGUSR1 (Slurm's warning before the time limit) and SIGTERM; act at a step boundary."""

    def __init__(self):
        self.received: int | None = None
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGUSR1, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a notebook helper thread)
                pass
        return self

    def _handle(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, old in self._old.items():
            signal.signal(s, old)


def train(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer,
          forward_backward: Callable[[torch.Tensor, torch.Tensor, torch.amp.GradScaler], float],
          eval_loss: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
          clip_grad: Callable[[float], torch.Tensor] | None = None,
          raw_model: GPT | None = None, sample: Callable[[], str] | None = None, checkpointer=None) -> dict:
    """Train ``cfg.max_steps`` optimizer steps; returns (and on rank 0 writes) the summary.

    ``checkpointer``: anything with ``common.checkpoint``'s save/latest/load (default: that module, DCP).
    """
    cfg, info = run.cfg, run.info
    ckpt_io = checkpointer or checkpoint
    raw_model = raw_model or model
    scaler = run.precision.scaler()
    train_sampler = Sampler(run.data.train, cfg.seq_len, cfg.batch_size, cfg.seed)
    val_sampler = Sampler(run.data.val, cfg.seq_len, cfg.batch_size, cfg.seed + 1)
    eval_loss = eval_loss or (lambda x, y: loss_fn(model(x), y).item())
    clip_grad = clip_grad or (lambda max_norm: nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    jsonl = JsonlLog(run.out_dir / "log.jsonl" if info.is_main else None)

    start, losses, evals = 0, [], []
    if cfg.resume and (ckpt := ckpt_io.latest(run.out_dir)):
        state = ckpt_io.load(ckpt, model, optimizer, info)
        start, losses, evals = state["step"], state["losses"], state["evals"]
        scaler.load_state_dict(state["scaler"]) if state.get("scaler") else None
        log.info(f"resumed from {ckpt} at step {start}")
    elif cfg.resume:
        log.info(f"--resume: no checkpoint in {run.out_dir}/checkpoints yet, starting from step 0")

    def evaluate() -> float:
        model.eval()
        with torch.no_grad(), run.precision.autocast():
            vals = [eval_loss(*[t.to(info.device) for t in val_sampler.batch(i, run.dp_rank, run.dp_size)])
                    for i in range(cfg.eval_batches)]
        model.train()
        return distributed.all_reduce_mean(sum(vals) / len(vals), info)

    def save(step: int) -> Path:
        return ckpt_io.save(run.out_dir, step, model, optimizer, info, {
            "losses": losses, "evals": evals, "scaler": scaler.state_dict() if scaler.is_enabled() else None})

    peak, peak_src = peak_tflops(info.device, run.precision.name, cfg.peak_tflops)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len) if hasattr(raw_model, "flops_per_token") else 0
    tokens_per_step = cfg.batch_size * cfg.seq_len
    log.info(f"global batch {cfg.batch_size} x {cfg.seq_len} tokens = {run.dp_size} data-parallel rank(s) x "
             f"{run.accum_steps} micro-batch(es) of {run.micro_batch} | peak {peak or float('nan'):.2f} "
             f"TFLOP/s per device ({peak_src})")
    meter = Throughput()
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=run.strategy, disable=not (cfg.progress and info.is_main),
               mininterval=1 if sys.stderr.isatty() else 30, dynamic_ncols=True)
    model.train()
    with Signals() as signals:
        for step in range(start, cfg.max_steps):
            meter.start()
            lr = lr_at(step, cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = (t.to(info.device) for t in train_sampler.batch(step, run.dp_rank, run.dp_size))
            loss = forward_backward(x, y, scaler)
            scaler.unscale_(optimizer)
            grad_norm = clip_grad(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
            scaler.step(optimizer)
            scaler.update()
            if step == cfg.max_steps - 1:  # gradients still allocated: count them before zero_grad frees them
                mem = memory_breakdown(raw_model, optimizer)
            optimizer.zero_grad(set_to_none=True)
            loss = distributed.all_reduce_mean(loss, info)
            tok_s = meter.stop(tokens_per_step)
            losses.append(loss)
            bar.update(1)
            step_mfu = mfu(flops_per_token, tok_s, peak, info.world_size)
            record = dict(step=step + 1, loss=loss, lr=lr, grad_norm=float(grad_norm), tokens_per_s=tok_s, mfu=step_mfu)
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.max_steps:
                record["val_loss"] = evaluate()
                evals.append([step + 1, record["val_loss"]])
            jsonl.write(**record)
            if (step + 1) % cfg.log_interval == 0 or step == start or "val_loss" in record:
                line = (f"step {step + 1}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | grad_norm "
                        f"{float(grad_norm):.3f} | {tok_s:,.0f} tok/s" + (f" | mfu {step_mfu:.1%}" if step_mfu else ""))
                if "val_loss" in record:
                    line += f" | val_loss {record['val_loss']:.4f}"
                bar.write(line) if info.is_main and not bar.disable else log.info(line)
            if distributed.any_rank(signals.received is not None, info):
                path = save(step + 1)
                bar.close()
                log.info(f"preempted: checkpoint saved at step {step + 1} ({path}); rerun with --resume")
                return {"preempted": True, "step": step + 1}
            if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < cfg.max_steps:
                save(step + 1)
    bar.close()
    val_loss = evaluate()
    evals.append([cfg.max_steps, val_loss])
    save(cfg.max_steps)
    if start >= cfg.max_steps:  # resumed a finished run: no step ran, no gradients to count
        mem = memory_breakdown(raw_model, optimizer)
    mem["peak"] = peak_memory_bytes(info.device)
    per_rank = [mem]
    if info.world_size > 1:
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, mem)
    summary = dict(
        strategy=run.strategy, preset=cfg.preset, world_size=info.world_size, device=str(info.device.type),
        device_name=torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        precision=run.precision.name, steps=cfg.max_steps, final_loss=losses[-1], val_loss=val_loss,
        tokens_per_s=meter.tokens_per_s,
        mfu=mfu(flops_per_token, meter.tokens_per_s, peak, info.world_size),
        peak_tflops_per_device=peak, peak_memory_bytes=max(m["peak"] for m in per_rank),
        memory_per_rank=per_rank, params=raw_model.num_params() if hasattr(raw_model, "num_params") else None,
        threads_per_process=torch.get_num_threads() if info.device.type == "cpu" else None,
        losses=losses, evals=evals, **run.extra)
    log.info(f"done: final loss {losses[-1]:.4f} | val loss {val_loss:.4f} | {meter.tokens_per_s:,.0f} tok/s"
             + (f" | mfu {summary['mfu']:.1%}" if summary["mfu"] else "")
             + f" | peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if sample is not None and cfg.sample_tokens > 0:
        text = sample()
        log.info("sample:\n" + text)
        summary["sample"] = text
    if info.is_main:
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        title = f"{run.strategy}, {cfg.preset}, {info.world_size} process(es)"
        plot_losses(losses, evals, run.out_dir / "loss.png", title)
    return summary


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
             options: dict | None = None) -> None:
    """Command-line entry point: parse, run, print bad input as one line (exit 2), tear down.

    ``options`` = the script's own flags, {name: (default, help)} (see common.config.load_config).
    """
    from common.config import load_config

    try:
        main(load_config(argv, description, options=options))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        sys.exit(2)
    distributed.teardown()
