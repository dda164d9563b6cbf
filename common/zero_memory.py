"""What a DeepSpeed ZeRO rank holds, read from the engine's own buffers (for ``zero.py``'s memory report).

DeepSpeed frees its gradient partitions inside ``engine.step()``, so the gradients are counted after every
backward (``zero_grad_bytes``) and the report keeps the most (``zero_memory``).
"""

from __future__ import annotations

import torch

from common.metrics import memory_breakdown


def held_bytes(tensors) -> int:
    """Bytes these tensors cover, each byte once (DeepSpeed hands out views of its flat buffers)."""
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in tensors if t.numel())
    total = end = 0
    for start, stop in spans:
        total, end = total + max(0, stop - max(start, end)), max(end, stop)
    return total


def zero_grad_bytes(zero) -> int:
    """Gradient bytes this rank holds after a backward, before ``engine.step()`` frees them (measured in
    DeepSpeed 0.19 with gradient accumulation): ZeRO-1 keeps the full ``param.grad`` until the last micro-batch,
    then reduces once; ZeRO-2 reduce-scatters every micro-batch into its 1/N partition (``all_grad_tensors``,
    ``averaged_gradients``); ZeRO-3 owns a 1/N ``grad_partitions_flat_buffer``. The reduce buckets
    (``reduce_bucket_size`` elements, allocated during backward) are communication space, not counted."""
    params = [p for g in getattr(zero, "bit16_groups", None) or getattr(zero, "fp16_groups", []) for p in g]
    tensors = [getattr(p, a, None) for p in params for a in ("grad", "grad_accum")]
    for holder in (getattr(zero, "averaged_gradients", None) or {}, getattr(zero, "all_grad_tensors", None) or {}):
        tensors += [t for v in holder.values() for t in (v or [])]
    tensors += [getattr(zero, "grads_in_partition", None), getattr(zero, "grad_partitions_flat_buffer", None)]
    return held_bytes([t for t in tensors if torch.is_tensor(t)])


def zero_memory(engine, grads: int) -> dict:
    """Bytes this rank holds: its weights (a partition under ZeRO-3), the most gradient bytes it held after a
    backward (``grads``, from zero_grad_bytes: ``engine.step()`` frees them), Adam moments of its partition and
    its fp32 master weights."""
    zero = engine.optimizer
    masters = getattr(zero, "single_partition_of_fp32_groups", None) or getattr(zero, "fp32_partitioned_groups_flat",
                                                                               [])
    mem = memory_breakdown(engine.module, zero.optimizer)
    mem["optim"] += sum(t.numel() * t.element_size() for t in masters)
    mem["grads"] = grads
    return mem
