"""Tests that need a CUDA GPU: skipped, visibly, everywhere else (tests/gpu/run_gpu_checks.sh runs them)."""

import pytest
import torch

from common.errors import UserError
from common.precision import choose_precision, gpu_has_bf16

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")


def test_auto_precision_follows_the_gpu():
    dev = torch.device("cuda", 0)
    p = choose_precision("auto", dev)
    assert p.name == ("bf16" if gpu_has_bf16(dev) else "fp16")
    assert p.needs_scaler == (p.name == "fp16")
    if not gpu_has_bf16(dev):
        with pytest.raises(UserError, match="bf16 is not supported"):
            choose_precision("bf16", dev)


def test_mixed_precision_step_on_gpu(tmp_path, data_dir):
    from testutil import load_script

    from common.config import make_config

    ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
    s = ddp.main(make_config(preset="tiny", max_steps=10, device="cuda", data_dir=str(data_dir),
                             out_dir=str(tmp_path / "gpu"), sample_tokens=0, progress=False))
    assert s["device"] == "cuda" and s["precision"] in ("bf16", "fp16")
    assert s["losses"][-1] < s["losses"][0] and (s["mfu"] is None or s["mfu"] > 0)
