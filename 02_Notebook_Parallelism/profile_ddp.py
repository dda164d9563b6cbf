"""Profile a few DDP training steps: when backward runs, and when the gradient all-reduces run.

Builds the GPT of ``common.model`` (the ``tiny`` preset), wraps it in ``DistributedDataParallel`` and runs a
few training steps under ``torch.profiler.profile`` with a schedule: ``wait`` steps unrecorded, ``warmup`` steps
recorded and thrown away (first-call costs), ``active`` steps kept. Each ``--bucket-mb`` value is one
configuration: ``apply_ddp`` wraps the model with ``common.parallelize.apply_ddp`` itself (DDP's default bucket
sizes: a 1 MiB first bucket, 25 MiB after it); a number ``N`` makes the same DDP call with an explicit
``bucket_cap_mb=N``, which sets *every* bucket's cap, the first one's included. Every rank exports the Chrome
trace of its active steps (``<out-dir>/<config>_rank<r>.json``, config ``apply_ddp`` or ``bucket<N>``); rank 0
also writes ``summary.json`` with the table of the top ops. The whole profile runs once per configuration (a
fresh model and DDP each time), so one launch compares them. The batches are random tokens: a profile depends
on the shapes, not on the values.

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
from common.parallelize import apply_ddp  # noqa: E402
from common.strategy import loss_fn  # noqa: E402

APPLY_DDP = "apply_ddp"


def bucket_arg(value: str) -> str | float:
    """A ``--bucket-mb`` value: ``apply_ddp`` (the project's own DDP call) or an explicit cap in MiB."""
    return value if value == APPLY_DDP else float(value)


def config_name(bucket_mb: str | float) -> str:
    return APPLY_DDP if bucket_mb == APPLY_DDP else f"bucket{bucket_mb:g}"


def profile_run(args: argparse.Namespace, bucket_mb: str | float, info) -> dict:
    """Profile ``wait + warmup + active`` training steps of one DDP configuration (see the module docstring)."""
    torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model = GPT(MODEL_PRESETS["tiny"]).to(info.device)
    if bucket_mb == APPLY_DDP:  # what the chapter-03 scripts run: DDP's default bucket sizes
        ddp = apply_ddp(model, info.device)
    else:  # apply_ddp's call with an explicit cap: the first bucket gets it too
        ddp = DDP(model, device_ids=[info.device.index] if info.device.type == "cuda" else None,
                  bucket_cap_mb=bucket_mb, gradient_as_bucket_view=True)  # fmt: skip
    # either way the gradients are all-reduced bucket by bucket, each as soon as its last gradient exists
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
    name = config_name(bucket_mb)
    trace = Path(args.out_dir) / f"{name}_rank{info.rank}.json"
    plan = schedule(wait=args.wait, warmup=args.warmup, active=args.active, repeat=1)
    with profile(activities=activities, schedule=plan, record_shapes=args.record_shapes,
                 profile_memory=args.profile_memory,
                 on_trace_ready=lambda p: p.export_chrome_trace(str(trace))) as prof:  # fmt: skip
        for _ in range(args.wait + args.warmup + args.active):
            step()
            prof.step()  # tells the schedule that a step ended
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top)
    log.info(f"{name}: trace {trace.name}")
    return {"config": name, "bucket_cap_mb": None if bucket_mb == APPLY_DDP else bucket_mb, "trace": trace.name,
            "table": table, "params": model.num_params()}  # fmt: skip


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
    p.add_argument("--bucket-mb", type=bucket_arg, nargs="+", default=[0.5, APPLY_DDP, 25.0],
                   help="configurations: apply_ddp (DDP's default buckets) or an explicit bucket_cap_mb")  # fmt: skip
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
