# Sourced by the training sbatch templates:  run_requeueable srun ... train.py --resume ...
#
# Surviving the time limit by checkpoint + requeue. With `#SBATCH --signal=B:USR1@300` Slurm sends USR1 to
# the batch shell 300 s before the limit. The trap forwards it to every job step (the training processes
# on all nodes save a checkpoint and exit); once the step has ended, the job requeues itself
# (`#SBATCH --requeue`) and its next start resumes from the checkpoint (`--resume`; the out-dir contains
# the job id, which a requeued job keeps); a step that fails instead is not requeued. Returns the step's exit
# status.
# The step must not die of USR1 itself: torchrun ignores it (`trap "" USR1` before `exec torchrun`) and the
# Python workers handle it (common/trainer.py).

run_requeueable() {
  _requeue=0 _step=""
  trap _forward_usr1 USR1
  "$@" &
  _step=$!
  # `wait` returns early when the trap runs: wait again until the step has really finished
  local rc
  while true; do
    rc=0; wait "$_step" || rc=$?
    kill -0 "$_step" 2>/dev/null || break
  done
  rc=0; wait "$_step" || rc=$?  # the step's own status (bash keeps it), not that of an interrupted wait
  if [ "$_requeue" = 1 ] && [ "$rc" = 0 ]; then
    echo "requeueing job $SLURM_JOB_ID to resume from the checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
  elif [ "$_requeue" = 1 ]; then  # a failure is not a checkpoint: requeueing would fail again, and again
    echo "USR1 came, but the training step failed (exit $rc): not requeueing; fix the error above and resubmit"
  fi
  return "$rc"
}

_forward_usr1() {
  echo "USR1: time limit near, asking the training processes to checkpoint"
  _requeue=1
  # all job steps on all nodes (not this shell); repeated, because a worker that has not
  # installed its handler yet (still starting up) ignores the signal
  ( while kill -0 "$_step" 2>/dev/null; do scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null; sleep 10; done ) &
}
