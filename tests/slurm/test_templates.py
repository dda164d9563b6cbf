"""Every sbatch template in the repository, found automatically, is checked without running it:
static rules (fresh clone, no site paths, bash syntax) and `sbatch --test-only` on both partitions."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SKIP_DIRS = {".git", ".venv", "node_modules", "logs", "runs", "data", "__pycache__"}
PARTITIONS = ("a100", "v100")


def find_templates() -> list[str]:
    """All *.slurm files, tracked or not (a new template cannot escape), outside build dirs."""
    found = []
    for path in REPO.rglob("*.slurm"):
        rel = path.relative_to(REPO)
        if not SKIP_DIRS.intersection(rel.parts[:-1]) and not rel.parts[0].startswith(".venv"):
            found.append(rel.as_posix())
    return sorted(found)


TEMPLATES = find_templates()
KNOWN = {
    "01_Basics/hello.slurm", "01_Basics/allreduce.slurm", "01_Basics/jupyter.slurm",
    "03_LLM_Training_on_GPU/ddp.slurm", "03_LLM_Training_on_GPU/ddp_multinode.slurm",
}  # fmt: skip


def sbatch_options(text: str) -> dict[str, str]:
    opts = {}
    for m in re.finditer(r"^#SBATCH\s+--([\w-]+)(?:[= ](\S+))?", text, re.M):
        opts[m.group(1)] = m.group(2) or ""
    return opts


def test_discovery_finds_the_known_templates():
    assert KNOWN <= set(TEMPLATES), f"discovered {TEMPLATES}"


@pytest.mark.parametrize("template", TEMPLATES)
def test_template_rules(template):
    text = (REPO / template).read_text()
    assert text.startswith("#!/bin/bash"), "sbatch needs a shebang on line 1"
    assert not re.search(r"^(<<<<<<<|=======|>>>>>>>)( |$)", text, re.M), "merge markers"
    assert not re.search(r"/(home|scratch|fsx|work|gpfs|lustre)/\w", text), "site or user path"
    assert "/tmp/venv" not in text
    opts = sbatch_options(text)
    for key in ("job-name", "partition", "time", "output"):
        assert key in opts, f"#SBATCH --{key} missing"
    # Slurm does not create the --output directory: it must exist in a fresh clone
    out_dir = Path(opts["output"]).parent
    if str(out_dir) != ".":
        tracked = subprocess.run(["git", "ls-files", str(out_dir)], cwd=REPO,
                                 capture_output=True, text=True).stdout  # fmt: skip
        assert tracked.strip() or not (REPO / ".git").exists(), (
            f"--output directory {out_dir}/ has no tracked file (add {out_dir}/.gitkeep)"
        )
        assert (REPO / out_dir).is_dir()
    r = subprocess.run(["bash", "-n", template], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # scripts the template runs must exist
    for script in re.findall(r"(\d\d_[\w.-]+/[\w./-]+\.(?:py|sh))", text):
        assert (REPO / script).exists(), f"{template} calls {script}, which does not exist"


@pytest.mark.parametrize("partition", PARTITIONS)
@pytest.mark.parametrize("template", TEMPLATES)
def test_sbatch_test_only(cluster, template, partition):
    """The template's own header is accepted by Slurm on both partitions (GPU type per partition)."""
    r = subprocess.run(["sbatch", "--test-only", "-p", partition, template],
                       cwd=cluster.sandbox, env=cluster.env, capture_output=True, text=True,
                       timeout=30)  # fmt: skip
    assert r.returncode == 0, f"sbatch --test-only -p {partition} {template}:\n{r.stderr}"
    assert f"in partition {partition}" in r.stderr, r.stderr


def test_test_only_rejects_what_a_real_cluster_rejects(cluster):
    """The local cluster is strict like a real one, so the checks above mean something."""
    bad = [
        ["--gres=gpu:a100:1", "-p", "v100"],  # no A100 in the v100 partition
        ["--gpus-per-node=8"],  # 4 GPUs per node
        ["--time=3-00:00:00"],  # over the partition's MaxTime
    ]
    for extra in bad:
        r = subprocess.run(["sbatch", "--test-only", *extra, "01_Basics/hello.slurm"],
                           cwd=cluster.sandbox, env=cluster.env, capture_output=True, text=True,
                           timeout=30)  # fmt: skip
        assert r.returncode != 0, f"accepted {extra}: {r.stderr}"


def test_activate_env_without_environment_is_a_clear_error(tmp_path):
    """No $LLM_VENV, no .venv, no conda: the job stops with instructions, not a crash later."""
    script = f"set -euo pipefail; source {REPO}/01_Basics/activate_env.sh; echo reached"
    env = {"PATH": "/usr/bin:/bin", "SLURM_SUBMIT_DIR": str(tmp_path), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "reached" not in r.stdout
    assert f"no .venv in {tmp_path}" in r.stderr and "conda env create -f environment.yml" in r.stderr


def test_activate_env_uses_llm_venv(tmp_path):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/activate").write_text('export PATH="$(dirname "${BASH_SOURCE[0]}"):$PATH"\n')
    (venv / "bin/python").symlink_to("/usr/bin/env")  # any executable named python
    script = f"set -euo pipefail; source {REPO}/01_Basics/activate_env.sh; command -v python"
    env = {"PATH": "/usr/bin:/bin", "LLM_VENV": str(venv), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"{venv}/bin/python")
