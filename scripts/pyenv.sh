# Shared by scripts/setup.sh and 04_Finetuning/setup_env.sh (sourced): the build target, the Python, the venv.
#   llm_parse_target ARGS...   --cpu | --cuda cuXYZ | --auto (default), --dry-run; other words -> LLM_ARGS
#                              sets LLM_TARGET (cpu or cuXYZ), LLM_TARGET_WHY, LLM_DRY_RUN (0/1)
#   llm_find_python            sets LLM_PYTHON: $PYTHON, else the newest python3.1x on PATH; refuses < 3.11
#   llm_check_venv DIR         a DIR made by an old or broken Python is removed (recreated by the caller)
# Why explicit targets: the login node (the only one with internet) usually has no GPU, but builds the
# environments that the GPU nodes use: `--cuda cu126` there, whatever `nvidia-smi` says.

LLM_MIN_PY=3.11

llm_usage_target() {
  echo "  --cuda cu126   a CUDA build of torch (for the GPU nodes; works on a login node without GPU)"
  echo "  --cpu          the CPU build (laptops, CI, CPU partitions)"
  echo "  (neither)      auto: CUDA if nvidia-smi sees a GPU here, else CPU"
  echo "  --dry-run      say what would be done, change nothing"
}

llm_parse_target() {
  LLM_TARGET="" LLM_TARGET_WHY="" LLM_DRY_RUN=0 LLM_ARGS=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --cpu) LLM_TARGET=cpu LLM_TARGET_WHY="--cpu" ;;
      --cuda) shift
        [[ "${1:-}" =~ ^cu[0-9]{3}$ ]] || { echo "error: --cuda needs a CUDA tag such as cu126, not '${1:-}'" >&2; return 2; }
        LLM_TARGET=$1 LLM_TARGET_WHY="--cuda $1" ;;
      --cuda=*) set -- "--cuda" "${1#--cuda=}" "${@:2}"; continue ;;
      --auto) LLM_TARGET="" ;;
      --dry-run) LLM_DRY_RUN=1 ;;
      -h|--help) return 3 ;;
      -*) echo "error: unknown option $1" >&2; return 2 ;;
      *) LLM_ARGS+=("$1") ;;
    esac
    shift
  done
  if [ -z "$LLM_TARGET" ]; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
      LLM_TARGET=cu126 LLM_TARGET_WHY="auto: nvidia-smi sees a GPU"
    else
      LLM_TARGET=cpu LLM_TARGET_WHY="auto: no GPU here (for GPU nodes, build with --cuda cu126)"
    fi
  fi
}

_llm_py_version() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }
_llm_py_ok() { "$1" -c "import sys; sys.exit(sys.version_info < (${LLM_MIN_PY/./, }))" 2>/dev/null; }

llm_find_python() {
  local c candidates
  if [ -n "${PYTHON:-}" ]; then candidates=("$PYTHON"); else candidates=(python3.13 python3.12 python3.11 python3); fi
  for c in "${candidates[@]}"; do
    if command -v "$c" >/dev/null 2>&1 && _llm_py_ok "$c"; then LLM_PYTHON=$(command -v "$c"); return 0; fi
  done
  c=${candidates[-1]}
  echo "error: this project needs Python $LLM_MIN_PY or newer; $c is $(_llm_py_version "$c" || echo 'not found')." >&2
  echo "  Get one, then run this again:" >&2
  echo "    module avail python; module load python/3.11     # the site's modules (names vary)" >&2
  echo "    conda create -y -p \$SCRATCH/envs/py311 python=3.11 && export PYTHON=\$SCRATCH/envs/py311/bin/python" >&2
  echo "    (or PYTHON=/path/to/python3.11 bash $0 ...; on AlmaLinux/RHEL 8 an admin can dnf install python3.11)" >&2
  return 1
}

llm_check_venv() {
  local venv=$1 v
  [ -e "$venv" ] || return 0
  if [ -x "$venv/bin/python" ] && _llm_py_ok "$venv/bin/python"; then return 0; fi
  v=$(_llm_py_version "$venv/bin/python" || echo "a broken Python")
  if [ "${LLM_DRY_RUN:-0}" = 1 ]; then
    echo "== would recreate $venv: it was made by Python $v (needs $LLM_MIN_PY+)"
  else
    echo "== $venv was made by Python $v (needs $LLM_MIN_PY+): removing it to recreate it"
    rm -rf "$venv"
  fi
}
