"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): one format for every strategy.

DCP writes each rank's shard of the model and optimizer in parallel and can load them back under a
different world size or strategy (DDP, FSDP, TP, a single process for export). ``get_state_dict``
gives parameter names without wrapper prefixes (``module.``), so a DDP checkpoint loads into a plain
model. Besides the DCP folder a step folder holds ``trainer_state.json`` (step, loss history, loss
scaler) and ``rng_rank<R>.pt`` (RNG tensors, loaded with ``weights_only=True``). Nothing here
unpickles arbitrary objects.

Layout: ``<out_dir>/checkpoints/step_000100/`` and ``<out_dir>/checkpoints/latest`` (a text file with
the folder name, written last, so a half-written checkpoint is never picked up).
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from common.distributed import DistInfo, barrier


def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def save(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         info: DistInfo, trainer_state: dict) -> Path:
    """Collective: every rank calls it. Returns the step folder."""
    root = Path(out_dir) / "checkpoints"
    path = root / f"step_{step:06d}"
    model_sd, optim_sd = get_state_dict(model, optimizer)
    with warnings.catch_warnings():  # a single process without a process group is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
    torch.save(_rng_state(), path / f"rng_rank{info.rank}.pt")
    barrier(info)
    if info.is_main:
        (path / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}))
        tmp = root / "latest.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / "latest")
    barrier(info)
    return path


def latest(out_dir: str | Path) -> Path | None:
    pointer = Path(out_dir) / "checkpoints" / "latest"
    if not pointer.exists():
        return None
    return pointer.parent / pointer.read_text().strip()


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    if optimizer is None:
        model_sd, _ = get_state_dict(model, [])
        dcp.load({"model": model_sd}, checkpoint_id=str(path))
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.load({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd)


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, info: DistInfo) -> dict:
    """Collective: load model (+ optimizer, RNG) from a step folder; returns the trainer state."""
    path = Path(path)
    with warnings.catch_warnings():  # a single process without a process group is intended here
        warnings.filterwarnings("ignore", message=".*assuming the intent is to")
        _load_dcp(path, model, optimizer)
    rng_file = path / f"rng_rank{info.rank}.pt"
    if rng_file.exists():
        rng = torch.load(rng_file, weights_only=True)
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
