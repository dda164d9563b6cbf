#!/usr/bin/env bash
# Create the own environment of the torchtune or the Unsloth route of chapter 04 (see their READMEs for why)
# from 04_Finetuning/NAME/requirements.txt. Idempotent: a stamp with the hash of requirements.txt, this
# script and the target makes a re-run return at once. Run it where the internet is (the login node).
#   bash 04_Finetuning/setup_env.sh torchtune [--cuda cu126 | --cpu] [--dry-run]      # or: unsloth
# Target: --cuda cu126 builds the GPU environment also on a login node without GPU; without an option,
# CUDA if nvidia-smi sees a GPU here, else CPU. Where: $LLM_TORCHTUNE_VENV / $LLM_UNSLOTH_VENV (the site
# profile may set them), else ./.venv-NAME. Python: as scripts/setup.sh (3.11+, $PYTHON; an older venv is recreated).
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=${1:?usage: setup_env.sh torchtune|unsloth [--cuda cu126 | --cpu] [--dry-run]}
shift
source scripts/pyenv.sh
rc=0; llm_parse_target "$@" || rc=$?
if [ "$rc" != 0 ]; then sed -n '2,8p' "$0" >&2; llm_usage_target >&2; exit $(( rc == 3 ? 0 : 2 )); fi
[ ${#LLM_ARGS[@]} = 0 ] || { echo "error: unexpected arguments: ${LLM_ARGS[*]}" >&2; exit 2; }
if [ -f 01_Basics/site.sh ]; then LLM_SITE_QUIET=1 source 01_Basics/site.sh >/dev/null 2>&1 || true; fi
_v=LLM_${NAME^^}_VENV
VENV=${!_v:-.venv-$NAME}
REQ=04_Finetuning/$NAME/requirements.txt
[ -f "$REQ" ] || { echo "no $REQ" >&2; exit 2; }
llm_find_python || exit 1
DEFAULT_INDEX=https://download.pytorch.org/whl/$LLM_TARGET
echo "== $NAME: target $LLM_TARGET ($LLM_TARGET_WHY), Python $LLM_PYTHON, venv $VENV"
llm_check_venv "$VENV"
if [ "$LLM_DRY_RUN" = 1 ]; then
  echo "== dry run: would install $(grep -E '^torch==' "$REQ") from ${TORCH_INDEX_URL:-$DEFAULT_INDEX} and $REQ into $VENV"
  exit 0
fi
hash=$(cat "$REQ" 04_Finetuning/setup_env.sh scripts/pyenv.sh | sha1sum | cut -c1-12)-$LLM_TARGET
stamp="$VENV/.installed-$hash"
if [ -f "$stamp" ]; then
  echo "== $VENV is up to date ($stamp)"
  exit 0
fi
[ -x "$VENV/bin/python" ] || { echo "== creating $VENV"; "$LLM_PYTHON" -m venv "$VENV"; }
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
TORCH_SPEC=$(grep -E '^torch==' "$REQ")
want_cuda=$([ "$LLM_TARGET" = cpu ] && echo False || echo True)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '${TORCH_SPEC#torch==}' or (torch.version.cuda is not None) != $want_cuda)" 2>/dev/null; then
  index="${TORCH_INDEX_URL:-}"
  if [ -z "$index" ] && "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('$DEFAULT_INDEX/torch/', timeout=5)" 2>/dev/null; then
    index="$DEFAULT_INDEX"
  fi
  if [ -z "$index" ] && [ "$LLM_TARGET" != cpu ]; then
    echo "error: $DEFAULT_INDEX is not reachable; a CUDA build needs it (or TORCH_INDEX_URL)" >&2; exit 1
  fi
  echo "== installing $TORCH_SPEC (${index:-default index})"
  "${PIP[@]}" install -q --force-reinstall --no-deps ${index:+--index-url "$index"} "$TORCH_SPEC"
  "${PIP[@]}" install -q ${index:+--index-url "$index"} "$TORCH_SPEC"
fi
echo "== installing $REQ"
"${PIP[@]}" install -q -r "$REQ"
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit((torch.version.cuda is not None) != $want_cuda)" 2>/dev/null; then
  echo "error: $REQ left a torch that is not the $LLM_TARGET build; set TORCH_INDEX_URL=$DEFAULT_INDEX" >&2
  exit 1
fi
rm -f "$VENV"/.installed-*
touch "$stamp"
"$VENV/bin/python" -c "import torch; print(f'== ready: $VENV with torch {torch.__version__}')"
