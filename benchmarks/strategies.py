"""Every chapter-03 strategy on the same small preset: tokens/s, MFU, memory per rank -> table + bar chart.

    python benchmarks/strategies.py                  # CPU: 2 ranks x 1 thread (4 for 2-D), ~4 min
    python benchmarks/strategies.py --device cuda    # GPU: all GPUs of this node (2-D: tp=2)
    python benchmarks/strategies.py --only fsdp,tp   # a subset

Each row is a real ``torchrun`` of a chapter script; numbers come from its summary.json: tokens/s
averaged over all steps but the first, MFU against the measured matmul peak (CPU, same thread count)
or the data-sheet peak (GPU); weights, gradients and optimizer state (AdamW moments, ZeRO's fp32
masters) of the most loaded rank, gradients counted after backward and before the optimizer step
frees them (ZeRO: common.zero_memory.zero_grad_bytes); peak = peak resident memory (CPU) or peak allocated
GPU memory of the most loaded rank. Two micro-batches per rank (gradient accumulation), so ZeRO-1
(full gradients until the last micro-batch) and ZeRO-2 (a reduce-scattered 1/N partition) differ.
Writes a Markdown table (stdout and ``images/strategies_<device>.md``) and a bar chart
``images/strategies_<device>.png``. To add a strategy (pp.py, zero.py), append to STRATEGIES.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CH = "03_LLM_Training_on_GPU"


@dataclass
class Strategy:
    label: str  # row name in the table and the chart
    script: str  # file in 03_LLM_Training_on_GPU/
    nproc: int = 2  # processes on CPU; on GPU: all GPUs of the node if > 1 (skipped if fewer than nproc)
    args: list[str] = field(default_factory=list)  # script-specific flags


STRATEGIES = [
    Strategy("1 process", "ddp.py", nproc=1),
    Strategy("DDP", "ddp.py"),
    Strategy("FSDP2", "fsdp.py"),
    Strategy("TP", "tp.py"),
    Strategy("TP + SP", "tp.py", args=["--sequence-parallel", "--loss-parallel"]),
    Strategy("FSDP x TP (2x2)", "fsdp_tp.py", nproc=4, args=["--tp", "2", "--sequence-parallel"]),
    Strategy("PP 1F1B", "pp.py", args=["--schedule", "1f1b", "--n-microbatches", "4",
                                       "--config", f"{CH}/untied.toml"]),  # GPU presets tie the head
    Strategy("PP interleaved 1F1B", "pp.py", args=["--schedule", "interleaved1f1b", "--n-microbatches", "4",
                                                   "--config", f"{CH}/untied.toml"]),
    Strategy("ZeRO-1", "zero.py", args=["--ds-config", f"{CH}/ds_zero1.json"]),
    Strategy("ZeRO-2", "zero.py", args=["--ds-config", f"{CH}/ds_zero2.json"]),
    Strategy("ZeRO-3", "zero.py", args=["--ds-config", f"{CH}/ds_zero3.json"]),
]

# Same preset and global batch for every strategy; short runs that still measure steady state. On CPU each of
# the 2 data-parallel ranks accumulates 2 micro-batches of 4 (1 process: 4 of 4).
RUNS = {
    "cpu": ["--preset", "tiny", "--max-steps", "30", "--batch-size", "16", "--micro-batch-size", "4",
            "--seq-len", "128", "--threads", "1"],
    "cuda": ["--preset", "gpt2-small", "--max-steps", "30", "--batch-size", "32", "--micro-batch-size", "8",
             "--seq-len", "1024"],
}


def run(s: Strategy, device: str, out: Path) -> dict | None:
    nproc = s.nproc
    if device == "cuda" and s.nproc > 1:
        import torch

        nproc = torch.cuda.device_count()
        if nproc < s.nproc:
            print(f"{s.label}: skipped, needs {s.nproc} GPUs, {nproc} visible", file=sys.stderr)
            return None
    common = ["--device", device, "--eval-interval", "0", "--eval-batches", "1", "--sample-tokens", "0",
              "--no-progress", "--log-interval", "1000", "--out-dir", str(out), "--overwrite", *RUNS[device], *s.args]
    script = str(ROOT / CH / s.script)
    cmd = ([sys.executable, script] if nproc == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]) + common
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads((out / "summary.json").read_text())


def state(summary: dict) -> dict:
    """Weights, gradients and optimizer bytes of the rank that holds the most in all."""
    return max(summary["memory_per_rank"], key=lambda m: m["params"] + m["grads"] + m["optim"])


def state_bytes(summary: dict) -> int:
    m = state(summary)
    return m["params"] + m["grads"] + m["optim"]


def table(rows: list[tuple[Strategy, dict]], device: str) -> str:
    unit = "thread" if device == "cpu" else "GPU"
    lines = [f"| strategy | processes x 1 {unit} | precision | tokens/s | MFU | per rank (MiB): weights "
             "| gradients | optimizer state | model state | peak memory per rank (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    mib = 2**20
    for s, r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] else "n/a"
        m = state(r)
        lines.append(f"| {s.label} | {r['world_size']} | {r['precision']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                     f"{m['params'] / mib:.1f} | {m['grads'] / mib:.1f} | {m['optim'] / mib:.1f} | "
                     f"{state_bytes(r) / mib:.1f} | {r['peak_memory_bytes'] / mib:,.0f} |")
    return "\n".join(lines)


def chart(rows: list[tuple[Strategy, dict]], device: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s.label for s, _ in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    a.barh(labels, [r["tokens_per_s"] for _, r in rows], color="tab:blue")
    a.set_xlabel("tokens / s (higher is better)")
    left = [0.0] * len(rows)
    for key, name, color in (("params", "weights", "tab:orange"), ("grads", "gradients", "tab:red"),
                             ("optim", "AdamW state", "tab:gray")):
        part = [state(r)[key] / 2**20 for _, r in rows]
        b.barh(labels, part, left=left, color=color, label=name)
        left = [x + y for x, y in zip(left, part)]
    b.set_xlabel("model state per rank, MiB (lower is better)")
    b.set_xlim(0, 1.4 * max(left))  # room for the legend right of the bars
    b.legend(loc="lower right", fontsize=8)
    b.set_yticklabels([])
    for ax in (a, b):
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    preset = RUNS[device][1]
    fig.suptitle(f"chapter 03 strategies on {device.upper()}: preset {preset}, same global batch")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--only", default="", help="comma-separated labels or script names to run")
    p.add_argument("--out", default="runs/bench-strategies")
    p.add_argument("--images", default=str(ROOT / "images"))
    a = p.parse_args()
    wanted = set(filter(None, a.only.split(",")))
    rows = []
    load0 = os.getloadavg()[0]
    for i, s in enumerate(STRATEGIES):
        if wanted and s.label not in wanted and s.script.removesuffix(".py") not in wanted:
            continue
        r = run(s, a.device, Path(a.out) / f"{i:02d}-{s.script.removesuffix('.py')}")
        if r is None:
            continue
        rows.append((s, r))
        print(f"{s.label}: {r['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    md = table(rows, a.device)
    if a.device == "cpu":  # a busy machine changes tokens/s a lot: say how busy it was
        md += (f"\n\nMeasured with torch {version('torch')} on {os.cpu_count()} cores; load average "
               f"{load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end (above the number of cores: "
               "the runs shared them with other work).")
    print(md)
    images = Path(a.images)
    images.mkdir(parents=True, exist_ok=True)
    (images / f"strategies_{a.device}.md").write_text(md + "\n")
    chart(rows, a.device, images / f"strategies_{a.device}.png")
    print(f"wrote {images / f'strategies_{a.device}.md'} and .png", file=sys.stderr)


if __name__ == "__main__":
    main()
