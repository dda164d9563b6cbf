"""Fixtures for tests that submit the real sbatch templates to a local Slurm cluster.

Start one with `bash .ci/slurm/start.sh` (root; .ci/run does it). Without a cluster the tests
skip with the reason. Jobs are submitted from a sandbox directory whose entries link to the
repository: a template finds its clone from the path it was submitted with, which is the sandbox,
so the logs (`<name>-<id>.out` in the submit directory), `runs/` and `data/` of the jobs stay out
of the work tree while the templates run unchanged.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ALT_SITE = "01_Basics/sites/local-ci.env"
FINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
    "BOOT_FAIL", "DEADLINE", "PREEMPTED",
}  # fmt: skip


def slurm_status() -> str | None:
    """None when a controller answers, else why not."""
    try:
        r = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=10)
    except FileNotFoundError:
        return "scontrol not installed (start one with: bash .ci/slurm/start.sh)"
    except subprocess.TimeoutExpired:
        return "scontrol ping timed out"
    if r.returncode != 0 or "UP" not in r.stdout:
        return f"scontrol ping: {(r.stdout + r.stderr).strip()[:200]}"
    return None


def job_venv() -> Path | None:
    """The Python environment the jobs activate: $LLM_VENV, ./.venv, or the one running pytest."""
    if os.environ.get("LLM_VENV"):
        return Path(os.environ["LLM_VENV"])
    if (REPO / ".venv/bin/activate").exists():
        return REPO / ".venv"
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return None


@dataclass
class Job:
    id: str
    fields: dict  # from `scontrol show job -o`
    log: str

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "?")

    def describe(self) -> str:
        keep = ("JobState", "Reason", "ExitCode", "Restarts", "RunTime", "NodeList")
        info = " ".join(f"{k}={self.fields.get(k)}" for k in keep)
        return f"job {self.id}: {info}\n--- log ---\n{self.log[-4000:]}"


class Cluster:
    def __init__(self, sandbox: Path, env: dict):
        self.sandbox, self.env = sandbox, env

    def sbatch(self, template: str, *sbatch_args: str, args=(), env=None, cwd=None) -> str:
        cmd = ["sbatch", "--parsable", *sbatch_args, template, *args]
        env = {k: v for k, v in {**self.env, **(env or {})}.items() if v is not None}  # None: unset it
        r = subprocess.run(cmd, cwd=cwd or self.sandbox, env=env,
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
        return r.stdout.strip().split(";")[0]

    def submit(self, template: str, *sbatch_args: str, gpu="a100", site=ALT_SITE, args=(), env=None) -> str:
        """Submit as 01_Basics/README.md says, through submit.sh with a site profile (default: the second
        site's, 01_Basics/sites/local-ci.env: partitions gpu_a100/gpu_v100, an account, a reservation)."""
        cmd = ["bash", "01_Basics/submit.sh", f"--{gpu}", "--parsable", *sbatch_args, template, *args]
        env = {k: v for k, v in {**self.env, "LLM_SITE": str(self.sandbox / site), **(env or {})}.items()
               if v is not None}  # fmt: skip
        r = subprocess.run(cmd, cwd=self.sandbox, env=env, capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stdout}{r.stderr}"
        return re.search(r"^(\d+)", r.stdout, re.M).group(1)

    def show(self, job_id: str) -> dict:
        r = subprocess.run(["scontrol", "show", "job", "-o", job_id],
                           capture_output=True, text=True, timeout=30)  # fmt: skip
        return dict(re.findall(r"(\w+)=(\S*)", r.stdout))

    def log(self, job_id: str, where: Path | None = None) -> str:
        """The job's log: ``<name>-<id>.out`` (``<name>-<array id>_<task>.out``) in the submit directory."""
        logs = list((where or self.sandbox).glob(f"*-{job_id}.out"))
        return logs[0].read_text(errors="replace") if logs else "(no log file)"

    def wait(self, job_id: str, timeout: float, poll: float = 0.5, on_poll=None, where: Path | None = None) -> Job:
        """Poll until the job reaches a final state (a requeued job goes on); scancel on timeout.
        ``on_poll(fields)`` is called with the job's fields at every poll."""
        deadline = time.monotonic() + timeout
        while True:
            fields = self.show(job_id)
            if on_poll:
                on_poll(fields)
            if fields.get("JobState") in FINAL_STATES:
                return Job(job_id, fields, self.log(job_id, where))
            if time.monotonic() > deadline:
                subprocess.run(["scancel", job_id], timeout=30)
                job = Job(job_id, fields, self.log(job_id, where))
                pytest.fail(f"still not finished after {timeout:.0f} s, cancelled\n{job.describe()}")
            time.sleep(poll)

    def run(self, template: str, *sbatch_args: str, args=(), env=None, timeout=300, cwd=None) -> Job:
        """Submit (from ``cwd``, default the sandbox) and wait; the log is read from ``cwd``."""
        return self.wait(self.sbatch(template, *sbatch_args, args=args, env=env, cwd=cwd), timeout, where=cwd)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    reason = slurm_status()
    if reason:
        pytest.skip(f"no local Slurm: {reason}")
    venv = job_venv()
    if venv is None or not (venv / "bin/activate").exists():
        pytest.skip(f"no virtual environment for the jobs (set LLM_VENV): {venv}")
    sandbox = tmp_path_factory.mktemp("slurm-submit")
    # sbatch runs on this host and the nodes share its filesystem: links are enough
    for entry in REPO.iterdir():
        if entry.name in {".git", ".venv", "logs", "runs", "data"} or entry.name.endswith(".out"):
            continue
        if entry.name == "03_LLM_Training_on_GPU":  # a real folder, to submit from (`cd 03_... && sbatch ddp.slurm`)
            (sandbox / entry.name).mkdir()
            for f in entry.iterdir():
                if not f.name.endswith(".out"):
                    (sandbox / entry.name / f.name).symlink_to(f)
        else:
            (sandbox / entry.name).symlink_to(entry)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SBATCH_", "SALLOC_", "LLM_", "SLURM_")) and k != "HF_HOME"}  # fmt: skip
    env.update(
        LLM_VENV=str(venv),
        LLM_DEVICE="cpu",  # the training scripts' default for --device
        OMP_NUM_THREADS="1",  # 2 shared cores: one thread per process
        OMP_WAIT_POLICY="PASSIVE",
        PYTHONUNBUFFERED="1",
    )
    return Cluster(sandbox, env)
