"""03_LLM_Training_on_GPU/sweep.slurm: an array whose task N trains with row N of sweep.tsv, logs named
<name>-<array id>_<task>.out, and `python -m common.plot` draws the tasks' loss curves in one figure."""

import re
import subprocess
import sys
import time

import tomllib
from test_jobs import LOSS

ARGS = ["--preset", "tiny", "--max-steps", "20", "--log-interval", "5", "--eval-batches", "2", "--sample-tokens", "0"]
ROWS = {1: (1, 1e-3), 2: (2, 3e-3)}  # sweep.tsv: task -> (seed, lr)


def test_sweep_array_maps_task_to_table_row(cluster):
    array = cluster.submit("03_LLM_Training_on_GPU/sweep.slurm", "--array=1-2", "--time=10",
                           args=ARGS, env={"NPROC_PER_NODE": "1"})  # fmt: skip
    deadline = time.monotonic() + 600
    while subprocess.run(["squeue", "-h", "-j", array], capture_output=True, text=True).stdout.strip():
        assert time.monotonic() < deadline, f"array {array} still running"
        time.sleep(1)
    shown = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True).stdout
    states = dict(re.findall(r"ArrayTaskId=(\d+) .*?JobState=(\S+)", shown))
    runs = []
    for task, (seed, lr) in ROWS.items():
        log_file = cluster.sandbox / f"sweep-{array}_{task}.out"
        log = log_file.read_text() if log_file.exists() else "(no log)"
        assert states.get(str(task)) == "COMPLETED", f"{states}\n{log[-3000:]}"
        assert f"sweep task {task} of array {array}" in log and f"--seed {seed} --lr" in log, log[-3000:]
        run = cluster.sandbox / "runs" / f"sweep-{array}_{task}"
        cfg = tomllib.loads((run / "config.toml").read_text())
        assert (cfg["seed"], cfg["lr"]) == (seed, lr), cfg
        assert LOSS.findall(log)[-1][0] == "20", log[-3000:]
        runs.append(run)
    out = cluster.sandbox / "sweep.png"
    r = subprocess.run([sys.executable, "-m", "common.plot", *map(str, runs), "-o", str(out)],
                       cwd=cluster.sandbox, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and out.stat().st_size > 10_000, r.stdout + r.stderr
