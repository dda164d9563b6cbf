"""Where two DDP processes lose to twice one process on the CPU (issue 13's scaling target; a benchmark).

    python benchmarks/scaling.py --repeats 3        # prints a Markdown table

The race configuration (``benchmarks/race.py``: tiny preset, ``--vocab-size 257``, sequence 128, fp32, one
thread per process), four kinds of run, alternating, medians of the repeats:

1. one process, global batch 16: the race's 1-process row;
2. one process with the per-rank batch (8 sequences): what each of two ranks computes, alone;
3. two DDP processes, global batch 16: the race's 2-process row;
4. the same with DDP's gradient all-reduce replaced by a hook that hands back the local gradients (wrong
   training, right timing): two ranks computing side by side without moving gradients.

(3) / (1) is the scaling the target asks for (>= 1.95x); (2) x 2 is its ceiling on this machine (a rank's
smaller matmuls are no less efficient, so it is about 2x (1)); (4) vs (3) is what the gradient all-reduce
costs; (2) x 2 vs (4) what running as one job costs (the ranks wait for each other every step, the
per-step loss all-reduce, DDP's hooks). Measured results: docs/toolkit.md.
"""

import argparse
import json
import runpy
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from race import launch, project_args  # noqa: E402


def no_grad_sync_worker() -> None:
    """Run ddp.py with every gradient bucket returned unreduced (this file under torchrun, ``--worker``)."""
    from common import parallelize

    real = parallelize.apply_ddp

    def apply_ddp_without_all_reduce(model, device):
        ddp = real(model, device)

        def keep_local(_state, bucket):
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp.register_comm_hook(None, keep_local)
        return ddp

    parallelize.apply_ddp = apply_ddp_without_all_reduce
    sys.argv = [str(ROOT / "03_LLM_Training_on_GPU" / "ddp.py")] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")


def run(nproc: int, batch: int, out: Path, data_dir: str, no_sync: bool) -> float:
    args = project_args(nproc, batch, 60, out, data_dir)
    if no_sync:
        launch(nproc, "benchmarks/scaling.py", ["--worker"] + args)
    else:
        launch(nproc, "03_LLM_Training_on_GPU/ddp.py", args)
    return json.loads((out / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="runs/scaling")
    a = p.parse_args()
    kinds = {"1 process, batch 16": (1, 16, False), "1 process, batch 8 (one rank's share)": (1, 8, False),
             "2 DDP processes, batch 16": (2, 16, False), "2 processes, all-reduce replaced by a no-op": (2, 16, True)}
    res: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(a.repeats):
        for i, (name, (n, b, no_sync)) in enumerate(kinds.items()):
            res[name].append(run(n, b, Path(a.out) / f"{i}-{r}", a.data_dir, no_sync))
    med = {k: statistics.median(v) for k, v in res.items()}
    one = med["1 process, batch 16"]
    print("| run | tokens/s | / 1 process |")
    print("|---|---|---|")
    for k, v in med.items():
        print(f"| {k} | {v:,.0f} | {v / one:.2f}x |")
    print("repeats:", json.dumps({k: [round(x) for x in v] for k, v in res.items()}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        no_grad_sync_worker()
    else:
        main()
