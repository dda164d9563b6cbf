#!/usr/bin/env bash
# Create ./.venv-unsloth (repository root) for the Unsloth route; idempotent (see ../setup_env.sh).
# Unsloth brings its own transformers/trl/peft versions and GPU packages (xformers, bitsandbytes,
# triton, ~1 GB), hence its own environment; torch stays pinned at the project's version.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash 04_Finetuning/setup_env.sh unsloth
# unsloth_zoo pulls torchvision, whose CUDA-only operators break `import unsloth` and transformers'
# Trainer next to a CPU torch; text fine-tuning does not need it.
if ! nvidia-smi -L >/dev/null 2>&1 && [ -d .venv-unsloth/lib ] && compgen -G ".venv-unsloth/lib/python*/site-packages/torchvision" >/dev/null; then
  .venv-unsloth/bin/python -m pip uninstall -y -q torchvision
fi
