"""The recorded trajectories: a matrix of configurations trained through ``hessmpi train``
on 1, 2 and 3 ranks, each summarised by digests of its final parameters and of its metrics
rows. ``fixtures/trajectories.json`` holds the digests recorded on the code before the
redesign of issue 14 (commit 85319cf); ``test_trajectories.py`` checks today's code
reproduces them bitwise. Configurations whose behaviour a later issue changed on purpose
are listed in CHANGED with the reason; they were recorded again after that change, and the
earlier record is kept under the key NAME@RANKS#before (the legacy checkpoints, written
before the change, are compared with it).

    python tests/e2e/trajectories.py --record          # rewrite the fixture (on purpose)
    python tests/e2e/trajectories.py --record NAME...  # record these again (CHANGED)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).parent / "fixtures"
DATA = FIXTURES / "traj_data.h5"          # 200 train / 50 test rows, 8 features, 3 classes
RECORD = FIXTURES / "trajectories.json"
STEPS = 30
RANKS = (1, 2, 3)
#: metrics columns of the trajectory (not the timings and bytes of this machine), as recorded
COMPARED = ("epoch", "fallback", "forward_evals", "grad_evals", "grad_norm", "rank_kept",
            "step", "step_norm", "test_acc", "test_loss", "train_loss")

BASE = ["backend.dtype=float64",
        "backend.device=cpu", "backend.threads=1", f"train.steps={STEPS}", "train.batch_size=8",
        "train.seed=3", "train.log_every=5", "train.eval_every=10", "optim.check_every=10"]
MLP = ["model.name=mlp", "model.hidden=[8]", "model.activation=tanh"]
SECANT = ["optim.name=secant", "optim.lr=0.05"]
LBFGS = ["optim.name=secant", "optim.pairs=history", "optim.line_search=armijo",
         "optim.newton_lr=1", "optim.momentum=0", "optim.damping=0", "optim.h0=bb",
         "optim.max_step_ratio=1e4", "optim.lr=0.5"]

#: configurations recorded again after a deliberate change of behaviour, and why
SEARCHED = ("issue 15: with a line search the SGD fallback is searched too (momentum dropped, "
            "no step if nothing decreases F), so a run with a fallback moves differently")
FULL = ("; at full batch the line search's trials are gradients, the accepted one the next "
        "step's, and the batch is the shard as stored (not permuted), which changes the "
        "rounding")
CHANGED = {"secant-subspace-armijo": SEARCHED, "secant-history-minibatch": SEARCHED,
           "secant-history-fullbatch": SEARCHED + FULL,
           "secant-history-softmax-fullbatch": SEARCHED + FULL}

#: name -> --set overrides on top of BASE
MATRIX: dict[str, list[str]] = {
    "sgd-nesterov-wd-cosine": ["optim.nesterov=true", "optim.weight_decay=1e-3",
                               "optim.schedule=cosine", "optim.warmup_steps=3",
                               "optim.min_lr=0.01"],
    "sgd-step-relu": ["model.activation=relu", "optim.schedule=step", "optim.decay_every=10",
                      "optim.decay_factor=0.5", "optim.momentum=0.5"],
    "sgd-float32": ["backend.dtype=float32"],
    "sgd-autoencoder": ["model.name=autoencoder", "model.encoder=[4, 2]", "optim.lr=0.01"],
    "secant-probe": SECANT,
    "secant-probe-k2-mem3-T2-pb": [*SECANT, "optim.pairs_per_rank=2", "optim.memory=3",
                                   "optim.probe_every=2", "optim.probe_batch=0.5"],
    "secant-random-lsq-bb-mem2": [*SECANT, "optim.probe=random", "optim.curvature=lsq",
                                  "optim.h0=bb", "optim.memory=2", "optim.probe_sigma=0.01"],
    "secant-subspace-armijo": [*SECANT, "optim.curvature=subspace",
                               "optim.line_search=armijo", "optim.newton_lr=1",
                               "optim.memory=2"],
    "secant-local": [*SECANT, "optim.pairs=local", "optim.local_steps=3"],
    "secant-history-minibatch": [*LBFGS, "optim.memory=4"],
    "secant-history-fullbatch": [*LBFGS, "optim.memory=5", "train.batch_size=0"],
    "secant-history-softmax-fullbatch": [*LBFGS, "optim.memory=3", "train.batch_size=0",
                                         "model.name=softmax", "optim.probe_every=2"],
    "deflated": ["optim.name=deflated", "optim.lr=0.05", "optim.pairs_per_rank=2",
                 "optim.probe_every=5", "optim.newton_lr=0.5"],
}


def config(name: str) -> list[str]:
    """The overrides of configuration ``name``: the MLP unless it names another model."""
    sets = MATRIX[name]
    return sets if any(s.startswith("model.name=") for s in sets) else [*MLP, *sets]


def digest(array) -> str:
    return hashlib.blake2b(np.ascontiguousarray(array).tobytes(), digest_size=16).hexdigest()


def summarise(out: Path) -> dict:
    """Digests of run directory ``out``: final parameters, the optimizer state, the
    compared metrics columns, and the fallback counters."""
    from hessmpi.checkpoint import list_checkpoints, read_checkpoint
    from hessmpi.metrics import read_metrics

    (step, path), *_ = list_checkpoints(out)
    arrays, attrs = read_checkpoint(path)
    m_attrs, cols = read_metrics(out / "metrics.h5")
    return {
        "step": int(step),
        "params": digest(arrays["params"]),
        "metrics": digest(np.concatenate([np.asarray(cols[k], dtype=np.float64)
                                          for k in COMPARED])),
        "train_loss": float(cols["train_loss"][-1]),
        "grad_evals": float(attrs["grad_evals"]),
        "forward_evals": int(attrs.get("forward_evals", 0)),
        "fallback_reasons": json.loads(m_attrs.get("fallback_reasons") or "{}"),
    }


def train_one(name: str, ranks: int, workdir: Path, train) -> dict:
    """Train configuration ``name`` on ``ranks`` ranks with ``train(*args, n=ranks,
    cwd=...)`` (the CLI runner of the e2e suite) and summarise it."""
    shutil.copy(DATA, workdir / "data.h5")
    out = workdir / f"{name}-{ranks}"
    sets = [*BASE, "data.path=data.h5", *config(name)]
    args = [a for s in sets for a in ("--set", s)]
    result = train(*args, "--out", out, n=ranks, cwd=workdir)
    if result.rc != 0:
        raise RuntimeError(f"{name} on {ranks} ranks: {result}")
    return summarise(out)


def record(names=None) -> None:
    """Record every configuration, or again only ``names`` (each in CHANGED), keeping the
    earlier record under NAME@RANKS#before."""
    sys.path.insert(0, str(Path(__file__).parent))
    from clirun import train

    table = json.loads(RECORD.read_text()) if names else {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names or MATRIX:
            if names and name not in CHANGED:
                raise SystemExit(f"{name} is not in CHANGED: say why it changed first")
            for ranks in RANKS:
                key = f"{name}@{ranks}"
                if names:
                    table.setdefault(f"{key}#before", table[key])
                table[key] = train_one(name, ranks, Path(tmp), train)
                print(name, ranks, table[key], flush=True)
    RECORD.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def make_data() -> None:
    from hessmpi.data import write_dataset
    from hessmpi.importers import synthetic

    train_, test_, attrs = synthetic(200, 50, 8, 3, 10.0, 2.0, 7)
    write_dataset(DATA, train_, test_, **attrs)




#: configurations whose half-way checkpoint, written by the code before the redesign, is
#: kept under fixtures/legacy/NAME (2 ranks: metrics.h5 of the whole run and
#: checkpoints/ckpt_15.h5 only, as a run killed after step 15 would leave them)
LEGACY = ("secant-probe-k2-mem3-T2-pb", "secant-history-minibatch", "deflated",
          "sgd-nesterov-wd-cosine")


def record_legacy() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from clirun import train

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copy(DATA, tmp / "data.h5")
        for name in LEGACY:
            out = tmp / name
            sets = [*BASE, "data.path=data.h5", *config(name), f"checkpoint.every={STEPS // 2}"]
            result = train(*[a for s in sets for a in ("--set", s)], "--out", out, n=2,
                           cwd=tmp)
            if result.rc != 0:
                raise RuntimeError(str(result))
            dest = FIXTURES / "legacy" / name
            shutil.rmtree(dest, ignore_errors=True)
            (dest / "checkpoints").mkdir(parents=True)
            shutil.copy(out / "metrics.h5", dest / "metrics.h5")
            shutil.copy(out / "checkpoints" / f"ckpt_{STEPS // 2:09d}.h5",
                        dest / "checkpoints")


if __name__ == "__main__":
    if "--record" in sys.argv:
        only = sys.argv[sys.argv.index("--record") + 1:]
        if only:
            record(only)
        else:
            if not DATA.exists():
                make_data()
            record()
            record_legacy()
