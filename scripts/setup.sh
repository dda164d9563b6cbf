#!/usr/bin/env bash
# Create the project's virtual environment and install the project into it (idempotent: re-runs only
# when requirements change). Run it where the internet is (the login node on a cluster).
#   bash scripts/setup.sh                  # auto: CUDA build if nvidia-smi sees a GPU here, else CPU
#   bash scripts/setup.sh --cuda cu126     # the CUDA 12.6 build, also on a login node without GPU (for GPU jobs)
#   bash scripts/setup.sh --cpu test       # CPU build + test tools (pytest, ruff, datasets, nbclient, ipykernel)
#   bash scripts/setup.sh --dry-run --cuda cu126   # what it would do
# Where: $LLM_VENV (the site profile, 01_Basics/site.env, may set it), else ./.venv.
# Python: $PYTHON, else the newest python3.1x on PATH; 3.11 or newer, else it stops and says how to get one.
# A venv made by an older Python (e.g. AlmaLinux 8's python3 3.6) is recreated.
# PyTorch: cu126 wheels run on V100, A100 and H100; the CPU build from PyTorch's CPU index when reachable
# (TORCH_INDEX_URL chooses the index yourself). No torchvision/torchaudio: not needed for text, and their
# CPU wheels break `import transformers` next to a CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/pyenv.sh
rc=0; llm_parse_target "$@" || rc=$?
if [ "$rc" != 0 ]; then
  sed -n '2,13p' "$0" >&2; llm_usage_target >&2; exit $(( rc == 3 ? 0 : 2 ))
fi
EXTRAS="${LLM_ARGS[0]:-}"
[ ${#LLM_ARGS[@]} -le 1 ] || { echo "error: one extras group at most (e.g. test), got: ${LLM_ARGS[*]}" >&2; exit 2; }
if [ -f 01_Basics/site.sh ]; then LLM_SITE_QUIET=1 source 01_Basics/site.sh >/dev/null 2>&1 || true; fi
VENV=${LLM_VENV:-.venv}
llm_find_python || exit 1

if [ "$LLM_TARGET" = cpu ]; then
  TORCH_REQ=requirements/cpu.txt
else
  TORCH_REQ=requirements/cu126.txt  # the torch pin; the wheel comes from the $LLM_TARGET index
fi
DEFAULT_INDEX=https://download.pytorch.org/whl/$LLM_TARGET
echo "== target $LLM_TARGET ($LLM_TARGET_WHY), Python $LLM_PYTHON ($(_llm_py_version "$LLM_PYTHON")), venv $VENV"
llm_check_venv "$VENV"
if [ "$LLM_DRY_RUN" = 1 ]; then
  echo "== dry run: would install $(grep -E '^torch==' "$TORCH_REQ") from ${TORCH_INDEX_URL:-$DEFAULT_INDEX} and the project${EXTRAS:+ with [$EXTRAS]} into $VENV"
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  "$LLM_PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh scripts/pyenv.sh | sha1sum | cut -c1-12)-$LLM_TARGET
stamp="$VENV/.installed-$hash-${EXTRAS:-base}"
# an install with test extras also satisfies a plain one
if [ -f "$stamp" ] || { [ -z "$EXTRAS" ] && compgen -G "$VENV/.installed-$hash-*" >/dev/null; }; then
  echo "== $VENV is up to date ($stamp)"
  exit 0
fi

TORCH_SPEC=$(grep -E '^torch==' "$TORCH_REQ")
want_cuda=$([ "$LLM_TARGET" = cpu ] && echo False || echo True)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}' or (torch.version.cuda is not None) != $want_cuda)" 2>/dev/null; then
  index="${TORCH_INDEX_URL:-}"
  if [ -z "$index" ] && "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$DEFAULT_INDEX/torch/', timeout=5)" 2>/dev/null; then
    index="$DEFAULT_INDEX"
  fi
  if [ -z "$index" ] && [ "$LLM_TARGET" != cpu ]; then
    echo "error: $DEFAULT_INDEX is not reachable; a CUDA build needs it (or TORCH_INDEX_URL)" >&2
    exit 1
  fi
  echo "== installing $TORCH_SPEC (${index:-default index})"
  "${PIP[@]}" install -q --force-reinstall --no-deps ${index:+--index-url "$index"} "$TORCH_SPEC"
  "${PIP[@]}" install -q ${index:+--index-url "$index"} "$TORCH_SPEC"
fi
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit((torch.version.cuda is not None) != $want_cuda)" 2>/dev/null; then
  echo "error: the torch installed is not the $LLM_TARGET build; set TORCH_INDEX_URL=$DEFAULT_INDEX" >&2
  exit 1
fi

echo "== installing the project${EXTRAS:+ with [$EXTRAS]}"
"${PIP[@]}" install -q -e ".${EXTRAS:+[$EXTRAS]}"
rm -f "$VENV"/.installed-*
touch "$stamp"
"$VENV/bin/python" -c "import torch, common; print(f'== ready: torch {torch.__version__}, CUDA {torch.version.cuda}')"
