"""The configuration schema: every key, its type, default and allowed values, in one place.

A configuration is a nested dict ``{section: {key: value}}``. It comes from a TOML file,
then ``--set section.key=value`` overrides, and is validated as a whole before any rank
starts work. Unknown keys and bad values raise :class:`UsageError` naming the key, the
value and what is allowed.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hessmpi.errors import UsageError


@dataclass(frozen=True)
class Option:
    """One configuration key.

    kind: "int", "float", "str", "bool", "int_list", "float_list" or "table" (a TOML table:
    string keys, values TOML strings, numbers, booleans, lists or tables).
    choices: allowed values of a "str" option; ``pattern``: (regular expression, what it
    means in words) of further allowed values.
    low: smallest allowed value of a number (inclusive unless ``low_open``).
    applies: where the key means something, by the family of its section's ``name`` key
    (:func:`family`: the name itself, or "python"/"torch" for a model plug-in):
    {family: alternatives}, each alternative {other key: allowed
    values} (every condition of one alternative must hold; ``"*"``: any name); None:
    everywhere. A key set to a non-default value where it
    does not apply is refused.
    fixed: a resumed run must keep it (it fixes the model, the data or the shape of the
    optimizer state).
    """

    default: Any
    kind: str
    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    applies: dict[str, tuple[dict[str, tuple], ...]] | None = None
    fixed: bool = False
    pattern: tuple[str, str] | None = None


def _on(*names: str, **conditions: tuple) -> dict[str, tuple[dict[str, tuple], ...]]:
    """``applies`` for the section names ``names``, each under ``conditions``."""
    return {name: (conditions,) for name in names}


def _either(*rules: dict) -> dict[str, tuple[dict[str, tuple], ...]]:
    """``applies`` where any of ``rules`` does."""
    out: dict[str, tuple] = {}
    for rule in rules:
        for name, alternatives in rule.items():
            out[name] = out.get(name, ()) + alternatives
    return out


SGD, SECANT, DEFLATED = "sgd", "secant", "deflated"
HESSIAN_FREE, ENTROPY_SGD, ADAM = "hessian_free", "entropy_sgd", "adam"
ASGD, DCASGD = "asgd", "dcasgd"
QUASI_NEWTON = (SECANT, DEFLATED)
#: The methods of the synchronous SPMD trainer, and those of the asynchronous parameter
#: server (hessmpi.asynchronous: rank 0 serves the parameters, the other ranks push).
SYNCHRONOUS = (SGD, SECANT, DEFLATED, HESSIAN_FREE, ENTROPY_SGD, ADAM)
ASYNCHRONOUS = (ASGD, DCASGD)

# ----- model plug-ins: model.name = "python:MODULE:FACTORY" or "torch:MODULE:FACTORY" -----
PLUGIN_FAMILIES = ("python", "torch")
BUILTIN_MODELS = ("softmax", "mlp", "autoencoder", "cnn")
PLUGIN_PATTERN = (r"(python|torch):([A-Za-z_]\w*(\.[A-Za-z_]\w*)*|[^:]+\.py):[A-Za-z_]\w*",
                  "'python:MODULE:FACTORY' or 'torch:MODULE:FACTORY' (MODULE a dotted module "
                  "or a path to a .py file, FACTORY a function in it)")


def family(name: str | None) -> str | None:
    """The family of a section's ``name`` that ``Option.applies`` is keyed by: "python" or
    "torch" for a model plug-in ("python:MODULE:FACTORY"), else the name itself."""
    if isinstance(name, str) and name.partition(":")[0] in PLUGIN_FAMILIES and ":" in name:
        return name.partition(":")[0]
    return name


SCHEMA: dict[str, dict[str, Option]] = {
    "model": {
        "name": Option("softmax", "str", "softmax (multinomial logistic regression), mlp, "
                       "autoencoder (deep autoencoder of the inputs: logistic units, linear "
                       "code layer, cross-entropy reconstruction), cnn (conv 5x5, ReLU, 2x2 "
                       "max-pool blocks, then dense layers), or a plug-in: a model of the "
                       "protocol (python:) or a torch.nn.Module (torch:)",
                       choices=BUILTIN_MODELS, pattern=PLUGIN_PATTERN, fixed=True),
        "options": Option({}, "table", "keyword arguments of the plug-in's FACTORY",
                          applies=_on(*PLUGIN_FAMILIES), fixed=True),
        "channels": Option([32, 64], "int_list", "cnn: output channels of each conv 5x5 + "
                           "ReLU + 2x2 max-pool block", applies=_on("cnn"), fixed=True),
        "dense": Option([1024], "int_list", "cnn: widths of the hidden dense (ReLU) layers "
                        "after the conv blocks", applies=_on("cnn"), fixed=True),
        "hidden": Option([256, 256], "int_list", "MLP hidden layer widths",
                         applies=_on("mlp"), fixed=True),
        "activation": Option("relu", "str", "MLP hidden activation", choices=("relu", "tanh"),
                             applies=_on("mlp"), fixed=True),
        "encoder": Option([1000, 500, 250, 30], "int_list", "autoencoder encoder widths, the "
                          "last is the code; the decoder mirrors them",
                          applies=_on("autoencoder"), fixed=True),
        "l2": Option(1e-4, "float", "L2 penalty (l2/2)*||theta||^2 in the objective", low=0.0,
                     applies=_on(*BUILTIN_MODELS, "torch"), fixed=True),
    },
    "data": {
        "path": Option("data/digits.h5", "str", "HDF5 dataset file (groups train and test)",
                       fixed=True),
    },
    "optim": {
        "name": Option("sgd", "str", "optimizer: data-parallel SGD, SGD accelerated by the "
                       "workers' secant pairs, the deflated variant that tracks the top "
                       "Hessian eigenspace (ALGORITHM.md s.1-2, 7), and the comparators "
                       "distributed Hessian-free, Entropy-SGD and the asynchronous ASGD and "
                       "DC-ASGD (s.5), and Adam",
                       choices=(*SYNCHRONOUS, *ASYNCHRONOUS), fixed=True),
        "lr": Option(0.1, "float", "SGD learning rate eta", low=0.0, low_open=True),
        "momentum": Option(0.9, "float", "momentum (for secant: beta of the momentum on d; "
                           "for entropy_sgd: Nesterov's on the outer step; for adam: beta1)",
                           low=0.0, high=0.999999,
                           applies=_on(SGD, SECANT, DEFLATED, ENTROPY_SGD, ADAM)),
        "adam_beta2": Option(0.999, "float", "adam: decay of the second-moment average",
                             low=0.0, high=0.999999, applies=_on(ADAM)),
        "adam_eps": Option(1e-8, "float", "adam: epsilon added to the root of the second "
                           "moment", low=0.0, low_open=True, applies=_on(ADAM)),
        "nesterov": Option(False, "bool", "Nesterov momentum", applies=_on(SGD)),
        "weight_decay": Option(0.0, "float", "decoupled from the objective: added to the gradient",
                               low=0.0, applies=_on(SGD)),
        "schedule": Option("constant", "str", "learning-rate schedule",
                           choices=("constant", "step", "cosine")),
        "warmup_steps": Option(0, "int", "linear warm-up from lr/warmup_steps to lr", low=0),
        "decay_every": Option(1000, "int", "steps between decays of the step schedule", low=1,
                              applies=_on("*", schedule=("step",))),
        "decay_factor": Option(0.1, "float", "factor of each decay of the step schedule",
                               low=0.0, low_open=True, high=1.0,
                               applies=_on("*", schedule=("step",))),
        "min_lr": Option(0.0, "float", "final learning rate of the cosine schedule", low=0.0,
                         applies=_on("*", schedule=("cosine",))),
        # --- the secant method (ALGORITHM.md sections 1-2) ---
        "pairs": Option("probe", "str", "source of the secant pairs: the workers' probes, "
                        "their local drifts, the steps taken (history; overlap: y on the "
                        "rows consecutive batches share), or averaged iterates",
                        choices=("probe", "shared_probe", "local", "history", "overlap",
                                 "averaged"),
                        applies=_on(SECANT),
                        fixed=True),
        "probe": Option("sgd", "str", "probe direction of pairs = probe",
                        choices=("sgd", "random"), applies=_on(SECANT, pairs=("probe",)),
                        fixed=True),
        "probe_lr": Option(0.0, "float", "eta_probe of the sgd probe (0: the step's lr)",
                           low=0.0, applies=_either(
                               _on(SECANT, pairs=("probe",), probe=("sgd",)),
                               _on(SECANT, pairs=("shared_probe",)))),
        "probe_sigma": Option(1e-3, "float", "length of the random probe (deflated: of the "
                              "finite difference) relative to max(||theta||, 1)",
                              low=0.0, low_open=True,
                              applies=_either(_on(SECANT, pairs=("probe",), probe=("random",)),
                                              _on(DEFLATED))),
        "probe_every": Option(1, "int", "T: form new pairs every T steps (cost 1 + cost of "
                              "the probe / T gradients per step)", low=1,
                              applies=_either(
                                  _on(SECANT, pairs=("probe", "shared_probe", "history",
                                                     "overlap", "averaged")),
                                  _on(DEFLATED))),
        "probe_batch": Option(1.0, "float", "fraction of each minibatch the probe uses (< 1: "
                              "also its base gradient there, cost 2 * fraction)",
                              low=0.0, low_open=True, high=1.0,
                              applies=_on(SECANT, pairs=("probe", "averaged"))),
        "overlap": Option(0.25, "float", "fraction of each rank's minibatch that the next "
                          "one shares (y of pairs = overlap is on the shared rows)", low=0.0,
                          low_open=True, high=0.5, applies=_on(SECANT, pairs=("overlap",)),
                          fixed=True),
        "local_steps": Option(4, "int", "SGD gradient evaluations per synchronisation of "
                              "pairs = local", low=2, applies=_on(SECANT, pairs=("local",))),
        "pairs_per_rank": Option(1, "int", "k: pairs each rank adds per step", low=1,
                                 applies=_either(_on(SECANT, pairs=("probe",)), _on(DEFLATED)),
                                 fixed=True),
        "memory": Option(1, "int", "K: steps of pairs kept (ring buffer)", low=1,
                         applies=_on(SECANT), fixed=True),
        "damping": Option(0.1, "float", "lam: Y <- Y + lam*S", low=0.0, applies=_on(SECANT)),
        "curvature": Option("bfgs", "str", "step rule: the block rules bfgs, lsq, subspace "
                            "(all kept pairs at once), or lbfgs (the two-loop recursion, one "
                            "pair at a time: positive definite)",
                            choices=("bfgs", "lsq", "subspace", "lbfgs"), applies=_on(SECANT)),
        "powell": Option(False, "bool", "lbfgs: Powell-damp pairs of little curvature "
                         "instead of skipping them", applies=_on(SECANT, curvature=("lbfgs",))),
        "curvature_tol": Option(1e-6, "float", "tau of the curvature filter (lbfgs: a pair "
                                "is kept if s^T y > tau ||s|| ||y||)", low=0.0,
                                applies=_on(SECANT)),
        "lsq_mu": Option(1e-12, "float", "mu of the lsq rule, relative to tr(Y^T Y)/m",
                         low=0.0, applies=_on(SECANT, curvature=("lsq",))),
        "h0": Option("lr", "str", "scale of the initial inverse Hessian", choices=("lr", "bb"),
                     applies=_on(SECANT)),
        "newton_lr": Option(0.2, "float", "alpha: step length along the secant direction",
                            low=0.0, low_open=True, applies=_on(*QUASI_NEWTON)),
        "max_step_ratio": Option(10.0, "float", "clip ||d|| <= ratio * ||lr * g_bar||",
                                 low=0.0, low_open=True, applies=_on(SECANT)),
        "line_search": Option("none", "str", "on the global minibatch objective from "
                              "newton_lr (ALGORITHM.md s.8): armijo (backtracking) or wolfe "
                              "(strong Wolfe, no momentum); the SGD fallback is then searched "
                              "too", choices=("none", "armijo", "wolfe"),
                              applies=_on(SECANT, pairs=("probe", "shared_probe", "history",
                                                         "overlap"))),
        "ls_c1": Option(1e-4, "float", "c1 of the sufficient-decrease condition", low=0.0,
                        low_open=True, high=1.0,
                        applies=_either(_on(SECANT, line_search=("armijo", "wolfe")),
                                        _on(HESSIAN_FREE))),
        "ls_c2": Option(0.9, "float", "c2 of the strong Wolfe curvature condition", low=0.0,
                        low_open=True, high=1.0, applies=_on(SECANT, line_search=("wolfe",))),
        "ls_max_trials": Option(5, "int", "trials of the quasi-Newton (Hessian-free: CG) "
                                "step before the SGD fallback", low=1,
                                applies=_either(_on(SECANT, line_search=("armijo", "wolfe")),
                                                _on(HESSIAN_FREE))),
        # --- progressive batching (hessmpi.progressive; Bollapragada et al. 2018) ---
        "batch_test": Option("none", "str", "grow the batch when a variance test says noise "
                             "dominates: none, or inner_product (the augmented inner-product "
                             "test on every step's gradient; train.batch_size is the first "
                             "batch, up to the whole shard)", choices=("none", "inner_product"),
                             applies=_either(_on(SGD, ADAM, HESSIAN_FREE),
                                             _on(SECANT, pairs=("shared_probe", "history",
                                                                "averaged"))),
                             fixed=True),
        "batch_theta": Option(0.9, "float", "theta of the inner-product test", low=0.0,
                              low_open=True, applies=_on("*", batch_test=("inner_product",))),
        "batch_nu": Option(5.84, "float", "nu of the orthogonality test (5.84: an angle of "
                           "about 80 degrees, the papers' value)", low=0.0, low_open=True,
                           applies=_on("*", batch_test=("inner_product",))),
        "batch_pieces": Option(8, "int", "K: pieces of each rank's part of the batch whose "
                               "gradients estimate the variances (the same work; P (K - 1) "
                               "degrees of freedom)", low=2,
                               applies=_on("*", batch_test=("inner_product",))),
        # --- distributed Hessian-free (Martens 2010; He et al. 2016) ---
        "hf_damping": Option(1.0, "float", "initial Levenberg-Marquardt lambda of (G + lambda "
                             "I) d = -g", low=0.0, low_open=True, applies=_on(HESSIAN_FREE)),
        "hf_max_cg": Option(50, "int", "cap on CG iterations per step", low=1,
                            applies=_on(HESSIAN_FREE)),
        "hf_curvature_batch": Option(1.0, "float", "fraction of each rank's batch the "
                                     "curvature products read", low=0.0, low_open=True,
                                     high=1.0, applies=_on(HESSIAN_FREE)),
        "hf_cg_decay": Option(0.95, "float", "CG starts from this times the last step's "
                              "solution", low=0.0, high=1.0, applies=_on(HESSIAN_FREE)),
        "hf_precondition": Option(False, "bool", "precondition CG by (diag of the empirical "
                                  "Fisher + lambda)^0.75", applies=_on(HESSIAN_FREE)),
        # --- Entropy-SGD (Chaudhari et al. 2017) ---
        "entropy_steps": Option(20, "int", "L: inner Langevin steps per outer step, each on "
                                "a fresh minibatch", low=1, applies=_on(ENTROPY_SGD)),
        "entropy_lr": Option(0.1, "float", "eta': step of the inner loop", low=0.0,
                             low_open=True, applies=_on(ENTROPY_SGD)),
        "entropy_noise": Option(1e-4, "float", "eps: scale of the inner loop's Gaussian "
                                "noise (times sqrt(eta'))", low=0.0, applies=_on(ENTROPY_SGD)),
        "entropy_gamma": Option(0.03, "float", "gamma_0: the coupling of x' to x", low=0.0,
                                low_open=True, applies=_on(ENTROPY_SGD)),
        "entropy_scoping": Option(1e-3, "float", "gamma_1: gamma grows by (1 + gamma_1) per "
                                  "outer step", low=0.0, applies=_on(ENTROPY_SGD)),
        "entropy_alpha": Option(0.25, "float", "alpha of the running average mu of x'",
                                low=0.0, low_open=True, high=1.0, applies=_on(ENTROPY_SGD)),
        # --- asynchronous: a parameter server and workers (Zheng et al. 2017) ---
        "dc_lambda": Option(2.0, "float", "lambda_0 of the delay compensation lambda g*g*(w - "
                            "w_bak) (the paper: 2 adaptive, 0.04 constant)", low=0.0,
                            applies=_on(DCASGD)),
        "dc_adaptive": Option(True, "bool", "lambda_t = lambda_0 / sqrt(MeanSquare_t + eps), "
                              "elementwise (DC-ASGD-a); false: the constant lambda_0 "
                              "(DC-ASGD-c)", applies=_on(DCASGD), fixed=True),
        "dc_decay": Option(0.95, "float", "m of MeanSquare_t = m MeanSquare_t-1 + (1 - m) g*g",
                           low=0.0, high=0.999999, applies=_on(DCASGD, dc_adaptive=(True,))),
        "dc_epsilon": Option(1e-7, "float", "eps of lambda_t", low=0.0, low_open=True,
                             applies=_on(DCASGD, dc_adaptive=(True,))),
        "async_timeout": Option(300.0, "float", "seconds the server waits for a worker's "
                                "gradient before it ends the job (exit 1) naming the worker "
                                "(0: never)", low=0.0, applies=_on(*ASYNCHRONOUS)),
        "async_replay": Option([], "int_list", "test mode: the ranks of the workers in the "
                               "order the server takes their gradients, repeated (the run is "
                               "then deterministic); []: as they arrive",
                               applies=_on(*ASYNCHRONOUS)),
        "async_delay": Option([], "float_list", "emulated heterogeneous workers: seconds a "
                              "worker sleeps after each gradient, one value for every worker "
                              "or one per worker (ranks 1, 2, ...)", low=0.0,
                              applies=_on(*ASYNCHRONOUS)),
        "exchange": Option("allgather", "str", "how the optimizer's state is laid out and "
                           "pairs move: allgather (every rank holds it whole) or sharded "
                           "(each rank holds 1/P of every n-vector: ALGORITHM.md s.4); not "
                           "for hessian_free, entropy_sgd or adam",
                           choices=("allgather", "sharded"), applies=_on(SGD, *QUASI_NEWTON)),
        "check_every": Option(100, "int", "steps between checks that all ranks hold identical "
                              "parameters (0: never)", low=0, applies=_on(*SYNCHRONOUS)),
    },
    "train": {
        "steps": Option(1000, "int", "total optimizer steps", low=1, high=1e12),
        "batch_size": Option(64, "int", "minibatch size per rank (0: the rank's whole shard, "
                             "i.e. full batch on any number of ranks)", low=0, fixed=True),
        "seed": Option(0, "int", "seed of initialisation and sampling", low=0, fixed=True),
        "log_every": Option(10, "int", "steps between rows of metrics.h5 and progress lines",
                            low=1),
        "eval_every": Option(100, "int", "steps between test-set evaluations (0: only at the end)",
                             low=0),
        "max_loss_ratio": Option(10.0, "float", "fail the run (exit 1) when a step's training "
                                 "loss exceeds this multiple of the first step's (0: never)",
                                 low=0.0),
        "chance_window": Option(200, "int", "fail the run (exit 1) once every test "
                                "evaluation over this many steps found it at chance: accuracy "
                                "<= 1.5/C and training loss >= 0.9 ln C (0: never)", low=0),
    },
    "checkpoint": {
        "every": Option(0, "int", "steps between checkpoints (0: only at the end and on "
                        "SIGTERM/SIGUSR1)", low=0),
        "keep": Option(3, "int", "how many of the newest checkpoints to keep", low=1),
    },
    "backend": {
        "device": Option("auto", "str", "array backend device", choices=("auto", "cpu", "gpu")),
        "dtype": Option("float32", "str", "floating-point type of parameters and data",
                        choices=("float32", "float64"), fixed=True),
        "threads": Option(0, "int", "BLAS threads per rank (0: node cores / ranks on the node)",
                          low=0),
        "share_gpus": Option(False, "bool", "allow more ranks than GPUs on a node"),
        "intranode": Option("mpi", "str", "the gradient's collective: mpi (MPI's own "
                            "Allreduce / Reduce_scatter) or window (through an MPI-3 "
                            "shared-memory window of each node's ranks, two-level across "
                            "nodes, where it applies)", choices=("mpi", "window")),
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
        return ("one of " + ", ".join(repr(c) for c in opt.choices)
                + (f", or {opt.pattern[1]}" if opt.pattern else ""))
    what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "int_list": "a list of positive integers, e.g. [256, 256]",
            "float_list": "a list of numbers",
            "table": "a table of TOML values, e.g. {width = 16}"}[opt.kind]
    bounds = []
    if opt.low is not None:
        bounds.append(f"{'>' if opt.low_open else '>='} {opt.low:g}")
    if opt.high is not None:
        bounds.append(f"<= {opt.high:g}")
    what += " " + " and ".join(bounds) if bounds else ""
    return what + (", e.g. [0.0, 0.01]" if opt.kind == "float_list" else "")


def _coerce(name: str, opt: Option, value: Any) -> Any:
    """Check ``value`` against ``opt`` and return it in canonical type, or raise UsageError."""
    bad = UsageError(f"config key {name} = {value!r} is invalid: expected {_allowed(opt)}")
    if opt.kind == "bool":
        if not isinstance(value, bool):
            raise bad
        return value
    if opt.kind == "str":
        if not isinstance(value, str) or (opt.choices and value not in opt.choices and not (
                opt.pattern and re.fullmatch(opt.pattern[0], value))):
            raise bad
        return value
    if opt.kind == "table":
        if not isinstance(value, dict) or not _plain_toml(value):
            raise bad
        return copy.deepcopy(value)
    if opt.kind == "int_list":
        if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
            raise bad
        return list(value)
    if opt.kind == "float_list":
        if not isinstance(value, list):
            raise bad
        try:
            return [_coerce(name, dataclasses.replace(opt, kind="float"), v) for v in value]
        except UsageError:
            raise bad from None
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


def _plain_toml(value: Any) -> bool:
    """Whether ``value`` holds only what :func:`to_toml` writes back: strings, numbers,
    booleans, lists and tables with string keys (no dates or times)."""
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_toml(v) for k, v in value.items())
    if isinstance(value, list):
        return all(map(_plain_toml, value))
    return isinstance(value, (str, int, float, bool))


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


def _read_toml(path: Path) -> dict:
    """The TOML document at ``path``; UsageError naming the file if unreadable."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise UsageError(f"cannot read config file {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: not UTF-8 text ({e})") \
            from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"config file {path} is not valid TOML: {e}") from None


def _merge_tables(cfg: dict, doc: dict, where: str) -> set[tuple[str, str]]:
    """Merge ``{section: {key: value}}`` into ``cfg``; returns the keys given."""
    given = set()
    for section, table in doc.items():
        if not isinstance(table, dict):
            raise UsageError(f"{where}: top-level key {section!r} must be a [section]; "
                             f"known sections: {', '.join(SCHEMA)}")
        for key, value in table.items():
            _merge(cfg, section, key, value, where)
            given.add((section, key))
    return given


def from_dict(doc: dict, base: dict | None = None) -> dict[str, dict[str, Any]]:
    """``base`` (default: the defaults) updated by ``{section: {key: value}}``, validated as
    a file would be: the configuration of a script that builds its runs in Python."""
    cfg = copy.deepcopy(base) if base is not None else defaults()
    given = _merge_tables(cfg, doc, "configuration")
    _check_combinations(cfg)
    _check_applicable(cfg, given)
    return cfg


def load(path: str | Path | list | None, overrides: list[str] = (),
         base: dict | None = None) -> dict[str, dict[str, Any]]:
    """``base`` (default: the defaults), then the TOML file at ``path`` (if any; a list:
    each in turn, later ones overriding), then ``section.key=value`` overrides. A key given
    here (not inherited from ``base``) with a non-default value where it does not apply is
    refused."""
    cfg = copy.deepcopy(base) if base is not None else defaults()
    given: set[tuple[str, str]] = set()
    for one in ([] if path is None else path if isinstance(path, list) else [path]):
        given |= _merge_tables(cfg, _read_toml(Path(one)), str(one))
    for item in overrides:
        name, sep, text = item.partition("=")
        section, dot, key = name.strip().partition(".")
        if not sep or not dot:
            raise UsageError(f"--set {item!r}: expected section.key=value, e.g. optim.lr=0.05")
        key, entry, value = *_table_entry(cfg, section, key), _parse_value(text.strip())
        if entry:    # section.key.entry=value: one entry of a table key, the others kept
            value = {**cfg[section][key], entry: value}
        _merge(cfg, section, key, value, f"--set {item}")
        given.add((section, key))
    _check_combinations(cfg)
    _check_applicable(cfg, given)
    return cfg


def _table_entry(cfg: dict, section: str, key: str) -> tuple[str, str]:
    """(key, entry) of ``--set section.key.entry=value`` where section.key is a table
    (model.options.width=16); (key, "") otherwise."""
    head, dot, entry = key.partition(".")
    opt = SCHEMA.get(section, {}).get(head)
    if dot and opt is not None and opt.kind == "table" and entry:
        return head, entry
    return key, ""


def applies(cfg: dict, section: str, key: str) -> bool:
    """Whether ``section.key`` means something in configuration ``cfg`` (Option.applies)."""
    rule = SCHEMA[section][key].applies
    if rule is None:
        return True
    table = cfg[section]
    alternatives = rule.get(family(table.get("name")), ()) + rule.get("*", ())
    return any(all(table[k] in allowed for k, allowed in conditions.items())
               for conditions in alternatives)


def _where(section: str, rule: dict) -> str:
    """Where a key applies, in words: "optim.name = 'secant' with pairs = 'probe'"."""
    def one(name, conditions):
        where = [f"{k} = {' or '.join(map(repr, v))}" for k, v in conditions.items()]
        name = ("" if name == "*" else f"{section}.name = '{name}:MODULE:FACTORY'"
                if name in PLUGIN_FAMILIES else f"{section}.name = {name!r}")
        return " with ".join(filter(None, [name, " and ".join(where)]))
    return "; or ".join(one(name, c) for name, alternatives in rule.items()
                        for c in alternatives)


def _check_applicable(cfg: dict, given: set[tuple[str, str]]) -> None:
    for section, key in sorted(given):
        opt = SCHEMA[section][key]
        if cfg[section][key] != opt.default and not applies(cfg, section, key):
            table = cfg[section]
            ruling = dict.fromkeys(k for alternatives in opt.applies.values()
                                   for conditions in alternatives for k in conditions)
            here = ", ".join([f"{section}.name = {table['name']!r}",
                              *(f"{k} = {table[k]!r}" for k in ruling)])
            raise UsageError(f"config key {section}.{key} = {table[key]!r} does not apply "
                             f"with {here}: it applies with {_where(section, opt.applies)}; "
                             "remove it")


def fixed_keys_differ(a: dict, b: dict) -> list[str]:
    """The keys a resumed run must keep (Option.fixed) whose values differ between
    configurations a and b."""
    return [f"{sec}.{key}" for sec, keys in SCHEMA.items() for key, opt in keys.items()
            if opt.fixed and a[sec][key] != b[sec][key]]


def _check_combinations(cfg: dict) -> None:
    """Rules that involve several keys beyond where each applies."""
    o = cfg["optim"]
    if cfg["model"]["name"] == "autoencoder" and not cfg["model"]["encoder"]:
        raise UsageError("model.encoder = [] is invalid with model.name = 'autoencoder': give "
                         "the encoder widths, the last the code, e.g. [1000, 500, 250, 30]")
    if (o["name"] == SECANT and o["pairs"] == "probe" and o["probe"] == "sgd"
            and o["pairs_per_rank"] > (cfg["train"]["batch_size"] or math.inf)):
        raise UsageError(f"optim.pairs_per_rank = {o['pairs_per_rank']} is invalid with "
                         f"train.batch_size = {cfg['train']['batch_size']}: the sgd probe "
                         "splits each minibatch into pairs_per_rank sub-batches")
    if o["name"] == SECANT and o["pairs"] == "overlap" and not cfg["train"]["batch_size"]:
        raise UsageError("optim.pairs = 'overlap' is invalid with train.batch_size = 0 (full "
                         "batch: every batch is the last one): use optim.pairs = 'history', "
                         "whose pairs are then on the whole batch at no cost")
    if o["batch_test"] != "none":
        _check_batch_test(cfg)
    if o["name"] == SECANT and o["line_search"] == "wolfe" and o["momentum"] != 0:
        raise UsageError(f"optim.momentum = {o['momentum']!r} is invalid with "
                         "optim.line_search = 'wolfe', which searches along the quasi-Newton "
                         "direction alone: use optim.momentum = 0")


def _check_batch_test(cfg: dict) -> None:
    o, batch = cfg["optim"], cfg["train"]["batch_size"]
    said = f"optim.batch_test = {o['batch_test']!r} is invalid with "
    if not batch:
        raise UsageError(said + "train.batch_size = 0 (full batch: there is no larger batch "
                         "to grow to): give the first batch per rank")
    if o["exchange"] != "allgather":
        raise UsageError(said + f"optim.exchange = {o['exchange']!r} (the test needs the "
                         "whole gradient on every rank): use optim.exchange = 'allgather'")
    if o["batch_pieces"] > batch:
        raise UsageError(f"optim.batch_pieces = {o['batch_pieces']} is invalid with "
                         f"train.batch_size = {batch}: every piece needs a row")


_TYPES = {"int": int, "float": float, "str": str, "bool": bool, "int_list": list,
          "float_list": list, "table": dict}


@functools.cache
def _options_class(section: str, name: str | None) -> type:
    fields = [(key, _TYPES[opt.kind]) for key, opt in SCHEMA[section].items()
              if opt.applies is None or name in opt.applies or "*" in opt.applies]
    title = "".join(w.title() for w in f"{name or ''} {section}".split())
    return dataclasses.make_dataclass(f"{title}Options", fields, frozen=True)


def options(cfg: dict, section: str):
    """The typed options of ``section`` (a frozen dataclass, attribute access): for a section
    with a ``name`` key, only the keys that can apply to that name (model.name,
    optim.name); reading another is an AttributeError."""
    table = cfg[section]
    cls = _options_class(section, family(table.get("name")))
    return cls(**{f.name: copy.deepcopy(table[f.name]) for f in dataclasses.fields(cls)})


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + "".join("\\" + c if c in '"\\' else f"\\u{ord(c):04x}"
                             if ord(c) < 0x20 or c == "\x7f" else c for c in value) + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_value(k)} = {_toml_value(v)}"
                               for k, v in value.items()) + "}"
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
