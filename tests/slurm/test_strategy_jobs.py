"""The chapter-03 strategy templates run for real on the local cluster: FSDP, TP, PP, ZeRO on one node and
FSDP, FSDP + TP, ZeRO across two nodes (ddp.slurm and ddp_multinode.slurm are in test_jobs.py).

All seven are submitted at once with short tiny-preset runs and share the four nodes (and this machine's
cores); each must finish cleanly, train, and write a summary with the expected number of processes.
Submitted as 01_Basics/README.md says, with `01_Basics/submit.sh [--v100]` and the second site profile
(01_Basics/sites/local-ci.env: partitions gpu_a100/gpu_v100, account and reservation llm_course): the
templates run unchanged on a site with other names. Only command-line overrides otherwise, as a user
would type them: --time, NPROC_PER_NODE, script arguments.
"""

import pytest
from test_jobs import assert_ok, assert_trains, summary

STEPS = 30
ARGS = ["--preset", "tiny", "--max-steps", str(STEPS), "--log-interval", "5", "--eval-batches", "2",
        "--sample-tokens", "0"]  # fmt: skip
CH = "03_LLM_Training_on_GPU"
# template: (partition, processes per node, extra script arguments, expected world size, a line of its log)
JOBS = {
    "fsdp.slurm": ("a100", 2, [], 2, "fsdp: 2 process(es)"),
    "tp.slurm": ("a100", 2, ["--sequence-parallel"], 2, "tp: 2 process(es)"),
    "pp.slurm": ("v100", 2, ["--schedule", "gpipe"], 2, "pp: 2 process(es)"),
    "zero.slurm": ("v100", 2, [], 2, "zero: 2 process(es)"),
    "fsdp_multinode.slurm": ("a100", 1, [], 2, "fsdp: 2 process(es)"),
    "fsdp_tp_multinode.slurm": ("v100", 2, [], 4, "fsdp_tp: 4 process(es)"),
    "zero_multinode.slurm": ("a100", 1, [], 2, "zero: 2 process(es)"),
}


@pytest.fixture(scope="module")
def jobs(cluster):
    ids = {name: cluster.submit(f"{CH}/{name}", "--time=10", gpu=part, args=ARGS + extra,
                                env={"NPROC_PER_NODE": str(nproc)})  # fmt: skip
           for name, (part, nproc, extra, _, _) in JOBS.items()}
    return {name: cluster.wait(job_id, timeout=900) for name, job_id in ids.items()}


@pytest.mark.parametrize("name", list(JOBS))
def test_strategy_template_trains(cluster, jobs, name):
    job, (part, _, _, world, line) = jobs[name], JOBS[name]
    assert_ok(job)
    assert line in job.log, job.describe()
    assert_trains(job, STEPS)
    assert job.fields["Partition"] == f"gpu_{part}", job.describe()  # the profile's name for the GPU type
    assert job.fields["Account"] == job.fields["Reservation"] == "llm_course", job.describe()
    result = summary(cluster, job)
    assert result["world_size"] == world and result["steps"] == STEPS, result
