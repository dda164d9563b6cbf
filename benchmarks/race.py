"""CPU race against a nanoGPT-style trainer at the same dimensions (issue 13's benchmark, not a test).

    python benchmarks/race.py --repeats 3             # prints a Markdown table
    python benchmarks/race.py --repeats 3 --compile   # both compiled (nanoGPT's own default is compile=True)

Both train 4 layers of width 128 with 4 heads, sequence 128, global batch 16, fp32, one thread per
process, on the same byte-level tokens of the embedded plays (``--vocab-size 257``), on 1 and on 2 gloo
processes. Runs alternate (project, reference, project, ...) so that a drift of the machine hits both;
the table gives the median tokens/s of the repeats (all steps but the first). The project's MFU is against
the measured 1-thread matmul peak (its summary.json). The reference is ``benchmarks/nanogpt_ref.py``.
"""

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def launch(nproc: int, script: str, args: list[str]) -> None:
    cmd = ([sys.executable, script] if nproc == 1 else
           [str(BIN / "torchrun"), "--standalone", f"--nproc_per_node={nproc}", script]) + args
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env={"OMP_NUM_THREADS": "1",
                   **{k: v for k, v in __import__("os").environ.items() if k != "OMP_NUM_THREADS"}})


def project_args(nproc: int, batch: int, steps: int, out: Path, data_dir: str) -> list[str]:
    """ddp.py's flags for the race configuration (also benchmarks/scaling.py's)."""
    return ["--preset", "tiny", "--vocab-size", "257", "--seq-len", "128", "--batch-size", str(batch),
            "--micro-batch-size", str(batch // nproc), "--precision", "fp32", "--threads", "1", "--device", "cpu",
            "--max-steps", str(steps), "--eval-interval", "0", "--eval-batches", "1", "--sample-tokens", "0",
            "--no-final-checkpoint", "--no-progress", "--data-dir", data_dir, "--out-dir", str(out), "--overwrite"]


def project(nproc: int, steps: int, out: Path, data_dir: str, compile_: bool) -> dict:
    launch(nproc, "03_LLM_Training_on_GPU/ddp.py",
           project_args(nproc, 16, steps, out, data_dir) + (["--compile"] if compile_ else []))
    s = json.loads((out / "summary.json").read_text())
    return {"tokens_per_s": s["tokens_per_s"], "mfu": s["mfu"]}


def reference(nproc: int, steps: int, out: Path, data_dir: str, compile_: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    launch(nproc, "benchmarks/nanogpt_ref.py", ["--steps", str(steps), "--data-dir", data_dir, "--out",
                                                str(out / "summary.json")] + (["--compile"] if compile_ else []))
    return json.loads((out / "summary.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--data-dir", default="data")
    p.add_argument("--out", default="runs/race")
    p.add_argument("--compile", action="store_true", help="torch.compile both (the project per block, "
                   "the reference the whole model, as nanoGPT does)")
    a = p.parse_args()
    res: dict = {}
    for r in range(a.repeats):
        for n in (1, 2):
            for name, fn in (("project", project), ("nanoGPT-style", reference)):
                out = Path(a.out) / f"{name}-{n}-{r}"
                res.setdefault((name, n), []).append(fn(n, a.steps, out, a.data_dir, a.compile))
    med = {k: statistics.median(x["tokens_per_s"] for x in v) for k, v in res.items()}
    mfu = {n: statistics.median(x["mfu"] for x in res[("project", n)]) for n in (1, 2)}
    print("| processes | project tok/s | nanoGPT-style tok/s | project / nanoGPT-style | project MFU |")
    print("|---|---|---|---|---|")
    for n in (1, 2):
        print(f"| {n} | {med[('project', n)]:,.0f} | {med[('nanoGPT-style', n)]:,.0f} | "
              f"{med[('project', n)] / med[('nanoGPT-style', n)]:.2f}x | {mfu[n]:.1%} |")
    for name in ("project", "nanoGPT-style"):
        print(f"{name}: 2 processes / 1 = {med[(name, 2)] / med[(name, 1)]:.2f}x")
    print("repeats:", json.dumps({f"{k[0]}-{k[1]}": [round(x["tokens_per_s"]) for x in v] for k, v in res.items()}))


if __name__ == "__main__":
    main()
