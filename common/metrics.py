"""Throughput, MFU and memory.

MFU (model FLOPs utilisation) = achieved model FLOP/s / peak FLOP/s of the hardware.
Achieved FLOP/s = tokens/s x training FLOPs per token (``GPT.flops_per_token``). Peak values are
dense tensor-core numbers from the vendors' data sheets; on CPU the peak is measured with a matmul
(or given with ``--peak-tflops``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import time
from pathlib import Path

import torch
from torch import nn

from common.errors import UserError

# Dense (no sparsity) peak TFLOP/s per GPU from the vendors' data sheets; fp32 without TF32. Matched on
# the device name, most specific first: the PCIe / NVL cards are clocked lower than the SXM ones.
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("H200", "NVL"), {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (("H200",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (("H100", "NVL"), {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0}),
    (("H100", "PCIe"), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (("H100",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),  # SXM
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),  # SXM and PCIe alike
    (("V100S",), {"fp16": 130.0, "fp32": 16.4}),
    (("V100", "PCIE"), {"fp16": 112.0, "fp32": 14.0}),
    (("V100",), {"fp16": 125.0, "fp32": 15.7}),  # SXM2
]


def datasheet_peak(name: str, precision: str) -> tuple[float | None, str]:
    """(peak TFLOP/s, which row) for a CUDA device name such as 'NVIDIA H100 PCIe' (case-insensitive)."""
    upper = name.upper()
    for words, table in PEAK_TFLOPS:
        if all(w.upper() in upper for w in words):
            row = " ".join(words)
            value = table.get(precision)
            return value, f"{row} data sheet" if value else f"{row}: no {precision} peak"
    return None, f"{name} not in the peak table (use --peak-tflops)"


def measure_gpu_tflops(device: torch.device, precision: str, size: int = 8192, trials: int = 5) -> float:
    """Best dense matmul TFLOP/s on this GPU in ``precision`` (timed with CUDA events after a warm-up)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    best = 0.0
    for _ in range(trials):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(4):
            a @ b
        end.record()
        end.synchronize()
        best = max(best, 4 * 2 * size**3 / (start.elapsed_time(end) / 1e3) / 1e12)
    return best

_measured: dict[tuple[str, int], float] = {}


def measure_cpu_tflops(dtype: torch.dtype = torch.float32, size: int = 512, trials: int = 12) -> float:
    """Best matmul TFLOP/s of this process with its current thread count (cached).

    The best of several short trials, so that a busy machine does not make the peak look low.
    """
    key = (str(dtype), torch.get_num_threads())
    if key not in _measured:
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        a @ b  # warm up
        best = 0.0
        for _ in range(trials):
            t0 = time.perf_counter()
            for _ in range(4):
                a @ b
            best = max(best, 4 * 2 * size**3 / (time.perf_counter() - t0) / 1e12)
        _measured[key] = best
    return _measured[key]


def peak_tflops(device: torch.device, precision: str, override: float = 0.0) -> tuple[float | None, str]:
    """(peak TFLOP/s per device, where the number comes from); None if the GPU is not in the table."""
    if override:
        return override, "given"
    if device.type == "cuda":
        return datasheet_peak(torch.cuda.get_device_name(device), precision)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    return measure_cpu_tflops(dtype), f"measured {precision} matmul, {torch.get_num_threads()} thread(s)"


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated GPU memory, or this process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _local_bytes(t: torch.Tensor) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t  # DTensor: only this rank's shard
    if t.numel() == 0 and getattr(t, "ds_tensor", None) is not None:  # DeepSpeed ZeRO-3: this rank's partition
        t = t.ds_tensor
    return t.numel() * t.element_size()


def memory_breakdown(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
    """Bytes this rank holds for parameters, gradients and optimizer state."""
    params = list({id(p): p for p in model.parameters()}.values())
    out = {"params": sum(_local_bytes(p) for p in params),
           "grads": sum(_local_bytes(p.grad) for p in params if p.grad is not None), "optim": 0}
    if optimizer is not None:
        for state in optimizer.state.values():
            out["optim"] += sum(_local_bytes(v) for v in state.values() if torch.is_tensor(v))
    return out


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the peak of all devices (None without a peak)."""
    return flops_per_token * tokens_per_s / (peak * 1e12 * devices) if peak else None


class Throughput:
    """Tokens/s over the steps after the first (which includes warm-up and allocation)."""

    def __init__(self):
        self.tokens, self.seconds, self.steps = 0, 0.0, 0
        self._t0 = None

    def start(self) -> None:
        self._t0 = time.perf_counter()

    def stop(self, tokens: int) -> float:
        dt = time.perf_counter() - self._t0
        self.steps += 1
        if self.steps > 1:
            self.tokens += tokens
            self.seconds += dt
        return tokens / dt

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def restart_count() -> int:
    """How often torchrun (--max-restarts) or Slurm (--requeue) restarted this run."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) + int(os.environ.get("SLURM_RESTART_COUNT", 0))


def strict_json(obj):
    """JSON has no NaN/inf: write them as null (a reader must never choke on a summary)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [strict_json(v) for v in obj]
    return obj


class JsonlLog:
    """Append-only JSON-lines log (rank 0 only); every line carries the wall-clock time and restart count."""

    def __init__(self, path: Path | None):
        self.path = path

    def write(self, **record) -> None:
        if self.path is not None:
            record = {**record, "time": round(time.time(), 3), "restart": restart_count()}
            with open(self.path, "a") as f:
                f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")


class MetricsSink:
    """Where a run's numbers go (rank 0): log.jsonl always; TensorBoard event files in <out>/tb with
    --tensorboard; a W&B offline run in <out>/wandb with --wandb. summary.json + loss.png at the end."""

    def __init__(self, out_dir: Path, cfg, is_main: bool):
        self.out_dir, self.jsonl, self.tb, self.wandb = out_dir, JsonlLog(out_dir / "log.jsonl" if is_main else None), \
            None, None
        if not is_main:
            return
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.tb = SummaryWriter(str(out_dir / "tb"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError:
                raise UserError("--wandb needs the wandb package: pip install wandb (or drop --wandb)") from None
            self.wandb = wandb.init(mode="offline", dir=str(out_dir), config=cfg.to_dict(),
                                    name=out_dir.name, resume="allow")

    def write(self, record: dict) -> None:
        self.jsonl.write(**record)
        scalars = {k: v for k, v in record.items() if isinstance(v, int | float) and k != "step" and v is not None}
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}" if k != "val_loss" else "val/loss", v, record["step"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["step"])

    def summary(self, summary: dict, title: str) -> None:
        if self.jsonl.path is not None:
            (self.out_dir / "summary.json").write_text(json.dumps(strict_json(summary), indent=1, allow_nan=False))
            plot_losses(summary["losses"], summary["evals"], self.out_dir / "loss.png", title)
        self.close()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def plot_losses(losses: list[float], evals: list[list[float]], path: Path, title: str = "") -> Path:
    """Training loss per step and validation loss points, as a PNG next to summary.json."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, label="train", lw=1)
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
