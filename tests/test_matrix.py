"""The composability matrix: every strategy x every flag it offers, against one process on the same global batch.

Each configuration trains 10 steps (fp32, seed 11 -- a seed no other test uses) and its losses must
match the 1-process reference run in this process (``ddp.py`` with no flag: plain training). Flags a
strategy refuses are checked to be refused before any process group exists (tests/test_sharded.py and
``test_refused_flags`` below). Two torchrun launches in all: 2 ranks and 4 ranks.

Tolerances, and why they hold on any x86-64 CPU:
- fp32, no compile: max |dloss| <= 1e-5. The same float32 math runs on every rank; only the order of
  the sums in the all-reduce / reduce-scatter differs from one process (rounding ~1e-7 relative per
  step, then AdamW). Measured here (2026-11-30): <= 9.6e-7. Losses, not weights: AdamW turns tiny gradient
  differences on rarely-seen embedding rows into lr-sized weight steps that change no loss.
- compile: max |dloss| <= 1e-4. Inductor fuses elementwise ops and may reassociate float sums
  (and on CPU vectorises with the machine's ISA), so the bits may differ from eager; measured here
  <= 9.6e-7 (on this CPU inductor kept eager's arithmetic), 100x margin for other ISAs.
- fp16 (autocast + dynamic loss scaling): finite, falling, the loss scale is logged, and within 1e-2
  of fp32 at every step: fp16 has a 10-bit mantissa (~5e-4 relative per op); the mean over 512 tokens
  averages most of it away: measured here <= 9.8e-5; 1e-2 leaves 100x for CPUs with native fp16 math.
Activation checkpointing (full and selective) is exact recomputation: held to the fp32 1e-5.
"""

import importlib.util
import json
import re
import time

import pytest
from testutil import ROOT, load_script, torchrun

from common.config import TrainConfig, make_config
from common.parallelize import REFUSED

CH = "03_LLM_Training_on_GPU"
BASE = dict(preset="tiny", batch_size=8, micro_batch_size=2, seq_len=64, max_steps=10, log_interval=5,
            eval_interval=5, eval_batches=2, sample_tokens=0, progress=False, seed=11, threads=1)
FP32_TOL, COMPILE_TOL, FP16_TOL = 1e-5, 1e-4, 1e-2
HAS_DEEPSPEED = importlib.util.find_spec("deepspeed") is not None
ZERO2 = str(ROOT / CH / "ds_zero2.json")

# name -> (script, world, flags). The reference for all is the 1-process fp32 run.
MATRIX = {
    "ddp+ac_full": ("ddp", 2, dict(activation_checkpointing="full")),
    "ddp+ac_selective": ("ddp", 2, dict(activation_checkpointing="selective")),
    "ddp+compile": ("ddp", 2, dict(compile=True)),
    "ddp+fp16": ("ddp", 2, dict(precision="fp16")),
    "fsdp+ac_selective": ("fsdp", 2, dict(activation_checkpointing="selective")),
    "fsdp+no_reshard": ("fsdp", 2, dict(reshard_after_forward=False)),
    "fsdp+compile+ac_full": ("fsdp", 2, dict(compile=True, activation_checkpointing="full")),
    "fsdp+ac_full+offload": ("fsdp", 2, dict(activation_checkpointing="full", cpu_offload=True)),
    "fsdp+fp16": ("fsdp", 2, dict(precision="fp16")),
    "tp+sp+lp+ac_full": ("tp", 2, dict(sequence_parallel=True, loss_parallel=True, activation_checkpointing="full")),
    "tp+ac_selective": ("tp", 2, dict(activation_checkpointing="selective")),
    "tp+resume": ("tp", 2, dict(ckpt_interval=5)),
    "tp+fp16": ("tp", 2, dict(precision="fp16", sequence_parallel=True)),
    "pp+ac_full": ("pp", 2, dict(activation_checkpointing="full", schedule="1f1b", n_microbatches=4)),
    "pp+fp16": ("pp", 2, dict(precision="fp16", schedule="gpipe", n_microbatches=4)),
    "zero2+ac_full": ("zero", 2, dict(activation_checkpointing="full", ds_config=ZERO2)),
    "fsdp_tp+ac_full+sp+lp": ("fsdp_tp", 4, dict(tp=2, activation_checkpointing="full", sequence_parallel=True,
                                                 loss_parallel=True)),
    "fsdp_tp+ac_selective+offload+no_reshard": ("fsdp_tp", 4, dict(tp=2, activation_checkpointing="selective",
                                                                   cpu_offload=True, reshard_after_forward=False)),
    "fsdp_tp+resume": ("fsdp_tp", 4, dict(tp=2, sequence_parallel=True, ckpt_interval=5)),
    "fsdp_tp+fp16": ("fsdp_tp", 4, dict(tp=2, precision="fp16")),
}
if not HAS_DEEPSPEED:
    del MATRIX["zero2+ac_full"]
RESUMED = [name for name, (_, _, flags) in MATRIX.items() if "ckpt_interval" in flags]


def tolerance(flags: dict) -> float:
    return FP16_TOL if flags.get("precision") == "fp16" else COMPILE_TOL if flags.get("compile") else FP32_TOL


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("matrix")
    base = {**BASE, "data_dir": str(data_dir)}
    ddp = load_script(f"{CH}/ddp.py")
    out = {"ref": ddp.main(make_config(**base, out_dir=str(tmp / "ref")))}
    for world in (2, 4):
        plan = []
        for name, (script, w, flags) in MATRIX.items():
            if w != world:
                continue
            config = {**base, **flags, "out_dir": str(tmp / name)}
            step = {"name": name, "script": f"{CH}/{script}.py", "config": config}
            plan.append(step)
            if name in RESUMED:  # train 10 steps (checkpoints at 5, 10), rewind to 5, resume to 10
                plan += [{"rewind": str(tmp / name), "to": "step_000005"},
                         {**step, "name": name + ":resumed", "config": {**step["config"], "resume": True}}]
        (tmp / f"plan{world}.json").write_text(json.dumps(plan))
        t0 = time.perf_counter()
        proc = torchrun(world, "tests/strategy_driver.py", str(tmp / f"plan{world}.json"), str(tmp), timeout=900)
        print(f"{world}-rank launch: {time.perf_counter() - t0:.0f} s;",
              "; ".join(line[8:] for line in proc.stdout.splitlines() if line.startswith("driver: ")))
        for step in plan:
            if "name" in step:
                out[step["name"]] = json.loads((tmp / f"{step['name']}.json").read_text())
    out["tmp"] = tmp
    return out


def max_diff(a, b):
    assert len(a) == len(b) == BASE["max_steps"], (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.mark.parametrize("name", list(MATRIX))
def test_matches_one_process(runs, name):
    script, world, flags = MATRIX[name]
    s, ref = runs[name], runs["ref"]
    assert s["world_size"] == world and s["steps"] == BASE["max_steps"]
    tol = tolerance(flags)
    d = max_diff(ref["losses"], s["losses"])
    print(f"{name}: max |dloss| = {d:.2e} (tolerance {tol:g})")
    assert d <= tol, (name, d)
    assert abs(ref["val_loss"] - s["val_loss"]) <= tol
    assert s["losses"][-1] < s["losses"][0] - 0.5  # it learns


@pytest.mark.parametrize("name", [n for n, (_, _, f) in MATRIX.items() if f.get("precision") == "fp16"])
def test_fp16_logs_its_loss_scale(runs, name):
    s = runs[name]
    assert s["precision"] == "fp16"
    log = [json.loads(line) for line in (runs["tmp"] / name / "log.jsonl").read_text().splitlines()]
    scales = [r["loss_scale"] for r in log]
    assert len(scales) == BASE["max_steps"] and all(x > 0 for x in scales), scales


@pytest.mark.parametrize("name", RESUMED)
def test_resume_equals_uninterrupted(runs, name):
    assert max_diff(runs[name]["losses"], runs[name + ":resumed"]["losses"]) <= 1e-6
    assert abs(runs[name]["val_loss"] - runs[name + ":resumed"]["val_loss"]) <= 1e-6


def test_log_lines_carry_time_and_restart_count(runs):
    log = [json.loads(line) for line in (runs["tmp"] / "ref" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 11))
    assert all(r["restart"] == 0 and r["time"] > 1.7e9 for r in log)
    assert all(b["time"] >= a["time"] for a, b in zip(log, log[1:]))


def test_ddp_compile_with_accumulation_on_one_process(runs, data_dir, tmp_path):
    """The gpt2-small shape of the bug: one process, compile, micro-batch < batch (4 micro-batches)."""
    ddp = load_script(f"{CH}/ddp.py")
    s = ddp.main(make_config(**{**BASE, "data_dir": str(data_dir), "out_dir": str(tmp_path / "c"), "compile": True}))
    d = max_diff(runs["ref"]["losses"], s["losses"])
    print(f"ddp+compile, 1 process, 4 micro-batches: max |dloss| = {d:.2e}")
    assert d <= COMPILE_TOL


CH03 = [s for s in REFUSED if s != "fsdp_sft"]  # fsdp_sft.py (chapter 04): tests/finetuning/test_fsdp_sft.py


@pytest.mark.parametrize("script,flag", [(s, f) for s in CH03 for f in REFUSED[s]])
def test_refused_flags(script, flag, monkeypatch, tmp_path):
    """Every refused cell of the table: one line naming the alternative, before any process group."""
    import torch

    from common.errors import UserError

    for k, v in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0").items():
        monkeypatch.setenv(k, v)
    module = load_script(f"{CH}/{script}.py")
    value = {"activation_checkpointing": "full", "no_reshard_after_forward": None}.get(flag, True)
    kw = {"reshard_after_forward": False} if flag == "no_reshard_after_forward" else {flag: value}
    cls = getattr(module, "Config", TrainConfig)
    with pytest.raises(UserError) as err:
        module.main(make_config(cls, **{**BASE, **kw, "data_dir": str(tmp_path), "out_dir": str(tmp_path / "o")}))
    msg = str(err.value)
    assert msg.startswith(f"--{flag.replace('_', '-')} is not available with {script}.py: ") and "\n" not in msg
    assert not torch.distributed.is_initialized()


def test_readme_table_matches_the_matrix():
    """03_LLM_Training_on_GPU/README.md's table: every cell is a test here or a refusal in REFUSED."""
    from common.parallelize import FLAGS

    text = (ROOT / CH / "README.md").read_text()
    table = text[text.index("<!-- matrix -->"): text.index("<!-- /matrix -->")]
    rows = {line.split("|")[1].strip().strip("`"): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| `")}
    columns = list(FLAGS) + ["fp16", "accumulation", "resume"]
    assert set(rows) == set(CH03), rows.keys()
    for script, cells in rows.items():
        assert len(cells) == len(columns) and all(cells), (script, cells)
        for col, cell in zip(columns, cells):
            if (script, col) == ("zero", "fp16"):  # DeepSpeed refuses fp16 on its CPU accelerator: test below
                assert cell.startswith("refused on CPU"), cell
                continue
            if col in REFUSED[script]:
                assert cell.startswith("refused"), (script, col, cell)
                continue
            assert cell.startswith("parity"), (script, col, cell)
            proofs = re.findall(r"`([^`]+)`", cell)
            assert proofs, (script, col, cell)
            for proof in proofs:  # a configuration of MATRIX above, or tests/FILE::TEST
                if "::" in proof:
                    file, test = proof.split("::")
                    assert f"def {test}(" in (ROOT / file).read_text(), proof
                else:
                    assert proof in MATRIX and MATRIX[proof][0] == script, proof


def test_zero_fp16_on_cpu_is_one_clear_line(tmp_path, data_dir, capsys):
    if not HAS_DEEPSPEED:
        pytest.skip("deepspeed is not installed")
    from common.trainer import run_main

    zero = load_script(f"{CH}/zero.py")
    with pytest.raises(SystemExit) as exc:
        run_main(zero.main, "", ["--precision", "fp16", "--device", "cpu", "--data-dir", str(data_dir),
                                 "--out-dir", str(tmp_path / "z")], cls=zero.Config)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --precision fp16 with zero.py needs a GPU") and "\n" not in err
