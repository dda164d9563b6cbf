"""Where a CPU training step's time goes: ``torch.profiler`` over a short ``ddp.py`` run, self time by kind.

    python benchmarks/profile_step.py                    # the race configuration (benchmarks/race.py), 1 process
    python benchmarks/profile_step.py --nanogpt          # the same for benchmarks/nanogpt_ref.py
    python benchmarks/profile_step.py --compile [--nanogpt]   # both compiled (compiled kernels: their own row)

Prints a Markdown table: milliseconds per step and share for matmuls, attention, elementwise work (norms,
RoPE, SwiGLU/GELU, residual adds), the loss, the optimizer, communication, and the rest (Python, logging,
data) = the steps' wall time minus the profiled operators; from the step after ``--warmup`` to the last.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

KINDS = [  # (kind, substrings of aten op names), first match wins
    ("compiled kernels (fused elementwise)", ("compiledfxgraph",)),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul")),
    ("communication", ("allreduce", "all_reduce", "broadcast", "gloo", "c10d")),
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("copies and views", ("copy_", "contiguous", "clone", "to_copy", "cat", "stack", "index", "embedding")),
    ("elementwise", ("mul", "add", "sub", "div", "pow", "rsqrt", "mean", "silu", "gelu", "layer_norm", "norm",
                     "sum", "neg", "exp", "where", "fill", "zero", "clamp", "sqrt", "sigmoid", "ones", "empty")),
]


def kind_of(name: str) -> str:
    low = name.lower()
    return next((k for k, keys in KINDS if any(s in low for s in keys)), "other operators")


class Window:
    """Profile from the start of the second step to the end of the last (no setup, no final evaluation)."""

    def __init__(self, steps: int, warmup: int):
        self.prof = profile(activities=[ProfilerActivity.CPU])
        self.calls, self.steps, self.warmup, self.t0, self.wall = 0, steps, warmup, 0.0, 0.0

    def wrap(self, fn, stop_after_last: bool):
        def wrapped(*a, **kw):
            self.calls += 1
            if self.calls == self.warmup + 1:
                self.prof.start()
                self.t0 = time.perf_counter()
            out = fn(*a, **kw)
            if stop_after_last and self.calls == self.steps:
                self.stop()
            return out
        return wrapped

    def stop(self):
        if not self.wall:
            self.wall = time.perf_counter() - self.t0
            self.prof.stop()


def run(nanogpt: bool, steps: int, compile_: bool = False, warmup: int = 1) -> tuple[dict, float]:
    torch.set_num_threads(1)
    w = Window(steps, warmup)
    if nanogpt:
        sys.argv = ["nanogpt_ref.py", "--steps", str(steps), "--data-dir", "data"] + (["--compile"] if compile_ else [])
        sys.path.insert(0, str(ROOT / "benchmarks"))
        import nanogpt_ref

        nanogpt_ref.GPT.forward = w.wrap(nanogpt_ref.GPT.forward, stop_after_last=False)
        nanogpt_ref.main()
    else:
        import importlib.util

        from common import trainer
        from common.config import make_config

        spec = importlib.util.spec_from_file_location("ddp", ROOT / "03_LLM_Training_on_GPU" / "ddp.py")
        ddp = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(ddp)
        trainer.train_step = w.wrap(trainer.train_step, stop_after_last=True)
        cfg = make_config(preset="tiny", vocab_size=257, seq_len=128, batch_size=16, micro_batch_size=16,
                          precision="fp32", threads=1, device="cpu", max_steps=steps, eval_interval=0,
                          eval_batches=1, sample_tokens=0, final_checkpoint=False, progress=False,
                          out_dir=tempfile.mkdtemp() + "/run", data_dir="data", compile=compile_)
        ddp.main(cfg)
    w.stop()
    by_kind: dict[str, float] = {}
    for e in w.prof.key_averages():
        if e.key.startswith(("aten::", "c10d::", "gloo:", "## Call CompiledFxGraph")) or "adam" in e.key.lower():
            by_kind[kind_of(e.key)] = by_kind.get(kind_of(e.key), 0.0) + e.self_cpu_time_total / 1e3
    return by_kind, w.wall * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", action="store_true")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="the project with --compile (nanoGPT-style: compiled too)")
    p.add_argument("--warmup", type=int, default=None, help="steps before the profiled ones (1; 5 with --compile: "
                   "a compiled run may recompile in its second step)")
    a = p.parse_args()
    warmup = a.warmup if a.warmup is not None else (5 if a.compile else 1)
    by_kind, wall = run(a.nanogpt, a.steps, a.compile, warmup)
    by_kind["rest (Python, logging, data)"] = wall - sum(by_kind.values())
    n = a.steps - warmup  # profiled steps
    print(f"{'nanoGPT-style' if a.nanogpt else 'project'}: {n} steps profiled, {wall / n:.1f} ms per step")
    print("| kind | ms per step | share |")
    print("|---|---|---|")
    for k, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"| {k} | {ms / n:.2f} | {ms / wall:.0%} |")


if __name__ == "__main__":
    main()
