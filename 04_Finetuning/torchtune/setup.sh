#!/usr/bin/env bash
# Create the torchtune environment (./.venv-torchtune, or $LLM_TORCHTUNE_VENV from the site profile);
# idempotent (see ../setup_env.sh). Run it on the login node (it has the internet):
#   bash 04_Finetuning/torchtune/setup.sh --cuda cu126     # for the GPU nodes, also on a login node without GPU
#   bash 04_Finetuning/torchtune/setup.sh --cpu            # laptop, CI
#   bash 04_Finetuning/torchtune/setup.sh                  # auto: CUDA if nvidia-smi sees a GPU here
# torchtune is frozen upstream (0.6.1 is its last release), so everything is pinned; it lives apart
# from .venv because it needs torchao 0.13/0.14 while peft (in .venv) needs torchao >= 0.16.
set -euo pipefail
bash "$(dirname "$0")/../setup_env.sh" torchtune "$@"
