"""Helpers shared by tests and test drivers (a plain module: several folders have a conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def load_script(relpath: str):
    """Import a chapter script (its folder name starts with a digit, so not as a package)."""
    path = ROOT / relpath
    spec = importlib.util.spec_from_file_location(path.stem + "_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def torchrun(nproc: int, script: str, *args: str, timeout: int = 300, env: dict | None = None):
    """Run ``torchrun --standalone`` on a chapter script; returns the CompletedProcess (asserts rc 0)."""
    cmd = [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", str(ROOT / script), *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc
