#!/usr/bin/env bash
# Start a one-host SLURM for testing hessmpi's job scripts: munged, slurmctld and two
# emulated nodes (one slurmd -N nodeK each) on this machine, all state under one directory.
#
#   bash jobs/slurm-local/start.sh          # install if needed, start, wait until srun answers
#   export SLURM_CONF=/tmp/hessmpi-slurm/slurm.conf   # then sbatch/srun/squeue use it
#   bash jobs/slurm-local/stop.sh           # end what this script started
#
# Needs root (slurmd runs jobs as their owner) and, the first time, apt (Debian's packages
# slurmctld slurmd slurm-client munge, installed with --no-install-recommends). Where either
# is missing it says why and exits 77 (the "skipped" status of automake test drivers).
# Idempotent: daemons that already run (pid files under the state directory) are kept.
#
# Environment:
#   HESSMPI_SLURM_DIR    state directory (default /tmp/hessmpi-slurm): slurm.conf, env.sh,
#                        munge key and socket, controller state, spool, logs, pid files
#   HESSMPI_SLURM_NODES  emulated nodes (default 2)
#   HESSMPI_SLURM_PORT   first TCP port (default 16817: slurmctld; slurmd's take the next
#                        ones), away from a system SLURM's 6817/6818
# What the configuration holds and why: ../../../shared/design/SLURM.md (measured facts).
set -euo pipefail

STATE=${HESSMPI_SLURM_DIR:-/tmp/hessmpi-slurm}
NODES=${HESSMPI_SLURM_NODES:-2}
PORT=${HESSMPI_SLURM_PORT:-16817}
PACKAGES=(slurmctld slurmd slurm-client munge)
say() { echo "slurm-local: $*"; }
cannot() { echo "slurm-local: cannot run here: $*" >&2; exit 77; }

[ "$(id -u)" = 0 ] || cannot "needs root (slurmd and munged run as system daemons); as root: sudo bash $0"

# ----- packages ------------------------------------------------------------------------
missing=()
for cmd in munged slurmctld slurmd srun sbatch scontrol; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("$cmd")
done
if [ ${#missing[@]} -gt 0 ]; then
    command -v apt-get >/dev/null 2>&1 \
        || cannot "${missing[*]} not installed and no apt-get to install ${PACKAGES[*]}"
    say "installing ${PACKAGES[*]} (missing: ${missing[*]})"
    export DEBIAN_FRONTEND=noninteractive
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } \
        >"/tmp/hessmpi-slurm-apt.log" 2>&1 \
        || cannot "apt-get install ${PACKAGES[*]} failed (see /tmp/hessmpi-slurm-apt.log)"
fi

mkdir -p "$STATE"/{run,log,ctld,munge}
for i in $(seq 1 "$NODES"); do mkdir -p "$STATE/spool/node$i"; done
export SLURM_CONF=$STATE/slurm.conf

# pid file names a live process of this name (a reused pid is not ours)
alive() {
    local pidfile=$1 name=$2 pid
    [ -s "$pidfile" ] || return 1
    pid=$(cat "$pidfile")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$name" ]
}
wait_for_pidfile() {
    local pidfile=$1 name=$2 log=$3
    for _ in $(seq 1 100); do
        alive "$pidfile" "$name" && return 0
        sleep 0.1
    done
    echo "slurm-local: $name did not start; the end of $log:" >&2
    tail -n 20 "$log" >&2 || true
    exit 1
}

# ----- munge -----------------------------------------------------------------------------
M=$STATE/munge
if ! alive "$M/munged.pid" munged; then
    if [ ! -s "$M/munge.key" ]; then
        dd if=/dev/urandom of="$M/munge.key" bs=1 count=1024 status=none
    fi
    chown -R munge:munge "$M"
    chmod 0755 "$M"  # clients must reach the socket
    chmod 0400 "$M/munge.key"
    rm -f "$M/munged.pid"
    runuser -u munge -- munged --socket="$M/munge.socket" --pid-file="$M/munged.pid" \
        --log-file="$M/munged.log" --seed-file="$M/munged.seed" --key-file="$M/munge.key"
    wait_for_pidfile "$M/munged.pid" munged "$M/munged.log"
    echo "$(cat "$M/munged.pid")" >"$STATE/run/munged.pid"
    say "munged started (pid $(cat "$M/munged.pid"))"
fi

# ----- slurm.conf ------------------------------------------------------------------------
if ! alive "$STATE/run/slurmctld.pid" slurmctld || [ ! -s "$SLURM_CONF" ]; then
    # the node line from the real topology; RealMemory above what slurmd detects: INVAL
    topo=$(slurmd -C | head -n 1 | sed -e 's/^NodeName=[^ ]* //')
    mem=$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$topo")
    topo=$(sed -e 's/ *RealMemory=[0-9]*//' <<<"$topo")
    cpus=$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$topo")
    node_mem=$(( mem / NODES ))
    [ "$node_mem" -ge $(( cpus * 1024 )) ] || node_mem=$mem
    host=$(hostname -s)
    {
        echo "# Written by jobs/slurm-local/start.sh: a test cluster of $NODES emulated nodes on $host"
        echo "ClusterName=hessmpi-local"
        echo "SlurmctldHost=$host(127.0.0.1)"
        echo "SlurmctldPort=$PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        # a requeued job restarts in 11-14 s instead of 180 s with cred_expire=10
        echo "AuthInfo=socket=$M/munge.socket,cred_expire=10"
        echo "StateSaveLocation=$STATE/ctld"
        echo "SlurmdSpoolDir=$STATE/spool/%n"
        echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
        echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
        echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_Core_Memory"
        # without it one job takes the whole node's memory and jobs run one at a time
        echo "DefMemPerCPU=1024"
        echo "JobRequeue=1"
        echo "MailProg=/bin/true"
        echo "SchedulerParameters=sched_interval=2"
        # as many clusters: job scripts must name --mpi (pmi2 for the mpich wheel)
        echo "MpiDefault=none"
        echo "ReturnToService=2"
        echo "KillWait=10"
        # sbatch --wait polls every 2 s only while 2 < MinJobAge/2 fails, else 8 s, 32 s
        # (src/sbatch/sbatch.c): a finished job's record is kept 4+ s, listed in JobCompLoc
        echo "MinJobAge=4"
        # no slurmdbd here: finished jobs are listed in this file (sacct needs slurmdbd)
        echo "JobCompType=jobcomp/filetxt"
        echo "JobCompLoc=$STATE/log/jobcomp.txt"
        for i in $(seq 1 "$NODES"); do
            echo "NodeName=node$i NodeHostname=$host NodeAddr=127.0.0.1 Port=$(( PORT + i )) $topo RealMemory=$node_mem State=UNKNOWN"
        done
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } >"$SLURM_CONF.tmp"
    mv "$SLURM_CONF.tmp" "$SLURM_CONF"
fi
echo "export SLURM_CONF=$SLURM_CONF" >"$STATE/env.sh"

# ----- daemons ---------------------------------------------------------------------------
if ! alive "$STATE/run/slurmctld.pid" slurmctld; then
    rm -f "$STATE/run/slurmctld.pid"
    slurmctld -f "$SLURM_CONF"
    wait_for_pidfile "$STATE/run/slurmctld.pid" slurmctld "$STATE/log/slurmctld.log"
    say "slurmctld started (pid $(cat "$STATE/run/slurmctld.pid"))"
fi
for i in $(seq 1 "$NODES"); do
    pidfile=$STATE/run/slurmd-node$i.pid
    if ! alive "$pidfile" slurmd; then
        rm -f "$pidfile"
        slurmd -f "$SLURM_CONF" -N "node$i"
        wait_for_pidfile "$pidfile" slurmd "$STATE/log/slurmd-node$i.log"
        say "slurmd node$i started (pid $(cat "$pidfile"))"
    fi
done

# sinfo can show the saved node state before slurmd registers: a real srun proves it
started=$SECONDS
until timeout 20 srun --immediate=5 -N 1 -n 1 true >/dev/null 2>"$STATE/log/srun-probe.err"; do
    if (( SECONDS - started > 60 )); then
        echo "slurm-local: srun does not answer after 60 s:" >&2
        cat "$STATE/log/srun-probe.err" >&2
        sinfo >&2 || true
        exit 1
    fi
    scontrol update NodeName="node[1-$NODES]" State=RESUME >/dev/null 2>&1 || true
    sleep 1
done
say "ready: $NODES nodes, srun answers; export SLURM_CONF=$SLURM_CONF (or: source $STATE/env.sh)"
