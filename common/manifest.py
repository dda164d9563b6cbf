"""Step-folder manifests: what a finished checkpoint holds, written durably, and checked before use.

``manifest.json`` lists every file of a step folder with its size and sha256, plus the step, the
model config and the world size. It is written last (temp file + fsync + rename + fsync of the
folder), so a folder without a valid manifest is an unfinished or damaged save. Each rank hashes the
files it wrote itself (DCP names them ``__<rank>_<n>.distcp``), in parallel; rank 0 gathers them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path

import torch.distributed as dist

from common.distributed import DistInfo

MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"step_(\d+)")
VERIFY_CHECKSUMS_UP_TO = 1 << 30  # bytes per folder: bigger ones are checked by size only (sha256 ~1 GB/s)


# ----------------------------------------------------------------------------- durable files
def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> None:
    """Write ``path`` atomically: a temp file, fsync, rename over, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def step_of(folder: Path) -> int:
    return int(STEP_DIR.fullmatch(folder.name).group(1))


def step_folders(root: Path) -> list[Path]:
    """Finished step folders, newest first."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if STEP_DIR.fullmatch(p.name) and p.is_dir()), key=step_of, reverse=True)


# ----------------------------------------------------------------------------- manifest
def _owned_by(name: str, rank: int) -> bool:
    return name.startswith(f"__{rank}_") or name == f"rng_rank{rank}.pt"  # DCP names data files __<rank>_<n>.distcp


def describe_own_files(folder: Path, info: DistInfo) -> dict:
    """{name: {size, sha256}} of the files this rank wrote (rank 0: also every file no rank owns); fsyncs them."""
    out = {}
    for p in sorted(folder.iterdir()):
        if not p.is_file() or p.name in (MANIFEST, MANIFEST + ".tmp"):
            continue
        mine = _owned_by(p.name, info.rank) or (
            info.is_main and not any(_owned_by(p.name, r) for r in range(info.world_size)))
        if mine:
            fsync_path(p)
            out[p.name] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def gather_files(folder: Path, info: DistInfo) -> dict:
    """Collective: every rank hashes its own files in parallel; rank 0 gets them all."""
    own = describe_own_files(folder, info)
    if not info.initialized:
        return own
    parts = [None] * info.world_size
    dist.all_gather_object(parts, own)
    return {name: rec for part in parts for name, rec in part.items()}


def write_manifest(folder: Path, step: int, files: dict, info: DistInfo, model_config) -> None:
    manifest = {"format": 1, "step": step, "world_size": info.world_size, "model_config": model_config,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "files": files}
    write_durable(folder / MANIFEST, json.dumps(manifest, indent=1).encode())


def verify(folder: str | Path, checksums: bool | None = None) -> str | None:
    """None if ``folder`` matches its manifest, else what is wrong (one line).

    Sizes are always compared; checksums when ``checksums`` is True, or (None) when the folder holds at
    most ``VERIFY_CHECKSUMS_UP_TO`` bytes.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files, step = manifest["files"], int(manifest["step"])
        sizes = {name: int(rec["size"]) for name, rec in files.items()}
    except FileNotFoundError:
        return f"{folder} has no {MANIFEST} (its save did not finish)"
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{folder / MANIFEST} is unreadable ({type(e).__name__})"
    if STEP_DIR.fullmatch(folder.name) and step != step_of(folder):
        return f"{folder / MANIFEST} records step {step}, not {step_of(folder)}"
    if ".metadata" not in files and not any(n.endswith(".pt") for n in files):
        return f"{folder / MANIFEST} lists no checkpoint data"
    for name, size in sizes.items():
        path = folder / name
        if "/" in name or name in ("", ".", ".."):
            return f"{folder / MANIFEST} names a file outside the folder ({name!r})"
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, the manifest records {size} (truncated or replaced)"
    if checksums or (checksums is None and sum(sizes.values()) <= VERIFY_CHECKSUMS_UP_TO):
        for name, rec in files.items():
            if sha256_file(folder / name) != rec.get("sha256"):
                return f"{folder / name} does not match its sha256 in {MANIFEST} (damaged)"
    return None
