import pytest
import torch

from common.errors import UserError
from common.precision import choose_precision, describe


def test_cpu_defaults_to_fp32_and_can_be_overridden():
    cpu = torch.device("cpu")
    p = choose_precision("auto", cpu)
    assert p.name == "fp32" and not p.needs_scaler and "fp32" in describe(p)
    b = choose_precision("bf16", cpu)
    with b.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert choose_precision("fp16", cpu).scaler().is_enabled()
    assert not p.scaler().is_enabled()
    with pytest.raises(UserError, match="--precision must be"):
        choose_precision("int4", cpu)
