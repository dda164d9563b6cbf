"""01_Basics/check_env.py reports the environment and fails loudly when a required package is missing."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "01_Basics" / "check_env.py"


def load_check_env():
    spec = importlib.util.spec_from_file_location("check_env", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reports_this_environment():
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import torch

    assert f"torch        {torch.__version__}" in r.stdout
    assert "precision    auto on " in r.stdout
    if not torch.cuda.is_available():
        assert "GPUs usable by torch: 0" in r.stdout
        assert "precision    auto on cpu -> fp32" in r.stdout
    for name in ("transformers", "datasets", "peft", "trl", "deepspeed", "torchtune", "unsloth"):
        assert f"\n  {name}" in r.stdout, name  # listed, installed or not
    assert r.stdout.rstrip().endswith("environment OK")


def test_missing_required_package_fails_with_message(monkeypatch, capsys):
    check_env = load_check_env()
    monkeypatch.setattr(check_env, "REQUIRED", (*check_env.REQUIRED, "no_such_package_xyz"))
    assert check_env.main() == 1
    err = capsys.readouterr().err
    assert "MISSING (required)" in err and "no_such_package_xyz: ModuleNotFoundError" in err
    assert "scripts/setup.sh" in err


def test_slurm_gpu_grant_without_usable_gpu_fails_in_one_line():
    import os

    import torch

    if torch.cuda.is_available():
        pytest.skip("torch sees a GPU here: the failure needs a machine where it does not")
    env = {**os.environ, "SLURM_GPUS_ON_NODE": "4", "CUDA_VISIBLE_DEVICES": "0,1,2,3"}
    env.pop("LLM_DEVICE", None)
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 1 and "environment OK" not in r.stdout
    (line,) = [x for x in r.stderr.splitlines() if x.startswith("GPU ERROR")]
    assert "Slurm granted GPUs (SLURM_GPUS_ON_NODE=4)" in line and "scripts/setup.sh --cuda" in line
    r = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120,
                       env={**env, "LLM_DEVICE": "cpu"})  # fmt: skip
    assert r.returncode == 0 and "device       cpu -> cpu" in r.stdout, r.stderr
