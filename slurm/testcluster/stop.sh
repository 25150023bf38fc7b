#!/usr/bin/env bash
# Stop the single-machine SLURM test cluster started by start.sh.
#
#   slurm/testcluster/stop.sh [STATE_DIR]       # default: $NEUCLIP_SLURM_DIR or /tmp/neuclip-slurm
#
# Cancels every job first (otherwise slurmstepd and the job's processes outlive slurmd: they are not
# daemons we have a pid file for), then stops slurmd, slurmctld, slurmdbd, MariaDB and munged, each by the
# pid in its own pid file -- never by process name, since other agents/CI runs on this machine may run
# their own daemons of the same name. The state folder is kept (job-id counter, accounting database, keys),
# so a later start.sh resumes from it; delete the folder for a clean slate.
# Safe to run when nothing (or only part of the cluster) is running.
set -euo pipefail

STATE_DIR="${1:-${NEUCLIP_SLURM_DIR:-/tmp/neuclip-slurm}}"
if [[ ! -d $STATE_DIR ]]; then
    echo "[testcluster] nothing to stop: $STATE_DIR does not exist"
    exit 0
fi
D="$(cd "$STATE_DIR" && pwd)"
export SLURM_CONF="$D/etc/slurm.conf"

log() { echo "[testcluster] $*"; }

exec 9>"$D/.lock"
flock -w 180 9 || { echo "stop.sh: another start/stop holds $D/.lock" >&2; exit 1; }

# A daemon that exited stays a zombie until PID 1 reaps it, which in these VMs takes ~2 s; it is dead to us.
is_zombie() { [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

# Same check as start.sh: the pid must be alive AND be the program we expect (stale pid files are common
# after a crash, and the kernel may have handed that pid to something else).
live_pid() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name"* ]] && ! is_zombie "$pid" || return 1
    echo "$pid"
}

# stop_daemon PIDFILE NAME [GRACE_SECONDS]: SIGTERM, wait, then SIGKILL if it is still there.
stop_daemon() {
    local pidfile=$1 name=$2 grace=${3:-15} pid i
    if pid=$(live_pid "$pidfile" "$name"); then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < grace * 5; i++)); do
            if [[ ! -e /proc/$pid ]] || is_zombie "$pid"; then break; fi
            sleep 0.2
        done
        if [[ -e /proc/$pid ]] && ! is_zombie "$pid"; then
            log "$name (pid $pid) ignored SIGTERM for ${grace}s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
            sleep 0.5
        fi
        log "$name stopped"
    fi
    rm -f "$pidfile"
}

# 1. Jobs. Only possible while slurmctld answers; wait briefly for them to leave the node.
if live_pid "$D/run/slurmctld.pid" slurmctld >/dev/null && scontrol ping >/dev/null 2>&1; then
    jobs=$(squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: ${jobs//$'\n'/ }"
        # shellcheck disable=SC2086  # one job id per word
        scancel $jobs 2>/dev/null || true
        for ((i = 0; i < 50; i++)); do
            [[ -z $(squeue -h -t R,CG -o %A 2>/dev/null) ]] && break
            sleep 0.2
        done
    fi
fi

# 2. SLURM daemons, compute side first so slurmctld sees the node go away cleanly.
stop_daemon "$D/run/slurmd.pid" slurmd
stop_daemon "$D/run/slurmctld.pid" slurmctld
stop_daemon "$D/run/slurmdbd.pid" slurmdbd
# 3. MariaDB: SIGTERM is its clean shutdown (flushes InnoDB); give it longer.
stop_daemon "$D/mysql/mariadbd.pid" mariadbd 60
# 4. munge last: the daemons above authenticate through it while shutting down.
stop_daemon "$D/munge/munged.pid" munged
rm -f "$D/munge/munge.socket" "$D/munge/munge.socket.lock" "$D/mysql/mysqld.sock"
log "cluster in $D stopped (state kept; rm -rf $D for a clean slate)"
