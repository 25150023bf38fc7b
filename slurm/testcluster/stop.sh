#!/usr/bin/env bash
# Stop the single-machine SLURM test cluster started by start.sh.
#
#   slurm/testcluster/stop.sh [STATE_DIR]       # default: $NEUCLIP_SLURM_DIR or /tmp/neuclip-slurm
#
# Cancels every job first (otherwise slurmstepd and the job's processes outlive slurmd: they are not
# daemons we have a pid file for), then stops slurmd, slurmctld, slurmdbd, MariaDB and munged, each by the
# pid in its own pid file -- never by process name, since other agents/CI runs on this machine may run
# their own daemons of the same name. The state folder is kept (job-id counter, accounting database, keys),
# so a later start.sh resumes from it; delete the folder for a clean slate. The namespaced nodes' network
# namespaces, veth pairs, bridge and /etc/netns/<ns>/hosts files (STATE_DIR/netns.env names them) are removed.
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

# 2. SLURM daemons, compute side first so slurmctld sees the nodes go away cleanly (one slurmd per node;
#    run/slurmd.pid is the single-node layout of earlier versions).
for pidfile in "$D"/run/slurmd-*.pid "$D/run/slurmd.pid"; do
    [[ -e $pidfile ]] && stop_daemon "$pidfile" slurmd
done
stop_daemon "$D/run/slurmctld.pid" slurmctld
stop_daemon "$D/run/slurmdbd.pid" slurmdbd
# 3. MariaDB: SIGTERM is its clean shutdown (flushes InnoDB); give it longer.
stop_daemon "$D/mysql/mariadbd.pid" mariadbd 60
# 4. munge last: the daemons above authenticate through it while shutting down.
stop_daemon "$D/munge/munged.pid" munged
rm -f "$D/munge/munge.socket" "$D/munge/munge.socket.lock" "$D/mysql/mysqld.sock"
# 5. The namespaced nodes' network: only what start.sh recorded for this folder.
if [[ -s $D/netns.env ]]; then
    NETNS=0 BRIDGE="" NAMESPACES=""
    # shellcheck disable=SC1091
    source "$D/netns.env"
    for ns in $NAMESPACES; do
        [[ $ns == nc?????-node* ]] || continue  # never anything start.sh did not name
        ip netns del "$ns" 2>/dev/null || true  # its veth pair goes with it
        rm -rf "/etc/netns/$ns"
    done
    if [[ $BRIDGE == nc?????br ]]; then ip link del "$BRIDGE" 2>/dev/null || true; fi
    rmdir /etc/netns 2>/dev/null || true
    rm -f "$D/netns.env"
    if ((NETNS)); then log "network namespaces ($NAMESPACES) and bridge $BRIDGE removed"; fi
fi
log "cluster in $D stopped (state kept; rm -rf $D for a clean slate)"
