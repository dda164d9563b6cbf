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


def test_datasheet_peaks_match_the_exact_card():
    """PCIe / NVL cards are clocked lower than SXM ones: matched on the full device name, not a substring."""
    from common.metrics import datasheet_peak

    cases = {"NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H100 PCIe": 756.0, "NVIDIA H100 NVL": 835.0,
             "NVIDIA H200": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA A100-SXM4-80GB": 312.0,
             "NVIDIA A100 80GB PCIe": 312.0}
    for name, peak in cases.items():
        assert datasheet_peak(name, "bf16")[0] == peak, name
    assert datasheet_peak("Tesla V100-PCIE-32GB", "fp16")[0] == 112.0
    assert datasheet_peak("Tesla V100-SXM2-16GB", "fp16")[0] == 125.0
    assert datasheet_peak("Tesla V100S-PCIE-32GB", "fp32")[0] == 16.4
    assert datasheet_peak("Tesla V100-SXM2-16GB", "bf16") == (None, "V100: no bf16 peak")
    assert datasheet_peak("Some GPU", "bf16")[0] is None
