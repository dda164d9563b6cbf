#!/usr/bin/env bash
# Set up .venv with the test tools and run the whole test suite (lint + pytest). Extra arguments go
# to pytest, e.g.  bash scripts/test.sh -k ddp
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
if ! bash 04_Finetuning/torchtune/setup.sh; then  # torchtune needs its own environment (see 04_Finetuning)
  [ -n "${CI:-}" ] && { echo "error: creating .venv-torchtune failed" >&2; exit 1; }
  echo "warning: no .venv-torchtune; its tests will be skipped" >&2
fi
if ! bash 04_Finetuning/unsloth/setup.sh; then  # Unsloth too (~2 min, 2.9 GB; drop these lines to skip its tests)
  [ -n "${CI:-}" ] && { echo "error: creating .venv-unsloth failed" >&2; exit 1; }
  echo "warning: no .venv-unsloth; its tests will be skipped" >&2
fi
echo "== ruff"
.venv/bin/ruff check .
echo "== pytest"
exec .venv/bin/python -m pytest tests "$@"
