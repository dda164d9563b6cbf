"""Run torchtune's ``full_finetune_distributed`` recipe on CPU processes (gloo), unchanged.

The shipped recipe works with FSDP2 on CPU except for two calls that assume CUDA: the memory
statistics logged after the model is built (``training.get_memory_stats`` raises for a non-CUDA
device) and the cache cleanup before training (``training.cleanup_before_training`` calls
``empty_cache``/``reset_peak_memory_stats`` of the device module). This launcher replaces those two
functions in ``torchtune.training`` at runtime with CPU versions, then runs the installed recipe file
as ``__main__``: the recipe itself is never copied or edited. On GPUs use ``tune run`` directly.

    .venv-torchtune/bin/python 04_Finetuning/torchtune/launch_distributed.py --nproc 2 \\
        --config 04_Finetuning/torchtune/full_distributed.yaml max_steps_per_epoch=5
    .venv-torchtune/bin/tune run --nproc_per_node 4 full_finetune_distributed \\
        --config 04_Finetuning/torchtune/full_distributed.yaml device=cuda             # GPUs: no launcher
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import runpy
import subprocess
import sys
from pathlib import Path

RECIPE = "full_finetune_distributed"


def cpu_memory_stats(device=None, reset_stats: bool = True) -> dict:
    """Peak resident memory of this process in GiB, under the keys torchtune logs."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB
    return {"peak_memory_active": peak, "peak_memory_alloc": peak, "peak_memory_reserved": peak}


def patch_for_cpu() -> None:
    import torch
    from torchtune import training

    if torch.cuda.is_available():
        return
    training.get_memory_stats = cpu_memory_stats
    training.cleanup_before_training = gc.collect
    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    print(f"launch_distributed: rank {rank}/{world} on CPU: replaced training.get_memory_stats and "
          "training.cleanup_before_training", flush=True)


def worker(config: str, overrides: list[str]) -> None:
    """Inside one torchrun process: patch, then execute the installed recipe as a script."""
    patch_for_cpu()
    import torchtune

    path = Path(torchtune.__file__).parents[1] / "recipes" / f"{RECIPE}.py"  # where `tune run` finds it
    sys.argv = [str(path), "--config", config, *overrides]
    runpy.run_path(str(path), run_name="__main__")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nproc", type=int, default=2, help="processes on this machine")
    p.add_argument("--config", required=True, help="a torchtune YAML config")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a, overrides = p.parse_known_args(argv)
    if a.worker:
        worker(a.config, overrides)
        return 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={a.nproc}",
           __file__, "--worker", "--config", a.config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    return subprocess.call(cmd, env=env)


if __name__ == "__main__":
    sys.exit(main())
