#!/usr/bin/env bash
# Stop the test cluster of jobs/slurm-local/start.sh: cancel its jobs, then end the slurmd's,
# slurmctld and munged that start.sh started (their pid files under the state directory,
# each checked to still name a process of that name). Nothing else is touched; the state
# directory (logs, slurm.conf) stays for a look afterwards, unless --purge is given.
#
#   bash jobs/slurm-local/stop.sh [--purge]      # HESSMPI_SLURM_DIR as for start.sh
set -uo pipefail

STATE=${HESSMPI_SLURM_DIR:-/tmp/hessmpi-slurm}
export SLURM_CONF=$STATE/slurm.conf
say() { echo "slurm-local: $*"; }

pid_of() {   # the pid in pid file $1 if it is a live process named $2
    local pid
    [ -s "$1" ] || return 1
    pid=$(cat "$1")
    [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" = "$2" ] && echo "$pid"
}

end() {      # end the daemon of pid file $1 named $2: TERM, then KILL after 10 s
    local pid
    if pid=$(pid_of "$1" "$2"); then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do
            [ -d "/proc/$pid" ] || break
            sleep 0.1
        done
        if [ -d "/proc/$pid" ]; then
            kill -KILL "$pid" 2>/dev/null
        fi
        say "stopped $2 (pid $pid)"
    fi
    rm -f "$1"
}

if [ ! -d "$STATE" ]; then
    say "nothing to stop ($STATE does not exist)"
    exit 0
fi

# the cluster's jobs first (their processes outlive slurmd under proctrack/linuxproc)
if pid_of "$STATE/run/slurmctld.pid" slurmctld >/dev/null; then
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null | sort -u)
    if [ -n "$jobs" ]; then
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null
        for _ in $(seq 1 30); do
            [ -z "$(timeout 10 squeue -h -o %A 2>/dev/null)" ] && break
            sleep 1
        done
        say "cancelled job(s) $(echo $jobs)"
    fi
fi

for pidfile in "$STATE"/run/slurmd-*.pid; do
    [ -e "$pidfile" ] && end "$pidfile" slurmd
done
end "$STATE/run/slurmctld.pid" slurmctld
end "$STATE/run/munged.pid" munged
rm -f "$STATE/munge/munged.pid"

if [ "${1:-}" = "--purge" ]; then
    rm -rf "$STATE"
    say "removed $STATE"
fi
exit 0
