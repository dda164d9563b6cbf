"""The templates run for real on the local cluster, on CPU, one job after another.

Only command-line overrides: partition, --time, --signal, NPROC_PER_NODE, and arguments for the
training script (LLM_DEVICE=cpu is exported by the `cluster` fixture). Budget: a few minutes.
"""

import json
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

LOSS = re.compile(r"step (\d+)/\d+ \| loss ([0-9.]+)")
# The requeue test compares with the one-node run: both use exactly these arguments and
# 2 processes. Training must outlast the warning signal (<= 40 s after the start, see below):
# 250 steps take ~50 s at the fastest seen here (~11k tokens/s), longer under load.
STEPS = 250
TRAIN_ARGS = ["--preset", "tiny", "--device", "cpu", "--seed", "1", "--log-interval", "10",
              "--max-steps", str(STEPS)]  # fmt: skip


def losses(log: str) -> list[tuple[int, float]]:
    """(step, loss) pairs from rank 0's training log lines."""
    return [(int(s), float(v)) for s, v in LOSS.findall(log)]


def assert_ok(job):
    assert job.state == "COMPLETED" and job.fields.get("ExitCode") == "0:0", job.describe()


def assert_trains(job, steps: int):
    curve = losses(job.log)
    assert curve and curve[-1][0] == steps, f"no training up to step {steps}\n{job.describe()}"
    assert curve[-1][1] < curve[0][1] - 0.5, f"loss did not decrease: {curve}"


def summary(cluster, job) -> dict:
    path = cluster.sandbox / "runs" / f"{job.fields['JobName']}-{job.id}" / "summary.json"
    assert path.exists(), f"no {path}\n{job.describe()}"
    return json.loads(path.read_text())


def test_hello(cluster):
    job = cluster.run("01_Basics/hello.slurm", "--time=2", timeout=120)
    assert_ok(job)
    assert "batch shell runs on: a100-" in job.log  # default partition, node's own hostname
    assert "CUDA_VISIBLE_DEVICES=0" in job.log  # one (fake) GPU granted
    assert "environment OK" in job.log and "hello from Slurm: done" in job.log


def test_gpu_job_with_cpu_only_torch_fails_loudly(cluster):
    """GPUs granted, torch cannot use them, no CPU run asked for (LLM_DEVICE unset): hello.slurm and a training
    template stop with exit 1 and one line that names the cause and the fix, instead of training on the CPU."""
    t0 = time.monotonic()
    ids = {"hello": cluster.sbatch("01_Basics/hello.slurm", "--time=3", "--gpus-per-node=2", env={"LLM_DEVICE": None}),
           # --time=10: the header asks for USR1 330 s before the limit; with 3 minutes it comes at once and, on a
           # slow machine, before the loud failure -- then requeue.sh requeues the job over and over
           "ddp": cluster.sbatch("03_LLM_Training_on_GPU/ddp.slurm", "--time=10", "--gpus-per-node=1",
                                 env={"LLM_DEVICE": None})}  # fmt: skip
    jobs = {name: cluster.wait(job_id, timeout=180) for name, job_id in ids.items()}
    assert time.monotonic() - t0 < 120, "a loud failure should come within a minute or two"
    for job in jobs.values():
        assert job.state == "FAILED" and job.fields["ExitCode"] != "0:0", job.describe()
        assert "Slurm granted GPUs (SLURM_" in job.log and "CPU-only build" in job.log, job.describe()
        assert "scripts/setup.sh --cuda cu126" in job.log and "LLM_DEVICE=cpu" in job.log, job.describe()
    assert "environment OK" not in jobs["hello"].log and "GPU ERROR: Slurm granted GPUs" in jobs["hello"].log
    assert "GPUs granted: 2" in jobs["hello"].log and "processes per node (NPROC): 2" in jobs["hello"].log
    assert not LOSS.search(jobs["ddp"].log), "trained although the GPU was unusable"


def test_gpus_per_task_reach_each_task(cluster):
    """srun --gpus-per-task=1: every task gets its own GPU and counts as granted (so it would use cuda:0)."""
    env = {**cluster.env, "PATH": f"{cluster.env['LLM_VENV']}/bin:{cluster.env['PATH']}"}
    code = ("import os; from common.distributed import slurm_gpu_grant as g; "
            "print('task', os.environ['SLURM_LOCALID'], os.environ['CUDA_VISIBLE_DEVICES'], g())")  # fmt: skip
    r = subprocess.run(["srun", "-p", "a100", "-n", "2", "--gpus-per-task=1", "--time=2", "python", "-c", code],
                       cwd=cluster.sandbox, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    tasks = sorted(re.findall(r"task (\d) (\S+) SLURM_STEP_GPUS=(\S+)", r.stdout))
    assert [t[0] for t in tasks] == ["0", "1"] and tasks[0][1] != tasks[1][1], r.stdout
    assert all(t[1] == t[2] for t in tasks), r.stdout  # the step's own GPU, the one it sees


def test_allreduce_two_nodes(cluster):
    job = cluster.run("01_Basics/allreduce.slurm", "--time=3", args=["--size-mb", "8", "--iters", "5"],
                      env={"NPROC_PER_NODE": "1"}, timeout=180)  # fmt: skip
    assert_ok(job)
    hosts = set(re.findall(r"rank \d/2 on (\S+) device cpu backend gloo", job.log))
    assert hosts == {"a100-1", "a100-2"}, job.log
    busbw = re.search(r"all_reduce ok \| world 2 .*busbw ([0-9.]+) GB/s", job.log)
    assert busbw and float(busbw.group(1)) > 0, job.log


def test_hang_lab_job(cluster):
    """hang_lab.slurm for real: rank 1 hangs, rank 0's collective times out after 10 s, the flight recorder
    names the collective it was stuck in; the job completes (the lab's step fails on purpose)."""
    job = cluster.run("01_Basics/hang_lab.slurm", "--time=3", args=["--scenario", "hang", "--timeout-s", "10"],
                      env={"NPROC_PER_NODE": "2"}, timeout=240)  # fmt: skip
    assert_ok(job)
    assert "entered is #3 gloo:all_reduce" in job.log and "ended with an error, as planned" in job.log, job.log


@pytest.fixture(scope="session")
def ddp_reference(cluster):
    """ddp.slurm on one node, uninterrupted (also the reference of the requeue test)."""
    # --time=15: the header's warning (USR1 330 s before the end, at the latest) must not come
    # submitted from the chapter's folder, as `cd 03_LLM_Training_on_GPU && sbatch ddp.slurm`: the template
    # finds the clone itself and the log lands in that folder
    job = cluster.run("ddp.slurm", "--time=15", args=TRAIN_ARGS, env={"NPROC_PER_NODE": "2"}, timeout=600,
                      cwd=cluster.sandbox / "03_LLM_Training_on_GPU")  # fmt: skip
    assert_ok(job)
    assert f"repository {cluster.sandbox} |" in job.log, job.describe()
    return job, summary(cluster, job)


def test_ddp_one_node(ddp_reference):
    job, result = ddp_reference
    assert_trains(job, STEPS)
    assert result["world_size"] == 2 and result["steps"] == STEPS
    assert "(restart 0)" in job.log and "requeue" not in job.log


def test_ddp_multinode_on_v100(cluster, tmp_path):
    """Submitted by its absolute path from another folder (as from $HOME): the log lands there."""
    job = cluster.run(str(cluster.sandbox / "03_LLM_Training_on_GPU/ddp_multinode.slurm"), "-p", "v100",
                      "--time=10", args=["--preset", "tiny", "--max-steps", "40", "--log-interval", "10"],
                      env={"NPROC_PER_NODE": "1"}, timeout=300, cwd=tmp_path)  # fmt: skip
    assert_ok(job)
    assert (tmp_path / f"ddp-multinode-{job.id}.out").exists()
    assert "on v100-[1-2]: head v100-1:" in job.log
    assert_trains(job, 40)
    assert summary(cluster, job)["world_size"] == 2


def test_srun_without_torchrun_two_nodes(cluster):
    """`srun python ddp.py`: one Slurm task per process, ranks and rendezvous from Slurm's variables."""
    env = {**cluster.env, "PATH": f"{cluster.env['LLM_VENV']}/bin:{cluster.env['PATH']}"}  # an activated env
    cmd = ["srun", "-p", "v100", "-N", "2", "--ntasks-per-node=2", "--time=5", "python",
           "03_LLM_Training_on_GPU/ddp.py", "--preset", "tiny", "--max-steps", "20", "--log-interval", "5",
           "--eval-batches", "2", "--sample-tokens", "0", "--no-progress", "--out-dir", "runs/srun-ddp"]  # fmt: skip
    r = subprocess.run(cmd, cwd=cluster.sandbox, env=env, capture_output=True, text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode == 0, log[-4000:]
    assert "ddp: 4 process(es) on cpu (gloo)" in log, log[-4000:]
    curve = losses(log)
    assert curve[-1][0] == 20 and curve[-1][1] < curve[0][1] - 0.5, curve
    result = json.loads((cluster.sandbox / "runs/srun-ddp/summary.json").read_text())
    assert result["world_size"] == 4 and result["steps"] == 20


def test_time_limit_checkpoint_requeue_resume(cluster, ddp_reference):
    """A short time limit: the warning signal makes the trainer checkpoint, the job requeues
    itself, resumes from the checkpoint and ends exactly like the uninterrupted reference run.

    Slurm checks time limits every 30 s and sends the warning once less than @N + 30 s remain:
    with --time=2 and @80 it arrives 10-40 s after the start. The resumed run would get the same
    short limit and be preempted again and again on a slow machine (the same path, once more);
    so once the requeue is seen, the test gives the job 10 minutes, as an admin can.
    """
    t0 = time.monotonic()
    job_id = cluster.sbatch("03_LLM_Training_on_GPU/ddp.slurm", "--time=2", "--signal=B:USR1@80",
                            args=TRAIN_ARGS, env={"NPROC_PER_NODE": "2"})  # fmt: skip
    extended = []

    def extend_after_requeue(fields):
        if not extended and int(fields.get("Restarts", 0)) >= 1:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True, timeout=30)
            extended.append(time.monotonic() - t0)

    job = cluster.wait(job_id, timeout=600, on_poll=extend_after_requeue)
    assert_ok(job)
    log = job.log
    assert job.fields["Restarts"] == "1", job.describe()
    assert "USR1: time limit near" in log and "requeueing job" in log, job.describe()
    saved = [int(s) for s in re.findall(r"preempted: checkpoint saved at step (\d+)", log)]
    assert len(saved) == 1 and 0 < saved[0] < STEPS, job.describe()
    assert f"resumed from runs/ddp-{job_id}/checkpoints/" in log and "(restart 1)" in log, job.describe()
    curve = losses(log)
    assert curve[-1][0] == STEPS and curve[-1][1] < curve[0][1] - 0.5, curve
    result, ref = summary(cluster, job), ddp_reference[1]
    assert result["steps"] == STEPS
    assert result["final_loss"] == pytest.approx(ref["final_loss"], abs=1e-5), (result, ref)
    print(f"checkpoint at step {saved[0]}, requeued at {extended[0]:.0f} s, done at {time.monotonic() - t0:.0f} s")


def fetch(url: str, port: str) -> tuple[int, str]:
    """GET as a browser through the SSH tunnel would: to the node, with Host: localhost:<port>."""
    request = urllib.request.Request(url, headers={"Host": f"localhost:{port}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, ""
    except OSError:  # not listening yet (URLError is an OSError)
        return 0, ""


def test_jupyter_on_the_nodes_localhost_with_a_private_token(cluster):
    """Jupyter listens on 127.0.0.1 of its node (the SSH tunnel's end), not on the node's cluster address;
    the token is in a file only the user can read, not in the log and not on the command line (ps)."""
    import os
    import stat

    venv = cluster.env["LLM_VENV"]
    if subprocess.run([f"{venv}/bin/python", "-c", "import jupyterlab"]).returncode != 0:
        pytest.skip(f"jupyterlab is not installed in {venv}")
    job_id = cluster.sbatch("01_Basics/jupyter.slurm", "--time=3")
    url_file = cluster.sandbox / f"jupyter-{job_id}.url"
    try:
        deadline, m = time.monotonic() + 90, None
        while not (m and url_file.exists()) and time.monotonic() < deadline:
            log = cluster.log(job_id)
            m = re.search(r"ssh -N -L (\d+):localhost:\d+ -J \S+@\S+ \S+@(\S+)\n", log)
            time.sleep(0.5)
        assert m and url_file.exists(), f"no tunnel instructions\n{cluster.log(job_id)}"
        port, node = m.groups()
        assert node.startswith("a100-")
        url = url_file.read_text().strip()
        token = url.split("token=")[1]
        assert stat.S_IMODE(url_file.stat().st_mode) == 0o600 and token not in cluster.log(job_id)
        status = None  # the tunnel's end: the node's localhost (all test nodes share this host's loopback)
        while time.monotonic() < deadline:
            status, body = fetch(url.replace("localhost", "127.0.0.1"), port)
            if status == 200:
                break
            time.sleep(1)
        assert status == 200 and "JupyterLab" in body, f"{url}: {status}\n{cluster.log(job_id)}"
        assert fetch(f"http://127.0.0.1:{port}/api/contents", port)[0] == 403  # no token, no access
        assert fetch(f"http://{node}:{port}/lab", port)[0] == 0  # the node's cluster address: nobody listens
        cmdlines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
        assert any(b"jupyter" in c for c in cmdlines) and not any(token.encode() in c for c in cmdlines)
        assert os.environ.get("JUPYTER_TOKEN") != token
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    assert cluster.wait(job_id, timeout=60).state == "CANCELLED"
