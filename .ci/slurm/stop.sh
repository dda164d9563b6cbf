#!/usr/bin/env bash
# Stop the local test cluster started by .ci/slurm/start.sh and undo what it changed
# (daemons, /etc/hosts block, /etc/slurm/{slurm,gres}.conf, state directory).
# Installed packages stay. --keep-hosts: leave /etc/hosts alone (used by start.sh itself).
set -uo pipefail

STATE=${SLURM_CI_DIR:-/var/tmp/llm-slurm-ci}
[ "$(id -u)" = 0 ] || { echo "[slurm-ci] must run as root"; exit 1; }

# kill a daemon by the pid in its pid file, then wait for it to go
stop_pid() {
  local f=$1 pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f" 2>/dev/null) || return 0
  [ -n "$pid" ] && kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

if [ -d "$STATE" ]; then
  scancel --quiet --full --user=root >/dev/null 2>&1 || true
  for f in "$STATE"/slurmd-*.pid; do stop_pid "$f"; done
  stop_pid "$STATE/slurmctld.pid"
  # job processes left behind by killed slurmstepd (none expected)
  for p in /proc/[0-9]*; do
    exe=$(readlink "$p/exe" 2>/dev/null) || continue
    case "$exe" in */slurmstepd) kill -9 "${p#/proc/}" 2>/dev/null ;; esac
  done
fi
stop_pid /run/munge/munged.pid

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
