"""Check the Python environment on this machine: what a job will see before it trains.

Prints Python, torch, CUDA, NCCL, every visible GPU (compute capability, memory, bf16) and the
precision this project will choose, then the versions of the libraries later chapters use.
Exits with 1 and says what is missing when a required package cannot be imported, and with 1 and one
line naming the cause and the fix when GPUs were asked for (a Slurm GPU grant, or LLM_DEVICE=cuda) but
torch cannot use them (a CPU-only torch, a driver too old). LLM_DEVICE=cpu says "CPU on purpose".

    python 01_Basics/check_env.py          # on the login node, or in a job:
    sbatch 01_Basics/hello.slurm           # runs this on a compute node
"""

import importlib
import importlib.metadata
import os
import platform
import sys

# `python 01_Basics/check_env.py` puts 01_Basics on sys.path, not the repository root
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

REQUIRED = ("torch", "numpy", "tokenizers", "transformers", "common")
OPTIONAL = (
    "transformers", "tokenizers", "datasets", "accelerate", "peft", "trl",
    "deepspeed", "torchtune", "unsloth",
)  # fmt: skip


def missing_required(names) -> list[str]:
    """Import each required module; return 'name: reason' for those that fail."""
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # an ImportError, or a broken install failing on import
            missing.append(f"{name}: {type(e).__name__}: {e}")
    return missing


def package_version(name: str) -> str:
    """Installed version from the package metadata, without importing it (some are slow)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def torch_report() -> list[str]:
    import torch

    lines = [f"torch        {torch.__version__}"]
    lines.append(f"CUDA build   {torch.version.cuda or 'none (CPU-only torch)'}")
    if torch.version.cuda:
        nccl = torch.cuda.nccl.version() if torch.distributed.is_nccl_available() else None
        lines.append(f"NCCL         {'.'.join(map(str, nccl)) if nccl else 'not available'}")
    lines.append(f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    lines.append(f"GPUs usable by torch: {n}")
    for i in range(n):
        p = torch.cuda.get_device_properties(i)
        bf16 = "yes" if p.major >= 8 else "no (before Ampere: use fp16)"
        lines.append(
            f"  cuda:{i} {p.name} | compute capability {p.major}.{p.minor} | "
            f"{p.total_memory / 2**30:.1f} GiB | bf16 {bf16}"
        )
    device = torch.device("cuda", 0) if n else torch.device("cpu")
    from common.precision import choose_precision

    lines.append(f"precision    auto on {device} -> {choose_precision('auto', device).name}")
    return lines


def main() -> int:
    print(f"python       {platform.python_version()} ({sys.executable})")
    print(f"host         {platform.node()} ({platform.machine()}, {os.cpu_count()} CPUs)")
    missing = missing_required(REQUIRED)
    if not any(m.startswith("torch:") for m in missing):
        try:
            print("\n".join(torch_report()))
        except Exception as e:
            missing.append(f"common.precision: {type(e).__name__}: {e}")
    gpu_error = None
    if not missing:
        from common.distributed import pick_device
        from common.errors import UserError

        requested = os.environ.get("LLM_DEVICE", "auto")
        try:
            print(f"device       {requested} -> {pick_device(requested, 0)}")
        except UserError as e:
            gpu_error = str(e)
    print("packages:")
    for name in OPTIONAL:
        print(f"  {name:<13}{package_version(name)}")
    if missing:
        print("\nMISSING (required):", *missing, sep="\n  ", file=sys.stderr)
        print("Set up the environment: bash scripts/setup.sh (see 01_Basics/README.md)", file=sys.stderr)
        return 1
    if gpu_error:
        print(f"\nGPU ERROR: {gpu_error}", file=sys.stderr)
        return 1
    print("environment OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
