"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): one format for every strategy.

DCP writes each rank's shard of the model and optimizer in parallel and can load them back under a
different world size or strategy (DDP, FSDP, TP, a single process for export). ``get_state_dict``
gives parameter names without wrapper prefixes (``module.``), so a DDP checkpoint loads into a plain
model. Besides the DCP folder a step folder holds ``trainer_state.json`` (step, loss history, loss
scaler) and ``rng_rank<R>.pt`` (RNG tensors, loaded with ``weights_only=True``). Nothing here
unpickles arbitrary objects: DCP's own reader unpickles its ``.metadata`` file and non-tensor entries
freely, so loading goes through ``SafeReader`` (metadata classes of DCP and torch only) and
``SafePlanner`` (``torch.load(weights_only=True)`` for non-tensor entries).

Layout: ``<out_dir>/checkpoints/step_000100/`` and ``<out_dir>/checkpoints/latest`` (a text file with
the folder name, written last, so a half-written checkpoint is never picked up).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from common.distributed import DistInfo, barrier

# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): pipeline stages hold
# different parameters, and un-flattened "param_groups" lists of different ranks would collide in DCP's merge.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


_SAFE_BUILTINS = {"dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str", "bytes", "slice",
                  "complex", "NoneType", "object"}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata (dataclasses of torch.distributed.checkpoint, torch.Size, dtypes) and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.") or
                   (module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype))) or
                   (module == "builtins" and name in _SAFE_BUILTINS) or
                   (module == "collections" and name == "OrderedDict") or
                   (module == "pathlib" and name in ("PosixPath", "PurePosixPath")) or
                   (module == "torch.serialization" and name == "_get_layout") or
                   (module == "torch._utils" and name == "_rebuild_tensor_v2") or
                   (module == "torch.storage" and name == "_load_from_bytes"))
        if not allowed:
            raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}: refusing to load it")
        return super().find_class(module, name)


class SafeReader(dcp.FileSystemReader):
    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def safe_dcp_load(state_dict: dict, path: str | Path) -> None:
    SafeReader(str(path)).read_metadata()  # refuse a tampered checkpoint with a clear error, before DCP wraps it
    dcp.load(state_dict, storage_reader=SafeReader(str(path)), planner=SafePlanner())


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
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
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
        safe_dcp_load({"model": model_sd}, path)
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        safe_dcp_load({"model": model_sd, "optim": optim_sd}, path)
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)


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
