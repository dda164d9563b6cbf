"""Throughput benchmark: tokens/s and MFU of the DDP trainer for the tiny and gpt2-small presets.

    python benchmarks/throughput.py                 # CPU: 1 process x 1 thread, 2 processes x 1 thread
    python benchmarks/throughput.py --device cuda   # GPU: 1 GPU and all GPUs of this node

Each configuration is a real run of 03_LLM_Training_on_GPU/ddp.py; the numbers come from its
summary.json (tokens/s averaged over all steps but the first; MFU against the measured CPU matmul
peak of the same thread count, or the GPU data-sheet peak). Prints a Markdown table.
"""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# preset -> arguments that keep a CPU run short but representative
CPU_RUNS = {
    "tiny": ["--max-steps", "40", "--batch-size", "16", "--micro-batch-size", "8", "--seq-len", "128"],
    "gpt2-small": ["--max-steps", "4", "--batch-size", "2", "--micro-batch-size", "1", "--seq-len", "256"],
}
GPU_RUNS = {
    "tiny": ["--max-steps", "60", "--batch-size", "64", "--micro-batch-size", "64", "--seq-len", "256"],
    "gpt2-small": ["--max-steps", "30", "--batch-size", "32", "--micro-batch-size", "16", "--seq-len", "1024"],
}


def run(preset: str, nproc: int, device: str, extra: list[str], out: Path) -> dict:
    common = ["--preset", preset, "--device", device, "--eval-interval", "0", "--eval-batches", "1",
              "--sample-tokens", "0", "--no-progress", "--log-interval", "1000", "--out-dir", str(out), "--overwrite",
              *extra]
    if device == "cpu":
        common += ["--threads", "1"]
    script = str(ROOT / "03_LLM_Training_on_GPU" / "ddp.py")
    cmd = ([sys.executable, script] if nproc == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]) + common
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--presets", default="tiny,gpt2-small")
    p.add_argument("--out", default="runs/bench")
    a = p.parse_args()
    if a.device == "cuda":
        import torch

        counts = sorted({1, torch.cuda.device_count()})
    else:
        counts = [1, 2]
    runs = CPU_RUNS if a.device == "cpu" else GPU_RUNS
    rows = []
    for preset in a.presets.split(","):
        for n in counts:
            s = run(preset, n, a.device, runs[preset], Path(a.out) / f"{preset}-{n}")
            rows.append((preset, n, s))
            print(f"{preset} x{n}: {s['tokens_per_s']:,.0f} tok/s", file=sys.stderr)
    unit = "thread" if a.device == "cpu" else "GPU"
    print(f"| preset | processes x 1 {unit} | precision | tokens/s | MFU | peak TFLOP/s per process |")
    print("|---|---|---|---|---|---|")
    for preset, n, s in rows:
        mfu = f"{100 * s['mfu']:.0f}%" if s["mfu"] else "n/a"
        print(f"| {preset} | {n} | {s['precision']} | {s['tokens_per_s']:,.0f} | {mfu} | "
              f"{s['peak_tflops_per_device'] or float('nan'):.3f} |")


if __name__ == "__main__":
    main()
