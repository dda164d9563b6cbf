# The common start of every sbatch template, sourced once the template has found the clone ($LLM_REPO):
#   1. cd to the clone: script paths, and relative paths in a template's arguments, are relative to it
#   2. the site profile (01_Basics/site.sh: $LLM_SITE or 01_Basics/site.env): modules, environments, storage
#   3. the Python environment (01_Basics/activate_env.sh)
#   4. NPROC, processes per node: $NPROC_PER_NODE, else the GPUs Slurm granted on this node
#      (SLURM_GPUS_ON_NODE), else the GPUs `nvidia-smi -L` lists, else those in CUDA_VISIBLE_DEVICES, else 1
#   5. CPU threads: job steps get the job's --cpus-per-task (Slurm 22.05-23.02 gives an srun step 1 CPU
#      unless SRUN_CPUS_PER_TASK is set) and each process cpus-per-task / NPROC threads (torchrun's own
#      default is 1)
#   6. LLM_OUT, this job's run directory: $LLM_RUNS/<job name>-<job id> (<name>-<array id>_<task> in an array)
cd "$LLM_REPO" || exit 1
source 01_Basics/site.sh || exit 1
case ${LLM_JOB_ENV:-main} in  # chapter 04's tools have environments of their own
  torchtune|unsloth)
    _v=LLM_${LLM_JOB_ENV^^}_VENV
    LLM_VENV=${!_v:-$LLM_REPO/.venv-$LLM_JOB_ENV} LLM_CONDA_ENV=
    [ -f "$LLM_VENV/bin/activate" ] || { echo "no $LLM_VENV: run bash 04_Finetuning/$LLM_JOB_ENV/setup.sh first (on the login node)"; exit 1; }
    unset _v ;;
esac
source 01_Basics/activate_env.sh
echo "repository $LLM_REPO | site profile $LLM_SITE_FILE | runs $LLM_RUNS"

_llm_count_gpus() {
  local n=0
  if [ -n "${SLURM_GPUS_ON_NODE:-}" ]; then n=$SLURM_GPUS_ON_NODE
  elif n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); [ "$n" -gt 0 ]; then :
  elif [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then n=$(tr ',' '\n' <<< "$CUDA_VISIBLE_DEVICES" | grep -c .)
  fi
  echo $(( n > 0 ? n : 1 ))
}
export NPROC=${NPROC_PER_NODE:-$(_llm_count_gpus)}
unset -f _llm_count_gpus
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
  export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
  _t=$(( SLURM_CPUS_PER_TASK / NPROC ))
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( _t > 0 ? _t : 1 ))}
  unset _t
fi
if [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
  export LLM_OUT="$LLM_RUNS/$SLURM_JOB_NAME-${SLURM_ARRAY_JOB_ID}_$SLURM_ARRAY_TASK_ID"
else
  export LLM_OUT="$LLM_RUNS/$SLURM_JOB_NAME-$SLURM_JOB_ID"
fi
