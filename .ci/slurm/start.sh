#!/usr/bin/env bash
# Start a throw-away 4-node Slurm cluster on this one machine (for CI and local testing).
#   nodes a100-1 a100-2 (partition a100, default) and v100-1 v100-2 (partition v100),
#   each with 4 fake GPUs; one slurmd per node, each in its own UTS namespace (own hostname).
#   The same nodes also form gpu_a100 / gpu_v100 with a reservation llm_course: the second site profile
#   (01_Basics/sites/local-ci.env: other partition names, an account, a reservation) runs there.
# Idempotent: a running cluster is restarted with a fresh configuration. Needs root.
# Stop it with .ci/slurm/stop.sh. See .ci/slurm/README.md.
set -euo pipefail

STATE=${SLURM_CI_DIR:-/var/tmp/llm-slurm-ci}
NODES=(a100-1 a100-2 v100-1 v100-2)
HOSTS_BEGIN="# BEGIN llm-slurm-ci"
HOSTS_END="# END llm-slurm-ci"

log() { printf '[slurm-ci] %s\n' "$*"; }
die() {
  log "ERROR: $*"
  for f in "$STATE"/log/*.log; do
    [ -f "$f" ] && { echo "--- tail $f"; tail -n 20 "$f"; }
  done
  exit 1
}

[ "$(id -u)" = 0 ] || { log "must run as root"; exit 1; }
t0=$SECONDS

# 1. packages
if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
   || ! command -v sbatch >/dev/null || ! command -v munged >/dev/null; then
  log "installing slurmctld slurmd slurm-client munge"
  # package scripts must not try to start services (no systemd here)
  made_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-cache show slurmctld >/dev/null 2>&1 || apt-get update -qq
  apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
  if [ "$made_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; fi
fi

# 2. a clean slate: stop what a previous start left running
bash "$(dirname "$0")/stop.sh" --keep-hosts >/dev/null 2>&1 || true
rm -rf "$STATE"
mkdir -p "$STATE"/{log,ctld,gpu} /etc/slurm

# 3. fake GPUs: slurmd only accepts character devices in gres.conf
for i in 0 1 2 3; do mknod "$STATE/gpu/nvidia$i" c 1 3; done

# 4. node names resolve to their own loopback addresses (as DNS would on a real cluster)
tmp=$(mktemp)
sed "/^$HOSTS_BEGIN\$/,/^$HOSTS_END\$/d" /etc/hosts > "$tmp"
{
  echo "$HOSTS_BEGIN"
  echo "127.0.1.1 a100-1"; echo "127.0.1.2 a100-2"
  echo "127.0.2.1 v100-1"; echo "127.0.2.2 v100-2"
  echo "$HOSTS_END"
} >> "$tmp"
cat "$tmp" > /etc/hosts   # rewrite in place: /etc/hosts may be a bind mount
rm -f "$tmp"

# 5. configuration
ctl_host=$(hostname -s)
cat > /etc/slurm/slurm.conf <<CONF
# Written by .ci/slurm/start.sh for a local test cluster; removed by stop.sh.
ClusterName=llmci
SlurmctldHost=$ctl_host(127.0.0.1)
SlurmctldPort=6817
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=20
StateSaveLocation=$STATE/ctld
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdSpoolDir=$STATE/slurmd-%n
SlurmdPidFile=$STATE/slurmd-%n.pid
SlurmdLogFile=$STATE/log/slurmd-%n.log
SlurmdParameters=config_overrides
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
EnforcePartLimits=ALL
MinJobAge=600
KillWait=10
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=5
JobCompType=jobcomp/filetxt
JobCompLoc=$STATE/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
NodeName=a100-[1-2] NodeHostname=a100-[1-2] NodeAddr=127.0.1.[1-2] Port=[17001-17002] CPUs=16 RealMemory=64000 Gres=gpu:a100:4 State=UNKNOWN
NodeName=v100-[1-2] NodeHostname=v100-[1-2] NodeAddr=127.0.2.[1-2] Port=[17003-17004] CPUs=16 RealMemory=64000 Gres=gpu:v100:4 State=UNKNOWN
PartitionName=a100 Nodes=a100-[1-2] Default=YES MaxTime=2-00:00:00 State=UP
PartitionName=v100 Nodes=v100-[1-2] MaxTime=2-00:00:00 State=UP
# a second site's names for the same nodes (01_Basics/sites/local-ci.env). No AllowAccounts: without
# slurmdbd Slurm knows no associations and rejects every job there, even with the right --account.
PartitionName=gpu_a100 Nodes=a100-[1-2] MaxTime=2-00:00:00 State=UP
PartitionName=gpu_v100 Nodes=v100-[1-2] MaxTime=2-00:00:00 State=UP
CONF
cat > /etc/slurm/gres.conf <<CONF
# Written by .ci/slurm/start.sh: fake GPUs (character devices), removed by stop.sh.
AutoDetect=off
NodeName=a100-[1-2] Name=gpu Type=a100 File=$STATE/gpu/nvidia[0-3]
NodeName=v100-[1-2] Name=gpu Type=v100 File=$STATE/gpu/nvidia[0-3]
CONF

# 6. munge (as the munge user, key readable by it only)
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
[ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  runuser -u munge -- munged || die "munged did not start"
  touch "$STATE/munged.ours"  # stop.sh stops only a munged started here
fi
munge -n | unmunge >/dev/null || die "munge does not work"

# 7. controller, then one slurmd per node with its own hostname
slurmctld || die "slurmctld did not start"
for _ in $(seq 50); do scontrol ping 2>/dev/null | grep -q UP && break; sleep 0.2; done
scontrol ping 2>/dev/null | grep -q UP || die "slurmctld does not answer"
for n in "${NODES[@]}"; do
  unshare --uts sh -c "hostname $n && exec slurmd -N $n" || die "slurmd $n did not start"
done

# 8. wait until every node is idle
for _ in $(seq 100); do
  idle=$(sinfo -h -N -t idle -o '%N' 2>/dev/null | sort -u | wc -l)
  [ "$idle" -ge ${#NODES[@]} ] && break
  sleep 0.3
done
[ "$idle" -ge ${#NODES[@]} ] || { sinfo -N -l; die "not all nodes became idle"; }
# a course reservation that does not block other jobs: it starts in a week, and FLEX lets jobs that name it
# start now, outside it (a misspelt reservation is still rejected, as on a real site)
scontrol create reservation ReservationName=llm_course StartTime=now+7days Duration=60 Users=root \
  Nodes=ALL Flags=FLEX >/dev/null || die "could not create the reservation llm_course"
sinfo
log "cluster up in $((SECONDS - t0)) s (state and logs in $STATE)"
