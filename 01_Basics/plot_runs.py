"""Loss curves of several runs side by side, e.g. the tasks of a job array (03_LLM_Training_on_GPU/sweep.slurm).

    python 01_Basics/plot_runs.py runs/sweep-1234_* --out sweep.png

Reads each run folder's ``log.jsonl`` (one line per logged step) and ``config.toml``; one panel per run, same
y axis, titled with the settings that differ between the runs (seed, lr, ...), and a last panel with all
curves on top of each other. Prints the final loss of each run.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import tomllib

IGNORED = {"out_dir", "resume", "data_dir"}


def read_run(path: Path) -> tuple[list[int], list[float], dict]:
    steps, losses = [], []
    for line in (path / "log.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row and "step" in row:
            steps.append(row["step"])
            losses.append(row["loss"])
    cfg_file = path / "config.toml"
    cfg = tomllib.loads(cfg_file.read_text()) if cfg_file.exists() else {}
    return steps, losses, cfg


def differing(configs: list[dict]) -> list[str]:
    keys = sorted({k for c in configs for k in c if not isinstance(c[k], dict)} - IGNORED)
    return [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with log.jsonl)")
    p.add_argument("--out", default="runs.png", help="image to write (default: runs.png)")
    a = p.parse_args(argv)
    runs = [r for r in a.runs if (r / "log.jsonl").exists()]
    missing = [str(r) for r in a.runs if r not in runs]
    if missing:
        print(f"skipped (no log.jsonl): {' '.join(missing)}", file=sys.stderr)
    if not runs:
        print("error: none of the folders has a log.jsonl", file=sys.stderr)
        return 1
    data = [read_run(r) for r in runs]
    keys = differing([cfg for _, _, cfg in data])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(3.2 * (len(runs) + 1), 3), sharey=True, squeeze=False)
    for ax, run, (steps, losses, cfg) in zip(axes[0], runs, data):
        label = ", ".join(f"{k}={cfg.get(k)}" for k in keys) or run.name
        ax.plot(steps, losses)
        ax.set_title(f"{run.name}\n{label}", fontsize=8)
        ax.set_xlabel("step")
        axes[0][-1].plot(steps, losses, label=label)
        print(f"{run.name:<28} {label:<30} final loss {losses[-1]:.4f} at step {steps[-1]}")
    axes[0][0].set_ylabel("training loss")
    axes[0][-1].set_title("all runs", fontsize=8)
    axes[0][-1].set_xlabel("step")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
