"""The command line: ``hessmpi train | report | data | info``.

Exit status: 0 success; 2 usage or configuration error (one message, no traceback); 1 a run
that failed; 75 a run stopped by SIGTERM/SIGUSR1 after writing a checkpoint (resume it).
Under MPI an unexpected exception on any rank prints one line naming the rank
and the cause and ends every rank with MPI_Abort, so no rank is left waiting.
Set HESSMPI_TRACEBACK=1 to see the full traceback of such an exception.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import sys
import traceback
from datetime import datetime
from pathlib import Path

from hessmpi import __version__
from hessmpi.errors import RankLost, RunFailed, RunStopped, UsageError

#: Exit status of a run stopped by SIGTERM/SIGUSR1 after its checkpoint (EX_TEMPFAIL).
EXIT_STOPPED = 75


def _error(message: str) -> None:
    print(f"hessmpi: error: {message}", file=sys.stderr, flush=True)


def _launcher_rank() -> int:
    """This process's rank as the MPI launcher tells it (0 when not launched by one)."""
    for var in ("PMI_RANK", "PMIX_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0


class _Parser(argparse.ArgumentParser):
    """Under mpiexec/srun every rank parses the command line; only rank 0 prints a usage
    error (every rank still exits 2)."""

    def error(self, message):
        if _launcher_rank() == 0:
            self.print_usage(sys.stderr)
            print(f"{self.prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="hessmpi", description=(
        "Distributed data-parallel SGD accelerated by an inverse-Hessian approximation built "
        "from the workers' secant pairs. Train under MPI: mpiexec -n 4 hessmpi train ..."))
    p.add_argument("--version", action="version", version=f"hessmpi {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a model (run under mpiexec/srun)")
    t.add_argument("--config", type=Path, action="append",
                   help="TOML configuration file (jobs/configs/*.toml); repeatable: later "
                        "files override earlier ones, e.g. a model's file then "
                        "jobs/configs/recommended_fullbatch.toml")
    t.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a configuration key (repeatable)")
    t.add_argument("--out", type=Path,
                   help="run directory (default: runs/DATE-TIME-MODEL-OPTIMIZER)")
    t.add_argument("--resume", type=Path, metavar="OUT",
                   help="continue the run in directory OUT from its newest valid checkpoint "
                        "(--set train.steps=N extends it)")

    r = sub.add_parser("report", help="a table over finished or running runs",
                       description="One row per run directory (running, stopped, finished "
                       "or failed runs alike): method, ranks, backend, steps, final and best "
                       "training loss, test accuracy, wall time, fallback rate and the median "
                       "split of a step into gradient, communication and solve (ms).")
    r.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run directories")
    r.add_argument("--csv", type=Path, help="also write the table as CSV to this file")
    r.add_argument("--plot", type=Path, metavar="FILE.png",
                   help="also draw training loss against steps and against wall time, and "
                        "test accuracy, one line per run (needs matplotlib: hessmpi[report])")
    r.add_argument("--target-loss", type=float, metavar="LOSS",
                   help="add columns to_loss_steps, to_loss_s: the first logged step (and its "
                        "wall time) with training loss <= LOSS")
    r.add_argument("--baseline", type=Path, metavar="RUN",
                   help="compare with this run: its final training loss is the loss target "
                        "(unless --target-loss is given) and columns x_steps, x_wall give "
                        "each run's steps and wall time to it as multiples of its own")
    r.add_argument("--target-acc", type=float, metavar="ACC",
                   help="add columns to_acc_steps, to_acc_s: the first evaluation with test "
                        "accuracy >= ACC (a fraction, e.g. 0.95)")

    d = sub.add_parser("data", help="build an HDF5 dataset file")
    dsub = d.add_subparsers(dest="source", required=True, metavar="SOURCE")
    dg = dsub.add_parser("digits", help="the UCI digits bundled in scikit-learn (1,797 samples)")
    dg.add_argument("--test-fraction", type=float, default=0.2)
    dg.add_argument("--seed", type=int, default=0)
    idx = []
    for kind, what in (("mnist", "MNIST"), ("fashion-mnist", "Fashion-MNIST")):
        dm = dsub.add_parser(kind, help=f"{what} from its IDX files (.gz or plain), with "
                             "image_shape (for model.name = cnn)")
        dm.add_argument("--images", type=Path, required=True)
        dm.add_argument("--labels", type=Path, required=True)
        dm.add_argument("--test-images", type=Path)
        dm.add_argument("--test-labels", type=Path)
        dm.add_argument("--n-train", type=int, default=8000,
                        help="without test files: the first N samples train, the rest test")
        idx.append(dm)
    ds = dsub.add_parser("synthetic", help="a seeded Gaussian mixture of given conditioning")
    ds.add_argument("--n-train", type=int, default=4000)
    ds.add_argument("--n-test", type=int, default=1000)
    ds.add_argument("--features", type=int, default=50)
    ds.add_argument("--classes", type=int, default=5)
    ds.add_argument("--cond", type=float, default=100.0,
                    help="condition number of the feature covariance")
    ds.add_argument("--separation", type=float, default=2.0)
    ds.add_argument("--seed", type=int, default=0)
    for q in (dg, *idx, ds):
        q.add_argument("--out", type=Path, required=True, help="dataset file to write")

    i = sub.add_parser("info", help="versions, MPI library, BLAS, GPU; with RUN, how that run "
                       "was laid out over its ranks")
    i.add_argument("run", nargs="?", type=Path, metavar="RUN",
                   help="a run directory: also its exchange, optimizer state bytes per rank "
                        "and gradient collective (from RUN/metrics.h5)")
    return p


def _default_out(cfg: dict) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    # a plug-in's name holds ':' and may hold a path: its file name and factory only
    model = re.sub(r"[^\w.-]+", "-", re.sub(r"[^:]*/", "", cfg["model"]["name"]))
    return Path("runs") / f"{stamp}-{model}-{cfg['optim']['name']}"


def _train(args) -> int:
    # SLURM may signal a job while it starts: remember the signal until the trainer's own
    # handlers take over (it then checkpoints after its first step and exits 75).
    early: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: early.append(signum))
    from mpi4py import MPI

    from hessmpi import config
    from hessmpi.backend import blas_threads, make_backend, node_layout
    from hessmpi.comm import Communicator, cuda_aware_mpi
    from hessmpi.rundir import claim_on_rank0

    comm = Communicator(MPI.COMM_WORLD)
    _numpy_warnings_once(comm.rank)
    lock = None
    try:
        _check_launch(comm.size)
        resume = None
        if args.resume is not None:
            if args.config is not None or args.out is not None:
                raise UsageError("--resume OUT continues the run in OUT with its own config: "
                                 "give no --config or --out with it")
            out = args.resume
            lock = claim_on_rank0(comm, out, resuming=True)
            cfg, resume = _resumable(comm, out, args.set)
        else:
            cfg = comm.collectively(config.load, args.config, args.set)
            out = comm.bcast(args.out or _default_out(cfg))
            lock = claim_on_rank0(comm, out, resuming=False)
        bcfg = cfg["backend"]
        local_rank, _, affinities = node_layout(comm.comm)
        threads = bcfg["threads"] or blas_threads(local_rank, affinities)
        backend = comm.collectively(make_backend, bcfg["device"], bcfg["dtype"], threads,
                                    local_rank=local_rank)
        gpus = comm.allgather((socket.gethostname(), backend.gpu_bus_id))
        if backend.name == "cupy" and len(set(gpus)) < len(gpus) and not bcfg["share_gpus"]:
            raise UsageError(f"{len(gpus)} ranks share {len(set(gpus))} GPU(s): start one "
                             "rank per GPU, or set backend.share_gpus = true")
        comm.intranode = bcfg["intranode"]
        if backend.name == "cupy":
            path = bcfg["mpi_device_path"]
            comm.device_path = (("direct" if cuda_aware_mpi() else "staged") if path == "auto"
                                else path)

        from hessmpi.trainer import make_run

        run = make_run(cfg, comm, backend, out, resume=resume)
        run.stop_signal = early[0] if early else 0
        summary = run.run()
    except UsageError as e:
        if comm.rank == 0 and _launcher_rank() == 0:   # singletons are all rank 0
            _error(str(e))
        return 2
    except RunFailed as e:
        if comm.rank == 0:
            _error(f"run failed: {e}")
        if isinstance(e, RankLost) and comm.size > 1:   # a rank that no longer answers
            comm.abort(1)
        return 1
    except RunStopped as e:
        if comm.rank == 0:
            print(f"hessmpi: {e}", file=sys.stderr, flush=True)
        return EXIT_STOPPED
    except BaseException as e:  # noqa: BLE001 - any other failure must end every rank
        if os.environ.get("HESSMPI_TRACEBACK"):
            traceback.print_exc()
        where = f"rank {comm.rank} of {comm.size}"
        cause = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        print(f"hessmpi: error on {where}: {cause}; ending all ranks", file=sys.stderr,
              flush=True)
        if lock is not None:
            lock.release()
        if comm.size > 1:
            comm.abort(1)
        return 1
    finally:
        # The run is over: a stop request arriving now (mpiexec's copy of a signal the ranks
        # already had) has nothing left to stop, and Python's finalization would give it its
        # default action back: death by the signal, and a wrong exit status for the job.
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        if lock is not None:
            lock.release()
    if comm.rank == 0:
        print(f"hessmpi: finished {summary['steps']} steps in {summary['wall_time']:.1f} s: "
              f"train loss {summary['train_loss']:.4g}, test loss {summary['test_loss']:.4g}, "
              f"test accuracy {summary['test_acc']:.4f}; results in {out}/metrics.h5",
              flush=True)
    return 0


def _numpy_warnings_once(rank: int) -> None:
    """NumPy's floating-point warnings (overflow, invalid value, division by zero: a run
    going wrong) become one line from rank 0, the first time, instead of source lines."""
    import numpy as np

    said = []

    def once(kind: str, flag: int) -> None:
        if rank == 0 and not said:
            said.append(kind)
            print(f"hessmpi: warning: floating-point {kind} (numbers out of range): the "
                  "run may be diverging; if it fails, lower optim.lr", file=sys.stderr,
                  flush=True)

    np.seterrcall(once)
    np.seterr(over="call", invalid="call", divide="call")


def _check_launch(size: int) -> None:
    """The MPI world must have the size the launcher started: srun with a PMI plugin the MPI
    library does not speak (e.g. --mpi=none) starts N singletons that train apart.

    The launcher's own count (PMI_SIZE, OMPI_COMM_WORLD_SIZE) is trusted first; without one,
    inside a SLURM step, the step's task count (SLURM_STEP_NUM_TASKS) is expected. (The
    wheel's mpiexec inside an allocation starts its proxies as a SLURM step of its own, but
    sets PMI_SIZE for the ranks.)"""
    env = os.environ
    expected = env.get("PMI_SIZE") or env.get("OMPI_COMM_WORLD_SIZE")
    source = "the launcher"
    if not expected and env.get("SLURM_STEP_ID") is not None:
        expected, source = env.get("SLURM_STEP_NUM_TASKS"), "SLURM"
    if expected and expected.isdigit() and int(expected) != size:
        raise UsageError(f"MPI sees {size} rank(s) but {source} started {expected} tasks: the "
                         "ranks are not connected; launch with 'srun --mpi=pmi2' (the mpich "
                         "wheel speaks PMI2) or the mpiexec of the MPI that mpi4py uses")


def _resumable(comm, out: Path, overrides: list[str]):
    """(config, (arrays, attrs)) to resume run directory ``out``: rank 0 picks the newest
    checkpoint that verifies and belongs to this run (same model, data and optimizer as the
    run's metrics.h5), every rank reads it; ``overrides`` apply on top of its config. A
    missing or damaged metrics.h5 is rebuilt from that checkpoint (rank 0 holds the lock)."""
    from hessmpi import config
    from hessmpi.checkpoint import CheckpointError, list_checkpoints, newest_valid, read_checkpoint
    from hessmpi.metrics import read_metrics, rebuild
    from hessmpi.sealed import DamagedFile

    def warn(message: str) -> None:
        print(f"hessmpi: warning: {message}", file=sys.stderr, flush=True)

    def pick() -> Path | None:
        if comm.rank != 0:
            return None
        results, own = out / "metrics.h5", None
        if not results.exists():
            if not list_checkpoints(out):
                raise UsageError(f"{out} holds no run to resume (no metrics.h5, no checkpoints)")
            warn(f"{out} has no metrics.h5")
        else:
            try:
                own = config.from_toml(read_metrics(results)[0]["config"])
            except DamagedFile as e:
                warn(str(e))
            except (UsageError, KeyError, ValueError) as e:
                warn(f"{results} holds no usable configuration ({e})")

        def accept(path, attrs):
            missing = [k for k in ("step", "epoch", "grad_evals", "wall_time", "config",
                                   "mpi_size", "signature") if k not in attrs]
            if missing:
                raise CheckpointError(f"{path} is not a training checkpoint (no "
                                      f"{', '.join(missing)})")
            try:
                theirs = config.from_toml(attrs["config"])
            except (UsageError, ValueError) as e:  # ValueError: tomllib.TOMLDecodeError
                raise CheckpointError(f"{path} holds a configuration this hessmpi cannot "
                                      f"use ({e})") from None
            differ = config.fixed_keys_differ(theirs, own) if own else []
            if differ:
                raise CheckpointError(f"{path} belongs to another run ({', '.join(differ)} "
                                      "differ from this run's metrics.h5)")

        path = newest_valid(out, accept, warn=warn)
        if own is None:   # metrics.h5 missing or unusable
            warn(rebuild(results, *read_checkpoint(path), path.name))
        return path

    path = comm.bcast(comm.collectively(pick))
    arrays, attrs = comm.collectively(read_checkpoint, path)
    saved = config.from_toml(attrs["config"])
    cfg = comm.collectively(config.load, None, overrides, base=saved)
    changed = config.fixed_keys_differ(cfg, saved)
    if changed:
        raise UsageError(f"--set {', '.join(changed)}: cannot change when a run is resumed "
                         "(fixes the model, the data or the optimizer state); start a new run "
                         "instead")
    if comm.rank == 0:
        print(f"hessmpi: resuming {out} from {path.name} (step {attrs['step']})", flush=True)
    return cfg, (arrays, attrs)


def _data(args) -> int:
    from hessmpi import importers
    from hessmpi.data import write_dataset

    if args.source == "digits":
        train, test, attrs = importers.digits(args.test_fraction, args.seed)
    elif args.source in importers.IDX_SETS:
        train, test, attrs = importers.mnist(args.images, args.labels, args.test_images,
                                             args.test_labels, args.n_train, kind=args.source)
    else:
        train, test, attrs = importers.synthetic(args.n_train, args.n_test, args.features,
                                                 args.classes, args.cond, args.separation,
                                                 args.seed)
    try:
        write_dataset(args.out, train, test, **attrs)
    except OSError as e:
        raise UsageError(f"cannot write {args.out}: {e.strerror or e}") from None
    print(f"hessmpi: wrote {args.out}: {len(train[1])} train and {len(test[1])} test samples "
          f"of {train[0].shape[1]} features, {attrs['n_classes']} classes")
    return 0


def _info(args) -> int:
    from hessmpi.info import describe, describe_run

    print(describe())
    if args.run is not None:
        print(describe_run(args.run))
    return 0


def _report(args) -> int:
    from hessmpi.report import report

    print(report(args.runs, csv_path=args.csv, plot_path=args.plot,
                 target_loss=args.target_loss, target_acc=args.target_acc,
                 baseline=args.baseline), flush=True)
    for what, path in (("table", args.csv), ("plot", args.plot)):
        if path is not None:
            print(f"hessmpi: wrote the {what} to {path}", file=sys.stderr, flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "train":
        return _train(args)
    handler = {"data": _data, "info": _info, "report": _report}[args.command]
    try:
        return handler(args)
    except UsageError as e:
        _error(str(e))
        return 2
