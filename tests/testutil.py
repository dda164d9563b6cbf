"""Helpers shared by tests and test drivers (a plain module: several folders have a conftest.py)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from contextlib import contextmanager
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


@contextmanager
def nan_at_step(step: int, rank: int = 0):
    """A loss spike on one rank: the model's output is NaN in the first micro-batch of training step ``step``
    (0-based) on ``rank`` only, so its gradients are NaN too and the step must be skipped on every rank."""
    import torch.distributed as dist

    from common import model, trainer

    real_step, real_forward = trainer.train_step, model.GPT.forward
    now = {"step": -1, "poisoned": False}

    def train_step(run, s, step_, *args, **kwargs):
        now["step"] = step_
        return real_step(run, s, step_, *args, **kwargs)

    def forward(self, tokens):
        out = real_forward(self, tokens)
        here = dist.get_rank() if dist.is_initialized() else 0
        if self.training and now["step"] == step and here == rank and not now["poisoned"]:
            now["poisoned"] = True
            return out * float("nan")
        return out

    trainer.train_step, model.GPT.forward = train_step, forward
    try:
        yield
    finally:
        trainer.train_step, model.GPT.forward = real_step, real_forward
