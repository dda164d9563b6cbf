#!/usr/bin/env bash
# Create ./.venv-NAME (repository root) from 04_Finetuning/NAME/requirements.txt: the own environment of
# the torchtune or the Unsloth route of chapter 04 (see their READMEs for why). Idempotent: a
# stamp with the hash of requirements.txt and this script makes a re-run return at once.
#   bash 04_Finetuning/setup_env.sh torchtune      # or: unsloth
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: setup_env.sh torchtune|unsloth}
VENV=.venv-$NAME
REQ=04_Finetuning/$NAME/requirements.txt
[ -f "$REQ" ] || { echo "no $REQ" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  DEFAULT_INDEX=https://download.pytorch.org/whl/cu126
else
  DEFAULT_INDEX=https://download.pytorch.org/whl/cpu
fi
hash=$(cat "$REQ" 04_Finetuning/setup_env.sh | sha1sum | cut -c1-12)-$(basename "$DEFAULT_INDEX")
stamp="$VENV/.installed-$hash"
if [ -f "$stamp" ]; then
  echo "== $VENV is up to date ($stamp)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "== creating $VENV with $($PYTHON --version)"; "$PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
TORCH_SPEC=$(grep -E '^torch==' "$REQ")
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}')" 2>/dev/null; then
  index="${TORCH_INDEX_URL:-}"
  if [ -z "$index" ] && "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$DEFAULT_INDEX/torch/', timeout=5)" 2>/dev/null; then
    index="$DEFAULT_INDEX"
  fi
  echo "== installing $TORCH_SPEC (${index:-default index})"
  "${PIP[@]}" install -q ${index:+--index-url "$index"} "$TORCH_SPEC"
fi
echo "== installing $REQ"
"${PIP[@]}" install -q -r "$REQ"
if [ "$(basename "$DEFAULT_INDEX")" = cpu ] && ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)"; then
  echo "error: $REQ pulled a CUDA build of torch on a CPU machine; set TORCH_INDEX_URL=$DEFAULT_INDEX" >&2
  exit 1
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
"$VENV/bin/python" -c "import torch; print(f'== ready: $VENV with torch {torch.__version__}')"
