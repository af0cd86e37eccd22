"""The configuration schema: every key, its type, default and allowed values, in one place.

A configuration is a nested dict ``{section: {key: value}}``. It comes from a TOML file,
then ``--set section.key=value`` overrides, and is validated as a whole before any rank
starts work. Unknown keys and bad values raise :class:`UsageError` naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hessmpi.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One configuration key.

    kind: "int", "float", "str", "bool" or "int_list".
    choices: allowed values of a "str" option.
    low: smallest allowed value of a number (inclusive unless ``low_open``).
    """

    default: Any
    kind: str
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    low_open: bool = False
    high: float | None = None


SCHEMA: dict[str, dict[str, Option]] = {
    "model": {
        "name": Option("softmax", "str", "softmax (multinomial logistic regression), mlp, or "
                       "autoencoder (deep autoencoder of the inputs: logistic units, linear "
                       "code layer, cross-entropy reconstruction)",
                       choices=("softmax", "mlp", "autoencoder")),
        "hidden": Option([256, 256], "int_list", "MLP hidden layer widths (ignored by softmax)"),
        "activation": Option("relu", "str", "MLP hidden activation", choices=("relu", "tanh")),
        "encoder": Option([1000, 500, 250, 30], "int_list", "autoencoder encoder widths, the "
                          "last is the code; the decoder mirrors them"),
        "l2": Option(1e-4, "float", "L2 penalty (l2/2)*||theta||^2 in the objective", low=0.0),
    },
    "data": {
        "path": Option("data/digits.h5", "str", "HDF5 dataset file (groups train and test)"),
    },
    "optim": {
        "name": Option("sgd", "str", "optimizer: data-parallel SGD, SGD accelerated by the "
                       "workers' secant pairs, or the deflated variant that tracks the top "
                       "Hessian eigenspace (ALGORITHM.md s.1-2, 7)",
                       choices=("sgd", "secant", "deflated")),
        "lr": Option(0.1, "float", "SGD learning rate eta", low=0.0, low_open=True),
        "momentum": Option(0.9, "float", "momentum (for secant: beta of the momentum on d)",
                           low=0.0, high=0.999999),
        "nesterov": Option(False, "bool", "Nesterov momentum"),
        "weight_decay": Option(0.0, "float", "decoupled from the objective: added to the gradient",
                               low=0.0),
        "schedule": Option("constant", "str", "learning-rate schedule",
                           choices=("constant", "step", "cosine")),
        "warmup_steps": Option(0, "int", "linear warm-up from lr/warmup_steps to lr", low=0),
        "decay_every": Option(1000, "int", "steps between decays of the step schedule", low=1),
        "decay_factor": Option(0.1, "float", "factor of each decay of the step schedule",
                               low=0.0, low_open=True, high=1.0),
        "min_lr": Option(0.0, "float", "final learning rate of the cosine schedule", low=0.0),
        # --- the secant method (ALGORITHM.md sections 1-2) ---
        "pairs": Option("probe", "str", "source of the secant pairs: the workers' probes, "
                        "their local drifts, or the steps taken (history)",
                        choices=("probe", "local", "history")),
        "probe": Option("sgd", "str", "probe direction of pairs = probe",
                        choices=("sgd", "random")),
        "probe_lr": Option(0.0, "float", "eta_probe of the sgd probe (0: the step's lr)",
                           low=0.0),
        "probe_sigma": Option(1e-3, "float", "length of the random probe relative to "
                              "max(||theta||, 1)", low=0.0, low_open=True),
        "probe_every": Option(1, "int", "T: form new pairs every T steps (cost 1 + cost of "
                              "the probe / T gradients per step)", low=1),
        "probe_batch": Option(1.0, "float", "fraction of each minibatch the probe uses (< 1: "
                              "also its base gradient there, cost 2 * fraction)",
                              low=0.0, low_open=True, high=1.0),
        "local_steps": Option(4, "int", "SGD gradient evaluations per synchronisation of "
                              "pairs = local", low=2),
        "pairs_per_rank": Option(1, "int", "k: pairs each rank adds per step", low=1),
        "memory": Option(1, "int", "K: steps of pairs kept (ring buffer)", low=1),
        "damping": Option(0.1, "float", "lam: Y <- Y + lam*S", low=0.0),
        "curvature": Option("bfgs", "str", "step rule", choices=("bfgs", "lsq", "subspace")),
        "curvature_tol": Option(1e-6, "float", "tau of the curvature filter", low=0.0),
        "lsq_mu": Option(1e-12, "float", "mu of the lsq rule, relative to tr(Y^T Y)/m",
                         low=0.0),
        "h0": Option("lr", "str", "scale of the initial inverse Hessian", choices=("lr", "bb")),
        "newton_lr": Option(0.2, "float", "alpha: step length along the secant direction",
                            low=0.0, low_open=True),
        "max_step_ratio": Option(10.0, "float", "clip ||d|| <= ratio * ||lr * g_bar||",
                                 low=0.0, low_open=True),
        "line_search": Option("none", "str", "backtracking (Armijo) on the global minibatch "
                              "objective, starting at newton_lr (ALGORITHM.md s.8)",
                              choices=("none", "armijo")),
        "ls_c1": Option(1e-4, "float", "c1 of the Armijo condition", low=0.0, low_open=True,
                        high=1.0),
        "ls_max_trials": Option(5, "int", "trial steps (halving) before the SGD fallback",
                                low=1),
        "exchange": Option("allgather", "str", "how pairs move between ranks",
                           choices=("allgather",)),
        "check_every": Option(100, "int", "steps between checks that all ranks hold identical "
                              "parameters (0: never)", low=0),
    },
    "train": {
        "steps": Option(1000, "int", "total optimizer steps", low=1, high=1e12),
        "batch_size": Option(64, "int", "minibatch size per rank (0: the rank's whole shard, "
                             "i.e. full batch on any number of ranks)", low=0),
        "seed": Option(0, "int", "seed of initialisation and sampling", low=0),
        "log_every": Option(10, "int", "steps between rows of metrics.h5 and progress lines",
                            low=1),
        "eval_every": Option(100, "int", "steps between test-set evaluations (0: only at the end)",
                             low=0),
    },
    "checkpoint": {
        "every": Option(0, "int", "steps between checkpoints (0: only at the end and on "
                        "SIGTERM/SIGUSR1)", low=0),
        "keep": Option(3, "int", "how many of the newest checkpoints to keep", low=1),
    },
    "backend": {
        "device": Option("auto", "str", "array backend device", choices=("auto", "cpu", "gpu")),
        "dtype": Option("float32", "str", "floating-point type of parameters and data",
                        choices=("float32", "float64")),
        "threads": Option(0, "int", "BLAS threads per rank (0: node cores / ranks on the node)",
                          low=0),
        "share_gpus": Option(False, "bool", "allow more ranks than GPUs on a node"),
        "mpi_device_path": Option("auto", "str", "how GPU buffers reach MPI: direct (a "
                                  "CUDA-aware MPI), staged (through pinned host buffers), or "
                                  "auto (direct if the MPI library says it is CUDA-aware)",
                                  choices=("auto", "direct", "staged")),
    },
}


def defaults() -> dict[str, dict[str, Any]]:
    """The configuration with every key at its default."""
    return {sec: {k: copy.deepcopy(o.default) for k, o in keys.items()}
            for sec, keys in SCHEMA.items()}


def _allowed(opt: Option) -> str:
    if opt.choices:
        return "one of " + ", ".join(repr(c) for c in opt.choices)
    what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "int_list": "a list of positive integers, e.g. [256, 256]"}[opt.kind]
    bounds = []
    if opt.low is not None:
        bounds.append(f"{'>' if opt.low_open else '>='} {opt.low:g}")
    if opt.high is not None:
        bounds.append(f"<= {opt.high:g}")
    return what + (" " + " and ".join(bounds) if bounds else "")


def _coerce(name: str, opt: Option, value: Any) -> Any:
    """Check ``value`` against ``opt`` and return it in canonical type, or raise UsageError."""
    bad = UsageError(f"config key {name} = {value!r} is invalid: expected {_allowed(opt)}")
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if opt.kind == "str":
        if not isinstance(value, str) or (opt.choices and value not in opt.choices):
            raise bad
        return value
    if opt.kind == "int_list":
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise bad
        return list(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if opt.kind == "int":
        if isinstance(value, float):
            if not value.is_integer():
                raise bad
            value = int(value)
    else:
        value = float(value)
        if not math.isfinite(value):
            raise bad
    if opt.low is not None and (value < opt.low or (opt.low_open and value == opt.low)):
        raise bad
    if opt.high is not None and value > opt.high:
        raise bad
    return value


def _parse_value(text: str) -> Any:
    """A ``--set`` value: a TOML literal (number, bool, list, quoted string) or a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _merge(cfg: dict, section: str, key: str, value: Any, where: str) -> None:
    if section not in SCHEMA:
        raise UsageError(f"{where}: unknown config section [{section}]; "
                         f"known sections: {', '.join(SCHEMA)}")
    if key not in SCHEMA[section]:
        raise UsageError(f"{where}: unknown config key {section}.{key}; known keys of "
                         f"[{section}]: {', '.join(SCHEMA[section])}")
    cfg[section][key] = _coerce(f"{section}.{key}", SCHEMA[section][key], value)


def load(path: str | Path | None, overrides: list[str] = (),
         base: dict | None = None) -> dict[str, dict[str, Any]]:
    """``base`` (default: the defaults), then the TOML file at ``path`` (if any), then
    ``section.key=value`` overrides."""
    cfg = copy.deepcopy(base) if base is not None else defaults()
    if path is not None:
        path = Path(path)
        try:
            text = path.read_bytes().decode("utf-8")
        except OSError as e:
            raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise UsageError(f"config file {path} is not valid TOML: not UTF-8 text ({e})") \
                from None
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise UsageError(f"config file {path} is not valid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise UsageError(f"{path}: top-level key {section!r} must be a [section]; "
                                 f"known sections: {', '.join(SCHEMA)}")
            for key, value in table.items():
                _merge(cfg, section, key, value, str(path))
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise UsageError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.05")
        _merge(cfg, section, key, _parse_value(text.strip()), f"--set {item}")
    _check_combinations(cfg)
    return cfg


#: Keys that fix the model, the data, or the shape of the optimizer state: a resumed run
#: must keep them.
FIXED_ON_RESUME = ("model.name", "model.hidden", "model.activation", "model.l2", "data.path",
                   "backend.dtype", "train.seed", "train.batch_size", "optim.name",
                   "optim.pairs", "optim.probe", "optim.pairs_per_rank", "optim.memory")


def fixed_keys_differ(a: dict, b: dict) -> list[str]:
    """The FIXED_ON_RESUME keys whose values differ between configurations a and b."""
    return [k for k in FIXED_ON_RESUME
            if a[k.split(".")[0]][k.split(".")[1]] != b[k.split(".")[0]][k.split(".")[1]]]


def _check_combinations(cfg: dict) -> None:
    """Rules that involve several keys."""
    o = cfg["optim"]
    if cfg["model"]["name"] == "autoencoder" and not cfg["model"]["encoder"]:
        raise UsageError("model.encoder = [] is invalid with model.name = 'autoencoder': give "
                         "the encoder widths, the last the code, e.g. [1000, 500, 250, 30]")
    if o["name"] == "secant" and o["pairs"] == "local" and o["line_search"] != "none":
        raise UsageError("optim.line_search = 'armijo' is invalid with optim.pairs = 'local': "
                         "the step starts from the ranks' averaged point, whose objective is "
                         "not known")
    if o["name"] == "deflated":
        for key, allowed in (("memory", 1), ("pairs", "probe"), ("probe_batch", 1.0),
                             ("line_search", "none")):
            if o[key] != allowed:
                raise UsageError(f"optim.{key} = {o[key]!r} is invalid with optim.name = "
                                 f"'deflated', which tracks one basis: use {allowed!r}")
    if (o["name"] == "secant" and o["pairs"] == "probe" and o["probe"] == "sgd"
            and o["pairs_per_rank"] > (cfg["train"]["batch_size"] or math.inf)):
        raise UsageError(f"optim.pairs_per_rank = {o['pairs_per_rank']} is invalid with "
                         f"train.batch_size = {cfg['train']['batch_size']}: the sgd probe "
                         "splits each minibatch into pairs_per_rank sub-batches")
    if o["name"] == "secant" and o["pairs"] == "local" and (o["probe_every"] != 1
                                                            or o["probe_batch"] != 1.0):
        raise UsageError("optim.probe_every and optim.probe_batch apply to optim.pairs = "
                         "'probe'; pairs = 'local' forms its pairs at every synchronisation")
    if o["name"] == "secant" and o["pairs"] == "history" and (o["pairs_per_rank"] != 1
                                                              or o["probe_batch"] != 1.0):
        raise UsageError("optim.pairs_per_rank and optim.probe_batch apply to optim.pairs = "
                         "'probe'; pairs = 'history' forms one global pair per step (use 1)")
    if o["name"] == "secant" and o["pairs"] == "local" and o["pairs_per_rank"] != 1:
        raise UsageError(f"optim.pairs_per_rank = {o['pairs_per_rank']} is invalid with "
                         "optim.pairs = 'local': each rank's drift gives one pair; use 1")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}"
                             if ord(c) < 0x20 or c == "\x7f" else c for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def to_toml(cfg: dict[str, dict[str, Any]]) -> str:
    """The effective configuration as TOML text; ``load`` of it gives ``cfg`` back."""
    lines = []
    for section, table in cfg.items():
        lines.append(f"[{section}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in table.items()]
        lines.append("")
    return "\n".join(lines)


def from_toml(text: str) -> dict[str, dict[str, Any]]:
    """Parse and validate a stored effective configuration (as written by :func:`to_toml`)."""
    cfg = defaults()
    for section, table in tomllib.loads(text).items():
        for key, value in table.items():
            _merge(cfg, section, key, value, "stored config")
    _check_combinations(cfg)
    return cfg
