"""The training loop every chapter script shares; the strategy-specific part arrives as a ``Strategy``.

A script sets up (``setup``), builds and parallelizes its model (``common.parallelize``), and hands
``train`` a ``Strategy``: the model, its optimizer and loss scaler, how one step runs on it (by
default ``accumulate``: micro-batches with gradient sync on the last one), evaluation, clipping,
checkpoints, FLOPs and parameter counts. Everything else lives here once: the learning-rate schedule,
loss scaling, the non-finite guard, logging, validation, checkpoints, the Slurm time-limit signal and
the summary. A step, in order: ``forward_backward`` -> ``clip`` -> ``optimizer_step`` -> ``zero_grad``.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from common import checkpoint, distributed, runlock
from common.config import TrainConfig, UserError, load_config, to_toml
from common.data import Sampler, TokenData, prepare
from common.distributed import DistInfo, log
from common.metrics import (
    MetricsSink,
    Throughput,
    measure_gpu_tflops,
    memory_breakdown,
    mfu,
    peak_memory_bytes,
    peak_tflops,
    restart_count,
)
from common.model import GPT
from common.parallelize import check_flags, clip_grad_norm_
from common.precision import Precision, choose_precision, describe

MAX_BAD_STEPS = 3  # consecutive non-finite steps (each skipped) before the run stops


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
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])  # one fused kernel for all tensors on CUDA
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8,
                             **({"fused": True} if on_gpu else {"foreach": True}))


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay from lr to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def loss_fn(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor: the whole value of a (replicated or sharded) DTensor."""
    return t.full_tensor() if isinstance(t, DTensor) else t


class DCPCheckpointer:
    """Sharded checkpoints of model + optimizer with torch.distributed.checkpoint (common.checkpoint)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, info: DistInfo, keep: int = 0):
        self.model, self.optimizer, self.info, self.keep = model, optimizer, info, keep

    def latest(self, out_dir: Path) -> Path | None:
        return checkpoint.latest(out_dir)

    def save(self, out_dir: Path, step: int, state: dict) -> Path:
        return checkpoint.save(out_dir, step, self.model, self.optimizer, self.info, state, keep=self.keep)

    def load(self, path: Path) -> dict:
        return checkpoint.load(path, self.model, self.optimizer, self.info)


def _no_context(*args) -> AbstractContextManager:
    return nullcontext()


@dataclass
class Strategy:
    """What a chapter script hands ``train``: its parallelized model and how one step runs on it.

    Only ``model``, ``optimizer``, ``flops_per_token`` and ``num_params`` are required; the defaults
    are plain data-parallel training. ``grad_sync(last)`` is the context each micro-batch runs in
    (DDP's ``no_sync``, FSDP's ``set_requires_gradient_sync``), so gradients are reduced once per step.
    """

    model: nn.Module  # tokens -> logits, wrapped or sharded as the strategy needs
    optimizer: torch.optim.Optimizer
    flops_per_token: float | Callable[[int], float]  # training FLOPs per token of the whole model (for MFU),
    # or a function of the sequence length when it varies from batch to batch (fine-tuning)
    num_params: int  # parameters of the whole model (not this rank's shard or stage)
    scaler: torch.amp.GradScaler | None = None  # default: the precision's (enabled for fp16 only)
    autocast: Callable[[], AbstractContextManager] | None = None  # default: the precision's autocast
    loss_context: Callable[[], AbstractContextManager] = nullcontext  # e.g. tensor parallel's loss_parallel
    grad_sync: Callable[[bool], AbstractContextManager] = _no_context
    backward: Callable[[torch.Tensor], None] | None = None  # default: scaler.scale(loss).backward()
    loss_of: Callable[..., torch.Tensor] | None = None  # one micro-batch's share of the loss; default: LM loss / n
    forward_backward: Callable[..., torch.Tensor] | None = None  # one rank's batch -> mean loss; default: accumulate
    eval_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None  # default: loss of model(x)
    clip: Callable[[float], torch.Tensor] | None = None  # default: clip the global norm of model's gradients
    update: Callable[[float], tuple[float, bool]] | None = None  # default: clip_and_step; -> (norm, applied?)
    zero_grad: Callable[[], None] | None = None
    memory: Callable[[], dict] | None = None  # bytes held for params / grads / optimizer state on this rank
    checkpointer: object | None = None  # save / latest / load; default: DCPCheckpointer
    sample: Callable[[], str] | None = None  # text generated at the end

    def bind(self, run: Run) -> Strategy:
        """Fill in the defaults that need the run."""
        self.scaler = self.scaler or run.precision.scaler()
        self.autocast = self.autocast or run.precision.autocast
        self.backward = self.backward or (lambda loss: self.scaler.scale(loss).backward())
        self.loss_of = self.loss_of or (lambda x, y: loss_fn(self.model(x), y) / run.accum_steps)
        self.forward_backward = self.forward_backward or (lambda *batch: accumulate(self, run.accum_steps, batch))
        self.eval_loss = self.eval_loss or (lambda x, y: full(loss_fn(self.model(x), y)))
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.clip = self.clip or (lambda max_norm: clip_grad_norm_(params, max_norm))
        self.update = self.update or (lambda max_norm: clip_and_step(self, max_norm))
        self.zero_grad = self.zero_grad or (lambda: self.optimizer.zero_grad(set_to_none=True))
        self.memory = self.memory or (lambda: memory_breakdown(self.model, self.optimizer))
        self.checkpointer = self.checkpointer or DCPCheckpointer(self.model, self.optimizer, run.info,
                                                                 run.cfg.keep_checkpoints)
        return self


def accumulate(s: Strategy, n: int, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """This rank's share of the global batch in ``n`` micro-batches; gradients add up, and are reduced
    across ranks only in the last one. Returns the summed loss (a tensor on the device: no host sync)."""
    total = torch.zeros((), device=batch[0].device)
    for i, micro in enumerate(zip(*(t.chunk(n) for t in batch))):
        with s.grad_sync(i == n - 1), s.loss_context():
            with s.autocast():
                loss = s.loss_of(*micro)
            s.backward(loss)
        total += full(loss.detach()).float()
    return total


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # this rank's share of the global batch, on the device
    tokens: int  # tokens of the global batch (for tokens/s)
    seq_len: int  # sequence length (for the attention FLOPs)


@dataclass
class Task:
    """What a run trains on: its batches by step, and how it is evaluated (collective, -> {"val_loss": ...})."""

    batch: Callable[[int], Batch]
    evaluate: Callable[[], dict]
    evaluate_first: bool = False  # also evaluate before the first step (summary "before")


def lm_task(run: Run, s: Strategy) -> Task:
    """Next-token prediction on the token shards: every data-parallel rank reads its slice of a batch."""
    cfg, info = run.cfg, run.info
    train_sampler = Sampler(run.data.train, cfg.seq_len, cfg.batch_size, cfg.seed)
    val_sampler = Sampler(run.data.val, cfg.seq_len, cfg.batch_size, cfg.seed + 1)

    cuda = info.device.type == "cuda"

    def batch(step: int) -> Batch:  # CUDA: pinned host memory, copied without blocking the host
        x, y = (t.pin_memory().to(info.device, non_blocking=True) if cuda else t
                for t in train_sampler.batch(step, run.dp_rank, run.dp_size))
        return Batch((x, y), cfg.batch_size * cfg.seq_len, cfg.seq_len)

    def evaluate() -> dict:
        s.model.eval()
        total = torch.zeros((), device=info.device)
        with torch.no_grad(), s.loss_context(), s.autocast():
            for i in range(cfg.eval_batches):
                x, y = (t.to(info.device) for t in val_sampler.batch(i, run.dp_rank, run.dp_size))
                total += s.eval_loss(x, y).float()
        s.model.train()
        return {"val_loss": distributed.all_reduce_mean(total.item() / cfg.eval_batches, info)}

    return Task(batch, evaluate)


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


@dataclass
class History:
    """What a checkpoint carries besides weights: the loss curve, evaluations, the loss scale."""

    losses: list = field(default_factory=list)
    evals: list = field(default_factory=list)  # [step, val_loss]
    step: int = 0
    before: dict | None = None  # the evaluation before the first step (Task.evaluate_first)

    def state(self, run: Run, s: Strategy) -> dict:
        model_config = run.cfg.model_config(padded_vocab(run.data.vocab_size)) if run.data is not None else None
        return {"losses": self.losses, "evals": self.evals, "before": self.before,
                "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None,
                "batch_size": run.cfg.batch_size, "seq_len": getattr(run.cfg, "seq_len", None),
                "model_config": asdict(model_config) if model_config else None}  # in the manifest too


def resume(run: Run, s: Strategy) -> History:
    """The latest intact checkpoint's state, with --resume -- or after torchrun/Slurm restarted the run,
    whatever the flags (a restart must not start over)."""
    cfg = run.cfg
    if restart_count() and not cfg.resume:
        log.info(f"restart {restart_count()}: resuming from the latest checkpoint (as with --resume)")
    elif not cfg.resume:
        return History()
    path = s.checkpointer.latest(run.out_dir)
    if path is None:
        log.info(f"--resume: no checkpoint in {run.out_dir}/checkpoints yet, starting from step 0")
        return History()
    state = s.checkpointer.load(path)
    step = state["step"]
    if step > cfg.max_steps:
        raise UserError(f"{path} is at step {step}, past --max-steps {cfg.max_steps}: resuming would step backwards; "
                        f"give --max-steps >= {step} or start a new run (--out-dir, or --overwrite)")
    shape = {"batch_size": cfg.batch_size, "seq_len": getattr(cfg, "seq_len", None)}
    changed = {k: (state[k], v) for k, v in shape.items() if state.get(k, v) != v}
    if changed and not cfg.allow_batch_change:
        raise UserError(f"{path} was trained with " + ", ".join(f"{k}={a}" for k, (a, _) in changed.items())
                        + ", this run asks for " + ", ".join(f"{k}={b}" for k, (_, b) in changed.items())
                        + ": pass the checkpoint's values, or --allow-batch-change to continue anyway")
    if state.get("scaler") and s.scaler.is_enabled():
        s.scaler.load_state_dict(state["scaler"])
    log.info(f"resumed from {path} at step {state['step']}")
    return History(state["losses"], state["evals"], state["step"], state.get("before"))


def clip_and_step(s: Strategy, max_norm: float) -> tuple[float, bool]:
    """Unscale (fp16), clip the global gradient norm, step. A non-finite norm skips the update on every
    rank alike (the norm is global) -- except with fp16, where an overflow is the loss scaler's job: it
    skips the step itself and lowers the scale."""
    if s.scaler.is_enabled():
        s.scaler.unscale_(s.optimizer)
    norm = float(s.clip(max_norm))
    if not (math.isfinite(norm) or s.scaler.is_enabled()):
        return norm, False
    s.scaler.step(s.optimizer)
    s.scaler.update()
    return norm, True


def train_step(run: Run, s: Strategy, step: int, batch: Batch) -> tuple[float, float, bool]:
    """One optimizer step; returns (global mean loss, gradient norm, whether the update was applied).
    A non-finite loss (all-reduced: every rank agrees) skips the update."""
    cfg = run.cfg
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = distributed.all_reduce_mean(s.forward_backward(*batch.inputs).item(), run.info)
    if not math.isfinite(loss):
        return loss, float("nan"), False
    norm, applied = s.update(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
    return loss, norm, applied


def train(run: Run, s: Strategy, task: Task | None = None) -> dict:
    """Train ``cfg.max_steps`` optimizer steps of ``task`` (default: next-token prediction on the token
    shards); returns (and on rank 0 writes) the summary, or {"preempted": True, ...} after a signal."""
    try:
        return _train(run, s, task)
    finally:
        if run.lock is not None:
            run.lock.release()


def _train(run: Run, s: Strategy, task: Task | None) -> dict:
    cfg, info = run.cfg, run.info
    s.bind(run)
    task = task or lm_task(run, s)
    hist = resume(run, s)
    if task.evaluate_first and hist.before is None:
        hist.before = task.evaluate()
        log.info("before training: " + " | ".join(f"{k} {v:.4g}" for k, v in hist.before.items()
                                                  if isinstance(v, float)))
    sink = MetricsSink(run.out_dir, cfg, info.is_main)
    peak, peak_src = peak_tflops(info.device, run.precision.name, cfg.peak_tflops)
    if info.device.type == "cuda":  # the data sheet's promise and what this GPU really does
        run.facts["measured_peak_tflops"] = measure_gpu_tflops(info.device, run.precision.name)
        peak_src += f"; measured {run.facts['measured_peak_tflops']:.1f}"
    log.info(f"global batch {cfg.batch_size} = {run.dp_size} data-parallel rank(s) x {run.accum_steps} "
             f"micro-batch(es) of {run.micro_batch} | peak {peak or float('nan'):.2f} TFLOP/s per device ({peak_src})")
    meter, bad, mem, start = Throughput(), 0, None, hist.step
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=run.strategy, dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main), mininterval=1 if sys.stderr.isatty() else 30)
    say = bar.write if info.is_main and not bar.disable else log.info
    s.model.train()
    with Signals() as signals:
        for step in range(start, cfg.max_steps):
            meter.start()
            batch = task.batch(step)
            loss, norm, ok = train_step(run, s, step, batch)
            if step == cfg.max_steps - 1:  # gradients still allocated: count them before zero_grad frees them
                mem = s.memory()
            s.zero_grad()
            bad = 0 if ok else bad + 1
            hist.losses.append(loss)
            hist.step = step + 1
            bar.update(1)
            record = step_record(run, s, step, loss, norm, ok, meter.stop(batch.tokens), peak, batch.seq_len)
            if cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and step + 1 < cfg.max_steps:
                record["val_loss"] = task.evaluate()["val_loss"]
                hist.evals.append([step + 1, record["val_loss"]])
            sink.write(record)
            if (step + 1) % cfg.log_interval == 0 or step == start or "val_loss" in record:
                say(format_record(record, cfg.max_steps))
            if bad:
                stop_if_diverged(run, s, step, loss, norm, bad, say, sink)
            if distributed.any_rank(signals.received is not None, info):
                path = s.checkpointer.save(run.out_dir, step + 1, hist.state(run, s))
                bar.close()
                sink.close()
                log.info(f"preempted: checkpoint saved at step {step + 1} ({path}); rerun with --resume")
                return {"preempted": True, "step": step + 1}
            if cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and step + 1 < cfg.max_steps:
                s.checkpointer.save(run.out_dir, step + 1, hist.state(run, s))
    bar.close()
    return finish(run, s, task, hist, meter, mem or s.memory(), peak, sink)


def flops_at(s: Strategy, seq_len: int) -> float:
    return s.flops_per_token(seq_len) if callable(s.flops_per_token) else s.flops_per_token


def step_record(run: Run, s: Strategy, step: int, loss: float, norm: float, ok: bool, tok_s: float,
                peak: float | None, seq_len: int) -> dict:
    """One line of log.jsonl (the sink adds the wall-clock time and the restart count)."""
    record = dict(step=step + 1, loss=loss, lr=lr_at(step, run.cfg), grad_norm=norm, tokens_per_s=tok_s,
                  mfu=mfu(flops_at(s, seq_len), tok_s, peak, run.info.world_size))
    if s.scaler.is_enabled():
        record["loss_scale"] = s.scaler.get_scale()
    if not ok:
        record["skipped"] = True
    return record


def stop_if_diverged(run: Run, s: Strategy, step: int, loss: float, norm: float, bad: int, say, sink) -> None:
    """A skipped step is reported; ``MAX_BAD_STEPS`` in a row stop the run (exit 2) with what to try."""
    say(f"step {step + 1}: non-finite loss {loss} or gradient norm {norm}: update skipped ({bad} in a row)")
    if bad >= MAX_BAD_STEPS:
        sink.close()
        last = s.checkpointer.latest(run.out_dir)
        raise UserError(f"{bad} consecutive non-finite steps (last: step {step + 1}, loss {loss}); last good "
                        f"checkpoint: {last or 'none'}; likely causes: learning rate too high (--lr {run.cfg.lr:g}), "
                        "fp16 overflow (try --precision bf16 or fp32), bad data")


def format_record(r: dict, max_steps: int) -> str:
    line = (f"step {r['step']}/{max_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | grad_norm "
            f"{r['grad_norm']:.3f} | {r['tokens_per_s']:,.0f} tok/s")
    line += f" | mfu {r['mfu']:.1%}" if r["mfu"] else ""
    line += f" | loss scale {r['loss_scale']:g}" if "loss_scale" in r else ""
    return line + (f" | val_loss {r['val_loss']:.4f}" if "val_loss" in r else "")


def finish(run: Run, s: Strategy, task: Task, hist: History, meter: Throughput, mem: dict, peak: float | None,
           sink: MetricsSink) -> dict:
    """Final evaluation, checkpoint, summary (rank 0 writes summary.json and loss.png)."""
    cfg, info = run.cfg, run.info
    after = task.evaluate()
    hist.evals.append([cfg.max_steps, after["val_loss"]])
    if cfg.final_checkpoint:
        s.checkpointer.save(run.out_dir, cfg.max_steps, hist.state(run, s))
    mem["peak"] = peak_memory_bytes(info.device)
    per_rank = [mem]
    if info.world_size > 1:
        per_rank = [None] * info.world_size
        dist.all_gather_object(per_rank, mem)
    seq_len = getattr(cfg, "seq_len", 0)
    summary = dict(
        strategy=run.strategy, preset=cfg.preset, world_size=info.world_size, device=str(info.device.type),
        device_name=torch.cuda.get_device_name(info.device) if info.device.type == "cuda" else "cpu",
        precision=run.precision.name, steps=cfg.max_steps, final_loss=hist.losses[-1], val_loss=after["val_loss"],
        tokens_per_s=meter.tokens_per_s, mfu=mfu(flops_at(s, run.facts.get("mean_seq_len", seq_len)),
                                                 meter.tokens_per_s, peak, info.world_size),
        peak_tflops_per_device=peak, peak_memory_bytes=max(m["peak"] for m in per_rank),
        memory_per_rank=per_rank, params=s.num_params,
        threads_per_process=torch.get_num_threads() if info.device.type == "cpu" else None,
        losses=hist.losses, evals=hist.evals, **({"before": hist.before} if hist.before else {}), after=after,
        **run.facts)
    log.info(f"done: final loss {hist.losses[-1]:.4f} | val loss {after['val_loss']:.4f} | "
             f"{meter.tokens_per_s:,.0f} tok/s" + (f" | mfu {summary['mfu']:.1%}" if summary["mfu"] else "")
             + f" | peak memory {summary['peak_memory_bytes'] / 2**20:,.0f} MiB")
    if s.sample is not None and cfg.sample_tokens > 0:
        summary["sample"] = s.sample()
        log.info("sample:\n" + summary["sample"])
    sink.summary(summary, title=f"{run.strategy}, {cfg.preset}, {info.world_size} process(es)")
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
             cls: type = TrainConfig) -> None:
    """Command-line entry point: parse into ``cls``, run, print bad input as one line (exit 2), tear down."""
    try:
        main(load_config(argv, description, cls=cls))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        distributed.teardown()
        sys.exit(2)
    distributed.teardown()
