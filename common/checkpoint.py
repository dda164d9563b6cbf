"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): one format for every strategy, safe to resume.

DCP writes each rank's shard of the model and optimizer in parallel and can load them back under a
different world size or strategy (DDP, FSDP, TP, a single process for export). ``get_state_dict``
gives parameter names without wrapper prefixes (``module.``), so a DDP checkpoint loads into a plain
model. Besides the DCP files a step folder holds ``trainer_state.json`` (step, loss history, loss
scaler), ``rng_rank<R>.pt`` (RNG tensors) and ``manifest.json`` (``common/manifest.py``). Nothing is
unpickled beyond an explicit list of names (``common/safe_load.py``).

Layout and the order of writing (each step durable — fsync'd — before the next):

    <out_dir>/checkpoints/step_000100.tmp/   1. every rank writes its DCP shard and RNG state
                                             2. rank 0: trainer_state.json, then manifest.json
                                                (size + sha256 of every file, step, model config,
                                                world size) written last, atomically
    <out_dir>/checkpoints/step_000100/       3. the folder is renamed into place (a step folder that
                                                already exists, e.g. after resuming with a smaller
                                                --max-steps, is replaced whole, never mixed)
    <out_dir>/checkpoints/latest             4. the pointer moves (temp file + fsync + rename)
                                             5. ``keep``: older intact step folders beyond the newest
                                                ``keep`` are removed

A crash at any point leaves ``latest`` on an intact checkpoint (when a step folder is replaced, a
crash between its two renames makes ``latest()`` fall back to the newest older one). ``latest()`` verifies the
manifest (sizes, and checksums up to ``VERIFY_CHECKSUMS_UP_TO`` bytes) and falls back to the newest
intact step folder with a warning. ``load()`` refuses a checkpoint that does not fit the model. A
full disk is a one-line ``UserError`` and no partial folder is left behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from common.distributed import DistInfo, any_rank, barrier, log
from common.errors import UserError
from common.manifest import (
    MANIFEST,
    STEP_DIR,
    fsync_path,
    gather_files,
    step_folders,
    step_of,
    verify,
    write_durable,
    write_manifest,
)
from common.safe_load import SafePlanner, SafeReader, check_pickles, load_metadata

__all__ = ["save", "latest", "load", "verify", "seal", "check_pickles"]

# Optimizer state keyed by parameter name ("state.<fqn>.exp_avg", "param_groups.<fqn>.lr"): pipeline stages hold
# different parameters, and un-flattened "param_groups" lists of different ranks would collide in DCP's merge.
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)


# ----------------------------------------------------------------------------- save
def _rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


_OTHER_RANK = object()  # marks "a rank other than this one failed"


def _attempt(info: DistInfo, fn, main_only: bool = False):
    """Run ``fn`` (on rank 0 only if ``main_only``); every rank learns whether any rank failed."""
    err = None
    if info.is_main or not main_only:
        try:
            fn()
        except (OSError, RuntimeError, CheckpointException) as e:  # RuntimeError: torch's C++ file writer
            err = e
    return (err or _OTHER_RANK) if any_rank(err is not None, info) else None


def _root_cause(err):
    if isinstance(err, CheckpointException):
        for failure in err.failures.values():
            return failure[0] if isinstance(failure, tuple) else failure
    return err


def _disk_full(exc, root: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return "No space left" in str(exc) or ("write" in str(exc) and shutil.disk_usage(root).free < (1 << 20))
    except OSError:
        return False


def _save_error(err, step: int, root: Path) -> UserError:
    pointer = root / "latest"
    kept = f"latest is still {pointer.read_text().strip()}" if pointer.is_file() else "no earlier checkpoint exists"
    exc = _root_cause(err)
    if exc is _OTHER_RANK:
        return UserError(f"another rank failed while writing checkpoint step {step} in {root} (see its message); "
                         f"the partial checkpoint was removed, {kept}")
    if _disk_full(exc, root):
        return UserError(f"no space left on {root} while writing checkpoint step {step}; free space or use another "
                         f"--out-dir (the partial checkpoint was removed, {kept})")
    what = f"{exc.strerror} ({exc.filename})" if isinstance(exc, OSError) and exc.strerror else str(exc).splitlines()[0]
    return UserError(f"could not write checkpoint step {step} in {root}: {what}; the partial checkpoint was removed, "
                     f"{kept}")


def _fail(err, step: int, root: Path, tmp: Path, info: DistInfo) -> UserError:
    barrier(info)
    if info.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (root / "latest.tmp").unlink(missing_ok=True)
    barrier(info)
    return _save_error(err, step, root)


def save(out_dir: str | Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
         info: DistInfo, trainer_state: dict, keep: int = 0) -> Path:
    """Collective: every rank calls it. Returns the step folder once it and ``latest`` are durable.

    ``keep`` > 0: afterwards keep only the newest ``keep`` step folders up to this one (older intact
    ones are removed; damaged ones are left for inspection). ``trainer_state["model_config"]``, if
    given, is recorded in the manifest (``load`` names the differences when a model does not fit).
    """
    root = Path(out_dir) / "checkpoints"
    final, tmp = root / f"step_{step:06d}", root / f"step_{step:06d}.tmp"

    def clear_leftovers() -> None:  # folders of a save that was killed (one writer per run folder)
        root.mkdir(parents=True, exist_ok=True)
        for old in [*root.glob("step_*.tmp"), *root.glob(".step_*.old")]:
            shutil.rmtree(old)

    if err := _attempt(info, clear_leftovers, main_only=True):
        raise _fail(err, step, root, tmp, info)
    barrier(info)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)

    def write_shards() -> None:
        with warnings.catch_warnings():  # a single process without a process group is intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp))
        buf = io.BytesIO()
        torch.save(_rng_state(), buf)
        with open(tmp / f"rng_rank{info.rank}.pt", "wb") as f:  # Python's writer: a full disk is an OSError
            f.write(buf.getvalue())

    files = {}

    def describe() -> None:
        files.update(gather_files(tmp, info))

    if err := _attempt(info, write_shards):
        raise _fail(err, step, root, tmp, info)
    if err := _attempt(info, describe):
        raise _fail(err, step, root, tmp, info)

    def commit() -> None:
        state = json.dumps({"step": step, **trainer_state}).encode()
        write_durable(tmp / "trainer_state.json", state)
        files["trainer_state.json"] = {"size": len(state), "sha256": hashlib.sha256(state).hexdigest()}
        write_manifest(tmp, step, files, info, trainer_state.get("model_config"))  # last: marks it complete
        old = root / f".{final.name}.old"
        if final.exists():  # saved before (e.g. a resume with a smaller --max-steps): replace whole, never mix
            os.replace(final, old)
        os.replace(tmp, final)
        fsync_path(root)
        shutil.rmtree(old, ignore_errors=True)
        write_durable(root / "latest", final.name.encode())

    if err := _attempt(info, commit, main_only=True):
        raise _fail(err, step, root, tmp, info)
    if info.is_main and keep > 0:
        _prune(root, final, keep)
    barrier(info)
    return final


def seal(folder: str | Path, step: int, info: DistInfo, model_config=None, keep: int = 0) -> Path:
    """Collective: give a folder written by another library (DeepSpeed) a manifest, point ``latest`` at it."""
    folder = Path(folder)
    files = gather_files(folder, info)
    if info.is_main:
        write_manifest(folder, step, files, info, model_config)
        fsync_path(folder)
        write_durable(folder.parent / "latest", folder.name.encode())
        if keep > 0:
            _prune(folder.parent, folder, keep)
    barrier(info)
    return folder


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Remove intact step folders older than ``newest`` beyond the newest ``keep`` (``newest`` included)."""
    older = [p for p in step_folders(root) if step_of(p) < step_of(newest) and verify(p, checksums=False) is None]
    for p in older[keep - 1:]:
        try:
            shutil.rmtree(p)
        except OSError as e:
            log.warning(f"could not remove old checkpoint {p}: {e}")


# ----------------------------------------------------------------------------- find and load
def latest(out_dir: str | Path, checksums: bool | None = None) -> Path | None:
    """The step folder ``latest`` names if intact, else the newest intact one (with a warning), else None."""
    root = Path(out_dir) / "checkpoints"
    pointer, folders, problems, named = root / "latest", step_folders(root), [], None
    if pointer.is_file():
        name = pointer.read_text(errors="replace").strip()
        if STEP_DIR.fullmatch(name):
            named = root / name
            if (why := verify(named, checksums)) is None:
                return named
            problems.append(why)
        else:
            problems.append(f"{pointer} holds {name[:40]!r}, not a step folder name")
    elif folders:
        problems.append(f"{pointer} is missing")
    for folder in folders:
        if folder == named:
            continue
        if (why := verify(folder, checksums)) is None:
            log.warning(f"checkpoint: {'; '.join(problems[:3])}; using the newest intact checkpoint {folder}")
            return folder
        problems.append(why)
    if problems:
        log.warning(f"no intact checkpoint in {root} ({len(folders)} step folder(s)): {'; '.join(problems[:3])}")
    return None


def _full_model_shapes(model: nn.Module) -> tuple[object | None, dict]:
    """(config, {name: shape}) of the whole GPT that ``model`` is (a part of), or (None, {})."""
    from common.model import GPT

    gpt = next((m for m in model.modules() if isinstance(m, GPT)), None)
    if gpt is None:
        return None, {}
    with torch.device("meta"):
        full = GPT(gpt.cfg)
    return gpt.cfg, {k: tuple(v.shape) for k, v in full.state_dict().items()}


def _check_fits(path: Path, metadata, model_sd: dict, model: nn.Module) -> None:
    """Refuse a checkpoint whose model tensors (names, shapes) do not fit ``model``: DCP would load partially."""
    saved = {k[len("model."):]: tuple(v.size) for k, v in metadata.state_dict_metadata.items()
             if k.startswith("model.") and hasattr(v, "size")}
    ours = {k: tuple(v.shape) for k, v in model_sd.items() if isinstance(v, torch.Tensor)}
    cfg, full = _full_model_shapes(model)  # a pipeline stage holds a part of the model: the rest may be in it
    missing = [k for k in ours if k not in saved]
    wrong = [k for k in ours if k in saved and saved[k] != ours[k]]
    extra = [k for k in saved if k not in ours and full.get(k) != saved[k]]
    if not (missing or wrong or extra):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} tensor(s) of the model are not in it (e.g. {missing[0]})")
    if extra:
        parts.append(f"{len(extra)} tensor(s) in it are not in the model (e.g. {extra[0]})")
    if wrong:
        parts.append(f"{wrong[0]} is {list(saved[wrong[0]])} in it but {list(ours[wrong[0]])} in the model"
                     + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""))
    try:
        recorded = json.loads((path / MANIFEST).read_text()).get("model_config") or {}
    except (OSError, ValueError):
        recorded = {}
    diffs = [f"{k}={v} (model: {getattr(cfg, k)})" for k, v in recorded.items()
             if cfg is not None and hasattr(cfg, k) and getattr(cfg, k) != v] if isinstance(recorded, dict) else []
    saved_with = f"; it was saved with {', '.join(diffs)}" if diffs else ""
    raise UserError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}{saved_with}; resume with the "
                    "model settings it was saved with, or start a new --out-dir")


def load(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, info: DistInfo) -> dict:
    """Collective: load model (+ optimizer, RNG) from a step folder; returns the trainer state."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"checkpoint {path} does not exist")
    if (path / MANIFEST).exists():
        if why := verify(path):  # sizes, and checksums unless the folder is huge
            raise UserError(f"checkpoint {path} is damaged: {why}")
    else:
        log.warning(f"checkpoint {path} has no {MANIFEST}: its files cannot be verified")
    metadata = load_metadata(path / ".metadata")
    if optimizer is None:
        model_sd, optim_sd = get_state_dict(model, [])[0], {}
        state_dict = {"model": model_sd}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
        state_dict = {"model": model_sd, "optim": optim_sd}
    _check_fits(path, metadata, model_sd, model)
    try:
        with warnings.catch_warnings():  # a single process without a process group is intended here
            warnings.filterwarnings("ignore", message=".*assuming the intent is to")
            dcp.load(state_dict, storage_reader=SafeReader(str(path)), planner=SafePlanner())
    except CheckpointException as e:
        cause = _root_cause(e)
        if isinstance(cause, UserError):
            raise cause from None
        raise UserError(f"could not load checkpoint {path}: {type(cause).__name__}: "
                        f"{str(cause).strip().splitlines()[0] if str(cause).strip() else ''}") from None
    if optimizer is None:
        set_state_dict(model, [], model_state_dict=model_sd, optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd, options=_OPTIONS)
    rng_file = path / f"rng_rank{info.rank}.pt"
    try:
        if rng_file.exists():
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        return json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError, KeyError, RuntimeError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(f"could not load checkpoint {path}: {type(e).__name__}: {first}") from None
