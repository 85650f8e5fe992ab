#!/usr/bin/env bash
# A single-node SLURM cluster on this machine, for the tests and for trying `--launcher slurm` (docs/cluster.md).
#
#   scripts/slurm-local.sh start    # idempotent: installs the Debian packages if missing, starts munge + slurm
#   scripts/slurm-local.sh stop     # stops the daemons this script started (by their pid files)
#   scripts/slurm-local.sh status
#
# Needs root (a container without systemd is fine: the daemons are started directly). The node has this
# machine's cores and memory (from `slurmd -C`), one partition `debug`, no accounting, and two fake GPU gres
# devices (character devices made with mknod) so that GPU requests are scheduled; nothing can run CUDA on them.
# Environment: SMALLVIT_SLURM_GPUS (fake GPUs, default 2; 0 for none).
set -euo pipefail

STATE=/var/lib/smallvit-slurm          # spool folders, logs, fake devices
CONF=/etc/slurm/slurm.conf
GPUS=${SMALLVIT_SLURM_GPUS:-2}

die() { echo "slurm-local: $*" >&2; exit 1; }

up() {  # the controller answers and the node takes jobs
  timeout 5 scontrol ping 2>/dev/null | grep -q UP &&
    timeout 5 sinfo -h -N -o %t 2>/dev/null | grep -Eq '^(idle|mix|alloc)'
}

install_packages() {
  local missing=()
  for cmd in slurmctld slurmd munged sbatch; do command -v "$cmd" >/dev/null || missing+=("$cmd"); done
  [ ${#missing[@]} -eq 0 ] && return
  echo "slurm-local: installing slurmctld slurmd munge slurm-client (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurmctld slurmd munge slurm-client >/dev/null
}

write_config() {
  local host node gres=""
  host=$(hostname -s)
  # The node line as slurmd measures it (a mismatch would drain the node), minus its uptime field.
  node=$(slurmd -C | head -1)
  mkdir -p "$STATE"/{ctld,d,log} /etc/slurm
  if [ "$GPUS" -gt 0 ]; then
    for ((i = 0; i < GPUS; i++)); do [ -e "$STATE/gpu$i" ] || mknod "$STATE/gpu$i" c 1 3; done  # like /dev/null
    gres=" Gres=gpu:$GPUS"
    echo "NodeName=$host Name=gpu File=$STATE/gpu[0-$((GPUS - 1))]" > /etc/slurm/gres.conf
  fi
  cat > "$CONF" <<EOF
# Written by smallvit scripts/slurm-local.sh: a single-node test cluster.
ClusterName=smallvit-local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
JobRequeue=1
# Jobs stay listed by squeue this long after they end: without accounting, this is their only record in SLURM.
MinJobAge=600
KillWait=20
# A requeued job waits for the step credential to expire before it may start again (default 120 s), and pending
# jobs are looked at every sched_interval (default 60 s): short values, so that requeue tests take seconds.
AuthInfo=cred_expire=5
SchedulerParameters=sched_interval=1,bf_interval=2
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
GresTypes=gpu
$node$gres State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  [ "$GPUS" -gt 0 ] || rm -f /etc/slurm/gres.conf
}

start() {
  [ "$(id -u)" -eq 0 ] || die "run as root (it starts munged, slurmctld and slurmd)"
  install_packages
  if up; then echo "slurm-local: already running"; return; fi
  write_config
  if ! [ -f /run/munge/munged.pid ] || ! kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
    mkdir -p /run/munge && chown munge:munge /run/munge
    [ -f /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
  fi
  pgrep_pid /run/slurmctld.pid || slurmctld
  pgrep_pid /run/slurmd.pid || slurmd
  for _ in $(seq 60); do
    if up; then
      scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
      echo "slurm-local: up ($(sinfo -h -N -o '%N %c CPUs %m MB %G'))"
      return
    fi
    sleep 0.5
  done
  # A node left drained by an earlier configuration: resume it once, then report.
  scontrol update nodename="$(hostname -s)" state=resume 2>/dev/null || true
  sleep 2
  up || die "the cluster did not come up; see $STATE/log/slurmctld.log and $STATE/log/slurmd.log"
  echo "slurm-local: up"
}

pgrep_pid() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop() {
  local f pid
  for f in /run/slurmd.pid /run/slurmctld.pid /run/munge/munged.pid; do
    if pgrep_pid "$f"; then
      pid=$(cat "$f")
      kill "$pid"
      for _ in $(seq 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
      kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    fi
    rm -f "$f"
  done
  echo "slurm-local: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if up; then sinfo; squeue; else echo "slurm-local: not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
