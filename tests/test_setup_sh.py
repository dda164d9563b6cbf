"""scripts/setup.sh and the chapter-04 setup scripts: explicit targets, Python >= 3.11, stale venvs — checked
cheaply with --dry-run and a fake old python3 (nothing is installed)."""

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["scripts/setup.sh", "04_Finetuning/torchtune/setup.sh", "04_Finetuning/unsloth/setup.sh"]


def run(script, *args, **env):
    e = {k: v for k, v in os.environ.items() if not k.startswith("LLM_")}
    e.update(env)
    return subprocess.run(["bash", str(REPO / script), *args], capture_output=True, text=True, timeout=60, env=e)


def fake_python(tmp_path, version="3.6.8") -> Path:
    """A python3 that reports an old version, as AlmaLinux 8's does."""
    major, minor, micro = version.split(".")
    py = tmp_path / "python3"
    py.write_text(f"#!/bin/sh\ncase \"$*\" in\n  *version_info*'<'*) exit 1;;\n"
                  f"  *version_info*) echo {version};;\n  *) exit 1;;\nesac\n")  # fmt: skip
    py.chmod(0o755)
    return py


@pytest.mark.parametrize("script", SCRIPTS)
def test_explicit_cuda_target_on_a_machine_without_gpu(script):
    """A login node without GPU builds the environment of the GPU nodes when told so."""
    r = run(script, "--dry-run", "--cuda", "cu126")
    assert r.returncode == 0, r.stderr
    assert "target cu126 (--cuda cu126)" in r.stdout and "whl/cu126" in r.stdout, r.stdout
    r = run(script, "--dry-run", "--cpu")
    assert r.returncode == 0 and "target cpu (--cpu)" in r.stdout and "whl/cpu" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_bad_arguments_are_refused(script):
    r = run(script, "--cuda", "12.6")
    assert r.returncode == 2 and "--cuda needs a CUDA tag such as cu126" in r.stderr
    r = run(script, "--gpu")
    assert r.returncode == 2 and "unknown option --gpu" in r.stderr and "--cuda cu126" in r.stderr


def test_auto_is_cpu_without_nvidia_smi():
    r = run("scripts/setup.sh", "--dry-run", "test", PATH="/usr/bin:/bin:" + os.path.dirname(os.environ.get(
        "PYTHON", "/usr/bin/python3")))  # fmt: skip
    if "needs Python" in r.stderr:
        pytest.skip("no Python >= 3.11 on /usr/bin:/bin here")
    assert r.returncode == 0 and "target cpu (auto: no GPU here" in r.stdout and "with [test]" in r.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_old_python_is_refused_with_the_way_out(script, tmp_path):
    r = run(script, "--dry-run", "--cpu", PYTHON=str(fake_python(tmp_path)))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "needs Python 3.11 or newer" in r.stderr and "is 3.6.8" in r.stderr
    assert "module load python" in r.stderr and "conda create" in r.stderr


def test_a_venv_made_by_an_old_python_is_recreated(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").symlink_to(fake_python(tmp_path))
    r = run("scripts/setup.sh", "--dry-run", "--cpu", LLM_VENV=str(venv))
    assert r.returncode == 0, r.stderr
    assert f"would recreate {venv}: it was made by Python 3.6.8" in r.stdout


def test_pyproject_requires_311():
    assert 'requires-python = ">=3.11"' in (REPO / "pyproject.toml").read_text()
