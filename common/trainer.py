"""The training loop every script shares; the strategy-specific part arrives as a ``Strategy``.

A script sets up (``common.run.setup``), builds and parallelizes its model (``common.parallelize``),
and hands ``train`` a ``Strategy`` (``common.strategy``): the model, its optimizer and loss scaler, how
one step runs on it, evaluation, clipping, checkpoints, FLOPs and parameter counts -- and, optionally,
a ``Task`` (default: next-token prediction on the token shards). Everything else lives here once: the
learning-rate schedule, the non-finite guard, logging, validation, checkpoints, the Slurm time-limit
signal and the summary. A step: ``forward_backward`` -> ``update`` (unscale, clip, step) -> ``zero_grad``.
"""

from __future__ import annotations

import math
import signal
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from common import distributed
from common.config import UserError
from common.data import Sampler
from common.distributed import log
from common.metrics import (
    MetricsSink,
    Throughput,
    measure_gpu_tflops,
    mfu,
    peak_memory_bytes,
    peak_tflops,
    restart_count,
)
from common.run import (  # noqa: F401  (the chapter scripts import these from here)
    Run,
    build_model,
    build_optimizer,
    lr_at,
    padded_vocab,
    run_main,
    sample_text,
    setup,
)
from common.strategy import Strategy, accumulate, clip_and_step, full, loss_fn  # noqa: F401

MAX_BAD_STEPS = 3  # consecutive non-finite steps (each skipped) before the run stops


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
        self._announced = False
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

    def announce(self, say, log_interval: int) -> None:
        """Say once that a signal arrived: the trainer acts on it at the next log step (every rank agrees
        there), i.e. within --log-interval steps -- keep Slurm's warning (--signal=B:USR1@SECONDS) longer."""
        if self.received is not None and not self._announced:
            self._announced = True
            say(f"signal {signal.Signals(self.received).name} received: checkpoint and stop at the next log step "
                f"(within --log-interval {log_interval} steps)")

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


def train_step(run: Run, s: Strategy, step: int, batch: Batch, signals: Signals) -> torch.Tensor:
    """One optimizer step. Returns ``STATS`` as one tensor on the device: the host reads it only at log
    steps (``Window.flush``), so it can queue the next steps meanwhile (nanoGPT and torchtitan do the same).
    A non-finite loss on any rank skips the update on every rank; the step's one collective carries the
    loss and whether any rank has received a signal."""
    cfg, dev = run.cfg, run.info.device
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss = s.forward_backward(*batch.inputs).detach().to(dev, torch.float64)
    signalled = torch.full((), float(signals.received is not None), dtype=torch.float64, device=dev)
    shared = torch.stack([loss, signalled])
    if run.info.world_size > 1:
        dist.all_reduce(shared)
    loss = shared[0] / run.info.world_size
    norm, applied = s.update(cfg.grad_clip if cfg.grad_clip > 0 else float("inf"), ~torch.isfinite(loss))
    scale = s.scaler._get_scale_async() if s.scaler.is_enabled() else None  # the tensor, not a host read
    as_t = lambda v: torch.as_tensor(v, device=dev).to(torch.float64).reshape(())  # noqa: E731
    return torch.stack([loss, as_t(norm), 1 - as_t(applied), shared[1], as_t(math.nan if scale is None else scale)])


STATS = ("loss", "grad_norm", "skipped", "signals", "loss_scale")  # what train_step returns, in this order


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
    meter, mem, start = Throughput(), None, hist.step
    from tqdm.auto import tqdm

    bar = tqdm(total=cfg.max_steps, initial=start, desc=run.strategy, dynamic_ncols=True,
               disable=not (cfg.progress and info.is_main), mininterval=1 if sys.stderr.isatty() else 30)
    say = bar.write if info.is_main and not bar.disable else log.info
    window = Window(run, s, hist, sink, say, peak, start)
    s.model.train()
    with Signals() as signals:
        batch = task.batch(start) if start < cfg.max_steps else None
        meter.start()
        for step in range(start, cfg.max_steps):
            signals.announce(say, cfg.log_interval)
            window.add(train_step(run, s, step, batch, signals), batch)
            if step == cfg.max_steps - 1:  # gradients still allocated: count them before zero_grad frees them
                mem = s.memory()
            s.zero_grad()
            if step + 1 < cfg.max_steps:
                batch = task.batch(step + 1)  # the next batch, prepared while the device works on this one
            last = step + 1 == cfg.max_steps
            evaluate = cfg.eval_interval and (step + 1) % cfg.eval_interval == 0 and not last
            save = cfg.ckpt_interval and (step + 1) % cfg.ckpt_interval == 0 and not last
            if not ((step + 1) % cfg.log_interval == 0 or step == start or evaluate or save or last):
                continue
            shown = hist.step  # the steps already counted on the progress bar
            signalled = window.flush(step, meter, task.evaluate()["val_loss"] if evaluate else None)
            bar.update(step + 1 - shown)
            if signalled:
                path = s.checkpointer.save(run.out_dir, step + 1, hist.state(run, s))
                bar.close()
                sink.close()
                log.info(f"preempted: checkpoint saved at step {step + 1} ({path}); rerun with --resume")
                return {"preempted": True, "step": step + 1}
            if save:
                s.checkpointer.save(run.out_dir, step + 1, hist.state(run, s))
            meter.start()
    bar.close()
    return finish(run, s, task, hist, meter, mem or s.memory(), peak, sink)


def flops_at(s: Strategy, seq_len: int) -> float:
    return s.flops_per_token(seq_len) if callable(s.flops_per_token) else s.flops_per_token


class Window:
    """The steps since the last log step, as device tensors (``train_step``'s ``STATS``). ``flush`` reads
    them in one host sync, writes one log record per step, and stops a diverged run."""

    def __init__(self, run: Run, s: Strategy, hist: History, sink: MetricsSink, say, peak: float | None,
                 start: int):
        self.run, self.s, self.hist, self.sink, self.say, self.peak, self.start = run, s, hist, sink, say, peak, start
        self.stats: list[torch.Tensor] = []
        self.batches: list[tuple[int, int]] = []  # (tokens, seq_len) of each step
        self.bad = 0  # consecutive skipped steps

    def add(self, stats: torch.Tensor, batch: Batch) -> None:
        self.stats.append(stats)
        self.batches.append((batch.tokens, batch.seq_len))

    def flush(self, step: int, meter: Throughput, val_loss: float | None) -> bool:
        """Log the window ending at ``step`` (tokens/s over the window); True if any rank got a signal."""
        rows, batches = torch.stack(self.stats).tolist(), self.batches  # the one host sync of the window
        self.stats, self.batches = [], []
        tok_s = meter.stop(sum(tokens for tokens, _ in batches))
        cfg = self.run.cfg
        for i, (row, (_, seq_len)) in enumerate(zip(rows, batches)):
            st = step + 1 - len(rows) + i
            stats = dict(zip(STATS, row))
            record = step_record(self.run, self.s, st, stats, tok_s, self.peak, seq_len)
            if st == step and val_loss is not None:
                record["val_loss"] = val_loss
                self.hist.evals.append([step + 1, val_loss])
            self.hist.losses.append(stats["loss"])
            self.sink.write(record)
            if (st + 1) % cfg.log_interval == 0 or st == self.start or "val_loss" in record:
                self.say(format_record(record, cfg.max_steps))
            self.bad = self.bad + 1 if stats["skipped"] else 0
            if self.bad:
                stop_if_diverged(self.run, self.s, st, stats["loss"], stats["grad_norm"], self.bad, self.say,
                                 self.sink)
        self.hist.step = step + 1
        return any(row[STATS.index("signals")] for row in rows)


def step_record(run: Run, s: Strategy, step: int, stats: dict, tok_s: float, peak: float | None,
                seq_len: int) -> dict:
    """One line of log.jsonl (the sink adds the wall-clock time and the restart count)."""
    record = dict(step=step + 1, loss=stats["loss"], lr=lr_at(step, run.cfg), grad_norm=stats["grad_norm"],
                  tokens_per_s=tok_s, mfu=mfu(flops_at(s, seq_len), tok_s, peak, run.info.world_size))
    if s.scaler.is_enabled():
        record["loss_scale"] = stats["loss_scale"]
    if stats["skipped"]:
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
        strategy=run.strategy, preset=cfg.preset, world_size=info.world_size, local_world_size=info.local_world_size,
        device=str(info.device.type),
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
