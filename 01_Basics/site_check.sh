#!/usr/bin/env bash
# Check the site profile against the cluster, without running anything: the partitions it names (sinfo),
# then `sbatch --test-only` of every template on the A100 and the V100 partition, with the profile's
# account, QoS, reservation and memory. Prints a table; exits 1 if a template is rejected.
#   bash 01_Basics/site_check.sh                                  # 01_Basics/site.env
#   LLM_SITE=01_Basics/sites/param-rudra.env bash 01_Basics/site_check.sh
set -uo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
LLM_SITE_QUIET=1 source 01_Basics/site.sh || exit 1
echo "site profile: $LLM_SITE_FILE"
echo "  account=${LLM_ACCOUNT:-(default)} qos=${LLM_QOS:-(default)} reservation=${LLM_RESERVATION:-(none)}" \
  "mem=${LLM_MEM:-(default)} modules=${LLM_MODULES:-(none)}"
echo "  runs=$LLM_RUNS data=$LLM_DATA HF_HOME=${HF_HOME:-~/.cache/huggingface}"
echo "partitions:"
gpus=()
for gpu in a100 v100; do
  var=LLM_PARTITION_${gpu^^}; part=${!var:-}
  if [ -z "$part" ]; then echo "  $gpu: none in the profile"; continue; fi
  gpus+=("$gpu")
  line=$(sinfo -h -p "$part" -o '%P %a %l %D %G' 2>&1 | head -1)
  echo "  $gpu: ${line:-partition '$part' NOT FOUND by sinfo}"
done
[ ${#gpus[@]} -gt 0 ] || { echo "the profile names no GPU partition"; exit 1; }

bad=0
printf '\n%-48s' "template"; for gpu in "${gpus[@]}"; do printf ' %-10s' "$gpu"; done; echo
mapfile -t templates < <(find -L . -name '*.slurm' -not -path './.*' -not -path './runs/*' | sed 's|^\./||' | sort)
reasons=()
[ ${#templates[@]} -gt 0 ] || { echo "no *.slurm templates found under $repo"; exit 1; }
for t in "${templates[@]}"; do
  printf '%-48s' "$t"
  for gpu in "${gpus[@]}"; do
    ( llm_sbatch_env "$gpu" && sbatch --test-only "$t" ) >/tmp/site_check.$$ 2>&1
    if grep -q "to start at" /tmp/site_check.$$; then
      printf ' %-10s' ok
    else
      printf ' %-10s' REJECTED; bad=1
      reasons+=("$t on $gpu: $(grep -v '^$' /tmp/site_check.$$ | tail -1)")
    fi
  done
  echo
done
rm -f /tmp/site_check.$$
if [ "$bad" = 1 ]; then
  printf '\n%s\n' "${reasons[@]}"
  echo "site check: some templates are rejected: fix $LLM_SITE_FILE (or the limits in the templates' headers)"
  exit 1
fi
echo "site check: all ${#templates[@]} templates accepted on ${gpus[*]}"
