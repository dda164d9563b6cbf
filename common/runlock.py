"""One writer per run folder: a lock file held for the run's life, and no silent mixing of two runs.

``<out_dir>/.lock`` holds "host pid" of the process that writes the run (rank 0). A lock whose process
is gone (same host) is stale and taken over with a warning; a lock of another live process is an
error naming it. A fresh run (no ``--resume``) into a folder that already holds a run is refused
unless ``--overwrite`` says to start over.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from common.distributed import log
from common.errors import UserError

RUN_FILES = ("log.jsonl", "summary.json", "checkpoints")  # what makes a folder hold a run
OVERWRITTEN = (*RUN_FILES, "tb", "wandb", "loss.png", "config.toml")


def check_fresh(out_dir: Path, resume: bool, overwrite: bool, restarted: bool) -> None:
    """Refuse a fresh run into a folder holding an earlier one (every rank sees the same files)."""
    if resume or overwrite or restarted:
        return
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if found:
        raise UserError(f"{out_dir} already holds a run ({', '.join(found)}): add --resume to continue it, "
                        "--overwrite to start over (deletes its log and checkpoints), or choose another --out-dir")


def check_writable(out_dir: Path) -> None:
    """The run folder, or the nearest folder above it that exists, must be writable (checked by every rank
    before any process group exists)."""
    existing = Path(out_dir).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write the run folder {out_dir}: {existing} is not a writable folder; "
                        "choose a writable --out-dir")


def clear(out_dir: Path) -> None:
    """--overwrite: remove the earlier run's files (rank 0, holding the lock)."""
    for name in OVERWRITTEN:
        path = out_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    log.info(f"--overwrite: removed the earlier run's files from {out_dir}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.me = f"{socket.gethostname()} {os.getpid()}"
        self.held = False

    def acquire(self) -> str | None:
        """Take the lock; returns None, or the one-line reason it cannot be taken."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.exists() else ""
                host, _, pid = owner.partition(" ")
                if owner == self.me:  # this process ran an earlier run here (tests, notebooks, drivers)
                    self.held = True
                    return None
                if host == socket.gethostname() and pid.isdigit() and not _alive(int(pid)):
                    log.warning(f"{self.path}: stale lock of process {pid} (no longer running): taking it over")
                    self.path.unlink(missing_ok=True)
                    continue
                return (f"another run is writing to {self.path.parent} (process {pid or '?'} on {host or '?'}, "
                        f"{self.path}); wait for it, choose another --out-dir, or delete {self.path} if no job runs")
            with os.fdopen(fd, "w") as f:
                f.write(self.me)
            self.held = True
            return None
        return f"could not take the lock {self.path}"

    def release(self) -> None:
        if self.held and self.path.exists() and self.path.read_text().strip() == self.me:
            self.path.unlink()
        self.held = False
