"""Hung-rank lab: make one rank hang on purpose, watch the timeout fire, find the stuck rank and where it is.

A collective finishes only when every rank of the group has called it. One rank that never arrives (a
dead file system under its data loader, an ``if rank == 0:`` around a collective) leaves all the others
waiting -- with no error until the process-group timeout. Three scenarios, two processes, gloo on CPU and
NCCL on GPUs, unchanged:

  hang      rank 1 is stuck in ``load_batch()`` at step 3 while rank 0 waits in the step's ``all_reduce``.
            The process-group timeout (--timeout-s) fires on rank 0; its flight recorder (the ring buffer
            of collectives that TORCH_FR_BUFFER_SIZE turns on) says which collective it was waiting in.
  dump      the same hang, and the stack of every rank: a rank whose step takes longer than --watchdog-s
            prints its Python stack (faulthandler.dump_traceback_later), and ``kill -USR2 <pid>`` prints
            it on demand (faulthandler, registered by common.distributed.init for every script).
  mismatch  at step 3 rank 0 alone all-reduces a metric (the ``if rank == 0:`` bug) while rank 1 has moved
            on to a broadcast: a hang until the timeout -- or, with TORCH_DISTRIBUTED_DEBUG=DETAIL, an
            error at once that names both calls.

    torchrun --nproc-per-node 2 01_Basics/hang_lab.py --scenario hang --timeout-s 10
    torchrun --nproc-per-node 2 --tee 3 01_Basics/hang_lab.py --scenario dump      # --tee 3 labels each rank
    TORCH_DISTRIBUTED_DEBUG=DETAIL torchrun --nproc-per-node 2 01_Basics/hang_lab.py --scenario mismatch
    01_Basics/submit.sh 01_Basics/hang_lab.slurm --scenario dump                   # on a GPU node, NCCL

Every scenario ends with exit code 1 on purpose. What each message means: docs/debugging.md.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing
from common import distributed  # noqa: E402
from common.distributed import log  # noqa: E402
from common.errors import UserError  # noqa: E402

SCENARIOS = ("hang", "dump", "mismatch")
STUCK_STEP = 3  # steps 1 and 2 work: the flight recorder then holds collectives that completed
DEFAULT_TIMEOUT_S = {"hang": 10, "dump": 60, "mismatch": 10}  # dump: time to type `kill -USR2 <pid>`


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scenario", choices=SCENARIOS, default="hang")
    p.add_argument(
        "--timeout-s",
        type=int,
        default=0,
        help="process-group timeout (default: 10 s, 60 s for dump; the training scripts' default is 600 s)",
    )
    p.add_argument(
        "--watchdog-s", type=float, default=3.0, help="dump: a step slower than this prints every rank's stack (0: off)"
    )
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=os.environ.get("LLM_DEVICE", "auto"))
    args = p.parse_args(argv)
    args.timeout_s = args.timeout_s or DEFAULT_TIMEOUT_S[args.scenario]
    return args


def say(msg: str) -> None:
    """Every rank speaks in this lab (``[rank N]`` prefix on the others)."""
    log.info(msg, extra={"all_ranks": True})


def load_batch(rank: int, step: int, stuck: bool, device: torch.device) -> torch.Tensor:
    """Stands for the data loader. The stuck rank never returns, as on a hung file system."""
    if stuck and rank == 1 and step == STUCK_STEP:
        say(f"step {step}: load_batch() now hangs on rank 1 (the bug this lab plants)")
        while True:
            time.sleep(1)
    return torch.full((4,), float(rank + step), device=device)


def train_step(batch: torch.Tensor) -> torch.Tensor:
    """Stands for forward + backward: the gradient all-reduce is where the other ranks wait."""
    dist.all_reduce(batch)
    return batch


def log_metrics(rank: int, step: int, device: torch.device) -> None:
    """The bug of ``mismatch``: a collective behind ``if rank == 0``; the others move on to the next one."""
    if rank == 0 and step == STUCK_STEP:
        dist.all_reduce(torch.ones(1, device=device))  # rank 0 alone: "the mean validation loss"
    dist.broadcast(torch.zeros(1, device=device), src=0)  # every rank: "the next step's data seed"


def flight_recorder() -> str:
    """The last collective this rank entered, from its flight recorder (a ring buffer of the collectives
    of every process group; TORCH_FR_BUFFER_SIZE > 0 turns it on, for gloo and NCCL alike)."""
    try:
        from torch._C._distributed_c10d import _dump_fr_trace_json  # private: what a dump-on-timeout writes

        fr = json.loads(_dump_fr_trace_json())
    except (ImportError, RuntimeError) as e:
        return f"flight recorder not available ({e})"
    status = fr.get("pg_status", {}).get("0")
    if not status:
        return "flight recorder is empty (TORCH_FR_BUFFER_SIZE unset or 0?)"
    n = int(status["last_enqueued_collective"])
    entry = next((e for e in fr.get("entries", []) if e.get("collective_seq_id") == n), {})
    return (
        f"flight recorder: the last collective this rank entered is #{n} "
        f"{entry.get('profiling_name', '?')} of sizes {entry.get('input_sizes')}"
    )


def run_steps(args: argparse.Namespace, info: distributed.DistInfo) -> None:
    stuck = args.scenario in ("hang", "dump")
    for step in range(1, STUCK_STEP + 1):
        if args.scenario == "dump" and args.watchdog_s > 0:  # a step watchdog: armed before, cancelled after
            faulthandler.dump_traceback_later(args.watchdog_s, exit=False)
        batch = load_batch(info.rank, step, stuck, info.device)
        start = time.monotonic()
        try:
            out = train_step(batch)
            if args.scenario == "mismatch":
                log_metrics(info.rank, step, info.device)
            total = out.sum().item()  # on a GPU the wait happens here: NCCL collectives are asynchronous
        except Exception as e:  # gloo raises here; NCCL's watchdog aborts the process instead (docs/debugging.md)
            report_failure(args, info, step, time.monotonic() - start, e)
        faulthandler.cancel_dump_traceback_later()
        say(f"step {step} done (all-reduced sum {total:g})")


def report_failure(args, info, step: int, seconds: float, e: Exception) -> None:
    """What the user sees, then exit at once: a group with a timed-out collective is not shut down cleanly."""
    say(
        f"step {step}: collective failed after {seconds:.1f} s (process-group timeout {args.timeout_s} s): "
        f"{type(e).__name__}: {e}"
    )
    say(flight_recorder())
    if args.scenario == "mismatch" and os.environ.get("TORCH_DISTRIBUTED_DEBUG", "").upper() != "DETAIL":
        say(
            "rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL: every collective is then checked against the other "
            "ranks' first, and a mismatch fails at once, naming both calls"
        )
    elif args.scenario == "hang":
        say(
            "the rank that never entered this collective is the stuck one: see where it is with "
            "`kill -USR2 <its pid>` or `py-spy dump --pid <its pid>` (the dump scenario does it)"
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def main(args: argparse.Namespace) -> None:
    os.environ.setdefault("TORCH_FR_BUFFER_SIZE", "2000")  # the flight recorder, before the process group exists
    info = distributed.init(args.device, timeout_s=args.timeout_s)
    if info.world_size < 2:
        raise UserError("the lab needs two processes: torchrun --nproc-per-node 2 01_Basics/hang_lab.py ...")
    say(
        f"pid {os.getpid()}, {info.backend} on {info.device}, scenario {args.scenario}, "
        f"timeout {args.timeout_s} s: `kill -USR2 {os.getpid()}` prints this rank's stack"
    )
    run_steps(args, info)
    distributed.teardown()


if __name__ == "__main__":
    try:
        main(parse_args())
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
