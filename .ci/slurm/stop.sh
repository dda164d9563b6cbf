#!/usr/bin/env bash
# Stop the local test cluster started by .ci/slurm/start.sh and undo what it changed
# (daemons, /etc/hosts block, /etc/slurm/{slurm,gres}.conf, state directory).
# Installed packages stay. --keep-hosts: leave /etc/hosts alone (used by start.sh itself).
set -uo pipefail

STATE=${SLURM_CI_DIR:-/var/tmp/llm-slurm-ci}
[ "$(id -u)" = 0 ] || { echo "[slurm-ci] must run as root"; exit 1; }

# daemons by the pids in their pid files: TERM all, wait up to 10 s, then KILL what is left
# (munged only if start.sh started it)
if [ -d "$STATE" ] && scontrol ping >/dev/null 2>&1; then
  scancel --quiet --user=root >/dev/null 2>&1
  for _ in $(seq 100); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.2; done
fi
pidfiles=("$STATE"/slurmd-*.pid "$STATE/slurmctld.pid")
[ -f "$STATE/munged.ours" ] && pidfiles+=(/run/munge/munged.pid)
pids=()
for f in "${pidfiles[@]}"; do
  [ -f "$f" ] && pid=$(cat "$f" 2>/dev/null) && [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && pids+=("$pid")
done
if ((${#pids[@]})); then
  kill "${pids[@]}" 2>/dev/null
  for _ in $(seq 100); do
    alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  kill -9 "${pids[@]}" 2>/dev/null
fi
# jobs that did not end in time: their slurmstepd and every process below it
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child"; done
  kill -9 "$1" 2>/dev/null
}
stepd=$(readlink -f /usr/sbin/slurmstepd 2>/dev/null)
for p in /proc/[0-9]*; do
  [ -n "$stepd" ] && [ "$(readlink "$p/exe" 2>/dev/null)" = "$stepd" ] && kill_tree "${p#/proc/}"
done

if [ "${1:-}" != --keep-hosts ]; then
  if grep -q '^# BEGIN llm-slurm-ci$' /etc/hosts; then
    tmp=$(mktemp)
    sed '/^# BEGIN llm-slurm-ci$/,/^# END llm-slurm-ci$/d' /etc/hosts > "$tmp"
    cat "$tmp" > /etc/hosts && rm -f "$tmp"
  fi
  rm -f /etc/slurm/slurm.conf /etc/slurm/gres.conf
  rm -rf "$STATE"
fi
echo "[slurm-ci] stopped"
