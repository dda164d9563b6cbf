"""Every notebook in the repository runs headless, top to bottom, in its own folder.

Read along without running: ``docs/executed/`` holds executed copies of the chapter-02 notebooks (outputs and
figures visible on GitHub). One command regenerates them from a run of exactly the committed notebooks:

    NB_WRITE_EXECUTED=docs/executed .venv/bin/python -m pytest tests/test_notebooks.py -k 02_Notebook

``test_executed_copies_are_fresh`` fails when a notebook's cells differ from its executed copy's.

Exercises: a code cell tagged ``exercise`` holds the stub, the next one tagged ``exercise-check`` (and
``raises-exception``, so the headless run goes on) its check; the solution lives in
``<chapter>/solutions/<notebook>.py``. ``test_exercise_check_fails_unsolved_and_passes_solved`` proves both.
"""

import datetime
import os
import platform
import re
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "node_modules", "runs", "data", "logs", ".ipynb_checkpoints", "executed"}
NOTEBOOKS = sorted(
    p.relative_to(REPO).as_posix()
    for p in REPO.rglob("*.ipynb")
    if not SKIP_DIRS.intersection(p.relative_to(REPO).parts[:-1])
    and not p.relative_to(REPO).parts[0].startswith(".venv")  # .venv-torchtune, .venv-unsloth (04_Finetuning)
)
EXECUTED = REPO / "docs" / "executed"
REGENERATE = "NB_WRITE_EXECUTED=docs/executed .venv/bin/python -m pytest tests/test_notebooks.py"
READ_ALONG = [n for n in NOTEBOOKS if n.startswith("02_Notebook_Parallelism/")]  # the concept notebooks


def test_notebooks_are_found():
    assert "01_Basics/00_environment.ipynb" in NOTEBOOKS
    assert "02_Notebook_Parallelism/00b_collectives.ipynb" in NOTEBOOKS  # collectives 101, before notebook 01


def cells_of(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source) for c in nb.cells]


def write_executed(nb, notebook: str, out_dir: str, seconds: float) -> None:
    """Save the executed notebook with where and when it ran (for the read-along copies)."""
    nbformat = pytest.importorskip("nbformat")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    nb.metadata["executed"] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "seconds": round(seconds),
        "machine": f"{len(os.sched_getaffinity(0))} cores, {platform.machine()}, {platform.system()}",
    }
    target = Path(out_dir) / notebook
    target.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs(notebook, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (test dependency)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (test dependency)")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (test dependency)")
    path = REPO / notebook
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed notebooks carry no outputs
        assert not cell.get("outputs"), f"{notebook}: clear the outputs before committing"
    monkeypatch.setenv("NB_IMAGES_DIR", str(tmp_path / "images"))  # keep the committed figures untouched
    # per cell; notebook 00's GPT race trains 800 steps (about a minute quiet, 4 minutes seen at load ~10)
    timeout = 900 if notebook.endswith("00_from_text_to_tokens.ipynb") else 300
    client = nbclient.NotebookClient(
        nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    t0 = time.perf_counter()
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    for cell in nb.cells:  # an unsolved exercise's check must fail (and only there may a cell fail)
        if "exercise-check" in cell.metadata.get("tags", []):
            assert any(o.get("output_type") == "error" for o in cell.outputs), f"{notebook}: exercise check passed"
    if os.environ.get("NB_WRITE_EXECUTED") and notebook in READ_ALONG:
        write_executed(nb, notebook, os.environ["NB_WRITE_EXECUTED"], time.perf_counter() - t0)
    # every figure the notebook saves for the READMEs (savefig(fig, "name")) was written, as a PNG
    names = re.findall(r'savefig\(\w+, "([\w-]+)"\)', "".join(c.source for c in nb.cells if c.cell_type == "code"))
    if notebook.startswith("02_Notebook_Parallelism/"):
        assert names, f"{notebook} saves no figure for the READMEs"
    for name in names:
        png = tmp_path / "images" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{notebook}: {png.name}"


@pytest.mark.parametrize("notebook", READ_ALONG)
def test_executed_copies_are_fresh(notebook):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (test dependency)")
    copy = EXECUTED / notebook
    regenerate = f"{REGENERATE} -k {Path(notebook).stem}"
    assert copy.exists(), f"no executed copy of {notebook}: {regenerate}"
    executed = nbformat.read(copy, as_version=4)
    assert cells_of(executed) == cells_of(nbformat.read(REPO / notebook, as_version=4)), (
        f"docs/executed/{notebook} is stale (the notebook changed since it ran): {regenerate}")  # fmt: skip
    assert any(c.get("outputs") for c in executed.cells), f"docs/executed/{notebook} has no outputs"
    assert "commit" in executed.metadata.get("executed", {}), "executed copies record date, commit and machine"


EXERCISES = [n for n in NOTEBOOKS if '"exercise-check"' in (REPO / n).read_text()]


def test_there_are_exercises():
    """Every concept notebook ends with at least one 'your turn' exercise (proven below)."""
    missing = [n for n in READ_ALONG if n not in EXERCISES]
    assert len(READ_ALONG) >= 10 and not missing, f"concept notebooks without a 'your turn' exercise: {missing}"


@pytest.mark.parametrize("notebook", EXERCISES)
def test_exercise_check_fails_unsolved_and_passes_solved(notebook):
    """The check cell raises with the stub the notebook ships, and passes with the solution file's code."""
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (test dependency)")
    nb = nbformat.read(REPO / notebook, as_version=4)
    tagged = lambda tag: [c for c in nb.cells if tag in c.metadata.get("tags", [])]
    stubs, checks = tagged("exercise"), tagged("exercise-check")
    assert len(stubs) == len(checks) >= 1 and all("raises-exception" in c.metadata["tags"] for c in checks)
    solution = (REPO / notebook).parent / "solutions" / f"{Path(notebook).stem}.py"
    assert solution.exists(), f"{notebook}: no solution file {solution.relative_to(REPO)}"
    for stub, check in zip(stubs, checks):
        unsolved: dict = {"__name__": "exercise"}
        exec("import torch\n" + stub.source, unsolved)  # the exercises are self-contained (simulated ranks)
        with pytest.raises((AssertionError, NotImplementedError)):  # what an unsolved check raises
            exec(check.source, unsolved)
        solved: dict = {"__name__": "exercise"}
        exec(solution.read_text(), solved)
        exec(check.source, solved)
