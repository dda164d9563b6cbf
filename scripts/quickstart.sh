#!/usr/bin/env bash
# Set up .venv and run the main job: DDP training of a GPT on the embedded Shakespeare corpus.
# Uses every GPU on this machine (preset gpt2-small, bf16/fp16 chosen for the GPU) or, without a GPU,
# 2 CPU processes (preset tiny, fp32, about a minute). Extra arguments go to ddp.py, e.g.
#   bash scripts/quickstart.sh --max-steps 50 --preset tiny
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ngpu=$(.venv/bin/python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$ngpu" -gt 0 ]; then
  nproc=$ngpu; preset=gpt2-small
else
  cores=$(.venv/bin/python -c "import os; print(len(os.sched_getaffinity(0)))")
  nproc=$(( cores >= 2 ? 2 : 1 )); preset=tiny
fi
echo "== torchrun: $nproc process(es), preset $preset"
exec .venv/bin/torchrun --standalone --nproc_per_node="$nproc" 03_LLM_Training_on_GPU/ddp.py \
  --preset "$preset" --out-dir runs/quickstart --overwrite "$@"  # a rerun starts afresh
