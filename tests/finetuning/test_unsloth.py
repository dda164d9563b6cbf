"""Unsloth route, in its own environment (.venv-unsloth, made by 04_Finetuning/unsloth/setup.sh, which
scripts/test.sh runs: ~2 min, 2.9 GB). CPU fallback: a few LoRA steps; 4-bit QLoRA only on a GPU."""

import json
import os
import subprocess

import pytest
from ftutil import ROOT

PY = ROOT / ".venv-unsloth" / "bin" / "python"
SCRIPT = ROOT / "04_Finetuning" / "unsloth" / "unsloth_sft.py"
pytestmark = pytest.mark.skipif(not PY.exists(),
                                reason="no .venv-unsloth: create it with bash 04_Finetuning/unsloth/setup.sh")


def has_gpu() -> bool:
    return subprocess.run([str(PY), "-c", "import torch, sys; sys.exit(not torch.cuda.is_available())"]).returncode == 0


def run(*args, timeout=600):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(PY), str(SCRIPT), *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_lora_on_the_cpu_fallback(base_model, chat_data, tmp_path):
    out = tmp_path / "u"
    proc = run("--model", str(base_model), "--data-dir", str(chat_data), "--out-dir", str(out), "--max-steps", "4",
               "--batch-size", "4", "--val-examples", "8", "--max-new-tokens", "4")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    s = json.loads((out / "summary.json").read_text())
    assert len(s["losses"]) == 4 and all(0 < x < 20 for x in s["losses"])
    assert 0 < s["trainable_params"] < 0.1 * s["params"]  # adapters only
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert s["device"] == ("cuda" if has_gpu() else "cpu")


def test_qlora_needs_a_gpu(base_model, chat_data, tmp_path):
    if has_gpu():
        pytest.skip("a GPU is present: QLoRA runs in tests/gpu instead")
    proc = run("--model", str(base_model), "--data-dir", str(chat_data), "--qlora", timeout=120)
    assert proc.returncode != 0 and "--qlora needs a CUDA GPU" in proc.stderr
