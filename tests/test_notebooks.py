"""Every notebook in the repository runs headless, top to bottom, in its own folder."""

import re
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
    assert "02_Notebook_Parallelism/00b_collectives.ipynb" in NOTEBOOKS  # collectives 101, before notebook 01


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
    client = nbclient.NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback
    # every figure the notebook saves for the READMEs (savefig(fig, "name")) was written, as a PNG
    names = re.findall(r'savefig\(\w+, "([\w-]+)"\)', "".join(c.source for c in nb.cells if c.cell_type == "code"))
    if notebook.startswith("02_Notebook_Parallelism/"):
        assert names, f"{notebook} saves no figure for the READMEs"
    for name in names:
        png = tmp_path / "images" / f"{name}.png"
        assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{notebook}: {png.name}"
