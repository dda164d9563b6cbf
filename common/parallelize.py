"""How a model is parallelized: small ``apply_*`` functions, always applied in one order.

The order (torchtitan's ``parallelize_llama``) and why:
1. ``apply_tp``      tensor parallel (+ sequence parallel, loss parallel): needs the plain block
                     structure, ``attention.wq`` etc., to find the modules its plan names;
2. ``apply_ac``      activation checkpointing wraps each (already sharded) block;
3. ``apply_compile`` compiles each block (sharded, checkpointed) in place;
4. ``apply_fsdp`` / ``apply_ddp``: data parallelism last, around everything above.
``parallelize`` runs them in that order, so no script can get it wrong. Each script declares which
of the flags it can honour (``SUPPORT``); a flag it cannot honour is refused before any process group
starts, with the alternative in the message.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from common.errors import UserError
from common.model import GPT

# Per strategy: the flags it refuses, and what to use instead. Every other flag is supported (and
# parity-tested: see the table in 03_LLM_Training_on_GPU/README.md and tests/test_matrix.py).
FSDP_ONLY = "it is an FSDP setting: use fsdp.py or fsdp_tp.py"
TP_ONLY = "it needs tensor parallelism: use tp.py or fsdp_tp.py"
TP_COMPILE = ("torch.compile of tensor-parallel blocks fails in backward with torch 2.13 (a DTensor redistribute "
              "receives a plain tensor): run TP eager, or compile with ddp.py / fsdp.py")
REFUSED: dict[str, dict[str, str]] = {
    "ddp": {"sequence_parallel": TP_ONLY, "loss_parallel": TP_ONLY,
            "cpu_offload": "DDP keeps everything on the device: use fsdp.py --cpu-offload or zero.py with "
                           "ds_zero2_offload.json", "no_reshard_after_forward": FSDP_ONLY},
    "fsdp": {"sequence_parallel": TP_ONLY, "loss_parallel": TP_ONLY},
    "tp": {"compile": TP_COMPILE, "cpu_offload": "tensor parallelism keeps its shards on the device: use fsdp_tp.py "
                                             "--cpu-offload", "no_reshard_after_forward": FSDP_ONLY},
    "fsdp_tp": {"compile": TP_COMPILE},
    "pp": {"compile": "pipeline stages are not compiled here: drop --compile (compile the blocks with fsdp.py "
                      "or ddp.py)", "sequence_parallel": TP_ONLY, "loss_parallel": TP_ONLY,
           "cpu_offload": "use fsdp.py --cpu-offload", "no_reshard_after_forward": FSDP_ONLY},
    "zero": {"compile": "the DeepSpeed engine is not compiled here: drop --compile (or use fsdp.py --compile, "
                        "FSDP2 is ZeRO-3 in PyTorch)", "sequence_parallel": TP_ONLY, "loss_parallel": TP_ONLY,
             "cpu_offload": "ZeRO offload is set in the DeepSpeed config: --ds-config "
                            "03_LLM_Training_on_GPU/ds_zero2_offload.json",
             "no_reshard_after_forward": "pick the ZeRO stage in the DeepSpeed config: ds_zero2.json keeps weights "
                                         "whole, ds_zero3.json shards them"},
}
REFUSED["fsdp_sft"] = {  # chapter 04: a Hugging Face model, sharded with FSDP2 per decoder layer
    "compile": "fine-tuning runs eager here: drop --compile",
    "sequence_parallel": "fsdp_sft.py shards with FSDP only: drop --sequence-parallel",
    "loss_parallel": "fsdp_sft.py shards with FSDP only: drop --loss-parallel",
    "cpu_offload": "not wired for fine-tuning: use --lora (adapters only: a tiny optimizer state) to save memory",
    "no_reshard_after_forward": "not wired for fine-tuning: drop the flag"}
FLAGS = ("compile", "activation_checkpointing", "sequence_parallel", "loss_parallel", "cpu_offload",
         "no_reshard_after_forward")


def flags_set(cfg) -> set[str]:
    """The parallelism flags a config turns on (``no_reshard_after_forward`` = reshard_after_forward off)."""
    on = {f for f in ("compile", "sequence_parallel", "loss_parallel", "cpu_offload") if getattr(cfg, f)}
    if cfg.activation_checkpointing != "none":
        on.add("activation_checkpointing")
    if not cfg.reshard_after_forward:
        on.add("no_reshard_after_forward")
    return on


def check_flags(cfg, strategy: str) -> None:
    """Refuse, in one line and before any collective, a flag this strategy cannot honour."""
    for flag in sorted(flags_set(cfg)):
        if why := REFUSED[strategy].get(flag):
            raise UserError(f"--{flag.replace('_', '-')} is not available with {strategy}.py: {why}")


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


def _parallelize(module: nn.Module, mesh, plan: dict[str, ParallelStyle]) -> None:
    """``parallelize_module``, but a plan key that names no submodule is an error, not a skipped warning."""
    for key in plan:
        try:
            module.get_submodule(key)
        except AttributeError:
            raise RuntimeError(f"tensor-parallel plan entry {key!r} matches no module of {type(module).__name__}: "
                               "apply_tp must run before any wrapper (checkpointing, compile) changes the names"
                               ) from None
    parallelize_module(module, mesh, plan)


def apply_tp(model: GPT, mesh, sequence_parallel: bool = False, loss_parallel: bool = False) -> GPT:
    """Megatron-style tensor parallelism over the 1-D ``mesh`` (in place): column-parallel q/k/v and
    gate/up, row-parallel output and down projections; embedding and head split along the vocabulary."""
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
        _parallelize(block, mesh, plan)
    _parallelize(model, mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "norm": SequenceParallel() if sequence_parallel else ReplicateParallel(),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1) if loss_parallel else Replicate(),
                                  use_local_output=not loss_parallel),
    })
    model.tie_weights()  # both are sharded along the vocabulary now: share the one DTensor again
    return model


def _save_matmuls_and_attention():
    """Selective (op-level) checkpointing: keep the outputs of matmuls and attention, recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    save = {aten.mm.default, aten.addmm.default, aten.bmm.default,
            aten._scaled_dot_product_flash_attention.default, aten._scaled_dot_product_efficient_attention.default,
            aten._scaled_dot_product_flash_attention_for_cpu.default,
            aten._scaled_dot_product_cudnn_attention.default}

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in save else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: GPT, mode: str) -> GPT:
    """Wrap every block: ``full`` recomputes all its activations in backward, ``selective`` only the
    elementwise ops (norms, RoPE, SwiGLU's product) and keeps the expensive matmul/attention outputs."""
    if mode == "none":
        return model
    kw = {"context_fn": _save_matmuls_and_attention} if mode == "selective" else {}
    for key, block in model.layers.items():
        model.layers[key] = checkpoint_wrapper(block, preserve_rng_state=False, **kw)
    return model


def apply_compile(model: GPT) -> GPT:
    """``torch.compile`` each block in place (identical blocks share one compiled graph)."""
    for block in model.layers.values():
        block.compile()
    return model


def apply_fsdp(model: nn.Module, mesh, param_dtype: torch.dtype, cpu_offload: bool = False,
               reshard_after_forward: bool = True) -> nn.Module:
    """``fully_shard`` each block, then the root (embedding, final norm, head and what is left).
    Gathered weights are cast to ``param_dtype`` for compute; gradients are always reduced in fp32."""
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
              reshard_after_forward=reshard_after_forward)
    if cpu_offload:
        kw["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in model.layers.values():
        fully_shard(block, **kw)
    # the root's parameters are needed first in backward (head) and last in forward: keep them gathered
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    return model


def apply_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """Replicate with gradient all-reduce in buckets during backward: DDP's default sizes, a 1 MiB first
    bucket (the last layers' gradients, ready first, go out at once) and 25 MiB after it -- passing
    ``bucket_cap_mb=25`` explicitly would make the first bucket 25 MiB too, one bucket for a small model and
    no overlap at all (02_Notebook_Parallelism/07_profiling.ipynb measures it). The gradients live inside
    the buckets (``gradient_as_bucket_view``: no second copy of them)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)


def parallelize(model: GPT, cfg, *, tp_mesh=None, dp_mesh=None, data_parallel: str | None = None,
                param_dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> nn.Module:
    """TP -> activation checkpointing -> compile -> FSDP/DDP, each only where asked for."""
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tp(model, tp_mesh, cfg.sequence_parallel, cfg.loss_parallel)
    apply_ac(model, cfg.activation_checkpointing)
    if cfg.compile:
        apply_compile(model)
    if data_parallel == "fsdp":
        return apply_fsdp(model, dp_mesh, param_dtype, cfg.cpu_offload, cfg.reshard_after_forward)
    if data_parallel == "ddp":
        return apply_ddp(model, device)
    return model


@torch.no_grad()
def grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """Global L2 norm of the gradients, the same number on every rank.

    Under TP some gradients are DTensors on the TP mesh and others plain tensors; under FSDP x TP some
    live on the 2-D mesh and some only on one dimension: each group's norm is reduced over its own mesh.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        if p.grad is not None:
            key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
            groups.setdefault(key, []).append(p.grad)
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, 2.0)  # a DTensor norm is reduced over its mesh
        norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        squares.append(norm.float().pow(2))
    return torch.stack(squares).sum().sqrt() if squares else torch.zeros(())


@torch.no_grad()
def clip_grad_norm_(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Scale gradients so their global norm is at most ``max_norm``; returns the norm before clipping."""
    total = grad_norm(params)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
            g.mul_(coef.to(g.device, g.dtype))
    return total


