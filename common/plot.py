"""Loss curves of one or several runs, from their log.jsonl (works while a job is still writing it).

    python -m common.plot runs/ddp-tiny                         # -> runs/ddp-tiny/curves.png
    python -m common.plot runs/sweep-*/ -o sweep.png            # several runs side by side, one figure
Runs are labelled by the config values that differ between them (a sweep's seed and lr), else by folder.

Each run is one line (training loss per step) plus its validation points; a run that was restarted
(torchrun --max-restarts, Slurm requeue) shows the steps it repeated with a marker per restart.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def read_log(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/log.jsonl``; a half-written last line (the job is running) is skipped."""
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: is {run_dir} a run folder (--out-dir of a training)?")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def labels(run_dirs: list[str | Path]) -> list[str]:
    """Each run named by the config values that differ between the runs (a sweep: "seed=2 lr=0.001"),
    else by its folder name."""
    import tomllib

    configs = []
    for run in run_dirs:
        path = Path(run) / "config.toml"
        configs.append(tomllib.loads(path.read_text()) if path.is_file() else {})
    keys = sorted({k for c in configs for k in c if k not in ("out_dir", "resume", "overwrite")
                   and len({repr(c2.get(k)) for c2 in configs}) > 1})
    if len(run_dirs) < 2 or not keys:
        return [Path(run).resolve().name for run in run_dirs]
    return [" ".join(f"{k}={c.get(k)}" for k in keys) for c in configs]


def plot_runs(run_dirs: list[str | Path], out: str | Path, title: str = "") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, axv) = plt.subplots(1, 2, figsize=(11, 4))
    for run, label in zip(run_dirs, labels(run_dirs)):
        recs = read_log(run)
        line, = ax.plot([r["step"] for r in recs], [r["loss"] for r in recs], lw=1, label=label)
        val = [r for r in recs if r.get("val_loss") is not None]
        axv.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color=line.get_color(), label=label)
        restarts = [r for a, r in zip(recs, recs[1:]) if r.get("restart", 0) > a.get("restart", 0)]
        ax.plot([r["step"] for r in restarts], [r["loss"] for r in restarts], "x", color=line.get_color(), ms=9)
    for a, name in ((ax, "training loss"), (axv, "validation loss")):
        a.set(xlabel="step", ylabel=name, title=title or name)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return Path(out)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (each with a log.jsonl)")
    p.add_argument("-o", "--out", help="PNG to write (default: <first run>/curves.png)")
    p.add_argument("--title", default="")
    a = p.parse_args(argv)
    try:
        out = plot_runs(a.runs, a.out or Path(a.runs[0]) / "curves.png", a.title)
    except FileNotFoundError as e:
        raise SystemExit(f"error: {e}") from None
    print(out)
    return out


if __name__ == "__main__":
    main()
