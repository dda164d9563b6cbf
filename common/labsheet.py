"""The chapter-03 lab sheet: one Markdown table row per run folder, from its summary.json and config.toml.

    python -m common.labsheet runs/*                       # the filled table of every finished run
    python -m common.labsheet runs/lab-* -o lab_table.md   # also written to a file
A folder without summary.json (a job still running, one that crashed, not a run folder) gets one line
on stderr and no row; the exit status is then 1, after the table of the others.

Columns: the run folder, strategy, nodes x GPUs per node (CPU: processes per node; "N in all" when the
summary has no ``local_world_size``), device name, precision,
activation checkpointing, the micro-batch each process runs (x gradient-accumulation steps), tokens/s,
MFU against the data-sheet peak and against the matmul peak measured at start (GPU: both; CPU: only
the measured one exists), and the peak memory of the most loaded process in GiB (allocated GPU
memory, or resident memory of a CPU process).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import tomllib

GIB = 2**30


@dataclass
class Row:
    run: str  # folder name
    strategy: str  # summary "strategy": ddp, fsdp, zero2, ...
    nodes: int | None  # None: the summary does not say how many processes ran per node
    procs_per_node: int | None
    world_size: int
    device_name: str
    precision: str
    ac: str  # activation checkpointing: none, full, selective
    micro_batch: int  # sequences per forward pass per process
    accum_steps: int  # micro-batches per optimizer step per process
    tokens_per_s: float
    mfu_datasheet: float | None  # against the vendor's peak (GPU); None on CPU or for an unknown GPU
    mfu_measured: float | None  # against the matmul peak the run measured
    peak_memory_gib: float


def data_parallel(summary: dict) -> int:
    """Data-parallel replicas, the processes that split the global batch (as each chapter script sets up)."""
    if summary["strategy"] in ("tp", "pp"):
        return 1
    if "fsdp_tp" in summary:
        return summary["fsdp_tp"]["dp"]
    return summary["world_size"]


def read_run(folder: Path) -> Row:
    """One row from ``folder/summary.json`` and ``folder/config.toml``; FileNotFoundError with a readable message."""
    if not (folder / "summary.json").is_file():
        what = "still running or stopped early" if (folder / "log.jsonl").is_file() else "not a run folder"
        raise FileNotFoundError(f"{folder}: no summary.json ({what})")
    s = json.loads((folder / "summary.json").read_text())
    cfg = tomllib.loads((folder / "config.toml").read_text()) if (folder / "config.toml").is_file() else {}
    per_rank = cfg.get("batch_size", 0) // data_parallel(s)
    micro = max(
        (d for d in range(1, per_rank + 1) if per_rank % d == 0 and d <= cfg.get("micro_batch_size", 0)), default=0
    )  # as common.run.Run.micro_batch
    world, local = s["world_size"], s.get("local_world_size", 1 if s["world_size"] == 1 else None)
    cuda, mfu = s["device"] == "cuda", s["mfu"]
    if cuda:  # the summary's MFU is against the data sheet (or --peak-tflops); rescale to the measured peak
        datasheet = mfu if not cfg.get("peak_tflops") else None
        measured_peak = s.get("measured_peak_tflops")
        measured = mfu * s["peak_tflops_per_device"] / measured_peak if mfu and measured_peak else None
    else:  # CPU: the peak is a matmul measured at start, there is no data sheet
        datasheet, measured = None, mfu
    return Row(
        run=folder.name,
        strategy=s["strategy"],
        nodes=world // local if local else None,
        procs_per_node=local,
        world_size=world,
        device_name=s["device_name"],
        precision=s["precision"],
        ac=cfg.get("activation_checkpointing", "?"),
        micro_batch=micro,
        accum_steps=per_rank // micro if micro else 0,
        tokens_per_s=s["tokens_per_s"],
        mfu_datasheet=datasheet,
        mfu_measured=measured,
        peak_memory_gib=s["peak_memory_bytes"] / GIB,
    )


def _pct(x: float | None) -> str:
    return f"{100 * x:.1f}%" if x is not None else "n/a"


def markdown(rows: list[Row]) -> str:
    lines = [
        "| run | strategy | nodes x GPUs | device | precision | AC | micro-batch (x accum.) | tokens/s "
        "| MFU (data sheet) | MFU (measured peak) | peak memory (GiB) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        layout = f"{r.nodes} x {r.procs_per_node}" if r.nodes else f"{r.world_size} in all"
        lines.append(
            f"| {r.run} | {r.strategy} | {layout} | {r.device_name} | {r.precision} | {r.ac} | "
            f"{r.micro_batch} (x{r.accum_steps}) | {r.tokens_per_s:,.0f} | {_pct(r.mfu_datasheet)} | "
            f"{_pct(r.mfu_measured)} | {r.peak_memory_gib:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (the --out-dir of each training)")
    p.add_argument("-o", "--out", type=Path, help="also write the table to this file")
    a = p.parse_args(argv)
    rows, missing = [], 0
    for folder in a.runs:
        try:
            rows.append(read_run(folder))
        except FileNotFoundError as e:
            print(f"skipped: {e}", file=sys.stderr)
            missing += 1
    ac_order = {"none": 0, "selective": 1, "full": 2}
    rows.sort(key=lambda r: (r.device_name, r.strategy, r.world_size, ac_order.get(r.ac, 3), r.run))
    table = markdown(rows)
    print(table)
    if a.out:
        a.out.write_text(table + "\n")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
