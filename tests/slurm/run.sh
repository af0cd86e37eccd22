#!/usr/bin/env bash
# What `make test-slurm` runs: start the local SLURM (jobs/slurm-local/start.sh), run the
# job-script tests on it (tests/slurm), stop it again (unless it was running before), exit
# with pytest's status.
# Where the cluster cannot start (not root, no apt: start.sh exits 77), run only the tests
# that need no SLURM and say so. PYTHON: the interpreter with hessmpi and pytest (default
# .venv/bin/python). Extra arguments go to pytest.
set -uo pipefail
cd "$(dirname -- "$0")/../.."
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3

# a cluster that was running before is left running
pidfile=${HESSMPI_SLURM_DIR:-/tmp/hessmpi-slurm}/run/slurmctld.pid
was_running=no
if [ -s "$pidfile" ] && [ "$(cat "/proc/$(cat "$pidfile")/comm" 2>/dev/null)" = slurmctld ]; then
    was_running=yes
fi
bash jobs/slurm-local/start.sh
status=$?
if [ "$status" = 0 ]; then
    [ "$was_running" = yes ] || trap 'bash jobs/slurm-local/stop.sh' EXIT
    "$PYTHON" -m pytest -q -rs tests/slurm "$@"
    exit $?
elif [ "$status" = 77 ]; then
    echo "tests/slurm/run.sh: SKIPPING THE SLURM TESTS: the local SLURM cannot run on this" \
         "machine (see above); running only the job-script tests that need no SLURM"
    "$PYTHON" -m pytest -q -rs -m "not slurm" tests/slurm "$@"
    rc=$?
    echo "tests/slurm/run.sh: the SLURM tests were skipped (needs root and apt, as in CI)"
    exit $rc
else
    echo "tests/slurm/run.sh: jobs/slurm-local/start.sh failed (exit $status)" >&2
    exit "$status"
fi
