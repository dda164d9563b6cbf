#!/usr/bin/env bash
# Create ./.venv-torchtune (repository root) for the torchtune route; idempotent (see ../setup_env.sh).
# torchtune is frozen upstream (0.6.1 is its last release), so everything is pinned; it lives apart
# from .venv because it needs torchao 0.13/0.14 while peft (in .venv) needs torchao >= 0.16.
set -euo pipefail
bash "$(dirname "$0")/../setup_env.sh" torchtune
