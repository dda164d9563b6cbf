"""DeepSpeed ZeRO: data parallel where each process keeps only 1/N of the training state.

Plain data parallel keeps a full copy of weights, gradients and Adam state on every process. ZeRO
(the Zero Redundancy Optimizer) partitions them over the N data-parallel processes, in stages:
- stage 1: the optimizer state (Adam moments, fp32 master weights) — each rank updates its slice,
  then the updated weights are all-gathered;
- stage 2: + the gradients — reduce-scatter instead of all-reduce, each rank keeps its slice only;
- stage 3: + the weights themselves — each layer's weights are all-gathered just before its forward
  and backward and freed after (what FSDP does natively in PyTorch, see fsdp.py);
- offload (``ds_zero2_offload.json``): the optimizer state and step live in CPU memory.
The JSON configs next to this script hold the ZeRO settings; batch sizes, gradient clipping and
precision come from the shared command line, so a run equals ddp.py's on the same global batch.
``deepspeed.initialize`` wraps model and optimizer in an *engine*: ``engine.backward(loss)`` and
``engine.step()`` replace ``loss.backward()`` / clip / ``optimizer.step()`` (the engine clips with
the global norm, scales fp16 losses dynamically and keeps bf16/fp16 weights with fp32 masters).
The optimizer is this project's AdamW (a client optimizer), not DeepSpeed's fused/CPU Adam builds.

Launch (from the repository root):
    python 03_LLM_Training_on_GPU/zero.py --ds-config 03_LLM_Training_on_GPU/ds_zero1.json   # one process
    torchrun --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/zero.py                 # CPU: 2 processes
    torchrun --standalone --nproc_per_node=4 03_LLM_Training_on_GPU/zero.py --preset gpt2-medium \\
        --ds-config 03_LLM_Training_on_GPU/ds_zero3.json                                    # 4 GPUs
    deepspeed --num_gpus=4 --no_local_rank 03_LLM_Training_on_GPU/zero.py \\
        --ds-config 03_LLM_Training_on_GPU/ds_zero2.json                      # DeepSpeed's own launcher
    sbatch 03_LLM_Training_on_GPU/zero.slurm --ds-config 03_LLM_Training_on_GPU/ds_zero3.json   # one node
    sbatch -N 2 03_LLM_Training_on_GPU/zero_multinode.slurm                                 # several nodes
Options: ``--help``; this script adds --ds-config (default ds_zero2.json) and --shm-comm, and takes
--activation-checkpointing (applied to the blocks before ``deepspeed.initialize``); --compile is refused.

On CPU, DeepSpeed's communication layer JIT-compiles a shared-memory all-reduce kernel
(``deepspeed_shm_comm``, minutes with a C++ compiler) the first time a process group starts. Its
``build_shm_op`` skips the kernel when ``deepspeed.ops.__compatible_ops__`` marks it incompatible,
and then uses plain ``torch.distributed`` (gloo), the same backend as every other script here. This
script does exactly that unless ``--shm-comm`` is given (or the op was pre-built at install time
with ``DS_BUILD_SHM_COMM=1 pip install deepspeed``). DeepSpeed's ``cpu_adam`` is never built: the
optimizer is a client ``torch.optim.AdamW`` (a config-defined optimizer would need
``"torch_adam": true`` for that; with offload, ``"zero_force_ds_cpu_optimizer": false`` allows it).
Checkpoints are DeepSpeed's own (``engine.save_checkpoint``: each rank writes its partitions,
resume is exact); ``zero_to_fp32.py`` in a checkpoint folder merges them into one state dict.
DeepSpeed unpickles its files with ``weights_only=False``: before resuming, every file of the folder
is first checked with a restricted loader (``common.checkpoint.check_pickles``), so a crafted
checkpoint is refused instead of run.
"""

import json
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from common import checkpoint  # noqa: E402
from common.config import TrainConfig, UserError, doc  # noqa: E402
from common.distributed import log  # noqa: E402
from common.parallelize import apply_ac  # noqa: E402
from common.trainer import Strategy, build_model, build_optimizer, run_main, setup, train  # noqa: E402
from common.zero_memory import zero_grad_bytes, zero_memory  # noqa: E402

HERE = Path(__file__).resolve().parent


@dataclass
class Config(TrainConfig):
    ds_config: str = doc("DeepSpeed JSON config (ZeRO stage, offload, buckets)", str(HERE / "ds_zero2.json"))
    shm_comm: bool = doc("CPU only: let DeepSpeed build and use its shared-memory all-reduce (minutes to compile)",
                         False)


def deepspeed_config(path: str, run) -> dict:
    """The JSON file's ZeRO settings + what the shared command line decides (batch, clipping, precision)."""
    ds = json.loads(Path(path).read_text())
    cfg = run.cfg
    ds.update(train_batch_size=cfg.batch_size, train_micro_batch_size_per_gpu=run.micro_batch,
              gradient_accumulation_steps=run.accum_steps, gradient_clipping=cfg.grad_clip,
              steps_per_print=10**9, wall_clock_breakdown=False)
    name = run.precision.name
    ds["bf16"] = {"enabled": name == "bf16"}
    ds["fp16"] = {"enabled": name == "fp16", "loss_scale": 0, "initial_scale_power": 16}  # 0 = dynamic scaling
    return ds


class DeepSpeedCheckpointer:
    """DeepSpeed's own checkpoints (partitioned, exact resume) in the layout of common.checkpoint."""

    def __init__(self, engine, info, keep: int = 0):
        self.engine, self.info, self.keep = engine, info, keep

    def latest(self, out_dir: Path) -> Path | None:
        return checkpoint.latest(out_dir)  # DeepSpeed writes the same <out>/checkpoints/latest pointer

    def save(self, out_dir: Path, step: int, state: dict) -> Path:
        root, tag = Path(out_dir) / "checkpoints", f"step_{step:06d}"
        self.engine.save_checkpoint(str(root), tag=tag, client_state={"trainer_state": {"step": step, **state}})
        return checkpoint.seal(root / tag, step, self.info, keep=self.keep)  # manifest; `latest` moves after it

    def load(self, path: Path) -> dict:
        checkpoint.check_pickles(path)  # DeepSpeed itself unpickles with weights_only=False
        _, client_state = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        return client_state["trainer_state"]


def main(cfg: Config) -> dict:
    if not Path(cfg.ds_config).is_file():
        raise UserError(f"--ds-config {cfg.ds_config}: file not found (see 03_LLM_Training_on_GPU/ds_zero*.json)")
    try:
        import deepspeed
    except ImportError:
        raise UserError("DeepSpeed is not installed: pip install deepspeed (or bash scripts/setup.sh test)") from None
    run = setup(cfg, strategy="zero")
    if run.precision.name == "fp16" and run.info.device.type == "cpu":  # every rank alike: nothing hangs
        raise UserError("--precision fp16 with zero.py needs a GPU: DeepSpeed's CPU accelerator has no fp16; use fp32 "
                        "on CPU (or ddp.py / fsdp.py --precision fp16, which run fp16 autocast on CPU too)")
    ds_config = deepspeed_config(cfg.ds_config, run)
    if not dist.is_initialized():  # one process: DeepSpeed still wants a process group (a world of one)
        dist.init_process_group(run.info.backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", str(run.info.local_rank))  # DeepSpeed asserts it is set
    if run.info.device.type == "cpu" and not cfg.shm_comm:
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # gloo, no kernel build (see above)
    model = build_model(run)
    flops, n_params = model.flops_per_token(cfg.seq_len), model.num_params()  # before ZeRO-3 partitions
    apply_ac(model, cfg.activation_checkpointing)
    engine, *_ = deepspeed.initialize(model=model, optimizer=build_optimizer(model, cfg), config=ds_config)
    stage = engine.zero_optimization_stage()
    offload = bool(ds_config.get("zero_optimization", {}).get("offload_optimizer"))
    run.strategy = f"zero{stage}" + ("-offload" if offload else "")
    run.facts.update(zero_stage=stage, offload_optimizer=offload, ds_config=Path(cfg.ds_config).name)
    log.info(f"DeepSpeed {deepspeed.__version__}: ZeRO stage {stage}{' + optimizer offload' if offload else ''} "
             f"from {cfg.ds_config}, {run.accum_steps} micro-batch(es) of {run.micro_batch} per rank")

    @contextmanager
    def micro_step(last: bool):
        """DeepSpeed counts micro-batches in ``engine.step()``: before the last one it only advances the
        counter (ZeRO-2 reduces the gradients at the boundary); the real step is ``update`` below."""
        yield
        if not last:
            engine.step()

    def update(max_norm: float, bad_loss: torch.Tensor) -> tuple[float, bool]:
        """engine.step(): global-norm clipping (from the config), fp16 unscaling, the partitioned AdamW update,
        the all-gather of updated weights, zeroing the gradients. A step with non-finite gradients (a NaN or
        inf loss on any rank makes them so on every rank, through the reduction) is skipped by the engine
        itself: its overflow check drops the step's gradient partitions and still counts the micro-batch.
        Not calling ``engine.step()`` would leave both behind (stale partitions, the accumulation boundary one
        micro-batch early from then on)."""
        engine.step()
        stepped, bad = engine.was_step_applied(), bool(bad_loss)  # DeepSpeed reads its norm on the host anyway
        if stepped and bad:
            raise UserError("a non-finite loss left finite gradients and DeepSpeed applied the step; stopping: "
                            "the weights may be damaged (resume from the last checkpoint with a lower --lr)")
        # fp16: an overflow with a finite loss is the loss scaler's business (it lowers the scale), not a skip
        applied = stepped or (engine.fp16_enabled() and not bad)
        return float(engine.get_global_grad_norm() or 0.0), applied

    grads_held = [0]  # the most gradient bytes held after any backward (the memory report's "grads")

    def backward(loss: torch.Tensor) -> None:
        engine.backward(loss, scale_wrt_gas=False)
        grads_held[0] = max(grads_held[0], zero_grad_bytes(engine.optimizer))

    return train(run, Strategy(
        engine, engine.optimizer, flops, n_params, scaler=torch.amp.GradScaler(run.info.device.type, enabled=False),
        autocast=nullcontext,  # the engine keeps bf16/fp16 weights itself
        grad_sync=micro_step, backward=backward, update=update,
        zero_grad=lambda: None, memory=lambda: zero_memory(engine, grads_held[0]),
        checkpointer=DeepSpeedCheckpointer(engine, run.info, cfg.keep_checkpoints)))


if __name__ == "__main__":
    run_main(main, __doc__, cls=Config)
