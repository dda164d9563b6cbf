"""Pipeline parallel (PP): each process holds a slice of the layers and micro-batches flow through them.

The model is cut by layers into stages: stage 0 owns the embedding, the last stage the final norm and
the output head (``GPT`` lets a stage drop what it does not own). ``PipelineStage`` wraps a stage and
sends activations forward / gradients backward with point-to-point messages; a *schedule* decides
the order in which the micro-batches of one global batch run forward and backward on every stage:

- ``gpipe``: all forwards, then all backwards (simple; keeps every micro-batch's activations);
- ``1f1b``: one forward, one backward in steady state (same bubble, far fewer live activations);
- ``interleaved1f1b`` / ``loopedbfs``: ``--virtual-stages`` stages per process (looped placement:
  process r holds stages r, r+p, ...), which shrinks the bubble by that factor;
- ``interleavedzb``: zero bubble; backward is split into input- and weight-gradients, and the
  weight part fills the bubble (looped placement as above). (``ScheduleZBVZeroBubble``, with two
  stages per process in a V, trains too, but its ``eval`` fails in torch 2.13: left out.)

While the pipeline fills and drains, stages idle: the *bubble*. With p processes, m micro-batches
and v stages per process its share of the step is (p-1)/(v*m + p-1) (v=1: GPipe and 1F1B); the
zero-bubble schedule does better than this bound. It is printed at start and stored in summary.json.
The loss is computed on the last stage and broadcast, gradients are clipped by the norm over all
stages. One process runs the whole model as a single stage (a world of one).

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/pp.py --preset tiny                          # one process, 1 stage
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/pp.py --schedule 1f1b --n-microbatches 8
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/pp.py --schedule interleaved1f1b
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/pp.py --preset gpt2-medium \\
        --config 03_LLM_Training_on_GPU/untied.toml                             # 4 GPUs, untied head
    sbatch 03_LLM_Training_on_GPU/pp.slurm --schedule 1f1b                       # one node on Slurm
Options: ``--help``; this script adds --schedule, --n-microbatches, --virtual-stages, and takes
--activation-checkpointing (each stage's blocks); --compile is refused (see common/parallelize.py).
The GPT-2 and Llama presets tie the embedding to the output head, which would sit on two different
stages: ``--config 03_LLM_Training_on_GPU/untied.toml`` unties them (``[model] tie_embeddings = false``).
"""

import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleGPipe,
    ScheduleInterleaved1F1B,
    ScheduleInterleavedZeroBubble,
    ScheduleLoopedBFS,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common import distributed  # noqa: E402
from common.config import TrainConfig, UserError, doc  # noqa: E402
from common.distributed import log  # noqa: E402
from common.parallelize import apply_ac  # noqa: E402
from common.trainer import Strategy, build_model, build_optimizer, loss_fn, run_main, setup, train  # noqa: E402

# schedule name -> (class, several stages per process?)
SCHEDULES = {
    "gpipe": (ScheduleGPipe, False),
    "1f1b": (Schedule1F1B, False),
    "interleaved1f1b": (ScheduleInterleaved1F1B, True),
    "loopedbfs": (ScheduleLoopedBFS, True),
    "interleavedzb": (ScheduleInterleavedZeroBubble, True),
}


@dataclass
class Config(TrainConfig):
    schedule: str = doc("pipeline schedule: " + ", ".join(SCHEDULES), "1f1b")
    n_microbatches: int = doc("micro-batches per global batch (0: batch / micro-batch size, at least 2 x processes)",
                              0)
    virtual_stages: int = doc("stages per process for interleaved1f1b, loopedbfs and interleavedzb", 2)


def plan(cfg: Config, world: int) -> dict:
    """Check the pipeline layout before any process group exists; every problem is one UserError."""
    if cfg.schedule not in SCHEDULES:
        raise UserError(f"--schedule {cfg.schedule!r} is unknown; choose one of {', '.join(SCHEDULES)}")
    # one process runs the whole model as one stage (torch 2.13's eval fails between two stages of one process)
    per_rank = cfg.virtual_stages if SCHEDULES[cfg.schedule][1] and world > 1 else 1
    if per_rank < 1:
        raise UserError(f"--virtual-stages must be at least 1, not {per_rank}")
    n_stages = world * per_rank
    mcfg = cfg.model_config()
    if mcfg.tie_embeddings and n_stages > 1:
        raise UserError("tied embeddings cannot be split across pipeline stages (the embedding lives on the first "
                        "stage, the output head on the last): add --config 03_LLM_Training_on_GPU/untied.toml")
    if mcfg.n_layers < n_stages:
        raise UserError(f"{mcfg.n_layers} layers cannot fill {n_stages} pipeline stages ({world} processes x "
                        f"{per_rank} stage(s) each): use fewer processes or virtual stages, or more layers")
    m = cfg.n_microbatches or max(cfg.batch_size // cfg.micro_batch_size, 2 * world)
    if m < world:
        raise UserError(f"--n-microbatches {m} is fewer than the {world} pipeline processes: every stage would "
                        f"idle most of the step; use at least {world}")
    if cfg.batch_size % m:
        raise UserError(f"--batch-size {cfg.batch_size} is not divisible by --n-microbatches {m}; "
                        f"use a batch size that is a multiple of {m}")
    if cfg.schedule in ("interleaved1f1b", "interleavedzb") and m % max(1, m // world):
        raise UserError(f"--schedule {cfg.schedule} needs --n-microbatches to be a multiple of m // processes "
                        f"({max(1, m // world)}); a multiple of {world} always works")
    bounds = [mcfg.n_layers * s // n_stages for s in range(n_stages + 1)]
    return dict(schedule=cfg.schedule, n_stages=n_stages, stages_per_rank=per_rank, n_microbatches=m,
                layers_of_stage=[list(range(bounds[s], bounds[s + 1])) for s in range(n_stages)],
                stage_ids=lambda rank: [rank + k * world for k in range(per_rank)],  # looped placement
                bubble=(world - 1) / (per_rank * m + world - 1))


class PipelineLoss:
    """The schedule's loss on the last stage, per micro-batch; fp16: scaled while training (not in eval),
    with one scale for all stages, so an overflow on any stage skips the step on every stage."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler, self.training = scaler, False

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(logits, targets)
        return self.scaler.scale(loss) if self.training and self.scaler.is_enabled() else loss


class StageGradScaler(ShardedGradScaler):
    """ShardedGradScaler (its inf check is all-reduced, so every stage skips alike) whose inf flag has the
    shape fused AdamW expects: ShardedGradScaler makes it (1,), and fused AdamW's step-count correction
    fails to broadcast that into its () step counts (torch 2.13); GradScaler itself uses ()."""

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        state = self._per_optimizer_states[id(optimizer)]
        state["found_inf_per_device"] = {d: t.reshape(()) for d, t in state["found_inf_per_device"].items()}


class LowPrecisionBoundary(nn.Module):
    """Hidden states cross the stage boundary in the autocast dtype (bf16/fp16), so the point-to-point
    sends of activations forward and of their gradients backward carry half the bytes of fp32; inside a
    stage the residual stream is fp32 again, as it is without pipelining. (Parameter names are the
    stage's own: the checkpoint is taken from the stage model, not from this wrapper.)"""

    def __init__(self, stage: nn.Module, dtype: torch.dtype, first: bool, last: bool):
        super().__init__()
        self.stage, self.dtype, self.first, self.last = stage, dtype, first, last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stage(x if self.first else x.float())
        return y if self.last else y.to(self.dtype)


def main(cfg: Config) -> dict:
    _, world, _, _ = distributed.env_ranks()
    layout = plan(cfg, world)  # before any collective
    m, n_stages = layout["n_microbatches"], layout["n_stages"]
    cfg = replace(cfg, micro_batch_size=cfg.batch_size // m)  # one micro-batch = one pipeline chunk
    run = setup(cfg, strategy="pp", dp_size=lambda world: 1)  # every process sees the whole batch
    info = run.info
    own_group = not dist.is_initialized()
    if own_group:  # one process: a world of one, so that the stages can run
        dist.init_process_group(info.backend, store=dist.HashStore(), rank=0, world_size=1)
    my_stages = layout["stage_ids"](info.rank)
    owned = sorted(i for s in my_stages for i in layout["layers_of_stage"][s])
    has_first, has_last = 0 in my_stages, n_stages - 1 in my_stages
    # same initial weights as one process: build the whole model (on CPU), keep this process's part
    model = build_model(run, device="cpu")
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()  # the whole model's
    model = apply_ac(model.keep_only(owned, has_first, has_last).to(info.device), cfg.activation_checkpointing)
    stage_models = [model] if len(my_stages) == 1 else [
        model.stage_view(layout["layers_of_stage"][s], s == 0, s == n_stages - 1) for s in my_stages]
    if run.precision.dtype != torch.float32:  # bf16/fp16: half the bytes between stages
        stage_models = [LowPrecisionBoundary(sm, run.precision.dtype, s == 0, s == n_stages - 1)
                        for sm, s in zip(stage_models, my_stages)]
    stages = [PipelineStage(sm, s, n_stages, info.device) for sm, s in zip(stage_models, my_stages)]
    schedule_cls, multi = SCHEDULES[cfg.schedule]
    scaler = StageGradScaler(info.device.type, enabled=run.precision.needs_scaler)  # all-reduces the inf check
    pipeline_loss = PipelineLoss(scaler)
    pipe = schedule_cls(stages if multi else stages[0], n_microbatches=m, loss_fn=pipeline_loss)
    last_rank = next(r for r in range(info.world_size) if n_stages - 1 in layout["stage_ids"](r))
    run.facts["pipeline"] = dict(schedule=cfg.schedule, stages=n_stages, stages_per_process=len(my_stages),
                                 n_microbatches=m, expected_bubble=layout["bubble"],
                                 layers_per_stage=[len(x) for x in layout["layers_of_stage"]])
    log.info(f"pipeline: {cfg.schedule}, {n_stages} stage(s) on {info.world_size} process(es), {m} micro-batches of "
             f"{cfg.micro_batch_size} | expected bubble (p-1)/(v*m+p-1) = {layout['bubble']:.1%}")
    log.info(f"rank {info.rank}: stage(s) {my_stages}, layers {owned}", extra={"all_ranks": True})

    def run_pipeline(x, y, fn) -> torch.Tensor:
        """Run one global batch through ``fn`` (step or eval); the mean loss, on every process."""
        losses: list[torch.Tensor] = []
        with run.precision.autocast():
            fn(x, target=y, losses=losses)  # stage 0 uses x, the last stage y; the others receive activations
        loss = torch.stack(losses).mean().float() if has_last else torch.zeros((), device=info.device)
        dist.broadcast(loss, src=last_rank)  # the true global-batch loss everywhere (for logs and summary)
        return loss

    def forward_backward(x, y) -> torch.Tensor:
        scaler.scale(torch.zeros((), device=info.device))  # every stage's scaler needs its scale, not just the last's
        pipeline_loss.training = True
        loss = run_pipeline(x, y, pipe.step)
        pipeline_loss.training = False
        return loss / scaler._get_scale_async() if scaler.is_enabled() else loss  # no host read

    params = list(model.parameters())

    def clip(max_norm: float) -> torch.Tensor:
        """Clip by the norm of the gradient of the whole model: each stage's squared norm, summed."""
        grads = [p.grad for p in params if p.grad is not None]
        local = nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=info.device)
        sq = local.float() ** 2
        dist.all_reduce(sq)
        total = sq.sqrt()
        nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    try:
        return train(run, Strategy(model, build_optimizer(model, cfg), flops, n_params, scaler=scaler,
                                   forward_backward=forward_backward, clip=clip,
                                   eval_loss=lambda x, y: run_pipeline(x, y, pipe.eval)))
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    run_main(main, __doc__, cls=Config)
