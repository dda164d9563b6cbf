"""Small helpers the chapter-02 notebooks share: paths, launching chapter scripts with torchrun, saving figures.

Real multi-process work is always a ``torchrun`` subprocess on a script of the repository (a function
defined in a notebook cell cannot be spawned into other processes). Its processes run on the GPUs when
there is one per process, else on the CPU (a laptop, or the 1-GPU Jupyter node of 01_Basics/jupyter.slurm);
every launch prints which and why. ``LLM_DEVICE=cpu`` or ``cuda`` decides instead.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHAPTER = Path(__file__).resolve().parent
ROOT = CHAPTER.parent
IMAGES = Path(os.environ.get("NB_IMAGES_DIR") or CHAPTER / "images")  # the test suite points this elsewhere
DATA = ROOT / "data"  # the same shard cache the chapter-03 scripts use
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def visible_gpus() -> int:
    """GPUs torch can use in this kernel (0 without a driver or with a CPU-only torch)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def launch_device(nproc: int, gpus: int | None = None) -> tuple[str, str]:
    """``("cuda" | "cpu", why)`` for ``nproc`` processes: GPUs only when each process gets its own."""
    forced = os.environ.get("LLM_DEVICE", "")
    if forced in ("cpu", "cuda"):
        return forced, f"LLM_DEVICE={forced}"
    gpus = visible_gpus() if gpus is None else gpus
    if gpus >= nproc:
        return "cuda", f"{gpus} GPU(s) visible, one per process"
    return "cpu", f"{gpus} GPU(s) visible, fewer than {nproc} processes"


def torchrun(nproc: int, script: str, *args: str, timeout: int = 300, threads: int = 1) -> str:
    """``torchrun --standalone --nproc_per_node=N script args`` from the repository root; returns its output.

    torchrun is taken from the kernel's own environment (next to ``sys.executable``). Each process gets
    ``threads`` OpenMP threads (spinning between ops, the fast default, unless that oversubscribes the cores).
    A failure raises with the end of the output.
    """
    exe = Path(sys.executable).parent / "torchrun"
    cmd = [str(exe), "--standalone", f"--nproc_per_node={nproc}", script, *args]
    device, why = launch_device(nproc)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "LLM_DEVICE": device}  # the scripts' --device default
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if nproc * threads > cores:  # more threads than cores (ours, e.g. in a Slurm job): idle threads must sleep
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{out[-4000:]}")
    print(f"$ torchrun --nproc_per_node={nproc} {script} {' '.join(args)}   # {time.perf_counter() - t0:.0f} s, "
          f"{nproc} {'GPU' if device == 'cuda' else 'CPU'} process(es): {why}")
    return out


def train_run(script: str, nproc: int, out_dir: Path, *args: str, timeout: int = 300) -> dict:
    """Run a chapter-03 training script under torchrun (tiny preset, quiet) and return its summary.json."""
    torchrun(nproc, script, "--preset=tiny", "--no-progress", "--sample-tokens=0", f"--data-dir={DATA}",
             f"--out-dir={out_dir}", *args, timeout=timeout)
    return json.loads((Path(out_dir) / "summary.json").read_text())


def scratch(name: str) -> Path:
    """A fresh temporary folder for run outputs (nothing is written into the repository)."""
    return Path(tempfile.mkdtemp(prefix=f"nb-{name}-"))


def savefig(fig, name: str) -> Path:
    """Save a figure the READMEs use to ``02_Notebook_Parallelism/images/<name>.png`` (or ``$NB_IMAGES_DIR``)."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
