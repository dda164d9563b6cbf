#!/usr/bin/env bash
# Create the Unsloth environment (./.venv-unsloth, or $LLM_UNSLOTH_VENV from the site profile);
# idempotent (see ../setup_env.sh). Run it on the login node (it has the internet):
#   bash 04_Finetuning/unsloth/setup.sh --cuda cu126     # for the GPU nodes, also on a login node without GPU
#   bash 04_Finetuning/unsloth/setup.sh --cpu            # laptop, CI (Unsloth's CPU fallback)
#   bash 04_Finetuning/unsloth/setup.sh                  # auto: CUDA if nvidia-smi sees a GPU here
# Unsloth brings its own transformers/trl/peft versions and GPU packages (xformers, bitsandbytes,
# triton, ~1 GB), hence its own environment; torch stays pinned at the project's version.
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/pyenv.sh
rc=0; llm_parse_target "$@" || rc=$?
bash 04_Finetuning/setup_env.sh unsloth "$@"
[ "$rc" = 0 ] && [ "$LLM_DRY_RUN" = 0 ] || exit 0
if [ -f 01_Basics/site.sh ]; then LLM_SITE_QUIET=1 source 01_Basics/site.sh >/dev/null 2>&1 || true; fi
VENV=${LLM_UNSLOTH_VENV:-.venv-unsloth}
# unsloth_zoo pulls torchvision, whose CUDA-only operators break `import unsloth` and transformers'
# Trainer next to a CPU torch; text fine-tuning does not need it.
if [ "$LLM_TARGET" = cpu ] && compgen -G "$VENV/lib/python*/site-packages/torchvision" >/dev/null; then
  "$VENV/bin/python" -m pip uninstall -y -q torchvision
fi
