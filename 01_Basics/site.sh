# Load the site profile ($LLM_SITE, else 01_Basics/site.env). Sourced, never run:
#   source 01_Basics/site.sh          # on the login node: then plain `sbatch TEMPLATE` uses the profile's
#                                     # A100 partition, account, QoS, reservation (SBATCH_* variables, which
#                                     # win over a template's #SBATCH lines; options on the command line win
#                                     # over both), e.g. sbatch -p "$LLM_PARTITION_V100" TEMPLATE for V100
# Inside a job (01_Basics/job_env.sh) it sets only the runtime part: modules, environments, storage.
# Defines llm_sbatch_env a100|v100 (used by submit.sh and site_check.sh).

_llm_site_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LLM_SITE_FILE=${LLM_SITE:-$_llm_site_dir/site.env}
if [ ! -f "$LLM_SITE_FILE" ]; then
  echo "site.sh: no site profile $LLM_SITE_FILE (LLM_SITE=${LLM_SITE:-unset}); see 01_Basics/README.md" >&2
  return 1 2>/dev/null || exit 1
fi
set -a
# shellcheck disable=SC1090
source "$LLM_SITE_FILE"
# storage: explicit values win, then the profile's LLM_STORAGE, then the clone / the HF default
LLM_RUNS=${LLM_RUNS:-${LLM_STORAGE:+$LLM_STORAGE/}runs}
LLM_DATA=${LLM_DATA:-${LLM_STORAGE:+$LLM_STORAGE/}data}
[ -n "${LLM_STORAGE:-}" ] && HF_HOME=${HF_HOME:-$LLM_STORAGE/huggingface}
set +a
export LLM_SITE_FILE

# llm_sbatch_env a100|v100: export SBATCH_* (and SALLOC_* for salloc) from the profile for that GPU type
llm_sbatch_env() {
  local gpu=${1:-a100} part
  case "$gpu" in
    a100) part=${LLM_PARTITION_A100:-} ;;
    v100) part=${LLM_PARTITION_V100:-} ;;
    *) echo "site.sh: GPU type must be a100 or v100, not '$gpu'" >&2; return 1 ;;
  esac
  if [ -z "$part" ]; then
    echo "site.sh: the site profile $LLM_SITE_FILE names no $gpu partition (LLM_PARTITION_${gpu^^})" >&2
    return 1
  fi
  local v
  for v in SBATCH SALLOC; do
    export "${v}_PARTITION=$part"
    if [ -n "${LLM_ACCOUNT:-}" ]; then export "${v}_ACCOUNT=$LLM_ACCOUNT"; else unset "${v}_ACCOUNT"; fi
    if [ -n "${LLM_QOS:-}" ]; then export "${v}_QOS=$LLM_QOS"; else unset "${v}_QOS"; fi
    if [ -n "${LLM_RESERVATION:-}" ]; then export "${v}_RESERVATION=$LLM_RESERVATION"; else unset "${v}_RESERVATION"; fi
    if [ -n "${LLM_MEM:-}" ]; then export "${v}_MEM_PER_NODE=$LLM_MEM"; else unset "${v}_MEM_PER_NODE"; fi
  done
}

# on the login node: plain sbatch picks the profile up (A100 partition)
if [ -z "${SLURM_JOB_ID:-}" ] && [ "${LLM_SITE_QUIET:-0}" != 1 ]; then
  llm_sbatch_env a100 && echo "site profile $LLM_SITE_FILE: partition $SBATCH_PARTITION${LLM_ACCOUNT:+, account $LLM_ACCOUNT}${LLM_QOS:+, qos $LLM_QOS}${LLM_RESERVATION:+, reservation $LLM_RESERVATION}" >&2
fi
unset _llm_site_dir
