"""Configuration: defaults, TOML files, --set overrides, validation messages, round trips."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from hessmpi import config
from hessmpi.errors import UsageError

# The documented keys and defaults (CONTRACT.md and the README), written out by hand.
DOCUMENTED_DEFAULTS = {
    ("model", "name"): "softmax",
    ("model", "hidden"): [256, 256],
    ("model", "activation"): "relu",
    ("model", "l2"): 1e-4,
    ("data", "path"): "data/digits.h5",
    ("optim", "name"): "sgd",
    ("optim", "lr"): 0.1,
    ("optim", "momentum"): 0.9,
    ("optim", "nesterov"): False,
    ("optim", "weight_decay"): 0.0,
    ("optim", "schedule"): "constant",
    ("optim", "warmup_steps"): 0,
    ("train", "steps"): 1000,
    ("train", "batch_size"): 64,
    ("train", "seed"): 0,
    ("train", "log_every"): 10,
    ("train", "eval_every"): 100,
    ("backend", "device"): "auto",
    ("backend", "dtype"): "float32",
}

TYPES = {"int": int, "float": float, "str": str, "bool": bool, "int_list": list,
         "float_list": list, "table": dict}


def test_defaults_hold_every_schema_key_with_its_type():
    cfg = config.defaults()
    assert set(cfg) == set(config.SCHEMA)
    for section, keys in config.SCHEMA.items():
        assert set(cfg[section]) == set(keys)
        for key, opt in keys.items():
            assert type(cfg[section][key]) is TYPES[opt.kind], (section, key)


def test_readme_table_documents_every_key_with_its_default():
    """Every schema key has a row in the README's configuration table, and the default shown
    there (first backquoted value of the row) parses as TOML to the schema's default."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = text.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in cells[0].replace("/", ",").split(","):
                rows[name.strip().strip("`")] = cells[1]
    defaults = config.defaults()
    for section, keys in config.SCHEMA.items():
        for key in keys:
            name = f"{section}.{key}"
            assert name in rows, f"{name} is missing from the README's configuration table"
            if "," in rows[name] or "/" in rows[name]:
                continue            # several keys share the row
            shown = rows[name].split("`")[1]
            try:
                value = tomllib.loads(f"v = {shown}")["v"]
            except tomllib.TOMLDecodeError:     # a bare string: sgd, float32, ...
                value = shown
            assert value == defaults[section][key], (name, shown)


@pytest.mark.parametrize(("section", "key"), list(DOCUMENTED_DEFAULTS))
def test_documented_defaults(section, key):
    value = config.defaults()[section][key]
    expected = DOCUMENTED_DEFAULTS[(section, key)]
    assert value == expected and type(value) is type(expected)


def test_defaults_are_fresh_copies():
    a = config.defaults()
    a["model"]["hidden"].append(7)
    assert config.defaults()["model"]["hidden"] == [256, 256]


def test_load_without_file_is_defaults():
    assert config.load(None) == config.defaults()
    assert config.load(None, []) == config.defaults()


def test_load_toml_file(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        '[model]\nname = "mlp"\nhidden = [32, 16]\nactivation = "tanh"\n\n'
        "[optim]\nlr = 1\nmomentum = 0.5\nnesterov = true\n"
        "[train]\nsteps = 300.0\nbatch_size = 8\n"
        "[data]\npath = 'data/other.h5'\n"
    )
    cfg = config.load(path)
    expected = config.defaults()
    expected["model"].update(name="mlp", hidden=[32, 16], activation="tanh")
    expected["optim"].update(lr=1.0, momentum=0.5, nesterov=True)
    expected["train"].update(steps=300, batch_size=8)
    expected["data"]["path"] = "data/other.h5"
    assert cfg == expected
    # canonical types: an integer given for a float, an integral float given for an int
    assert type(cfg["optim"]["lr"]) is float
    assert type(cfg["train"]["steps"]) is int
    assert config.load(str(path)) == expected  # a str path works too


@pytest.mark.parametrize(("item", "section", "key", "expected"), [
    ("optim.lr=0.05", "optim", "lr", 0.05),
    ("optim.lr=2", "optim", "lr", 2.0),
    ("optim.lr=5e-3", "optim", "lr", 0.005),
    ("train.steps=1e3", "train", "steps", 1000),
    ("train.steps=20", "train", "steps", 20),
    ("train.steps=1e12", "train", "steps", 10**12),
    ("train.seed=0", "train", "seed", 0),
    ("optim.nesterov=true", "optim", "nesterov", True),
    ("optim.nesterov=false", "optim", "nesterov", False),
    ("model.hidden=[32, 16]", "model", "hidden", [32, 16]),
    ("model.hidden=[8]", "model", "hidden", [8]),
    ('model.name="mlp"', "model", "name", "mlp"),
    ("model.name='mlp'", "model", "name", "mlp"),
    ("model.name=mlp", "model", "name", "mlp"),
    ("data.path=data/mnist.h5", "data", "path", "data/mnist.h5"),
    ('data.path="with space.h5"', "data", "path", "with space.h5"),
    ("data.path=a=b.h5", "data", "path", "a=b.h5"),
    ("  optim.momentum = 0.25  ", "optim", "momentum", 0.25),
])
def test_set_overrides_parse_toml_literals(item, section, key, expected):
    cfg = config.load(None, ["model.name=mlp", item])   # the mlp: model.hidden applies
    assert cfg[section][key] == expected
    assert type(cfg[section][key]) is type(expected)
    # nothing else changed
    rest = config.defaults()
    rest["model"]["name"] = "mlp"
    rest[section][key] = expected
    assert cfg == rest


def test_overrides_apply_after_file_and_in_order(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[optim]\nlr = 0.3\nmomentum = 0.2\n")
    cfg = config.load(path, ["optim.lr=0.2", "optim.lr=0.7", "train.steps=5"])
    assert cfg["optim"]["lr"] == 0.7
    assert cfg["optim"]["momentum"] == 0.2
    assert cfg["train"]["steps"] == 5


# (--set item, substrings the message must contain: the key and what is allowed)
BAD_SETS = [
    # unknown section / key
    ("foo.bar=1", ["foo", "model", "optim", "train"]),
    ("optim.learning_rate=1", ["optim.learning_rate", "lr", "momentum"]),
    # wrong type
    ("optim.lr=true", ["optim.lr", "a number > 0"]),
    ("optim.lr=fast", ["optim.lr", "a number > 0"]),
    ("optim.lr=[1]", ["optim.lr", "a number"]),
    ("model.l2=abc", ["model.l2", "a number >= 0"]),
    ("optim.nesterov=1", ["optim.nesterov", "true or false"]),
    ("optim.nesterov=yes", ["optim.nesterov", "true or false"]),
    ("optim.nesterov=True", ["optim.nesterov", "true or false"]),
    ("model.name=[1]", ["model.name", "'softmax'", "'mlp'"]),
    ("model.hidden=64", ["model.hidden", "list of positive integers"]),
    ("model.hidden=[64, 0]", ["model.hidden", "list of positive integers"]),
    ("model.hidden=[1.5]", ["model.hidden", "list of positive integers"]),
    ("model.hidden=[true]", ["model.hidden", "list of positive integers"]),
    ('model.hidden=["a"]', ["model.hidden", "list of positive integers"]),
    # bool for int, non-integer float for int
    ("train.steps=true", ["train.steps", "an integer >= 1"]),
    ("train.steps=10.5", ["train.steps", "an integer >= 1"]),
    ("train.batch_size=many", ["train.batch_size", "an integer >= 0"]),
    ("train.seed=inf", ["train.seed", "an integer >= 0"]),
    # out of range
    ("optim.lr=0", ["optim.lr", "> 0"]),
    ("optim.lr=-0.1", ["optim.lr", "> 0"]),
    ("optim.lr=inf", ["optim.lr", "a number"]),
    ("optim.lr=nan", ["optim.lr", "a number"]),
    ("optim.momentum=1.0", ["optim.momentum", ">= 0", "<= 0.999999"]),
    ("optim.momentum=-0.5", ["optim.momentum", ">= 0"]),
    ("optim.decay_factor=0", ["optim.decay_factor", "> 0", "<= 1"]),
    ("optim.decay_factor=1.5", ["optim.decay_factor", "<= 1"]),
    ("optim.decay_every=0", ["optim.decay_every", ">= 1"]),
    ("optim.warmup_steps=-1", ["optim.warmup_steps", ">= 0"]),
    ("train.steps=0", ["train.steps", ">= 1"]),
    ("train.steps=1e30", ["train.steps", "an integer >= 1 and <= 1e+12"]),
    ("train.steps=1000000000001", ["train.steps", "<= 1e+12"]),
    ("train.seed=-3", ["train.seed", ">= 0"]),
    ("model.l2=-1e-3", ["model.l2", ">= 0"]),
    # not in choices
    ("model.name=resnet", ["model.name", "'softmax'", "'mlp'"]),
    ("model.activation=sigmoid", ["model.activation", "'relu'", "'tanh'"]),
    ("optim.schedule=linear", ["optim.schedule", "'constant'", "'step'", "'cosine'"]),
    ("backend.dtype=float16", ["backend.dtype", "'float32'", "'float64'"]),
    ("backend.device=tpu", ["backend.device", "'auto'", "'cpu'", "'gpu'"]),
]


@pytest.mark.parametrize(("item", "needles"), BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_set_values_name_key_and_allowed(item, needles):
    with pytest.raises(UsageError) as exc:
        config.load(None, [item])
    msg = str(exc.value)
    for needle in needles:
        assert needle in msg, (needle, msg)


@pytest.mark.parametrize("item", ["optim.lr", "lr=0.1", "=1", ""])
def test_malformed_set_items(item):
    with pytest.raises(UsageError, match="section.key=value"):
        config.load(None, [item])


@pytest.mark.parametrize(("text", "needles"), [
    ("[optim]\nlr = -1\n", ["optim.lr", "> 0"]),
    ("[optim]\nrate = 1\n", ["optim.rate", "lr"]),
    ("[trainer]\nsteps = 1\n", ["trainer", "train"]),
    ("[train]\nsteps = 2.5\n", ["train.steps", "an integer"]),
    ("[train]\nsteps = false\n", ["train.steps", "an integer"]),
    ('[model]\nname = "resnet"\n', ["model.name", "'softmax'", "'cnn'", "python:MODULE"]),
    ("steps = 10\n", ["steps", "[section]"]),
    ("[model.extra]\nx = 1\n", ["model.extra"]),
])
def test_bad_file_values(tmp_path, text, needles):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as exc:
        config.load(path)
    msg = str(exc.value).replace(str(path), "")
    for needle in needles:
        assert needle in msg, (needle, msg)


def test_unknown_key_in_file_names_the_file(tmp_path):
    path = tmp_path / "where.toml"
    path.write_text("[optim]\nrate = 1\n")
    with pytest.raises(UsageError, match="where.toml"):
        config.load(path)


# ----- round trip -----------------------------------------------------------------------------
def test_to_toml_round_trips_defaults():
    cfg = config.defaults()
    back = config.from_toml(config.to_toml(cfg))
    assert back == cfg
    for section in cfg:
        for key in cfg[section]:
            assert type(back[section][key]) is type(cfg[section][key])


@pytest.mark.parametrize("lr", [0.1 + 0.2, 1e-300, 1e20, 3.0, 2.0 / 3.0, 123456.789e-7])
def test_to_toml_round_trips_non_defaults(tmp_path, lr):
    cfg = config.load(None, [
        "model.name=mlp", "model.hidden=[7, 5, 3]", "model.activation=tanh",
        "model.l2=0", "optim.nesterov=true", "optim.momentum=0.999999",
        "optim.schedule=cosine", "train.steps=12345", "backend.dtype=float64",
    ])
    cfg["optim"]["lr"] = lr
    cfg["data"]["path"] = 'dir with "quotes"/back\\slash/\u00fcnicode\u00e9\ttab.h5'
    text = config.to_toml(cfg)
    back = config.from_toml(text)
    assert back == cfg
    assert back["optim"]["lr"] == lr  # bit-exact float
    for section in cfg:
        for key in cfg[section]:
            assert type(back[section][key]) is type(cfg[section][key])
    # the text is also a valid config file
    path = tmp_path / "effective.toml"
    path.write_text(text, encoding="utf-8")
    assert config.load(path) == cfg


@pytest.mark.parametrize("path", ["line\nbreak.h5", "ctrl\x01.h5", "del\x7f.h5"])
def test_to_toml_round_trips_control_characters(path):
    cfg = config.defaults()
    cfg["data"]["path"] = path
    assert config.from_toml(config.to_toml(cfg)) == cfg


def test_from_toml_validates():
    with pytest.raises(UsageError, match="optim.lr"):
        config.from_toml("[optim]\nlr = 0\n")
    with pytest.raises(UsageError, match="optim.bogus"):
        config.from_toml("[optim]\nbogus = 1\n")


# ----- file errors ----------------------------------------------------------------------------
def test_missing_file(tmp_path):
    path = tmp_path / "absent.toml"
    with pytest.raises(UsageError) as exc:
        config.load(path)
    assert str(path) in str(exc.value)


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(UsageError) as exc:
        config.load(tmp_path)
    assert str(tmp_path) in str(exc.value)


@pytest.mark.parametrize("text", ["[optim\nlr = 1\n", "[optim]\nlr = \n", "[optim]\nlr 0.1\n",
                                  "[a]\nx = 1\n[a]\nx = 2\n"])
def test_invalid_toml(tmp_path, text):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as exc:
        config.load(path)
    assert str(path) in str(exc.value)
    assert "TOML" in str(exc.value)


def test_non_utf8_file(tmp_path):
    path = tmp_path / "latin1.toml"
    path.write_bytes(b'[data]\npath = "caf\xe9.h5"\n')
    with pytest.raises(UsageError) as exc:
        config.load(path)
    assert str(path) in str(exc.value)


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "jobs" /
                                         "configs").glob("*.toml")), ids=lambda p: p.name)
def test_ready_configs_load(path):
    """Every configuration shipped in jobs/configs passes validation as it stands."""
    cfg = config.load(path, [])
    assert cfg["model"]["name"] in config.SCHEMA["model"]["name"].choices


def test_batch_size_zero_means_the_whole_shard_and_negative_is_refused():
    assert config.load(None, ["train.batch_size=0"])["train"]["batch_size"] == 0
    with pytest.raises(UsageError, match="train.batch_size"):
        config.load(None, ["train.batch_size=-1"])


def test_several_files_merge_in_order_and_are_checked_together(tmp_path):
    """A model's file then the recommended recipe's: later files override; a key of the
    first file that the second file's method does not read is refused."""
    model = tmp_path / "model.toml"
    model.write_text('[model]\nname = "mlp"\nhidden = [8]\n[optim]\nname = "sgd"\n'
                     'lr = 0.5\nmomentum = 0.9\n')
    recipe = Path(__file__).resolve().parents[2] / "jobs/configs/recommended_fullbatch.toml"
    cfg = config.load([model, recipe])
    assert cfg["model"]["hidden"] == [8] and cfg["optim"]["name"] == "secant"
    assert (cfg["optim"]["lr"], cfg["optim"]["momentum"]) == (1.0, 0.0)
    assert cfg["train"]["batch_size"] == 0
    nesterov = tmp_path / "nesterov.toml"
    nesterov.write_text('[optim]\nnesterov = true\n')
    with pytest.raises(UsageError, match="optim.nesterov = True does not apply with "
                                         "optim.name = 'secant'"):
        config.load([nesterov, recipe])
