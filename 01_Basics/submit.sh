#!/usr/bin/env bash
# Submit a template with the site profile (01_Basics/site.env, or $LLM_SITE): partition, account, QoS,
# reservation and memory come from the profile, the rest from the template's #SBATCH lines.
#   01_Basics/submit.sh 01_Basics/hello.slurm                       # A100 partition of the profile
#   01_Basics/submit.sh --v100 03_LLM_Training_on_GPU/ddp.slurm --max-steps 500
#   01_Basics/submit.sh --time=00:30:00 03_LLM_Training_on_GPU/ddp.slurm   # sbatch options before the template
# Works from any directory; the log is <job name>-<job id>.out in the directory you submit from.
set -euo pipefail
gpu=a100
case "${1:-}" in
  --a100|--v100) gpu=${1#--}; shift ;;
  ""|-h|--help) sed -n '2,7p' "$0"; exit 0 ;;
esac
LLM_SITE_QUIET=1 source "$(dirname "${BASH_SOURCE[0]}")/site.sh"
llm_sbatch_env "$gpu"
echo "site profile $LLM_SITE_FILE: partition $SBATCH_PARTITION${LLM_ACCOUNT:+, account $LLM_ACCOUNT}${LLM_QOS:+, qos $LLM_QOS}${LLM_RESERVATION:+, reservation $LLM_RESERVATION}"
out=$(sbatch "$@")
echo "$out"
job=$(grep -o '[0-9][0-9]*' <<< "$out" | head -1 || true)
if [ -n "$job" ]; then
  name=$(scontrol show job -o "$job" 2>/dev/null | grep -o 'JobName=[^ ]*' | cut -d= -f2 || true)
  echo "log: $PWD/${name:-<job name>}-$job.out   (tail -f it; squeue --me shows the queue)"
fi
