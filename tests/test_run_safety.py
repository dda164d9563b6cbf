"""Runs that cannot overwrite, mix or silently restart each other (issue: one writer per run folder,
restarts that resume). Single-process checks run in this process; the restart test is one torchrun launch."""

import json
import os
import subprocess

import pytest
from testutil import BIN, ROOT, load_script

from common.config import make_config
from common.errors import UserError

ddp = load_script("03_LLM_Training_on_GPU/ddp.py")
COMMON = dict(preset="tiny", batch_size=8, micro_batch_size=4, seq_len=64, log_interval=5, eval_interval=0,
              eval_batches=2, sample_tokens=0, progress=False, seed=5, max_steps=4)


def run(tmp_path, data_dir, name="r", **kw):
    return ddp.main(make_config(**{**COMMON, "data_dir": str(data_dir), "out_dir": str(tmp_path / name), **kw}))


def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_starts_over(tmp_path, data_dir):
    first = run(tmp_path, data_dir)
    with pytest.raises(UserError) as err:
        run(tmp_path, data_dir, lr=0.01)
    assert "already holds a run (log.jsonl, summary.json, checkpoints): add --resume" in str(err.value)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["losses"] == first["losses"]  # untouched
    again = run(tmp_path, data_dir, overwrite=True, max_steps=2)
    log = (tmp_path / "r" / "log.jsonl").read_text().splitlines()
    assert len(log) == 2 and len(again["losses"]) == 2  # nothing of the earlier run appended to
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")) == ["step_000002"]


def test_a_live_writer_holds_the_folder_and_a_dead_ones_lock_is_taken_over(tmp_path, data_dir):
    import socket

    out = tmp_path / "r"
    out.mkdir()
    (out / ".lock").write_text(f"{socket.gethostname()} {os.getppid()}")  # a live process (pytest's parent)
    with pytest.raises(UserError, match=f"another run is writing to {out} \\(process {os.getppid()}"):
        run(tmp_path, data_dir)
    dead = subprocess.Popen(["true"])
    dead.wait()  # its pid is free now: a lock naming it is stale
    (out / ".lock").write_text(f"{socket.gethostname()} {dead.pid}")
    run(tmp_path, data_dir)
    assert not (out / ".lock").exists()  # released at the end


def test_resume_that_would_step_back_or_change_the_batch_is_refused(tmp_path, data_dir):
    run(tmp_path, data_dir, max_steps=6, ckpt_interval=2)
    with pytest.raises(UserError, match="is at step 6, past --max-steps 4: resuming would step backwards"):
        run(tmp_path, data_dir, resume=True, max_steps=4)
    with pytest.raises(UserError, match="trained with batch_size=8, this run asks for batch_size=16"):
        run(tmp_path, data_dir, resume=True, max_steps=8, batch_size=16)
    s = run(tmp_path, data_dir, resume=True, max_steps=8, batch_size=16, allow_batch_change=True)
    assert len(s["losses"]) == 8


def test_unwritable_out_dir_is_one_line(tmp_path, data_dir):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(UserError, match="cannot write the run folder .*file/run: .*file is not a writable folder"):
        run(tmp_path, data_dir, name="file/run")
    import torch

    assert not torch.distributed.is_initialized()  # refused before any process group


def test_killed_rank_under_max_restarts_resumes_and_ends_like_an_uninterrupted_run(tmp_path, data_dir):
    """Rank 1 is SIGKILLed while it prepares the batch of step 8 of 10 (during step 7; checkpoints every 3
    steps); torchrun restarts both ranks, which
    resume from step 6 on their own (no --resume given). The losses equal the 1-process run's (fp32, 1e-5:
    the DDP parity tolerance), and log.jsonl marks the repeated steps with restart 1."""
    straight = run(tmp_path, data_dir, name="straight", max_steps=10)
    args = [f"--{k.replace('_', '-')}={v}" for k, v in {**COMMON, "max_steps": 10, "ckpt_interval": 3}.items()
            if not isinstance(v, bool)]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           str(ROOT / "tests/fault_driver.py"), "7", *args, "--no-progress", f"--data-dir={data_dir}",
           f"--out-dir={tmp_path / 'killed'}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "restart 1: resuming from the latest checkpoint" in proc.stdout
    s = json.loads((tmp_path / "killed" / "summary.json").read_text())
    assert max(abs(a - b) for a, b in zip(straight["losses"], s["losses"])) <= 1e-5 and len(s["losses"]) == 10
    log = [json.loads(x) for x in (tmp_path / "killed" / "log.jsonl").read_text().splitlines()]
    # before the kill: the steps up to the last log/checkpoint step (6); step 7's stats were still on the
    # device, read only at the next log step, which never came -- the restart trains it again
    assert [r["step"] for r in log if r["restart"] == 0] == list(range(1, 7))
    assert [r["step"] for r in log if r["restart"] == 1] == list(range(7, 11))


KILL_DURING_SAVE = """
import os, signal, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
import torch.distributed.checkpoint as dcp
from testutil import load_script
from common.config import make_config
original = dcp.save
def save(state, checkpoint_id, **kw):
    original(state, checkpoint_id=checkpoint_id, **kw)
    if "step_000004" in str(checkpoint_id):  # the shards are written, the manifest and `latest` are not yet
        os.kill(os.getpid(), signal.SIGKILL)
dcp.save = save
load_script("03_LLM_Training_on_GPU/ddp.py").main(make_config(**{cfg!r}))
"""


def test_sigkill_during_a_save_keeps_the_previous_checkpoint_and_resume_is_exact(tmp_path, data_dir):
    import signal
    import sys

    from common import checkpoint

    straight = run(tmp_path, data_dir, name="straight", max_steps=6)
    cfg = {**COMMON, "max_steps": 6, "ckpt_interval": 2, "data_dir": str(data_dir), "out_dir": str(tmp_path / "k")}
    code = KILL_DURING_SAVE.format(root=str(ROOT), tests=str(ROOT / "tests"), cfg=cfg)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert checkpoint.latest(tmp_path / "k").name == "step_000002"  # the half-written step 4 is not trusted
    assert not (tmp_path / "k" / "checkpoints" / "step_000004").exists()
    resumed = run(tmp_path, data_dir, name="k", max_steps=6, resume=True)  # a stale lock of a dead process
    assert max(abs(a - b) for a, b in zip(straight["losses"], resumed["losses"])) <= 1e-6
