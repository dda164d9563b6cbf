"""Measure the pipeline bubble: one global batch through GPipe on N processes for several micro-batch counts.

Each process holds a contiguous slice of the layers of a small ``common.model.GPT`` (stage 0 also the
embedding, the last stage the final norm and head), wrapped in ``PipelineStage``; ``ScheduleGPipe``
runs one training step (forward + backward) of the same global batch with m = 1, 2, 4, ... micro-batches.
Ideal pipeline time = the slowest stage's forward + backward on the whole batch, timed alone on its
process; measured bubble = 1 - ideal / measured step time. Rank 0 writes the numbers to ``--out`` (JSON).

    torchrun --standalone --nproc_per_node=2 02_Notebook_Parallelism/pp_bubble.py --out bubble.json
    sbatch --wrap "torchrun --nproc_per_node=4 02_Notebook_Parallelism/pp_bubble.py --out bubble.json"
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common.model import GPT, ModelConfig  # noqa: E402


def loss_fn(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def build_stage(rank: int, world: int, cfg: ModelConfig) -> GPT:
    """This rank's slice of the model: the same seeded GPT with the other stages' parts removed."""
    torch.manual_seed(0)
    model = GPT(cfg)
    per = cfg.n_layers // world
    for i in range(cfg.n_layers):
        if not rank * per <= i < (rank + 1) * per:
            del model.layers[str(i)]
    if rank > 0:
        model.tok_embeddings = None
    if rank < world - 1:
        model.norm, model.output = None, None
    return model


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)  # the least disturbed run on a shared machine


def main(out: str, micro: list[int], batch: int, seq_len: int, repeats: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(dim=128, n_layers=2 * world, n_heads=4, vocab_size=1024,
                      max_seq_len=seq_len)
    stage_mod = build_stage(rank, world, cfg)
    torch.manual_seed(1)
    x = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    y = torch.randint(0, cfg.vocab_size, (batch, seq_len))

    # ideal: this stage alone, forward + backward of the whole batch (input as it would arrive)
    h = x if rank == 0 else torch.randn(batch, seq_len, cfg.dim, requires_grad=True)

    def alone():
        outp = stage_mod(h)
        (loss_fn(outp, y) if rank == world - 1 else outp.float().pow(2).mean()).backward()

    alone()  # warm-up
    ideal = best_of(alone, repeats)
    ideal_all = [None] * world
    dist.all_gather_object(ideal_all, ideal)
    results = []
    for m in micro:
        stage = PipelineStage(stage_mod, rank, world, torch.device("cpu"))
        schedule = ScheduleGPipe(stage, n_microbatches=m, loss_fn=loss_fn)

        def step():
            if rank == 0:
                schedule.step(x)
            elif rank == world - 1:
                schedule.step(target=y)
            else:
                schedule.step()

        step()  # warm-up (shape inference, buffers)
        t = best_of(step, repeats)
        results.append(dict(micro_batches=m, step_s=t, measured_bubble=1 - max(ideal_all) / t,
                            formula=(world - 1) / (m + world - 1)))
        stage_mod.zero_grad(set_to_none=True)
    if rank == 0:
        Path(out).write_text(json.dumps(dict(world=world, batch=batch, seq_len=seq_len, ideal_stage_s=ideal_all,
                                             results=results), indent=1))
        for r in results:
            print(f"m={r['micro_batches']:3d}: step {r['step_s'] * 1e3:7.1f} ms | bubble measured "
                  f"{r['measured_bubble']:.2f}, (p-1)/(m+p-1) = {r['formula']:.2f}")
    dist.destroy_process_group()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="pp_bubble.json")
    p.add_argument("--micro", default="1,2,4,8,16", help="micro-batch counts (comma-separated)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args()
    main(a.out, [int(v) for v in a.micro.split(",")], a.batch, a.seq_len, a.repeats)
