# Activate the Python environment of this project inside a Slurm job (or any shell).
# Sourced by every sbatch template:   source 01_Basics/activate_env.sh
# First `module load $LLM_MODULES` when set (e.g. "miniconda3 cuda/12.6"), then the first match wins:
#   1. $LLM_VENV               a virtual environment you name (site profile or export LLM_VENV=/path/to/venv)
#   2. $LLM_CONDA_ENV          a conda environment you name (a name, or the path of conda env create -p)
#   3. .venv of the clone      the one `bash scripts/setup.sh` creates
#   4. conda env llm-across-platforms (conda env create -f environment.yml)
# The site profile (01_Basics/site.env) sets these. Anything else, or a Python older than 3.11, stops the job
# with a message that says what to do.

_llm_env_fail() {
  echo "activate_env.sh: $*" >&2
  echo "  Create the environment first (see 01_Basics/README.md): bash scripts/setup.sh," >&2
  echo "  or: conda env create -f environment.yml, or export LLM_VENV=/path/to/venv." >&2
  return 1
}

_llm_activate() {
  local root=${LLM_REPO:-${SLURM_SUBMIT_DIR:-$PWD}} name=${LLM_CONDA_ENV:-llm-across-platforms}
  if [ -n "${LLM_MODULES:-}" ]; then
    type module >/dev/null 2>&1 || { _llm_env_fail "LLM_MODULES is set but there is no 'module' command"; return 1; }
    # shellcheck disable=SC2086
    module load $LLM_MODULES || { _llm_env_fail "module load $LLM_MODULES failed"; return 1; }
  fi
  if [ -n "${LLM_VENV:-}" ]; then
    [ -f "$LLM_VENV/bin/activate" ] || { _llm_env_fail "LLM_VENV=$LLM_VENV has no bin/activate"; return 1; }
    . "$LLM_VENV/bin/activate"
  elif [ -z "${LLM_CONDA_ENV:-}" ] && [ -f "$root/.venv/bin/activate" ]; then
    . "$root/.venv/bin/activate"
  else
    command -v conda >/dev/null 2>&1 || { _llm_env_fail "no .venv in $root and no conda"; return 1; }
    eval "$(conda shell.bash hook)" && conda activate "$name" \
      || { _llm_env_fail "conda env '$name' not found"; return 1; }
  fi
  python -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    _llm_env_fail "$(command -v python) is Python $(python -c 'import platform; print(platform.python_version())'), this project needs 3.11 or newer: recreate the environment with a newer Python (module load python/3.11, or conda)"
    return 1; }
  # compute nodes are offline: models, tokenizers and datasets come from what the login node prepared
  export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
  echo "python: $(command -v python) ($(python --version 2>&1)), HF_HUB_OFFLINE=$HF_HUB_OFFLINE"
}

# venv and conda scripts are not written for `set -u`: relax it while activating
case $- in *u*) _llm_u=1; set +u ;; *) _llm_u=0 ;; esac
_llm_activate; _llm_rc=$?
[ "$_llm_u" = 1 ] && set -u
unset -f _llm_activate _llm_env_fail
[ "$_llm_rc" = 0 ] || exit "$_llm_rc"
