#!/usr/bin/env bash
# GPU checks of one node. Run on a CUDA machine from the repository root:
#   bash tests/gpu/run_gpu_checks.sh
# 1) the single-GPU check (tests/gpu/single_gpu_check.py: one table, < 10 minutes on one H100/H200;
#    it needs only the machine's PyTorch and a prepared data/ folder, see its docstring);
# 2) the DDP parity test with NCCL on the GPUs present (needs >= 2 GPUs);
# 2b) FSDP2 and TP+SP parity on 2 GPUs and a short bf16 FSDP run on all GPUs (needs >= 2 GPUs);
# 3) pytest's GPU-marked tests. Exits non-zero on any failure; without a GPU it says so and exits 1.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}
BIN=$(dirname "$($PY -c 'import sys; print(sys.executable)')")
ngpu=$($PY -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$ngpu" -eq 0 ]; then echo "no CUDA GPU visible: nothing to check here" >&2; exit 1; fi
out=${OUT:-runs/gpu-checks}; mkdir -p "$out"
$PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, '|', torch.cuda.get_device_name(0), '| GPUs:', torch.cuda.device_count())"

echo "== 1. single-GPU check (one table)"
single=0
$PY tests/gpu/single_gpu_check.py --out "$out/single" || single=$?  # the multi-GPU steps still run

if [ "$ngpu" -ge 2 ]; then
  echo "== 2. DDP parity, NCCL, 2 GPUs vs 1 GPU (fp32, tiny, 20 steps)"
  common=(--preset tiny --max-steps 20 --batch-size 8 --micro-batch-size 4 --precision fp32 --seed 7
          --sample-tokens 0 --no-progress --eval-interval 0 --overwrite)
  NVIDIA_TF32_OVERRIDE=0 $PY 03_LLM_Training_on_GPU/ddp.py "${common[@]}" --out-dir "$out/parity-1"
  NVIDIA_TF32_OVERRIDE=0 "$BIN/torchrun" --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/ddp.py "${common[@]}" --out-dir "$out/parity-2"
  $PY - "$out" <<'PY'
import json, sys
a, b = (json.load(open(f"{sys.argv[1]}/parity-{n}/summary.json")) for n in (1, 2))
d = max(abs(x - y) for x, y in zip(a["losses"], b["losses"]))
print(f"RESULT DDP NCCL parity: max |dloss| = {d:.2e} over 20 steps (tolerance 1e-4 on GPU)")
sys.exit(0 if d <= 1e-4 else 1)
PY
else
  echo "== 2. DDP parity skipped: needs >= 2 GPUs, found $ngpu"
fi
if [ "$ngpu" -ge 2 ]; then
  echo "== 2b. FSDP2 and TP (+SP) parity, NCCL, 2 GPUs vs the 1-GPU run above; FSDP bf16 on all GPUs"
  NVIDIA_TF32_OVERRIDE=0 "$BIN/torchrun" --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/fsdp.py "${common[@]}" --out-dir "$out/parity-fsdp"
  NVIDIA_TF32_OVERRIDE=0 "$BIN/torchrun" --standalone --nproc_per_node=2 03_LLM_Training_on_GPU/tp.py "${common[@]}" \
    --sequence-parallel --loss-parallel --out-dir "$out/parity-tp"
  "$BIN/torchrun" --standalone --nproc_per_node="$ngpu" 03_LLM_Training_on_GPU/fsdp.py --preset gpt2-small --max-steps 20 \
    --batch-size 16 --micro-batch-size 8 --eval-interval 0 --sample-tokens 0 --no-progress --out-dir "$out/fsdp-bf16"
  $PY - "$out" <<'PY'
import json, sys
ref = json.load(open(f"{sys.argv[1]}/parity-1/summary.json"))
ok = True
for name in ("fsdp", "tp"):
    s = json.load(open(f"{sys.argv[1]}/parity-{name}/summary.json"))
    d = max(abs(x - y) for x, y in zip(ref["losses"], s["losses"]))
    print(f"RESULT {name.upper()} NCCL parity: max |dloss| = {d:.2e} over 20 steps (tolerance 1e-4 on GPU)")
    ok &= d <= 1e-4
s = json.load(open(f"{sys.argv[1]}/fsdp-bf16/summary.json"))
print(f"RESULT FSDP gpt2-small x{s['world_size']} {s['precision']}: {s['tokens_per_s']:,.0f} tok/s, "
      f"peak {s['peak_memory_bytes'] / 2**30:.1f} GiB per GPU")
sys.exit(0 if ok else 1)
PY
fi
echo "== 3. pytest GPU tests"
$PY -m pytest -q tests/test_gpu.py
if [ "$single" -ne 0 ]; then echo "the single-GPU check failed (its table is above)" >&2; exit 1; fi
