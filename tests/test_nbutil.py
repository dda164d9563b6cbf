"""The notebooks' launcher puts its torchrun processes on GPUs only when each gets one, else on the CPU."""

import importlib.util
from pathlib import Path

import pytest
import torch

NBUTIL = Path(__file__).resolve().parents[1] / "02_Notebook_Parallelism/nbutil.py"
SPEC = importlib.util.spec_from_file_location("nbutil", NBUTIL)
nbutil = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(nbutil)


@pytest.mark.parametrize("gpus,nproc,device", [
    (0, 1, "cpu"), (0, 2, "cpu"), (0, 4, "cpu"),      # laptop, CPU node
    (1, 1, "cuda"), (1, 2, "cpu"), (1, 4, "cpu"),     # the 1-GPU Jupyter node of jupyter.slurm
    (4, 2, "cuda"), (4, 4, "cuda"),                   # a full GPU node
])  # fmt: skip
def test_launch_device_for_visible_gpus(monkeypatch, gpus, nproc, device):
    monkeypatch.delenv("LLM_DEVICE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert nbutil.visible_gpus() == gpus
    chosen, why = nbutil.launch_device(nproc)
    assert chosen == device and f"{gpus} GPU(s) visible" in why


def test_llm_device_decides(monkeypatch):
    monkeypatch.setenv("LLM_DEVICE", "cpu")
    assert nbutil.launch_device(2, gpus=4) == ("cpu", "LLM_DEVICE=cpu")


def test_torchrun_passes_the_choice_and_says_it(monkeypatch, capsys):
    seen = {}

    def fake_run(cmd, **kw):
        seen.update(kw["env"])
        return type("P", (), {"returncode": 0, "stdout": "", "stderr": ""})()

    monkeypatch.delenv("LLM_DEVICE", raising=False)
    monkeypatch.setattr(nbutil, "visible_gpus", lambda: 1)
    monkeypatch.setattr(nbutil.subprocess, "run", fake_run)
    nbutil.torchrun(2, "03_LLM_Training_on_GPU/ddp.py")
    assert seen["LLM_DEVICE"] == "cpu"
    assert "2 CPU process(es): 1 GPU(s) visible, fewer than 2 processes" in capsys.readouterr().out
