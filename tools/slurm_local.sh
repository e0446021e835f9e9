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
#
# No accounting daemon (slurmdbd): `sacct` has no data here, so tests poll `scontrol show job`,
# and MinJobAge keeps finished jobs visible to it for an hour.
set -euo pipefail

MARKER="# written by rpg_megatron tools/slurm_local.sh"
CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/lib/slurm/slurmctld
SPOOL_DIR=/var/lib/slurm/slurmd
LOG_DIR=/var/log/slurm
HOST="$(hostname -s)"

log() { echo "slurm_local: $*" >&2; }
die() { log "error: $*"; exit 1; }

controller_up() { scontrol ping 2>/dev/null | grep -q "is UP"; }
munge_up() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# pgrep -x matches the daemon's exact name; only used to detect, never to kill.
slurmd_up() { pgrep -x slurmd >/dev/null 2>&1; }

if [[ "${1:-}" == "--status" ]]; then
    munge_up && log "munged: up" || log "munged: down"
    controller_up && log "slurmctld: up" || log "slurmctld: down"
    slurmd_up && log "slurmd: running" || log "slurmd: not running"
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
[[ $(id -u) -eq 0 ]] || { controller_up && slurmd_up && exit 0; \
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
    cat >"$tmp" <<EOF
$MARKER
ClusterName=rpglocal
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
StateSaveLocation=$STATE_DIR
SlurmdSpoolDir=$SPOOL_DIR
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
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
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
    chmod 0644 "$tmp"
    if [[ -f "$CONF" ]] && cmp -s "$tmp" "$CONF"; then
        rm -f "$tmp"
    else
        mv -f "$tmp" "$CONF"
        log "wrote $CONF (node $HOST, CPUs=$CPUS, RealMemory=${MEM_MB}M)"
        # A running controller re-reads the file; node definitions need a restart, which
        # happens below only if it is down.
        if controller_up; then scontrol reconfigure || true; fi
    fi
fi

# ----------------------------------------------------------------------------------- daemons
mkdir -p "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
chown slurm:slurm "$STATE_DIR" "$LOG_DIR"
if ! controller_up; then
    log "starting slurmctld"
    /usr/sbin/slurmctld
    for _ in $(seq 100); do controller_up && break; sleep 0.2; done
    controller_up || die "slurmctld did not answer 'scontrol ping'; see $LOG_DIR/slurmctld.log"
fi
if ! slurmd_up; then
    log "starting slurmd"
    /usr/sbin/slurmd
fi

# ---------------------------------------------------------------------------- wait for node
state=""
for _ in $(seq 150); do
    state="$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)"
    case "$state" in
        idle | mixed | allocated | completing) break ;;
        down* | drain* | fail*)
            # ReturnToService=2 normally clears this; a node drained by an earlier config
            # (e.g. a lower CPU count) needs an explicit resume.
            scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true ;;
    esac
    sleep 0.2
done
case "$state" in
    idle | mixed | allocated | completing) log "node $HOST is $state; partition debug is up" ;;
    *) die "node $HOST is '${state:-unknown}' after 30 s; see $LOG_DIR/slurmd.log" ;;
esac
