#!/usr/bin/env bash
# Bring up a single-node Slurm on this machine for tests/e2e/test_slurm.py: munged, slurmctld and
# slurmd on localhost, no cgroups (ProctrackType=proctrack/linuxproc, TaskPlugin=task/none), one
# partition `debug` holding this host with CPUs=$(nproc).
#
# Idempotent: packages are installed only when `slurmctld` is missing (needs root + apt), the
# config is written only when absent or written by this script (marker line below), and a daemon
# that already answers is left alone. Safe to run twice; exits 0 once `sinfo` shows the node idle.
#
#   tools/slurm_local.sh            # install if needed, configure, start, wait for the node
#   tools/slurm_local.sh --status   # print what is running and exit
#   tools/slurm_local.sh --nodes 2  # a separate N-node cluster on this host (see below)
#
# --nodes N (N >= 2) brings up a second, separate cluster `rpglocalN` beside the one-node one,
# for multi-node jobs (tests/e2e/test_slurm_nodes.py): its own config /etc/slurm-rpgN/slurm.conf
# (use it with SLURM_CONF=/etc/slurm-rpgN/slurm.conf sbatch ...), its own ports (slurmctld 6917,
# slurmd 6918..), state and log directories, and N slurmd daemons on this host, one per node
# name rpg-node0 .. rpg-node<N-1> (`slurmd -N`, each with its own Port=; Debian's slurm-wlm
# 22.05 is built with --enable-multiple-slurmd: its slurmstepd carries the "slurmstepd-%s"
# per-node name, and `scontrol show config` says MULTIPLE_SLURMD=Yes). The node names are added
# to /etc/hosts as 127.0.0.1 (a job's script resolves its first node's name for torchrun's
# rendezvous). Every node claims all CPUs and 90% of the memory of the host: jobs on the two
# nodes share the host's cores.
#
# No accounting daemon (slurmdbd): `sacct` has no data here, so tests poll `scontrol show job`,
# and MinJobAge keeps finished jobs visible to it for an hour.
set -euo pipefail

NODES=1
STATUS=0
while (($#)); do
    case "$1" in
        --status) STATUS=1 ;;
        --nodes) NODES="${2:?--nodes needs a count}"; shift ;;
        *) echo "slurm_local: unknown argument $1 (use --status, --nodes N)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "slurm_local: --nodes $NODES: not a count" >&2; exit 2; }

MARKER="# written by rpg_megatron tools/slurm_local.sh"
HOST="$(hostname -s)"
if ((NODES == 1)); then
    CONF_DIR=/etc/slurm
    STATE_DIR=/var/lib/slurm/slurmctld
    SPOOL_DIR=/var/lib/slurm/slurmd
    LOG_DIR=/var/log/slurm
    CLUSTER=rpglocal
    NODE_NAMES=("$HOST")
else
    CONF_DIR="/etc/slurm-rpg$NODES"
    STATE_DIR="/var/lib/slurm-rpg$NODES/slurmctld"
    SPOOL_DIR="/var/lib/slurm-rpg$NODES/slurmd-%n"
    LOG_DIR="/var/log/slurm-rpg$NODES"
    CLUSTER="rpglocal$NODES"
    NODE_NAMES=()
    for ((i = 0; i < NODES; i++)); do NODE_NAMES+=("rpg-node$i"); done
    export SLURM_CONF="$CONF_DIR/slurm.conf"  # for scontrol/sinfo below
fi
CONF="$CONF_DIR/slurm.conf"

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

controller_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# Only used to detect, never to kill. By the pid file its config names, not by process name:
# the slurmd daemons of the one-node and of a multi-node cluster all run as `slurmd`.
slurmd_up() {
    local file="/run/slurmd.pid" pid
    ((NODES == 1)) || file="/run/slurmd-rpg$NODES-$1.pid"
    pid="$(cat "$file" 2>/dev/null)" || return 1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null
}

if ((STATUS)); then
    munge_up && log "munged: up" || log "munged: down"
    controller_up && log "slurmctld ($CONF): up" || log "slurmctld ($CONF): down"
    for name in "${NODE_NAMES[@]}"; do
        slurmd_up "$name" && log "slurmd $name: running" || log "slurmd $name: not running"
    done
    sinfo 2>/dev/null || true
    exit 0
fi

# ------------------------------------------------------------------------------------ install
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v munged >/dev/null 2>&1; then
    [[ $(id -u) -eq 0 ]] || die "slurm-wlm/munge are not installed and installing needs root: \
run 'sudo apt-get install slurm-wlm munge' or run this script as root"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
fi
[[ $(id -u) -eq 0 ]] || { controller_up && slurmd_up "${NODE_NAMES[0]}" && exit 0; \
    die "Slurm is installed but not running; starting slurmd needs root"; }

# ------------------------------------------------------------------------------------- munge
# No systemd here (the packages' units never start), so the daemons are started by hand.
if ! munge_up; then
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        # The Debian package normally creates the key; make one if it was removed.
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    # munged refuses a key readable by others or owned by another user.
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 0700 /etc/munge
    chmod 0400 /etc/munge/munge.key
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged
    for _ in $(seq 50); do munge_up && break; sleep 0.1; done
    munge_up || die "munged did not start; see /var/log/munge/munged.log"
fi

# ------------------------------------------------------------------------------------ config
if [[ -f "$CONF" ]] && ! grep -qF "$MARKER" "$CONF"; then
    if controller_up; then
        log "using the running controller and its own $CONF (not written by this script)"
    else
        die "$CONF exists and was not written by this script; move it away or start that Slurm"
    fi
else
    CPUS="$(nproc)"
    # RealMemory in MiB, 90% of physical memory, so slurmd's own check never drains the node.
    MEM_MB="$(awk '/MemTotal/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)"
    mkdir -p "$CONF_DIR"
    tmp="$(mktemp "$CONF_DIR/.slurm.conf.XXXXXX")"
    if ((NODES == 1)); then
        PIDS="SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid"
        LOGS="SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log"
        CTLD_PORT=""
        NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN"
        PARTITION_NODES="$HOST"
    else
        # %n: the node name, so every slurmd of this host keeps its own pid, log and spool.
        PIDS="SlurmctldPidFile=/run/slurmctld-rpg$NODES.pid
SlurmdPidFile=/run/slurmd-rpg$NODES-%n.pid"
        LOGS="SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd-%n.log"
        CTLD_PORT="
SlurmctldPort=6917"
        NODE_LINES=""
        for ((i = 0; i < NODES; i++)); do
            NODE_LINES+="NodeName=rpg-node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((6918 + i)) \
CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
"
        done
        PARTITION_NODES="$(IFS=,; echo "${NODE_NAMES[*]}")"
    fi
    cat >"$tmp" <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$HOST(127.0.0.1)$CTLD_PORT
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
$PIDS
$LOGS
# No cgroups: the sandbox has no writable cgroup tree and no systemd to delegate one.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
# Keep finished jobs in scontrol for an hour: there is no slurmdbd for sacct.
MinJobAge=3600
# A requeued job may start again right away (tests/e2e/test_slurm.py requeues one).
JobRequeue=1
ReturnToService=2
KillWait=30
SlurmctldTimeout=30
SlurmdTimeout=60
MpiDefault=none
$NODE_LINES
PartitionName=debug Nodes=$PARTITION_NODES Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$CONF"
        log "wrote $CONF (nodes ${NODE_NAMES[*]}, CPUs=$CPUS, RealMemory=${MEM_MB}M each)"
        # A running controller re-reads the file; node definitions need a restart, which
        # happens below only if it is down.
        if controller_up; then scontrol reconfigure || true; fi
    fi
fi

# ----------------------------------------------------------------------------------- daemons
if ((NODES > 1)); then
    # A job's script resolves its first node's name (torchrun's rendezvous endpoint).
    for name in "${NODE_NAMES[@]}"; do
        getent hosts "$name" >/dev/null || echo "127.0.0.1 $name  $MARKER" >>/etc/hosts
    done
fi
mkdir -p "$STATE_DIR" "$LOG_DIR"
for name in "${NODE_NAMES[@]}"; do mkdir -p "${SPOOL_DIR//%n/$name}"; done
chown slurm:slurm "$STATE_DIR" "$LOG_DIR"
if ! controller_up; then
    log "starting slurmctld"
    /usr/sbin/slurmctld -f "$CONF"
    for _ in $(seq 100); do controller_up && break; sleep 0.2; done
    controller_up || die "slurmctld did not answer 'scontrol ping'; see $LOG_DIR/slurmctld.log"
fi
for name in "${NODE_NAMES[@]}"; do
    slurmd_up "$name" && continue
    if ((NODES == 1)); then
        log "starting slurmd"
        /usr/sbin/slurmd
    else
        log "starting slurmd for node $name"
        /usr/sbin/slurmd -f "$CONF" -N "$name"
    fi
done

# ---------------------------------------------------------------------------- wait for node
for name in "${NODE_NAMES[@]}"; do
    state=""
    for _ in $(seq 150); do
        state="$(sinfo -h -n "$name" -o %T 2>/dev/null | head -1)"
        case "$state" in
            idle | mixed | allocated | completing) break ;;
            down* | drain* | fail*)
                # ReturnToService=2 normally clears this; a node drained by an earlier config
                # (e.g. a lower CPU count) needs an explicit resume.
                scontrol update NodeName="$name" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    case "$state" in
        idle | mixed | allocated | completing) log "node $name is $state; partition debug is up" ;;
        *) die "node $name is '${state:-unknown}' after 30 s; see $LOG_DIR/slurmd*.log" ;;
    esac
done
((NODES == 1)) || log "cluster $CLUSTER: use it with SLURM_CONF=$CONF"
