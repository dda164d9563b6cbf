#!/usr/bin/env bash
# Create ./.venv and install the project into it (idempotent: re-runs only when requirements change).
#   bash scripts/setup.sh          # runtime only
#   bash scripts/setup.sh test     # + test tools (pytest, ruff, datasets, nbclient, ipykernel)
# PyTorch: a CUDA 12.6 build where `nvidia-smi` sees a GPU (the cu126 wheels still run on V100),
# otherwise the CPU build of torch 2.13.0 — from PyTorch's CPU index when that is reachable, else from
# the default index (set TORCH_INDEX_URL to choose yourself). No torchvision/torchaudio: not needed for
# text, and their CPU wheels break `import transformers` next to a CPU torch.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-}"
PYTHON="${PYTHON:-python3}"

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check)

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  TORCH_REQ=requirements/cu126.txt
  DEFAULT_INDEX=https://download.pytorch.org/whl/cu126
else
  TORCH_REQ=requirements/cpu.txt
  DEFAULT_INDEX=https://download.pytorch.org/whl/cpu
fi
hash=$(cat pyproject.toml requirements/*.txt scripts/setup.sh | sha1sum | cut -c1-12)-$(basename $TORCH_REQ .txt)
stamp=".venv/.installed-$hash-${EXTRAS:-base}"
# an install with test extras also satisfies a plain one
if [ -f "$stamp" ] || { [ -z "$EXTRAS" ] && compgen -G ".venv/.installed-$hash-*" >/dev/null; }; then
  echo "== .venv is up to date ($stamp)"
  exit 0
fi

TORCH_SPEC=$(grep -E '^torch==' "$TORCH_REQ")
if ! .venv/bin/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
  index="${TORCH_INDEX_URL:-}"
  if [ -z "$index" ] && .venv/bin/python -c "import urllib.request as u; u.urlopen('$DEFAULT_INDEX/torch/', timeout=5)" 2>/dev/null; then
    index="$DEFAULT_INDEX"
  fi
  echo "== installing $TORCH_SPEC (${index:-default index})"
  "${PIP[@]}" install -q ${index:+--index-url "$index"} "$TORCH_SPEC"
fi
if [ "$TORCH_REQ" = requirements/cpu.txt ] && ! .venv/bin/python -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then
  echo "error: a CUDA build of torch was installed on the CPU path; set TORCH_INDEX_URL=$DEFAULT_INDEX" >&2
  exit 1
fi

echo "== installing the project${EXTRAS:+ with [$EXTRAS]}"
"${PIP[@]}" install -q -e ".${EXTRAS:+[$EXTRAS]}"
rm -f .venv/.installed-*
touch "$stamp"
.venv/bin/python -c "import torch, common; print(f'== ready: torch {torch.__version__}, CUDA {torch.version.cuda}')"
