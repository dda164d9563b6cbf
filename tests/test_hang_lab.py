"""The hung-rank lab (01_Basics/hang_lab.py) on CPU with gloo: each scenario really hangs or mismatches, and
each tool of docs/debugging.md answers what it should -- the process-group timeout fires on time, the
flight recorder names the collective, faulthandler prints the stuck function (on a watchdog and on
``kill -USR2``), TORCH_DISTRIBUTED_DEBUG=DETAIL names both calls of a mismatch.

Every launch has a subprocess timeout, so a lab that hangs for real fails the test instead of CI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from testutil import BIN, ROOT, load_script

LAB = "01_Basics/hang_lab.py"
STUCK_STEP = load_script(LAB).STUCK_STEP
LAUNCH_LIMIT_S = 150  # one torchrun launch: startup (15-25 s on a loaded 2-core machine) + a timeout of 6-15 s
FAILED = re.compile(r"^(?:\[default\d\]:)?(\[rank 1\] )?step (\d+): collective failed after ([\d.]+) s", re.M)
ENTERED = re.compile(
    r"^(?:\[default\d\]:)?(\[rank 1\] )?flight recorder: .* entered is #(\d+) (\S+) of sizes (.*)$", re.M
)


def command(scenario: str, timeout_s: int, *extra: str) -> list[str]:
    lab = [str(ROOT / LAB), "--scenario", scenario, "--timeout-s", str(timeout_s), "--device", "cpu", *extra]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node=2", *lab]


def environment(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_DISTRIBUTED_DEBUG", "TORCH_FR_BUFFER_SIZE")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start(cmd: list[str], log: Path, env: dict) -> subprocess.Popen:
    """torchrun in a session of its own, output to ``log``: ``stop`` can then kill it with its workers."""
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)


def stop(proc: subprocess.Popen, timeout: float = LAUNCH_LIMIT_S) -> int:
    """Wait for a launch; one still running after ``timeout`` is killed with all its processes (a stuck
    rank sleeps forever: it must not outlive the test), and the test fails."""
    try:
        return proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def run_side_by_side(tmp_path: Path, scenario: str, timeout_s: int) -> dict[str, tuple[int, str]]:
    """The scenario without and with TORCH_DISTRIBUTED_DEBUG=DETAIL, both launches at once (each mostly
    waits); TORCH_DISTRIBUTED_DEBUG -> (exit code, output)."""
    procs = {d: start(command(scenario, timeout_s), tmp_path / f"{d}.log", environment(TORCH_DISTRIBUTED_DEBUG=d))
             for d in ("OFF", "DETAIL")}  # fmt: skip
    try:
        codes = {d: stop(proc) for d, proc in procs.items()}
    finally:  # a launch that timed out fails the test: the other one must not outlive it either
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    return {d: (codes[d], (tmp_path / f"{d}.log").read_text()) for d in procs}


def failures(out: str) -> dict[int, tuple[int, float]]:
    """rank -> (step, seconds) of its 'collective failed after' line."""
    return {int(bool(m[1])): (int(m[2]), float(m[3])) for m in FAILED.finditer(out)}


def last_entered(out: str) -> dict[int, tuple[int, str, str]]:
    """rank -> (sequence number, collective, sizes) of the last collective its flight recorder saw it enter."""
    return {int(bool(m[1])): (int(m[2]), m[3], m[4]) for m in ENTERED.finditer(out)}


def test_one_process_is_refused_with_the_launch_line():
    env = {k: v for k, v in environment().items() if k not in ("RANK", "WORLD_SIZE", "SLURM_NTASKS")}
    r = subprocess.run([sys.executable, str(ROOT / LAB), "--device", "cpu"], capture_output=True, text=True,
                       timeout=120, env=env, cwd=ROOT)  # fmt: skip
    assert r.returncode == 2 and "torchrun --nproc-per-node 2" in r.stderr, r.stderr


def test_hang_timeout_fires_on_time_and_names_the_collective_or_with_detail_the_rank(tmp_path):
    timeout_s = 6
    runs = run_side_by_side(tmp_path, "hang", timeout_s)
    for debug, (code, out) in runs.items():
        assert code == 1, out[-3000:]
        # rank 0 waited in the step's all-reduce; rank 1 never got there (stuck in load_batch): it reports nothing
        assert f"[rank 1] step {STUCK_STEP}: load_batch() now hangs" in out
        fails = failures(out)
        assert set(fails) == {0} and fails[0][0] == STUCK_STEP, out[-3000:]
        # gloo waits for the missing peer on a steady clock until the deadline, so never less than the timeout
        # (-0.1: the line prints one decimal); +20 s: a late wake-up of a sleeping process on a loaded machine
        assert timeout_s - 0.1 <= fails[0][1] <= timeout_s + 20, (debug, fails)
    out = runs["OFF"][1]
    assert f"Timed out waiting {timeout_s * 1000}ms" in out  # torch's own message carries the timeout
    # the flight recorder (torch's record, not the lab's) names the collective rank 0 was waiting in: the
    # step's all-reduce, the only collective of a step in this scenario, so its number is the step's
    assert last_entered(out) == {0: (STUCK_STEP, "gloo:all_reduce", "[[4]]")}, out[-3000:]
    # DETAIL checks every collective with a monitored barrier first: the waiting rank names the missing one
    assert f"Ranks 1 failed to pass monitoredBarrier in {timeout_s * 1000} ms" in runs["DETAIL"][1]


def rank_stacks(out: str, rank: int) -> list[tuple[str, str]]:
    """(kind, frames) of each faulthandler dump of one rank (torchrun --tee 3 prefixes '[default<rank>]:'):
    kind 'watchdog' after dump_traceback_later's 'Timeout (...)!' header, 'on demand' after a signal."""
    stacks, prefix = [], f"[default{rank}]:"
    for line in out.splitlines():
        if not line.startswith(prefix):
            continue
        line = line[len(prefix) :]
        if line.startswith("Timeout ("):
            stacks.append(("watchdog", ""))
        elif line.startswith("Current thread"):  # the thread that handled the signal: the main one
            stacks.append(("on demand", ""))
        elif line.startswith("  File ") and stacks:
            stacks[-1] = (stacks[-1][0], stacks[-1][1] + line + "\n")
    return stacks


def watchdog_after(out: str, rank: int, marker: str) -> bool:
    """Whether the rank's step watchdog printed a stack after its line containing ``marker`` (so during
    the stuck step, not a slow earlier one)."""
    lines = [line for line in out.splitlines() if line.startswith(f"[default{rank}]:")]
    i = next((k for k, line in enumerate(lines) if marker in line), None)
    return i is not None and any(line.startswith(f"[default{rank}]:Timeout (") for line in lines[i:])


def test_dump_prints_where_each_rank_is_stuck_on_a_watchdog_and_on_kill_usr2(tmp_path):
    timeout_s, watchdog_s = 15, 2
    log = tmp_path / "dump.log"
    cmd = command("dump", timeout_s, "--watchdog-s", str(watchdog_s))
    cmd.insert(2, "--tee=3")  # labels each rank's lines, faulthandler's too
    proc = start(cmd, log, environment())
    try:
        # once both watchdogs fired, both ranks are stuck: rank 0 inside the all-reduce, rank 1 in load_batch
        deadline = time.monotonic() + LAUNCH_LIMIT_S
        while not (watchdog_after(log.read_text(), 0, f"step {STUCK_STEP - 1} done")
                   and watchdog_after(log.read_text(), 1, "now hangs")):  # fmt: skip
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        text = log.read_text()
        pids = [int(re.search(rf"^\[default{r}\]:(?:\[rank 1\] )?pid (\d+)", text, re.M)[1]) for r in (0, 1)]
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)  # what a user types in a second terminal
    finally:
        stop(proc)
    out = log.read_text()
    assert proc.returncode == 1, out[-3000:]
    stacks = {r: dict(rank_stacks(out, r)) for r in (0, 1)}
    assert set(stacks[0]) == set(stacks[1]) == {"watchdog", "on demand"}, out[-3000:]
    for kind in ("watchdog", "on demand"):
        assert "in load_batch" in stacks[1][kind], stacks[1][kind]
        # rank 0's stack is printed from inside the blocked C++ collective: faulthandler needs no Python code
        # to run, which is why it, not a signal.signal handler, is registered for SIGUSR2
        assert "in all_reduce" in stacks[0][kind] and "in train_step" in stacks[0][kind], stacks[0][kind]
    # SIGUSR2 only printed: rank 0 still ran into its timeout, and rank 1 died of torchrun's SIGTERM afterwards
    fails = failures(out)
    assert set(fails) == {0} and fails[0][0] == STUCK_STEP and fails[0][1] >= timeout_s - 0.1, fails
    assert "Signal 12" not in out and "(SIGUSR2)" not in out


def test_mismatch_hangs_without_detail_and_is_named_at_once_with_detail(tmp_path):
    timeout_s = 6
    runs = run_side_by_side(tmp_path, "mismatch", timeout_s)
    assert all(code == 1 for code, _ in runs.values()), runs
    out = {debug: text for debug, (_, text) in runs.items()}

    # OFF: nothing checks the calls; both ranks wait for the other until the timeout, with gloo's plain message
    plain = out["OFF"]
    fails = failures(plain)
    assert set(fails) == {0, 1} and all(s >= timeout_s - 0.1 for _, s in fails.values()), plain[-3000:]
    assert f"Timed out waiting {timeout_s * 1000}ms" in plain and "Detected mismatch" not in plain
    assert "rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL" in plain
    # ... but the two flight recorders disagree at the same sequence number: what torchfrtrace looks for
    entered = last_entered(plain)
    assert entered[0][0] == entered[1][0], entered
    assert (entered[0][1], entered[1][1]) == ("gloo:all_reduce", "gloo:broadcast"), entered

    # DETAIL: the fingerprints are compared before the call, and both ranks fail at once naming both calls
    detail = out["DETAIL"]
    fails = failures(detail)
    # half the timeout separates "at once" (a fingerprint exchange between two local processes) from a timeout
    assert set(fails) == {0, 1} and all(s < timeout_s / 2 for _, s in fails.values()), detail[-3000:]
    assert "Detected mismatch between collectives on ranks" in detail
    line0 = next(line for line in detail.splitlines() if line.startswith(f"step {STUCK_STEP}: collective failed"))
    assert re.search(r"Rank 0 is running collective: .*OpType=ALLREDUCE.*but Rank 1 is running collective: "
                     r".*OpType=BROADCAST", line0), line0  # fmt: skip
    assert "Op type: ALLREDUCEvs BROADCAST" in line0
