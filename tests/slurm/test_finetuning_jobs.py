"""The chapter-04 templates run for real on the local cluster: fsdp_sft.slurm, torchtune.slurm (each with 2
processes) and unsloth.slurm (one process, Unsloth's CPU fallback here).

The inputs are made first with the commands of 04_Finetuning/README.md, in the submit directory, at the default
paths the templates and configs use: a short pretraining run exported to ``runs/base-tiny/hf``, then the chat
data and tokenizer of ``runs/torchtune-data``. The three jobs are submitted together and share the nodes.
The torchtune and Unsloth jobs need their own environments; without them those two tests are skipped with
the reason (scripts/test.sh creates both).
"""

import json
import os
import subprocess
import sys

import pytest
from test_jobs import assert_ok

PRETRAIN = ["--max-steps", "30", "--batch-size", "8", "--micro-batch-size", "8", "--seq-len", "64",
            "--eval-interval", "0", "--eval-batches", "2", "--log-interval", "10", "--no-progress"]  # fmt: skip
# The fake GPUs of the local cluster are device files without a driver. Slurm exports ROCR_VISIBLE_DEVICES
# with a GPU allocation, and Unsloth, finding no CUDA device, takes that for a ROCm GPU that torch cannot drive
# and refuses to fall back to the CPU. So its job asks for no GPU, as on a CPU partition.
JOBS = {  # template: (processes, environment it needs, sbatch options, arguments)
    "fsdp_sft.slurm": (2, ".venv", [], ["--max-steps", "4", "--batch-size", "4", "--lr", "1e-3", "--warmup-steps", "1",
                                    "--train-examples", "64", "--val-examples", "8", "--max-new-tokens", "4"]),
    "torchtune/torchtune.slurm": (2, ".venv-torchtune", [], ["max_steps_per_epoch=3", "batch_size=2"]),
    "unsloth/unsloth.slurm": (1, ".venv-unsloth", ["--gpus-per-node=0"],
                              ["--data-dir", "runs/torchtune-data", "--max-steps", "3", "--batch-size", "4",
                               "--val-examples", "8", "--max-new-tokens", "4"]),
}


def user_command(cluster, *args: str) -> None:
    """A command of the chapter README, run in the submit directory with the jobs' Python environment."""
    env = {**cluster.env, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    python = os.path.join(cluster.env["LLM_VENV"], "bin", "python")
    r = subprocess.run([python if os.path.exists(python) else sys.executable, *args], cwd=cluster.sandbox,
                       env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert r.returncode == 0, f"{' '.join(args)}\n{r.stdout[-3000:]}{r.stderr[-3000:]}"


@pytest.fixture(scope="module")
def jobs(cluster):
    user_command(cluster, "04_Finetuning/make_base_model.py", "--out-dir", "runs/base-tiny", *PRETRAIN)
    user_command(cluster, "04_Finetuning/torchtune/prepare.py", "--model", "runs/base-tiny/hf", "--out-dir",
                 "runs/torchtune-data", "--train-examples", "200", "--val-examples", "16")
    ids = {}
    for name, (nproc, venv, options, args) in JOBS.items():
        if (cluster.sandbox / venv / "bin" / "activate").exists() or venv == ".venv":
            ids[name] = cluster.sbatch(f"04_Finetuning/{name}", "--time=10", *options, args=args,
                                       env={"NPROC_PER_NODE": str(nproc)})  # fmt: skip
    return {name: cluster.wait(job_id, timeout=900) for name, job_id in ids.items()}


def finished_run(cluster, jobs, name):
    if name not in jobs:
        pytest.skip(f"no {JOBS[name][1]} in the repository: create it with its setup.sh (scripts/test.sh does)")
    job = jobs[name]
    assert_ok(job)
    out = cluster.sandbox / "runs" / f"{job.fields['JobName']}-{job.id}"
    assert out.is_dir(), job.describe()
    return job, out


def test_fsdp_sft_template(cluster, jobs):
    job, out = finished_run(cluster, jobs, "fsdp_sft.slurm")
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == 2 and len(s["losses"]) == 4, s
    assert s["after"]["val_loss"] < s["before"]["val_loss"], s


def test_torchtune_template_on_cpu(cluster, jobs):
    job, out = finished_run(cluster, jobs, "torchtune/torchtune.slurm")
    assert "2 CPU processes, dtype fp32" in job.log, job.describe()
    for rank in (0, 1):
        assert f"launch_distributed: rank {rank}/2 on CPU" in job.log, job.describe()
    assert (out / "epoch_0" / "config.json").exists(), job.describe()


def test_unsloth_template_on_the_cpu_fallback(cluster, jobs):
    job, out = finished_run(cluster, jobs, "unsloth/unsloth.slurm")
    s = json.loads((out / "summary.json").read_text())
    assert len(s["losses"]) == 3 and s["device"] == "cpu", s
    assert (out / "adapter" / "adapter_model.safetensors").exists()
