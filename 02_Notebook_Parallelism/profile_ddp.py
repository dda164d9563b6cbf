"""Profile a few DDP training steps: when backward runs, and when the gradient all-reduces run.

Builds the GPT of ``common.model`` (the ``tiny`` preset), wraps it in ``DistributedDataParallel`` (the call of
``common.parallelize.apply_ddp``, with the bucket size as a flag) and runs a few training steps under
``torch.profiler.profile`` with a schedule: ``wait`` steps unrecorded, ``warmup`` steps recorded and thrown
away (first-call costs), ``active`` steps kept. Every rank exports the Chrome trace of its active steps
(``<out-dir>/bucket<MB>_rank<r>.json``); rank 0 also writes the table of the top ops and the bucket sizes.
The whole profile runs once per ``--bucket-mb`` value (a fresh model and DDP each time), so one launch
compares bucket sizes. The batches are random tokens: a profile depends on the shapes, not on the values.

    torchrun --standalone --nproc_per_node=2 02_Notebook_Parallelism/profile_ddp.py --out-dir /tmp/prof   # CPU
    torchrun --standalone --nproc_per_node=4 02_Notebook_Parallelism/profile_ddp.py --device cuda \\
        --batch-size 16 --seq-len 256 --out-dir prof                                              # 4 GPUs, NCCL
    sbatch --gpus-per-node=4 --wrap "torchrun --standalone --nproc_per_node=4 \\
        02_Notebook_Parallelism/profile_ddp.py --device cuda --out-dir prof"                      # on Slurm
On a GPU the profiler also records CUDA kernels (``ProfilerActivity.CUDA``); the NCCL all-reduce is then a
kernel on its own stream, next to the backward kernels.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.profiler import ProfilerActivity, profile, record_function, schedule

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.distributed import init, log, teardown  # noqa: E402
from common.model import GPT, MODEL_PRESETS  # noqa: E402
from common.strategy import loss_fn  # noqa: E402


def profile_run(args: argparse.Namespace, bucket_mb: float, info) -> dict:
    """Profile ``wait + warmup + active`` training steps with DDP buckets of ``bucket_mb`` MiB."""
    torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model = GPT(MODEL_PRESETS["tiny"]).to(info.device)
    # = apply_ddp(model, device), whose bucket_cap_mb is 25: gradients are all-reduced bucket by bucket
    ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
              bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(info.rank)  # each rank its own slice of the (random) batch
    vocab = model.cfg.vocab_size

    def step() -> None:
        x, y = (torch.randint(0, vocab, (args.batch_size, args.seq_len), generator=gen).to(info.device)
                for _ in range(2))  # fmt: skip
        with record_function("## forward ##"):  # our own labels: they show up as rows in the trace
            loss = loss_fn(ddp(x), y)
        with record_function("## backward ##"):  # returns only when every bucket's all-reduce has finished
            loss.backward()
        with record_function("## optimizer ##"):
            opt.step()
            opt.zero_grad(set_to_none=False)  # keep the gradients inside DDP's buckets

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if info.device.type == "cuda" else [])
    trace = Path(args.out_dir) / f"bucket{bucket_mb:g}_rank{info.rank}.json"
    plan = schedule(wait=args.wait, warmup=args.warmup, active=args.active, repeat=1)
    with profile(activities=activities, schedule=plan, record_shapes=args.record_shapes,
                 profile_memory=args.profile_memory,
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:  # fmt: skip
        for _ in range(args.wait + args.warmup + args.active):
            step()
            prof.step()  # tells the schedule that a step ended
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    log.info(f"bucket_cap_mb={bucket_mb:g}: trace {trace.name}")
    return {"bucket_mb": bucket_mb, "trace": trace.name, "table": table, "params": model.num_params()}


def main(args: argparse.Namespace) -> None:
    info = init(args.device)
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    runs = [profile_run(args, mb, info) for mb in args.bucket_mb]
    if info.is_main:
        steps = {"wait": args.wait, "warmup": args.warmup, "active": args.active}
        summary = {"world_size": info.world_size, "device": str(info.device), "backend": info.backend,
                   "steps": steps, "runs": runs}  # fmt: skip
        (Path(args.out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
        log.info(runs[-1]["table"])
    teardown()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out-dir", required=True, help="folder for the traces and summary.json")
    p.add_argument("--bucket-mb", type=float, nargs="+", default=[0.5, 25.0], help="DDP bucket sizes to profile")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (gloo on the CPU, NCCL on GPUs)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences per rank and step")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--wait", type=int, default=1, help="steps run before the profiler records")
    p.add_argument("--warmup", type=int, default=1, help="steps recorded, then discarded")
    p.add_argument("--active", type=int, default=2, help="steps kept in the trace")
    p.add_argument("--top", type=int, default=12, help="rows of the top-ops table")
    p.add_argument("--record-shapes", action="store_true", help="record input shapes of every op")
    p.add_argument("--profile-memory", action="store_true", help="record allocations and frees")
    main(p.parse_args())
