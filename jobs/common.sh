# shellcheck shell=bash
# Sourced by jobs/*.sbatch: where hessmpi is, how to launch it, where results and logs go.
# Not a job script itself.
#
# Inside a SLURM allocation (SLURM_JOB_ID set) the ranks start with
#     srun --mpi=pmi2 ...        (the mpich wheel speaks PMI2, not PMIx; a cluster default of
#                                 "none" silently gives N singletons, which hessmpi refuses)
# or, with HESSMPI_LAUNCHER=mpiexec, with the mpiexec of the MPI that mpi4py uses (MPICH's
# hydra detects SLURM and starts its proxies through srun). Outside SLURM a job script runs
# in single-node test mode: ${HESSMPI_MPIEXEC:-mpiexec} -n ${HESSMPI_NP:-2} on this machine.
#
# Environment (all optional):
#   HESSMPI_ROOT        the hessmpi checkout (found from the script or the submit directory)
#   HESSMPI_BIN         the hessmpi command (default: ROOT/.venv/bin/hessmpi, else on PATH)
#   HESSMPI_CONFIG      run configuration (default: the script's, under jobs/configs/)
#   HESSMPI_RUNS        parent directory of the run directories (default: runs)
#   HESSMPI_LAUNCHER    srun (default) or mpiexec, inside an allocation
#   HESSMPI_SRUN_MPI    srun's --mpi plugin (default pmi2)
#   HESSMPI_MPIEXEC_SLURM  the mpiexec of HESSMPI_LAUNCHER=mpiexec (default: next to
#                       HESSMPI_BIN)
#   HESSMPI_MPIEXEC     test mode's launcher, words allowed (default: the mpiexec next to
#                       HESSMPI_BIN, else on PATH)
#   HESSMPI_NP          test mode's rank count (default 2; the GPU script: the GPUs seen)
#   HESSMPI_SITE_PROFILE  a file to source first (default: jobs/site.profile if it exists;
#                       see jobs/site.profile.example: module loads, the cluster's MPI, CuPy)
#   HESSMPI_DRY_RUN=1   print the commands instead of running them

HESSMPI_ROOT=$(cd -- "${HESSMPI_ROOT:?set by the job script}" && pwd)
export HESSMPI_ROOT

_site=${HESSMPI_SITE_PROFILE:-$HESSMPI_ROOT/jobs/site.profile}
if [ -f "$_site" ]; then
    # shellcheck disable=SC1090
    source "$_site"
elif [ -n "${HESSMPI_SITE_PROFILE:-}" ]; then
    echo "hessmpi-job: HESSMPI_SITE_PROFILE=$HESSMPI_SITE_PROFILE does not exist" >&2
    exit 2
fi
unset _site

if [ -z "${HESSMPI_BIN:-}" ]; then
    if [ -x "$HESSMPI_ROOT/.venv/bin/hessmpi" ]; then
        HESSMPI_BIN=$HESSMPI_ROOT/.venv/bin/hessmpi
    else
        HESSMPI_BIN=$(command -v hessmpi || true)
    fi
fi
if [ -z "$HESSMPI_BIN" ] || [ ! -x "$HESSMPI_BIN" ]; then
    echo "hessmpi-job: no hessmpi command (looked for $HESSMPI_ROOT/.venv/bin/hessmpi and on" \
         "PATH): run 'make install', or set HESSMPI_BIN or load it in jobs/site.profile" >&2
    exit 2
fi
HESSMPI_RUNS=${HESSMPI_RUNS:-runs}

# True inside a SLURM batch job or allocation.
hessmpi_in_slurm() { [ -n "${SLURM_JOB_ID:-}" ]; }

# The run directory of this job: RUNS/NAME-JOBID, RUNS/NAME-ARRAYJOBID_INDEX for an array
# task (the same names as the logs, --output=%x-%j.out / %x-%A_%a.out), and
# RUNS/NAME-local-DATE-PID in test mode.
hessmpi_run_dir() {
    local name=${SLURM_JOB_NAME:-$1}
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ] && [ -n "${SLURM_ARRAY_TASK_ID:-}" ]; then
        echo "$HESSMPI_RUNS/$name-${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}"
    elif hessmpi_in_slurm; then
        echo "$HESSMPI_RUNS/$name-$SLURM_JOB_ID"
    else
        echo "$HESSMPI_RUNS/$1-local-$(date +%Y%m%d-%H%M%S)-$$"
    fi
}

# The value of --out or --resume in the arguments "$@" (empty if none): the run directory
# the user chose instead of ours.
hessmpi_arg_dir() {
    local flag=$1
    shift
    local dir=""
    while [ $# -gt 0 ]; do
        case $1 in
            "$flag") dir=${2:-}; shift ;;
            "$flag"=*) dir=${1#*=} ;;
        esac
        shift
    done
    echo "$dir"
}

# HESSMPI_CMD=(launcher hessmpi train ARGS...): the command line that trains with the
# arguments "$@". Launcher options (srun's) come in the array HESSMPI_LAUNCH_OPTS.
hessmpi_command() {
    local launcher=()
    if hessmpi_in_slurm; then
        if [ "${HESSMPI_LAUNCHER:-srun}" = mpiexec ]; then
            # hydra inside an allocation: its proxies go through srun, one rank per task
            launcher=("${HESSMPI_MPIEXEC_SLURM:-$(dirname -- "$HESSMPI_BIN")/mpiexec}"
                      -n "${SLURM_NTASKS:-1}")
        else
            launcher=(srun "--mpi=${HESSMPI_SRUN_MPI:-pmi2}" --kill-on-bad-exit=1
                      "${HESSMPI_LAUNCH_OPTS[@]}")
            # since Slurm 22.05 srun does not inherit sbatch's --cpus-per-task
            if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then
                launcher+=("--cpus-per-task=$SLURM_CPUS_PER_TASK")
            fi
        fi
    else
        local mpiexec=${HESSMPI_MPIEXEC:-}
        if [ -z "$mpiexec" ]; then
            if [ -x "$(dirname -- "$HESSMPI_BIN")/mpiexec" ]; then
                mpiexec=$(dirname -- "$HESSMPI_BIN")/mpiexec
            else
                mpiexec=mpiexec
            fi
        fi
        # shellcheck disable=SC2206  # words on purpose: HESSMPI_MPIEXEC may hold options
        launcher=($mpiexec -n "${HESSMPI_NP:-2}")
        # a relative path that is not here is the checkout's (make exports .venv/bin/mpiexec)
        if [[ ${launcher[0]} == */* && ${launcher[0]} != /* && ! -x ${launcher[0]} \
                && -x $HESSMPI_ROOT/${launcher[0]} ]]; then
            launcher[0]=$HESSMPI_ROOT/${launcher[0]}
        fi
    fi
    HESSMPI_CMD=("${launcher[@]}" "$HESSMPI_BIN" train "$@")
}

# The arguments of a new run: --config CONFIG --out OUT, then the job's own --set's, then
# the user's arguments (later ones win, so the user's --config/--out/--set override).
# With --resume among the user's arguments: only the user's arguments.
#   hessmpi_train_args CONFIG OUT JOBSET... -- USERARG...   ->  HESSMPI_ARGS=(...)
hessmpi_train_args() {
    local config=$1 out=$2
    shift 2
    local own=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do
        own+=("$1")
        shift
    done
    [ $# -gt 0 ] && shift
    if [ -n "$(hessmpi_arg_dir --resume "$@")" ]; then
        HESSMPI_ARGS=("$@")
    else
        HESSMPI_ARGS=(--config "$config" --out "$out" "${own[@]}" "$@")
    fi
}

# The MPI ranks among the descendants of process $1 (those whose environment holds a rank
# from the launcher), one pid per line. Test mode's preemptible script signals them itself:
# not every mpiexec passes SIGUSR1 on (MPICH's hydra does; the Open MPI 4.1 of one machine
# did not), and SIGUSR1 must not reach a launcher's helper processes, which it would end.
hessmpi_rank_pids() {
    local todo=("$1") pid child children
    while [ ${#todo[@]} -gt 0 ]; do
        pid=${todo[0]}
        todo=("${todo[@]:1}")
        children=$(cat /proc/"$pid"/task/*/children 2>/dev/null || pgrep -P "$pid" || true)
        for child in $children; do
            todo+=("$child")
            if tr '\0' '\n' <"/proc/$child/environ" 2>/dev/null \
                    | grep -qE '^(PMI_RANK|PMIX_RANK|OMPI_COMM_WORLD_RANK)='; then
                echo "$child"
            fi
        done
    done
}

# One line for the log: where this runs and what it starts.
hessmpi_banner() {
    if hessmpi_in_slurm; then
        echo "hessmpi-job: job ${SLURM_JOB_ID}${SLURM_ARRAY_TASK_ID:+ (array ${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID})}" \
             "'${SLURM_JOB_NAME:-}' restart ${SLURM_RESTART_COUNT:-0}:" \
             "${SLURM_NTASKS:-?} task(s) on ${SLURM_JOB_NUM_NODES:-?} node(s) ${SLURM_JOB_NODELIST:-}"
    else
        echo "hessmpi-job: not in a SLURM allocation: single-node test mode on $(hostname)"
    fi
    local verb=running
    [ "${HESSMPI_DRY_RUN:-0}" = 1 ] && verb="dry run, would run"
    echo "hessmpi-job: $(date -Is) $verb: ${HESSMPI_CMD[*]}"
}

# Run HESSMPI_CMD in the foreground (or print it with HESSMPI_DRY_RUN=1); its exit status.
hessmpi_run() {
    hessmpi_banner
    if [ "${HESSMPI_DRY_RUN:-0}" = 1 ]; then
        return 0
    fi
    local rc=0
    "${HESSMPI_CMD[@]}" || rc=$?
    echo "hessmpi-job: $(date -Is) exit $rc"
    return "$rc"
}
