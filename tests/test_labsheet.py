"""The chapter-03 lab sheet (common/labsheet.py): its table shows exactly what the runs' summary.json say.

One real 1-process training (ddp.py, tiny preset, 5 steps, activation checkpointing on) in this process;
a GPU-style summary is derived from it by changing only the device fields, to check the MFU rescaling
and the nodes x GPUs column, which a CPU run cannot show.
"""

import itertools
import json
import re
import shlex
import shutil

import pytest
from testutil import ROOT, load_script

from common import labsheet
from common.config import load_config, make_config

ddp = load_script("03_LLM_Training_on_GPU/ddp.py")


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
    d = tmp_path_factory.mktemp("labsheet")
    cfg = make_config(
        preset="tiny",
        max_steps=5,
        batch_size=8,
        micro_batch_size=2,
        seq_len=64,
        eval_batches=1,
        sample_tokens=0,
        progress=False,
        final_checkpoint=False,
        activation_checkpointing="full",
        data_dir=str(data_dir),
        out_dir=str(d / "ddp-cpu-ac"),
    )
    summary = ddp.main(cfg)
    return d / "ddp-cpu-ac", summary


def cells(table: str, run_name: str) -> dict[str, str]:
    """The row of ``run_name`` as {column header: cell text}."""
    header, _, *rows = table.splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    for row in rows:
        values = [c.strip() for c in row.strip("|").split("|")]
        if values[0] == run_name:
            return dict(zip(names, values))
    raise AssertionError(f"no row for {run_name} in\n{table}")


def number(cell: str) -> float:
    return float(cell.rstrip("%").replace(",", ""))


def test_table_equals_the_summary(run, tmp_path, capsys):
    folder, summary = run
    unfinished = tmp_path / "ddp-unfinished"
    unfinished.mkdir()
    (unfinished / "log.jsonl").write_text("")  # a job that started but wrote no summary yet
    assert labsheet.main([str(folder), str(unfinished)]) == 1  # a skipped folder: exit status 1
    out, err = capsys.readouterr()
    assert err == f"skipped: {unfinished}: no summary.json (still running or stopped early)\n"
    row = cells(out, folder.name)
    assert (row["strategy"], row["nodes x GPUs"], row["device"], row["precision"], row["AC"]) == (
        summary["strategy"],
        "1 x 1",
        "cpu",
        summary["precision"],
        "full",
    )
    assert row["micro-batch (x accum.)"] == "2 (x4)"  # --batch-size 8 on one process in micro-batches of 2
    # the cells are the summary's numbers rounded as printed: 0 decimals, 0.1 percentage point, 0.01 GiB
    assert abs(number(row["tokens/s"]) - summary["tokens_per_s"]) <= 0.5
    assert row["MFU (data sheet)"] == "n/a"  # a CPU has no data-sheet peak
    assert abs(number(row["MFU (measured peak)"]) - 100 * summary["mfu"]) <= 0.05
    assert abs(number(row["peak memory (GiB)"]) - summary["peak_memory_bytes"] / 2**30) <= 0.005


def test_gpu_summary_gives_both_mfus_and_the_node_layout(run, tmp_path):
    """8 processes on 2 nodes of 4 A100s: the summary's MFU is against the data sheet (312 TFLOP/s bf16), the
    second one is rescaled to the measured peak. Only device fields are changed; the numbers stay the run's."""
    folder, summary = run
    gpu = tmp_path / "ddp-a100-2n"
    shutil.copytree(folder, gpu)
    s = {
        **json.loads((folder / "summary.json").read_text()),
        "device": "cuda",
        "device_name": "NVIDIA A100-SXM4-80GB",
        "precision": "bf16",
        "world_size": 8,
        "local_world_size": 4,
        "peak_tflops_per_device": 312.0,
        "measured_peak_tflops": 260.0,
    }
    (gpu / "summary.json").write_text(json.dumps(s))
    r = labsheet.read_run(gpu)
    assert (r.nodes, r.procs_per_node, r.device_name, r.precision) == (2, 4, "NVIDIA A100-SXM4-80GB", "bf16")
    assert r.mfu_datasheet == summary["mfu"]
    assert r.mfu_measured == pytest.approx(summary["mfu"] * 312.0 / 260.0, rel=1e-12)  # float rounding only
    assert r.micro_batch == 1 and r.accum_steps == 1  # batch 8 over 8 data-parallel processes
    row = cells(labsheet.markdown([r]), gpu.name)
    assert row["nodes x GPUs"] == "2 x 4" and row["device"] == "NVIDIA A100-SXM4-80GB"
    del s["local_world_size"]  # a summary written before the trainer recorded it: say what is known
    (gpu / "summary.json").write_text(json.dumps(s))
    assert cells(labsheet.markdown([labsheet.read_run(gpu)]), gpu.name)["nodes x GPUs"] == "8 in all"


def test_a_folder_that_is_not_a_run_is_one_line(tmp_path, capsys):
    assert labsheet.main([str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert err == f"skipped: {tmp_path}: no summary.json (not a run folder)\n"
    assert len(out.splitlines()) == 2  # header and separator, no row


def test_every_lab_cell_is_one_valid_job():
    """LAB.md's sbatch lines: an existing template, ddp.py flags that parse, distinct job names (= run folders),
    8 sequences per GPU, and exactly the 16 cells {A100, V100} x {1, 2, 4 GPUs, 2 nodes x 4} x {AC off, on}."""
    text = (ROOT / "03_LLM_Training_on_GPU" / "LAB.md").read_text()
    shared = re.search(r'^   L="(.*)"$', text, re.MULTILINE).group(1)
    names, cells = set(), set()
    for line in (x for x in text.splitlines() if x.startswith("01_Basics/submit.sh")):
        words = shlex.split(line.replace("$L", shared))  # $L is unquoted in the commands: split like the shell
        t = next(i for i, w in enumerate(words) if w.endswith(".slurm"))
        opts = dict(w[2:].split("=", 1) for w in words[1:t] if w != "--v100")
        assert (ROOT / words[t]).is_file(), words[t]
        cfg = load_config(words[t + 1 :])
        nodes, per_node = int(opts.get("nodes", 1)), int(opts["gpus-per-node"])
        assert words[t].endswith("_multinode.slurm") == (nodes > 1), line
        assert (cfg.preset, cfg.micro_batch_size, cfg.batch_size) == ("gpt2-small", 8, 8 * nodes * per_node), line
        names.add(opts["job-name"])
        cells.add(("v100" if "--v100" in words else "a100", nodes, per_node, cfg.activation_checkpointing))
    layouts = [(1, 1), (1, 2), (1, 4), (2, 4)]
    expected = {(g, n, k, ac) for g, (n, k), ac in itertools.product(["a100", "v100"], layouts, ["none", "full"])}
    assert cells == expected and len(names) == len(expected)
