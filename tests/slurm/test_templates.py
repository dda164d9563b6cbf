"""Every sbatch template in the repository, found automatically, is checked without running it:
static rules (fresh clone, no site paths, bash syntax, the common job setup), `sbatch --test-only` on both
partitions, and the site check (01_Basics/site_check.sh) with the shipped profile and a second site's."""


import re
import subprocess
import sys
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
    # Slurm does not create the --output directory, and a relative one is relative to wherever the user
    # submits from: the log goes straight into the submit directory
    assert "/" not in opts["output"] and opts["output"].startswith("%x-"), opts["output"]
    assert "%a" in opts["output"] if "array" in opts else "%j" in opts["output"]
    # the common setup: finds the clone from the submitted path, loads the site profile, activates
    assert 'source "$LLM_REPO/01_Basics/job_env.sh"' in text
    assert "SLURM_GPUS_ON_NODE:-1" not in text, "NPROC comes from job_env.sh (it counts GPUs)"
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
    (venv / "bin/python").symlink_to(sys.executable)  # a Python >= 3.11 named python
    script = f"set -euo pipefail; source {REPO}/01_Basics/activate_env.sh; command -v python"
    env = {"PATH": "/usr/bin:/bin", "LLM_VENV": str(venv), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().endswith(f"{venv}/bin/python")


def test_activate_env_refuses_an_old_python(tmp_path):
    """A .venv made by AlmaLinux 8's python3 (3.6) stops the job with the way out, instead of failing later."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/activate").write_text('export PATH="$(dirname "${BASH_SOURCE[0]}"):$PATH"\n')
    (venv / "bin/python").write_text("#!/bin/sh\ncase \"$*\" in *platform*) echo 3.6.8;; *) exit 1;; esac\n")
    (venv / "bin/python").chmod(0o755)
    script = f"set -euo pipefail; source {REPO}/01_Basics/activate_env.sh; echo reached"
    env = {"PATH": "/usr/bin:/bin", "LLM_VENV": str(venv), "HOME": str(tmp_path)}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "reached" not in r.stdout
    assert "is Python 3.6.8, this project needs 3.11 or newer" in r.stderr and "module load" in r.stderr


def site_check(cluster, profile: str | None, **extra):
    env = {**cluster.env, **extra}
    env.pop("LLM_SITE", None)
    if profile:
        env["LLM_SITE"] = profile
    return subprocess.run(["bash", "01_Basics/site_check.sh"], cwd=cluster.sandbox, env=env,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def test_site_check_accepts_every_template_with_both_profiles(cluster):
    """The shipped profile (partitions a100/v100) and a second site's (gpu_a100/gpu_v100, an account, a
    reservation, --mem): every template accepted on both GPU types, without editing a template."""
    for profile, parts in ((None, ("a100", "v100")), ("01_Basics/sites/local-ci.env", ("gpu_a100", "gpu_v100"))):
        r = site_check(cluster, profile)
        out = r.stdout + r.stderr
        assert r.returncode == 0, out
        assert f"site check: all {len(TEMPLATES)} templates accepted on a100 v100" in out, out
        for part in parts:
            assert f": {part}" in out, out  # sinfo found the partition
        rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[0] in TEMPLATES]
        assert len(rows) == len(TEMPLATES) and all(line.split()[1:] == ["ok", "ok"] for line in rows), out
    assert "reservation=llm_course" in out and "account=llm_course" in out


def test_site_check_reports_a_wrong_profile(cluster):
    r = site_check(cluster, "01_Basics/sites/local-ci.env", LLM_RESERVATION="llm_cuorse", LLM_PARTITION_V100="")
    out = r.stdout + r.stderr
    assert r.returncode == 1 and "REJECTED" in out and "v100: none in the profile" in out, out
    assert "Requested reservation is invalid" in out and "fix " in out, out


def test_submit_uses_the_profile_over_the_header(cluster, tmp_path):
    """submit.sh --v100 with the second profile: partition, account, reservation and memory from the profile
    win over the template's `#SBATCH --partition=a100` (checked on the held job, then cancelled)."""
    env = {**cluster.env, "LLM_SITE": str(cluster.sandbox / "01_Basics/sites/local-ci.env")}
    r = subprocess.run([str(cluster.sandbox / "01_Basics/submit.sh"), "--v100", "--hold",
                        str(cluster.sandbox / "01_Basics/hello.slurm")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    job_id = re.search(r"Submitted batch job (\d+)", r.stdout).group(1)
    try:
        assert f"log: {tmp_path}/hello-{job_id}.out" in r.stdout, r.stdout
        fields = cluster.show(job_id)
        assert (fields["Partition"], fields["Account"], fields["Reservation"]) == ("gpu_v100", "llm_course",
                                                                                   "llm_course"), fields
        assert fields["MinMemoryNode"] == "1000M", fields
    finally:
        subprocess.run(["scancel", job_id], timeout=30)


def job_env(tmp_path, **env) -> dict:
    """Source 01_Basics/job_env.sh as a template does (no cluster needed) and return what it exported."""
    base = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLM_REPO": str(REPO), "LLM_VENV": str(tmp_path / "venv"),
            "SLURM_JOB_NAME": "ddp", "SLURM_JOB_ID": "77"}  # fmt: skip
    (tmp_path / "venv/bin").mkdir(parents=True, exist_ok=True)
    (tmp_path / "venv/bin/activate").write_text('export PATH="$(dirname "${BASH_SOURCE[0]}"):$PATH"\n')
    if not (tmp_path / "venv/bin/python").exists():
        (tmp_path / "venv/bin/python").symlink_to(sys.executable)
    script = f'set -euo pipefail; source "{REPO}/01_Basics/job_env.sh" >/dev/null; env'
    r = subprocess.run(["bash", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(line.split("=", 1) for line in r.stdout.splitlines() if "=" in line)


def test_job_env_counts_gpus_and_shares_cpus(tmp_path):
    e = job_env(tmp_path, SLURM_GPUS_ON_NODE="4", SLURM_CPUS_PER_TASK="16")
    assert (e["NPROC"], e["OMP_NUM_THREADS"], e["SRUN_CPUS_PER_TASK"]) == ("4", "4", "16")
    assert e["LLM_OUT"] == "runs/ddp-77" and e["LLM_SITE_FILE"] == str(REPO / "01_Basics/site.env")
    # no SLURM_GPUS_ON_NODE (an older Slurm, --gres): count the visible GPUs instead of falling back to 1
    e = job_env(tmp_path, CUDA_VISIBLE_DEVICES="0,1,2", SLURM_CPUS_PER_TASK="12")
    assert (e["NPROC"], e["OMP_NUM_THREADS"]) == ("3", "4")
    e = job_env(tmp_path, NPROC_PER_NODE="2", SLURM_GPUS_ON_NODE="4", SLURM_ARRAY_JOB_ID="70",
                SLURM_ARRAY_TASK_ID="3", LLM_STORAGE="/scratch/me/llm")  # fmt: skip
    assert e["NPROC"] == "2" and e["LLM_OUT"] == "/scratch/me/llm/runs/ddp-70_3"
    assert e["LLM_DATA"] == "/scratch/me/llm/data" and e["HF_HOME"] == "/scratch/me/llm/huggingface"
    assert job_env(tmp_path)["NPROC"] == "1"  # CPU job


def test_site_sh_exports_sbatch_variables(tmp_path):
    script = (f'source "{REPO}/01_Basics/site.sh" 2>/dev/null; llm_sbatch_env v100; env | grep -E "^S(BATCH|ALLOC)_"; '
              f'llm_sbatch_env a100 && echo "a100 -> $SBATCH_PARTITION"')  # fmt: skip
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "LLM_SITE": str(REPO / "01_Basics/sites/local-ci.env")}
    r = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=30)
    out = set(r.stdout.split())
    assert {"SBATCH_PARTITION=gpu_v100", "SBATCH_ACCOUNT=llm_course", "SBATCH_RESERVATION=llm_course",
            "SBATCH_MEM_PER_NODE=1000", "SALLOC_PARTITION=gpu_v100"} <= out, r.stdout + r.stderr  # fmt: skip
    assert "a100 -> gpu_a100" in r.stdout and not any(x.startswith("SBATCH_QOS") for x in out)
    r = subprocess.run(["bash", "-c", f'source "{REPO}/01_Basics/site.sh"; llm_sbatch_env v100'],
                       env={**env, "LLM_PARTITION_V100": ""}, capture_output=True, text=True, timeout=30)  # fmt: skip
    assert r.returncode == 1 and "names no v100 partition (LLM_PARTITION_V100)" in r.stderr
