"""01_Basics/requeue.sh without a cluster: fake `scancel`/`scontrol` on PATH, a fake job step, a real USR1.

(The whole path on the local Slurm cluster, time limit included, is tests/slurm/test_jobs.py.)"""

import os
import signal
import subprocess
import time

from testutil import ROOT

STEP = 'echo $$ > step.pid; trap "echo saved > saved; exit 0" USR1; while true; do sleep 0.1; done'


def fake_slurm(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # scancel --signal=USR1 JOB: log the call, deliver the signal to the (fake) job step
    (bin_dir / "scancel").write_text('#!/bin/bash\necho "scancel $*" >> calls\nkill -USR1 "$(cat step.pid)"\n')
    (bin_dir / "scontrol").write_text('#!/bin/bash\necho "scontrol $*" >> calls\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "42"}


def batch_shell(tmp_path, step: str) -> subprocess.Popen:
    script = f"set -euo pipefail; source {ROOT}/01_Basics/requeue.sh; run_requeueable bash -c '{step}'"
    return subprocess.Popen(["bash", "-c", script], cwd=tmp_path, env=fake_slurm(tmp_path),
                            stdout=open(tmp_path / "out", "w"), stderr=subprocess.STDOUT)  # fmt: skip


def test_usr1_is_forwarded_then_the_job_requeues(tmp_path):
    shell = batch_shell(tmp_path, STEP)
    deadline = time.monotonic() + 20
    while not (tmp_path / "step.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the step has installed its trap
    shell.send_signal(signal.SIGUSR1)  # what Slurm does with --signal=B:USR1@N
    assert shell.wait(timeout=30) == 0, (tmp_path / "out").read_text()
    assert (tmp_path / "saved").exists()  # the step got USR1 and "checkpointed"
    calls = (tmp_path / "calls").read_text().splitlines()
    assert calls[0] == "scancel --signal=USR1 42" and calls[-1] == "scontrol requeue 42", calls
    assert "requeueing job 42" in (tmp_path / "out").read_text()


def test_without_signal_the_step_status_is_returned_and_nothing_requeues(tmp_path):
    shell = batch_shell(tmp_path, "exit 3")
    assert shell.wait(timeout=30) == 3
    assert not (tmp_path / "calls").exists()


def test_a_step_that_fails_after_usr1_is_not_requeued(tmp_path):
    """USR1 arrives but the step fails (a real error, not a checkpoint): requeueing would loop forever."""
    shell = batch_shell(tmp_path, STEP.replace("exit 0", "exit 5"))
    deadline = time.monotonic() + 20
    while not (tmp_path / "step.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    shell.send_signal(signal.SIGUSR1)
    assert shell.wait(timeout=30) == 5, (tmp_path / "out").read_text()
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "scontrol requeue 42" not in calls and "not requeueing" in (tmp_path / "out").read_text(), calls
