"""Precision policy: bf16 where the GPU has it, fp16 + loss scaling where it does not (V100), fp32 on CPU.

Weights and optimizer state stay fp32; ``autocast`` runs matmuls in the low-precision dtype.
fp16 has a narrow exponent range, so its loss is scaled up before backward and the gradients are
unscaled before clipping (``torch.amp.GradScaler``); bf16 has fp32's range and needs no scaling.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from common.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str  # fp32, bf16 or fp16
    device_type: str  # cpu or cuda

    @property
    def dtype(self) -> torch.dtype:
        return DTYPES[self.name]

    @property
    def needs_scaler(self) -> bool:
        return self.name == "fp16"

    def autocast(self):
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scaler(self) -> torch.amp.GradScaler:
        """A GradScaler that is a no-op unless fp16 is used."""
        return torch.amp.GradScaler(self.device_type, enabled=self.needs_scaler)


def gpu_has_bf16(device: torch.device) -> bool:
    """Native bf16 needs compute capability 8.0+ (A100, H100); V100 (7.0) only emulates it."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def choose_precision(requested: str, device: torch.device) -> Precision:
    if requested not in ("auto", *DTYPES):
        raise UserError(f"--precision must be auto, fp32, bf16 or fp16, not {requested!r}")
    if device.type == "cuda":
        if requested == "auto":
            return Precision("bf16" if gpu_has_bf16(device) else "fp16", "cuda")
        if requested == "bf16" and not gpu_has_bf16(device):
            name = torch.cuda.get_device_name(device)
            raise UserError(f"--precision bf16 is not supported on {name} (compute capability "
                            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}); use fp16 or auto")
        return Precision(requested, "cuda")
    return Precision("fp32" if requested == "auto" else requested, "cpu")


def describe(p: Precision) -> str:
    what = {"fp32": "fp32 weights and math",
            "bf16": "fp32 weights, bf16 autocast, no loss scaling",
            "fp16": "fp32 weights, fp16 autocast, dynamic loss scaling"}[p.name]
    return f"precision: {p.name} on {p.device_type} ({what})"
