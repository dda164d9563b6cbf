"""Every notebook in the repository runs headless, top to bottom, in its own folder."""

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SKIP_DIRS = {".git", ".venv", "node_modules", "runs", "data", "logs", ".ipynb_checkpoints"}
NOTEBOOKS = sorted(
    p.relative_to(REPO).as_posix()
    for p in REPO.rglob("*.ipynb")
    if not SKIP_DIRS.intersection(p.relative_to(REPO).parts[:-1])
    and not p.relative_to(REPO).parts[0].startswith(".venv")  # .venv-torchtune, .venv-unsloth (04_Finetuning)
)


def test_notebooks_are_found():
    assert "01_Basics/00_environment.ipynb" in NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS)
def test_notebook_runs(notebook):
    nbformat = pytest.importorskip("nbformat", reason="nbformat not installed (test dependency)")
    nbclient = pytest.importorskip("nbclient", reason="nbclient not installed (test dependency)")
    pytest.importorskip("ipykernel", reason="ipykernel not installed (test dependency)")
    path = REPO / notebook
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:  # committed notebooks carry no outputs
        assert not cell.get("outputs"), f"{notebook}: clear the outputs before committing"
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
