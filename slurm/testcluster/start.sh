#!/usr/bin/env bash
# Start a real, single-machine SLURM cluster (munge + private MariaDB + slurmdbd + slurmctld + slurmd) with
# every file under one state folder, so CI and developers can run sbatch / srun / sacct / submitit against it.
#
# Nodes: "localhost" (partition debug, the default) and, where network namespaces can be made (root with
# CAP_NET_ADMIN, as here), two more hosts "node1" and "node2" (partition "two"): each slurmd runs in its own
# network namespace and UTS namespace (its own hostname), joined to the host by a veth pair on a bridge that
# carries slurmctld's address, with /etc/netns/<ns>/hosts naming every host. So a 2-node job really spans two
# hosts: MASTER_ADDR is node1's address, which node2 reaches over the bridge. Namespaces, veths, the bridge and
# the hosts files are created here and removed by stop.sh; traffic goes only to addresses inside them. (Why
# not SLURM's multiple-slurmd mode: Debian's build does not enable it, and all its nodes would share one
# hostname and address, so MASTER_ADDR would be the same host.)
#
#   slurm/testcluster/start.sh [STATE_DIR]      # default: $NEUCLIP_SLURM_DIR or /tmp/neuclip-slurm
#   source STATE_DIR/env.sh                     # exports SLURM_CONF for sinfo, sbatch, sacct, submitit
#   slurm/testcluster/stop.sh [STATE_DIR]
#
# Idempotent: when every daemon is alive and sinfo answers, it prints so and exits 0. A daemon that died (or a
# state folder left behind by a crash or a `kill -9`) is detected through its pid file and started again;
# job state and the accounting database are kept, so job ids keep increasing across restarts.
#
# Runs everything as root, without systemd and without cgroups (containers here have neither). Needs the
# Debian packages from .ci/install_debs.sh (Debian 12: SLURM 22.05, munge 0.5.15, MariaDB 10.11).
#
# Ports (all on 127.0.0.1, chosen away from the SLURM/MySQL defaults 6817-6819/3306 so a system SLURM or
# MySQL on the same machine does not clash); override with the environment variables:
#   NEUCLIP_SLURMCTLD_PORT=16817  NEUCLIP_SLURMD_PORT=16818  NEUCLIP_SLURMDBD_PORT=16819
#   NEUCLIP_MARIADB_PORT=16306
# Other knobs: NEUCLIP_SLURM_FAKE_GPUS=2 (fake GPUs for scheduling, per node), NEUCLIP_SLURM_START_TIMEOUT=60 (s),
#   NEUCLIP_SLURM_NETNS=auto|1|0 (the two namespaced nodes: where possible | required | never),
#   NEUCLIP_SLURM_SUBNET=10.213.77 (their /24: .1 the bridge and slurmctld, .11 node1, .12 node2; a second
#   cluster with namespaces on the same machine needs its own).
#
# Traps. [seen] = hit on this machine while writing this script; [doc] = recorded in docs/ECOSYSTEM.md or
# documented SLURM/MariaDB behaviour, guarded against up front.
#  - [seen] slurmd 22.05 dies with "gpu duplicate device file name (/dev/null)" when several gres.conf lines
#    share File=/dev/null: each fake GPU is a distinct symlink STATE_DIR/dev/fakegpuN -> /dev/null.
#  - [seen] A requeued job may only start again cred_expire+1 s later (default 120 s), and only the periodic
#    schedulers notice (main every 60 s, backfill every 30 s): a requeue took 2.5 min. cred_expire=10 and
#    sched_interval=2,bf_interval=1 bring it down to ~13 s.
#  - [seen] In these VMs PID 1 reaps orphaned zombies only after ~2 s: a stopped daemon lingers in /proc
#    as state Z. Liveness checks treat Z as dead (otherwise each stop waited 2 s per daemon).
#  - [seen] With slurmctld down, sinfo retries for ~9 s before failing; scontrol ping fails at once. The
#    "is it running" checks look at pid files first.
#  - [seen] Jobs that were running when the whole cluster was killed (-9) come back FAILED ("Job credential
#    revoked") after a restart; restarting itself works from such a dirty folder.
#  - [doc] munged refuses a socket folder (or parent) that is not world-executable, and clients could not
#    reach the socket either: the state folder and munge/ are mode 755.
#  - [doc] Without AccountingStoragePass=<munge socket> in slurm.conf, slurmctld and sacct authenticate to
#    slurmdbd through the DEFAULT munge socket (/run/munge/...), which does not exist here.
#  - [doc] StorageHost=localhost makes the MySQL client library use its compiled-in unix socket
#    (/run/mysqld/mysqld.sock) and ignore StoragePort; 127.0.0.1 forces TCP to our private server.
#  - [doc] slurmdbd has no -f option: it reads slurmdbd.conf from the folder of $SLURM_CONF and refuses a
#    file that is not mode 600 / owned by SlurmUser. gres.conf is likewise looked up next to slurm.conf.
#  - [doc] mariadbd does not daemonize: it is started with setsid and all std streams redirected, otherwise a
#    caller capturing output (pytest's subprocess.run) would wait forever for the pipe to close. For the same
#    reason every daemon is started with the start/stop lock's fd 9 closed (9>&-).
#  - [doc] mariadbd refuses to run as root unless given --user=root; --no-defaults keeps /etc/mysql/my.cnf
#    (the system datadir and socket) out of the way.
#  - [doc] With SelectTypeParameters=CR_Core_Memory a job without --mem gets the whole node's memory, so jobs
#    would run one at a time; DefMemPerCPU gives them a small default instead.
#  - [doc] slurmctld is started WITHOUT -c (clear state): with -c job ids restart at 1 while the accounting
#    database still holds the old job 1, 2, ..., so sacct -j (and submitit's state polling) may read a stale
#    record and a reused submitit folder mixes two jobs. -i lets it start past a state file left by a crash.
#  - [doc] RealMemory is `slurmd -C` minus 1 GiB: a node claiming more memory than it has is drained.
#  - [doc] Fake GPUs are for scheduling only: jobs get CUDA_VISIBLE_DEVICES, but there is no device.
#  - [doc] Inside a node's namespace "localhost" is that namespace's own loopback, so slurm.conf names the
#    controller's bridge address with SlurmctldAddr (SlurmctldHost stays "localhost", which slurmctld accepts
#    whatever the machine's hostname). Each node's slurmd runs with /etc/netns/<ns>/hosts bind-mounted over
#    /etc/hosts in a private mount namespace, inherited by all it starts (slurmstepd, the job), so node names
#    resolve there; `unshare --uts` gives it (and so gloo's gethostname()) its node's hostname.
#  - [doc] slurmd files are per node (%n in SlurmdPidFile, SlurmdLogFile, SlurmdSpoolDir).
set -euo pipefail

STATE_DIR="${1:-${NEUCLIP_SLURM_DIR:-/tmp/neuclip-slurm}}"
CTLD_PORT="${NEUCLIP_SLURMCTLD_PORT:-16817}"
SLURMD_PORT="${NEUCLIP_SLURMD_PORT:-16818}"
DBD_PORT="${NEUCLIP_SLURMDBD_PORT:-16819}"
DB_PORT="${NEUCLIP_MARIADB_PORT:-16306}"
FAKE_GPUS="${NEUCLIP_SLURM_FAKE_GPUS:-2}"
TIMEOUT="${NEUCLIP_SLURM_START_TIMEOUT:-60}"
NETNS="${NEUCLIP_SLURM_NETNS:-auto}"
SUBNET="${NEUCLIP_SLURM_SUBNET:-10.213.77}"
CLUSTER=neuclip
if ! [[ $NETNS =~ ^(auto|0|1)$ ]]; then
    echo "start.sh: NEUCLIP_SLURM_NETNS=$NETNS is not auto, 1 or 0" >&2
    exit 2
fi
if ! [[ $SUBNET =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]]; then
    echo "start.sh: NEUCLIP_SLURM_SUBNET=$SUBNET is not the first three numbers of a /24, e.g. 10.213.77" >&2
    exit 2
fi
for pv in "NEUCLIP_SLURMCTLD_PORT=$CTLD_PORT" "NEUCLIP_SLURMD_PORT=$SLURMD_PORT" \
    "NEUCLIP_SLURMDBD_PORT=$DBD_PORT" "NEUCLIP_MARIADB_PORT=$DB_PORT"; do
    p=${pv#*=}
    if ! [[ $p =~ ^[0-9]+$ ]] || ((p < 1 || p > 65535)); then
        echo "start.sh: $pv is not a TCP port number (1-65535)" >&2
        exit 2
    fi
done

log() { echo "[testcluster] $*"; }

# Absolute path: the path ends up in config files read by daemons whose working directory is elsewhere.
mkdir -p "$STATE_DIR"
STATE_DIR="$(cd "$STATE_DIR" && pwd)"
D="$STATE_DIR"

# The daemons live in /usr/sbin, which a non-root PATH lacks.
export PATH="$PATH:/usr/local/sbin:/usr/sbin:/sbin"
for bin in munged mungekey mariadbd mysql_install_db mariadb slurmdbd slurmctld slurmd sinfo sacctmgr scontrol; do
    command -v "$bin" >/dev/null || { echo "start.sh: '$bin' not found; run .ci/install_debs.sh first" >&2; exit 2; }
done

# --- layout ---------------------------------------------------------------------------------------------
# World-executable all the way down to the munge socket (see the trap list above); secrets stay mode 600.
chmod 755 "$D"
mkdir -p "$D/etc" "$D/munge" "$D/mysql" "$D/run" "$D/log" "$D/state/ctld" "$D/spool/slurmd"
chmod 755 "$D/etc" "$D/munge" "$D/run" "$D/log"
chmod 700 "$D/mysql"
MUNGE_SOCK="$D/munge/munge.socket"
SLURM_CONF_FILE="$D/etc/slurm.conf"
export SLURM_CONF="$SLURM_CONF_FILE"

# Serialize concurrent start/stop calls on the same folder (e.g. CI and a test fixture racing).
# Every daemon below is started with `9>&-`: a daemon that inherited fd 9 would hold this lock for its
# whole life and every later start/stop would hang on it.
exec 9>"$D/.lock"
flock -w 180 9 || { echo "start.sh: another start/stop holds $D/.lock" >&2; exit 1; }

# --- helpers --------------------------------------------------------------------------------------------
# A daemon that exited stays a zombie until PID 1 reaps it, which in these VMs takes ~2 s; it is dead to us.
is_zombie() { [[ $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) == Z ]]; }

# pid_alive PIDFILE NAME: true when the pid in PIDFILE is running AND is the expected program. The name
# check guards against a stale pid file whose pid the kernel has since given to an unrelated process.
pid_alive() {
    local pidfile=$1 name=$2 pid comm
    [[ -s $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/comm ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null || true)
    [[ $comm == "$name"* ]] && ! is_zombie "$pid"
}

die() {
    echo "start.sh: ERROR: $1" >&2
    shift
    for f in "$@"; do
        [[ -f $f ]] || continue
        echo "----- last lines of $f -----" >&2
        tail -n 25 "$f" >&2 || true
    done
    echo "All logs: $D/log/ (munged.log mariadb.log slurmdbd.log slurmctld.log slurmd-<node>.log)" >&2
    exit 1
}

# quiet COMMAND...: run it with its output discarded (for polling loops).
quiet() { "$@" >/dev/null 2>&1; }

# wait_for SECONDS COMMAND...: poll COMMAND every 0.3 s until it succeeds; false on timeout.
wait_for() {
    local secs=$1; shift
    local deadline=$((SECONDS + secs))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.3
    done
}

# Refuse to start a daemon on a port someone else already listens on; the error says which knob to turn.
port_free() {
    local port=$1 var=$2
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is already in use by another program; choose another with $var=<port>"
    fi
}

# --- the namespaced nodes -------------------------------------------------------------------------------
# Names are derived from the state folder, so two clusters' namespaces never clash (interface names <= 15).
TAG="nc$(printf %s "$D" | sha1sum | cut -c1-5)"
BRIDGE="${TAG}br"
NS_NODES=(node1 node2)
ns_of() { echo "${TAG}-$1"; }
node_addr() { echo "$SUBNET.$((10 + ${1#node}))"; }

netns_ok() {
    ip -o addr show dev "$BRIDGE" 2>/dev/null | grep -q " $SUBNET.1/24 " || return 1
    local n
    for n in "${NS_NODES[@]}"; do
        ip netns exec "$(ns_of "$n")" ip -o addr show dev eth0 2>/dev/null | grep -q " $(node_addr "$n")/24 " ||
            return 1
        [[ -s /etc/netns/$(ns_of "$n")/hosts ]] || return 1
    done
}

netns_up() {
    # The bridge carries the host side: slurmctld's address, which every namespace reaches.
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge || return 1
    ip addr replace "$SUBNET.1/24" dev "$BRIDGE" || return 1
    ip link set "$BRIDGE" up || return 1
    local n ns i m
    for n in "${NS_NODES[@]}"; do
        ns=$(ns_of "$n")
        i=${n#node}
        [[ -e /run/netns/$ns ]] || ip netns add "$ns" || return 1
        if ! ip netns exec "$ns" ip link show eth0 >/dev/null 2>&1; then
            ip link del "${TAG}h$i" >/dev/null 2>&1 || true
            ip link add "${TAG}h$i" type veth peer name "${TAG}p$i" || return 1
            ip link set "${TAG}p$i" netns "$ns" || return 1
            ip netns exec "$ns" ip link set "${TAG}p$i" name eth0 || return 1
        fi
        ip link set "${TAG}h$i" master "$BRIDGE" up || return 1
        ip netns exec "$ns" ip addr replace "$(node_addr "$n")/24" dev eth0 || return 1
        ip netns exec "$ns" ip link set eth0 up || return 1
        ip netns exec "$ns" ip link set lo up || return 1
        mkdir -p "/etc/netns/$ns" || return 1
        {
            echo "# written by slurm/testcluster/start.sh for the test cluster in $D; removed by stop.sh"
            echo "127.0.0.1 localhost"
            echo "$SUBNET.1 ncctl"
            for m in "${NS_NODES[@]}"; do echo "$(node_addr "$m") $m"; done
        } >"/etc/netns/$ns/hosts" || return 1
    done
}

# Decide once per start whether this cluster has the namespaced nodes; stop.sh reads the record.
if [[ $NETNS != 0 ]]; then
    if netns_ok || netns_up 2>>"$D/log/netns.log"; then
        NETNS=1
    elif [[ $NETNS == 1 ]]; then
        die "could not create the network namespaces for node1/node2 (needs root with CAP_NET_ADMIN and iproute2)" \
            "$D/log/netns.log"
    else
        log "network namespaces unavailable: single node only (set NEUCLIP_SLURM_NETNS=1 to require them)"
        NETNS=0
    fi
fi
{
    echo "NETNS=$NETNS"
    echo "BRIDGE=$BRIDGE"
    echo "NAMESPACES='$(for n in "${NS_NODES[@]}"; do printf '%s ' "$(ns_of "$n")"; done)'"
} >"$D/netns.env"
NODES=(localhost)
if ((NETNS)); then NODES+=("${NS_NODES[@]}"); fi

cluster_ok() {
    pid_alive "$D/munge/munged.pid" munged &&
        pid_alive "$D/mysql/mariadbd.pid" mariadbd &&
        pid_alive "$D/run/slurmdbd.pid" slurmdbd &&
        pid_alive "$D/run/slurmctld.pid" slurmctld || return 1
    local n
    for n in "${NODES[@]}"; do pid_alive "$D/run/slurmd-$n.pid" slurmd || return 1; done
    if ((NETNS)); then netns_ok || return 1; fi
    sinfo -h >/dev/null 2>&1
}

TWO_PARTITION=""
if ((NETNS)); then TWO_PARTITION=two; fi
write_env() {
    # Written atomically: a test fixture may be sourcing it at this moment.
    cat >"$D/env.sh.tmp" <<EOF
# Generated by slurm/testcluster/start.sh -- source this file to use the NeuCLIP test cluster.
# SLURM_CONF is all the SLURM clients (sinfo, sbatch, srun, sacct, scontrol) and submitit need: slurm.conf
# names the private munge socket (AuthInfo) and the slurmdbd port, so nothing else has to be exported.
export NEUCLIP_SLURM_DIR='$D'
export SLURM_CONF='$SLURM_CONF_FILE'
# For the munge CLI only (munge -S "\$NEUCLIP_MUNGE_SOCKET" -n | unmunge -S ...); SLURM reads slurm.conf.
export NEUCLIP_MUNGE_SOCKET='$MUNGE_SOCK'
# The partition of the two namespaced hosts (node1, node2); empty when this cluster has none.
export NEUCLIP_SLURM_TWO_NODE_PARTITION='$TWO_PARTITION'
EOF
    mv -f "$D/env.sh.tmp" "$D/env.sh"
}

T0=$SECONDS
if cluster_ok; then
    write_env
    log "already running in $D (source $D/env.sh)"
    exit 0
fi

# Check every port a daemon we are about to start needs, before starting anything, so a clash does not
# leave a half-started cluster behind.
pid_alive "$D/mysql/mariadbd.pid" mariadbd || port_free "$DB_PORT" NEUCLIP_MARIADB_PORT
pid_alive "$D/run/slurmdbd.pid" slurmdbd || port_free "$DBD_PORT" NEUCLIP_SLURMDBD_PORT
pid_alive "$D/run/slurmctld.pid" slurmctld || port_free "$CTLD_PORT" NEUCLIP_SLURMCTLD_PORT
# A slurmd of this folder started before slurmd files were per node (run/slurmd.pid) is ours: stop it.
if pid_alive "$D/run/slurmd.pid" slurmd; then
    old=$(tr -dc '0-9' <"$D/run/slurmd.pid")
    kill -TERM "$old" 2>/dev/null || true
    wait_for 15 bash -c "[[ ! -e /proc/$old ]] || [[ \$(awk '{print \$3}' /proc/$old/stat) == Z ]]" || true
fi
rm -f "$D/run/slurmd.pid"
pid_alive "$D/run/slurmd-localhost.pid" slurmd || port_free "$SLURMD_PORT" NEUCLIP_SLURMD_PORT

# --- munge ----------------------------------------------------------------------------------------------
if pid_alive "$D/munge/munged.pid" munged; then
    log "munged already running"
else
    if [[ ! -s $D/munge/munge.key ]]; then
        mungekey --create --keyfile="$D/munge/munge.key" >/dev/null
    fi
    chmod 600 "$D/munge/munge.key"
    # A dead munged leaves its socket and lock file behind; they would make the new one refuse to start.
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock" "$D/munge/munged.pid"
    munged --key-file="$D/munge/munge.key" --socket="$MUNGE_SOCK" --pid-file="$D/munge/munged.pid" \
        --log-file="$D/log/munged.log" --seed-file="$D/munge/munged.seed" </dev/null >/dev/null 2>&1 9>&- ||
        die "munged failed to start" "$D/log/munged.log"
    wait_for 15 test -S "$MUNGE_SOCK" || die "munge socket $MUNGE_SOCK never appeared" "$D/log/munged.log"
    log "munged up"
fi

# --- MariaDB (private instance for slurmdbd) ------------------------------------------------------------
DB_SOCK="$D/mysql/mysqld.sock"
DB_PASS_FILE="$D/mysql/slurm_db_password"
if [[ ! -s $DB_PASS_FILE ]]; then
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' >"$DB_PASS_FILE")
fi
DB_PASS=$(cat "$DB_PASS_FILE")
db() { mariadb --no-defaults --socket="$DB_SOCK" -uroot "$@"; }

if pid_alive "$D/mysql/mariadbd.pid" mariadbd; then
    log "mariadbd already running"
else
    if [[ ! -d $D/mysql/data/mysql ]]; then
        # First start: create the system tables. root@localhost authenticates through the unix socket
        # (we are root), so no root password has to be kept anywhere.
        rm -rf "$D/mysql/data"
        mysql_install_db --no-defaults --user=root --datadir="$D/mysql/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 ||
            die "mysql_install_db failed" "$D/log/mariadb-install.log"
    fi
    rm -f "$DB_SOCK" "$D/mysql/mariadbd.pid"
    # innodb_lock_wait_timeout=900 is what slurmdbd asks for (it warns otherwise); the buffer pool is kept
    # small because this database holds a few hundred test jobs at most.
    setsid mariadbd --no-defaults --user=root --datadir="$D/mysql/data" --socket="$DB_SOCK" \
        --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --pid-file="$D/mysql/mariadbd.pid" --log-error="$D/log/mariadb.log" \
        --innodb-buffer-pool-size=64M --innodb-log-file-size=16M --innodb-lock-wait-timeout=900 \
        </dev/null >>"$D/log/mariadb.log" 2>&1 9>&- &
    DB_BG=$!
    # Fail fast when mariadbd exits (bad option, datadir problem) instead of waiting out the timeout.
    db_ready() { quiet db -e 'SELECT 1' || { kill -0 "$DB_BG" 2>/dev/null || die "mariadbd exited" "$D/log/mariadb.log"; false; }; }
    wait_for "$TIMEOUT" db_ready || die "MariaDB did not come up on $DB_SOCK" "$D/log/mariadb.log"
    log "mariadbd up (127.0.0.1:$DB_PORT)"
fi
# Idempotent: (re)sets the password from the file, so a lost or changed password file is repaired too.
# Only 127.0.0.1 is needed: slurmdbd connects over TCP and --skip-name-resolve matches by address.
db -e "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
       GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    die "could not create the slurm database user" "$D/log/mariadb.log"

# --- config files ---------------------------------------------------------------------------------------
# Regenerated on every start, so edits to this script (or new ports) take effect after stop + start.
NCPU=$(slurmd -C | sed -n "s/.*CPUs=\([0-9]*\).*/\1/p" | head -1)  # the hardware, as slurmd counts it (nproc follows OMP_NUM_THREADS)
HW_MEM=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
MEM=$((HW_MEM - 1024))
((MEM >= 512)) || MEM=512
CTLD_ADDR_LINE="# SlurmctldAddr: unset (one node, on loopback)"
NS_NODE_LINES=""
NS_PARTITION_LINE=""
if ((NETNS)); then
    CTLD_ADDR_LINE="# Every host (the namespaced ones too) reaches the controller at the bridge's address.
SlurmctldAddr=$SUBNET.1"
    # Listed BEFORE localhost: while "localhost" is the only node defined, slurmctld's node lookup returns it
    # for any name [seen: "fatal: Duplicated NodeHostName node1"].
    NS_NODE_LINES="# Two more hosts, each a slurmd in its own network and UTS namespace (see the top of start.sh).
NodeName=node1 NodeHostname=node1 NodeAddr=$(node_addr node1) CPUs=$NCPU RealMemory=$MEM Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN
NodeName=node2 NodeHostname=node2 NodeAddr=$(node_addr node2) CPUs=$NCPU RealMemory=$MEM Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN"
    NS_PARTITION_LINE="PartitionName=two Nodes=node[1-2] Default=NO MaxTime=INFINITE State=UP"
fi

(
    umask 077
    cat >"$D/etc/slurmdbd.conf" <<EOF
# slurmdbd.conf for the NeuCLIP single-machine test cluster (generated by slurm/testcluster/start.sh).
# slurmdbd insists on mode 600 and on being owned by SlurmUser, because StoragePass is in clear text.
AuthType=auth/munge
# Our private munge daemon, not the system one.
AuthInfo=socket=$MUNGE_SOCK
# "localhost" is accepted regardless of the machine's hostname.
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
DebugLevel=info
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
StorageType=accounting_storage/mysql
# 127.0.0.1 (not "localhost") so the MySQL client uses TCP to our port, not /run/mysqld/mysqld.sock.
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chmod 600 "$D/etc/slurmdbd.conf"

cat >"$D/etc/slurm.conf" <<EOF
# slurm.conf for the NeuCLIP single-machine test cluster (generated by slurm/testcluster/start.sh;
# edits here are overwritten on the next start). One node called "localhost", one partition "debug".
ClusterName=$CLUSTER
# "localhost" is special-cased by slurmctld, so the real hostname of the machine does not matter.
SlurmctldHost=localhost
$CTLD_ADDR_LINE
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
# Everything runs as root in a container: no slurm user, no privilege drops.
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (BeginTime = requeue +
# cred_expire + 1): the default 120 s made every requeue test take 2.5 min. 10 s is still ample for a job
# step to launch on an idle test node.
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
# No cgroups in the container: track job processes by walking /proc, and bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
# Schedule cores and memory (so several small jobs share the node) plus GPUs through --gpus*.
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, CR_Core_Memory gives a job without --mem the whole node's memory (jobs serialize).
DefMemPerCPU=1024
# Pending jobs whose BeginTime has passed (requeued jobs) are only picked up by the periodic schedulers;
# the defaults (main every 60 s, backfill every 30 s) add up to a minute of idle waiting in tests.
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
GresTypes=gpu
MailProg=/bin/true
# A node that was down (e.g. after a restart of the cluster) returns to service as soon as slurmd registers.
ReturnToService=2
# Short grace between SIGTERM and SIGKILL so cancels and requeues in tests are quick.
KillWait=5
SlurmctldTimeout=30
SlurmdTimeout=60
# Keep finished jobs visible to squeue/scontrol for 5 min (sacct keeps them forever).
MinJobAge=300
# State, spool, pid and log files all live in the state folder.
StateSaveLocation=$D/state/ctld
SlurmdSpoolDir=$D/spool/slurmd-%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
# Accounting through slurmdbd, so sacct (and submitit's job-state polling, which calls sacct) work.
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
# Names the munge socket used to reach slurmdbd; without it the default system socket is used and fails.
AccountingStoragePass=$MUNGE_SOCK
# Also record GPUs (fake ones here) in the accounting database, as a real GPU cluster would.
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
# The node: CPUs from slurmd -C; RealMemory = slurmd -C ($HW_MEM MiB) minus 1 GiB headroom for the OS and
# daemons; $FAKE_GPUS fake GPUs (see gres.conf) so --gpus-per-node jobs can be scheduled without a GPU.
$NS_NODE_LINES
NodeName=localhost NodeHostname=localhost NodeAddr=127.0.0.1 CPUs=$NCPU RealMemory=$MEM Gres=gpu:fake:$FAKE_GPUS State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
$NS_PARTITION_LINE
EOF

# Each fake GPU needs its OWN device path: slurmd 22.05 dies with "gpu duplicate device file name
# (/dev/null)" when several gres.conf lines share File=/dev/null. So each one is a distinct symlink to the
# harmless character device /dev/null (slurmd only stats it; task/none never restricts device access).
rm -rf "${D:?}/dev"
mkdir -p "$D/dev"
chmod 755 "$D/dev"
for n in "${NODES[@]}"; do
    for ((i = 0; i < FAKE_GPUS; i++)); do
        ln -s /dev/null "$D/dev/$n-fakegpu$i"
    done
done
{
    echo "# gres.conf for the NeuCLIP test cluster (generated by slurm/testcluster/start.sh)."
    echo "# Fake GPUs exist for scheduling only: no autodetection (there is no NVML here), and each GPU"
    echo "# is a distinct symlink to /dev/null (slurmd rejects duplicate File= paths). Jobs get"
    echo "# CUDA_VISIBLE_DEVICES set as on a real cluster, but there is no GPU behind it."
    echo "AutoDetect=off"
    for n in "${NODES[@]}"; do
        for ((i = 0; i < FAKE_GPUS; i++)); do
            echo "NodeName=$n Name=gpu Type=fake File=$D/dev/$n-fakegpu$i"
        done
    done
} >"$D/etc/gres.conf"

# --- slurmdbd -------------------------------------------------------------------------------------------
if pid_alive "$D/run/slurmdbd.pid" slurmdbd; then
    log "slurmdbd already running"
else
    rm -f "$D/run/slurmdbd.pid"
    # Daemonizes itself (and closes stdio); reads $SLURM_CONF's folder for slurmdbd.conf.
    slurmdbd </dev/null >>"$D/log/slurmdbd.log" 2>&1 9>&- || die "slurmdbd failed to start" "$D/log/slurmdbd.log"
    # The first start creates the accounting tables, which takes a few seconds.
    wait_for "$TIMEOUT" quiet sacctmgr -n -P list cluster ||
        die "slurmdbd did not answer within ${TIMEOUT}s" "$D/log/slurmdbd.log" "$D/log/mariadb.log"
    log "slurmdbd up (localhost:$DBD_PORT)"
fi
# The cluster must be known to the database before slurmctld registers, or its jobs are not recorded.
if ! sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    sacctmgr -i add cluster "$CLUSTER" >/dev/null || die "sacctmgr add cluster $CLUSTER failed" "$D/log/slurmdbd.log"
fi

# --- slurmctld ------------------------------------------------------------------------------------------
if pid_alive "$D/run/slurmctld.pid" slurmctld; then
    log "slurmctld already running; re-reading config"
    scontrol reconfigure >/dev/null 2>&1 || true
else
    rm -f "$D/run/slurmctld.pid"
    slurmctld -f "$SLURM_CONF_FILE" -i </dev/null >>"$D/log/slurmctld.log" 2>&1 9>&- ||
        die "slurmctld failed to start" "$D/log/slurmctld.log"
    wait_for "$TIMEOUT" quiet scontrol ping ||
        die "slurmctld did not answer within ${TIMEOUT}s" "$D/log/slurmctld.log"
    log "slurmctld up (localhost:$CTLD_PORT)"
fi

# --- slurmd, one per node -------------------------------------------------------------------------------
for n in "${NODES[@]}"; do
    if pid_alive "$D/run/slurmd-$n.pid" slurmd; then
        log "slurmd $n already running"
        continue
    fi
    rm -f "$D/run/slurmd-$n.pid"
    mkdir -p "$D/spool/slurmd-$n"
    if [[ $n == localhost ]]; then
        # -N: the node name in slurm.conf, independent of the machine's hostname.
        slurmd -f "$SLURM_CONF_FILE" -N localhost </dev/null >>"$D/log/slurmd-localhost.log" 2>&1 9>&- ||
            die "slurmd failed to start" "$D/log/slurmd-localhost.log"
    else
        # Its own hostname (UTS namespace), its hosts file bind-mounted over /etc/hosts in a private mount
        # namespace, and its network namespace (nsenter: `ip netns exec` would also remount /sys, hiding the
        # cgroup mounts slurmd insists on [seen: "No filesystem mounted on /sys/fs/cgroup"]).
        unshare --mount --propagation private --uts bash -c \
            'mount --bind "$3" /etc/hosts && hostname "$1" && exec nsenter --net="/run/netns/$4" slurmd -f "$2" -N "$1"' \
            _ "$n" "$SLURM_CONF_FILE" "/etc/netns/$(ns_of "$n")/hosts" "$(ns_of "$n")" \
            </dev/null >>"$D/log/slurmd-$n.log" 2>&1 9>&- || die "slurmd $n failed to start" "$D/log/slurmd-$n.log"
    fi
    log "slurmd $n started"
done

# --- wait for the nodes ---------------------------------------------------------------------------------
node_state() { sinfo -h -N -n "$1" -o %T 2>/dev/null | head -n1; }
deadline=$((SECONDS + TIMEOUT))
for n in "${NODES[@]}"; do
    resumed=0
    while :; do
        st=$(node_state "$n" || true)
        [[ $st == idle || $st == mixed || $st == allocated ]] && break
        # A node saved as down/drained by an earlier run (e.g. a crash) may need an explicit resume;
        # do it once, after giving ReturnToService a few seconds.
        if [[ $resumed == 0 && ($st == down* || $st == drain*) ]] && ((SECONDS > T0 + 5)); then
            log "node $n is '$st'; resuming it"
            scontrol update NodeName="$n" State=RESUME >/dev/null 2>&1 || true
            resumed=1
        fi
        if ((SECONDS >= deadline)); then
            die "node '$n' is '${st:-unknown}' after ${TIMEOUT}s, not idle (scontrol show node $n)" \
                "$D/log/slurmd-$n.log" "$D/log/slurmctld.log"
        fi
        sleep 0.3
    done
done

write_env
log "cluster up in $((SECONDS - T0))s: partition debug, node localhost ($NCPU CPUs, ${MEM} MiB, $FAKE_GPUS fake GPUs)"
if ((NETNS)); then
    log "partition two: node1 ($(node_addr node1)) and node2 ($(node_addr node2)), each in its own network namespace"
fi
log "logs in $D/log/; use it with: source $D/env.sh"
