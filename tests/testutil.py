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
def nan_at_step(step: int, rank: int = 0, where: str = "output"):
    """A loss spike on one rank in training step ``step`` (0-based). ``where="output"``: the model's output is
    NaN in the first micro-batch on ``rank`` only, so its gradients are NaN too and the step must be skipped
    on every rank. ``where="loss"``: only the step's reported loss is NaN on ``rank``, the gradients stay
    finite (an update a strategy must not apply without saying so)."""
    import torch.distributed as dist

    from common import model, strategy, trainer

    real_step, real_forward, real_accumulate = trainer.train_step, model.GPT.forward, strategy.accumulate
    now = {"step": -1, "poisoned": False}

    def hit() -> bool:
        here = dist.get_rank() if dist.is_initialized() else 0
        if now["step"] == step and here == rank and not now["poisoned"]:
            now["poisoned"] = True
            return True
        return False

    def train_step(run, s, step_, *args, **kwargs):
        now["step"] = step_
        return real_step(run, s, step_, *args, **kwargs)

    def forward(self, tokens):
        out = real_forward(self, tokens)
        return out * float("nan") if self.training and hit() else out

    def accumulate(*args, **kwargs):
        loss = real_accumulate(*args, **kwargs)
        return loss * float("nan") if hit() else loss

    trainer.train_step = train_step
    if where == "output":
        model.GPT.forward = forward
    else:
        strategy.accumulate = accumulate
    try:
        yield
    finally:
        trainer.train_step, model.GPT.forward, strategy.accumulate = real_step, real_forward, real_accumulate


def assert_spike_skipped_like(reference_dir: Path, run_dir: Path, spike: int, max_steps: int, loss_tol: float):
    """Both runs' log.jsonl: only step ``spike`` (0-based, as given to ``nan_at_step``) skipped, every other
    loss finite, and every later step equal to the reference's (loss within ``loss_tol``; gradient norm within
    1e-3 relative: it is summed over shards or partitions in another order, 8e-5 relative measured with
    ZeRO-2, while a misplaced accumulation boundary or a leaked NaN gradient is off by far more, or NaN)."""
    import json

    import pytest

    logs = [[json.loads(x) for x in (d / "log.jsonl").read_text().splitlines()] for d in (reference_dir, run_dir)]
    for log in logs:
        assert [r["step"] for r in log if r.get("skipped")] == [spike + 1], log  # logged 1-based
        assert all(r["loss"] is not None for r in log if r["step"] != spike + 1)
    ref, run = ({r["step"]: r for r in log} for log in logs)
    assert sorted(ref) == sorted(run) == list(range(1, max_steps + 1))
    for step in ref:
        if step != spike + 1:
            assert abs(ref[step]["loss"] - run[step]["loss"]) <= loss_tol, step
            assert run[step]["grad_norm"] == pytest.approx(ref[step]["grad_norm"], rel=1e-3), step
