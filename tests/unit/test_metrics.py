"""metrics.h5: the documented columns, appends, attributes, reading with plain h5py."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from hessmpi.metrics import COLUMNS, MetricsFile, read_metrics, rebuild
from hessmpi.sealed import DamagedFile, check

# The /metrics columns named in CONTRACT.md, in its order, then hessmpi's additions.
CONTRACT_COLUMNS = ["step", "epoch", "wall_time", "train_loss", "grad_evals", "grad_norm",
                    "step_norm", "fallback", "rank_kept", "t_grad", "t_comm", "t_solve",
                    "bytes_sent", "test_loss", "test_acc"]
ADDED_COLUMNS = ["forward_evals", "curvature_evals", "cg_iters", "hf_lambda",
                 "staleness_mean", "staleness_max", "batch"]
# grad_evals counts a probe on a fraction of the batch as that fraction: a float.
INTEGER_COLUMNS = {"step", "fallback", "rank_kept", "bytes_sent", "forward_evals"}


def test_columns_are_the_documented_ones():
    assert list(COLUMNS) == CONTRACT_COLUMNS + ADDED_COLUMNS
    for name, dtype in COLUMNS.items():
        kind = np.dtype(dtype).kind
        assert kind == ("i" if name in INTEGER_COLUMNS else "f"), name


def row(k: int) -> dict:
    """A row whose every value is distinct and exactly representable in its column."""
    r = {name: k * 10 + j for j, name in enumerate(COLUMNS)}
    r["fallback"] = k % 2
    r["epoch"] = k / 4
    r["test_loss"] = np.nan if k % 3 else 0.5 + k
    r["test_acc"] = np.nan if k % 3 else 0.01 * k
    return r


def check_columns(f, rows):
    g = f["metrics"]
    assert set(g) == set(COLUMNS)
    for name, dtype in COLUMNS.items():
        d = g[name]
        assert d.dtype == np.dtype(dtype), name
        assert d.ndim == 1 and d.maxshape == (None,)
        expected = np.array([r[name] for r in rows], dtype=np.float64)
        np.testing.assert_array_equal(d[()].astype(np.float64), expected, err_msg=name)


def test_create_append_and_read_with_plain_h5py(tmp_path):
    path = tmp_path / "metrics.h5"
    attrs = {"config": "[optim]\nlr = 0.1\n", "mpi_size": 4, "backend": "numpy"}
    m = MetricsFile(path, attrs)

    # right after creation: a closed, complete file with empty columns
    with h5py.File(path, "r") as f:
        check_columns(f, [])
        assert f.attrs["status"] == "running"
        assert f.attrs["mpi_size"] == 4 and f.attrs["backend"] == "numpy"
        assert f.attrs["config"] == attrs["config"]

    rows = [row(k) for k in range(1, 4)]
    m.append(rows, steps_done=3)
    with h5py.File(path, "r") as f:  # readable between appends, default h5py settings
        check_columns(f, rows)
        assert f.attrs["steps_done"] == 3 and f.attrs["status"] == "running"

    rows2 = [row(k) for k in range(4, 6)]
    m.append(rows2, steps_done=5)
    m.append([], status="finished", wall_time_total=12.5)
    with h5py.File(path, "r") as f:
        check_columns(f, rows + rows2)
        assert f.attrs["status"] == "finished"
        assert f.attrs["steps_done"] == 5 and f.attrs["wall_time_total"] == 12.5

    got_attrs, cols = read_metrics(path)
    assert got_attrs["status"] == "finished" and got_attrs["config"] == attrs["config"]
    assert set(cols) == set(COLUMNS)
    for name in COLUMNS:
        assert len(cols[name]) == 5
    np.testing.assert_array_equal(cols["step"], [10, 20, 30, 40, 50])
    assert np.isnan(cols["test_acc"]).sum() == 4 and cols["test_acc"][2] == pytest.approx(0.03)


def test_readable_after_every_append(tmp_path):
    path = tmp_path / "metrics.h5"
    m = MetricsFile(path, {})
    for k in range(1, 30):
        m.append([row(k)])
        with h5py.File(path, "r") as f:
            assert f["metrics/step"].shape == (k,)
            assert f["metrics/step"][-1] == row(k)["step"]


def test_many_rows_beyond_one_chunk(tmp_path):
    path = tmp_path / "metrics.h5"
    m = MetricsFile(path, {})
    rows = [row(k) for k in range(2500)]
    m.append(rows[:1000])
    m.append(rows[1000:])
    _, cols = read_metrics(path)
    np.testing.assert_array_equal(cols["step"], np.arange(2500) * 10)
    np.testing.assert_array_equal(cols["fallback"], np.arange(2500) % 2)


def test_create_replaces_an_old_file(tmp_path):
    path = tmp_path / "metrics.h5"
    MetricsFile(path, {"old": 1}).append([row(1)])
    MetricsFile(path, {"new": 2})
    attrs, cols = read_metrics(path)
    assert "old" not in attrs and attrs["new"] == 2
    assert all(len(c) == 0 for c in cols.values())


def test_read_metrics_rejects_foreign_files(tmp_path):
    text = tmp_path / "text.h5"
    text.write_text("not hdf5")
    other = tmp_path / "other.h5"
    with h5py.File(other, "w") as f:
        f["x"] = np.zeros(3)
    for path in (text, other):
        with pytest.raises(DamagedFile, match=str(path)):
            read_metrics(path)
    with pytest.raises(FileNotFoundError):
        read_metrics(tmp_path / "missing.h5")


def test_every_write_replaces_the_file_whole_and_sealed(tmp_path):
    """Each write is a new, complete, sealed file renamed into place: a reader that opened
    the previous one keeps reading it whole, and no temporary file is left."""
    path = tmp_path / "metrics.h5"
    m = MetricsFile(path, {"config": "c"})
    reader = h5py.File(path, "r", locking=False)
    for k in range(1, 4):
        before = path.stat().st_ino
        m.append([row(k)])
        assert path.stat().st_ino != before and check(path) is True
    assert reader["metrics/step"].shape == (0,) and reader.attrs["config"] == "c"
    reader.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.h5"]


def test_reopen_keeps_rows_up_to_the_step_and_records_the_resume(tmp_path):
    path = tmp_path / "metrics.h5"
    m = MetricsFile(path, {"config": "c", "started": "then"})
    m.append([row(k) for k in range(1, 6)], status="stopped")     # steps 10 ... 50
    MetricsFile.reopen(path, 30, {"started": "now"})
    MetricsFile.reopen(path, 20, {})
    attrs, cols = read_metrics(path)
    np.testing.assert_array_equal(cols["step"], [10, 20])
    assert attrs["status"] == "running" and list(attrs["resumed_at"]) == [30, 20]
    assert attrs["config"] == "c" and attrs["started"] == "now"


def checkpoint_of(step: int, rows: list[dict] | None) -> tuple[dict, dict]:
    """(arrays, attrs) as read_checkpoint gives them, with the results rows if any."""
    arrays = {"params": np.zeros(3)}
    if rows is not None:
        arrays.update({f"metrics/{name}": np.array([r[name] for r in rows], dtype=dtype)
                       for name, dtype in COLUMNS.items()})
    return arrays, {"step": step, "config": "[train]\nsteps = 90\n"}


def test_rebuild_restores_the_rows_and_keeps_the_damaged_file(tmp_path):
    path = tmp_path / "metrics.h5"
    path.write_bytes(b"damaged")
    (tmp_path / "metrics.h5.damaged").write_bytes(b"damaged before")
    rows = [row(k) for k in range(1, 4)]
    said = rebuild(path, *checkpoint_of(30, rows), "ckpt_000000030.h5")
    assert "3 rows up to step 30" in said and "metrics.h5.damaged.1" in said, said
    assert (tmp_path / "metrics.h5.damaged.1").read_bytes() == b"damaged"
    assert (tmp_path / "metrics.h5.damaged").read_bytes() == b"damaged before"
    with h5py.File(path, "r") as f:
        check_columns(f, rows)
        assert f.attrs["status"] == "stopped" and f.attrs["rebuilt_from"] == "ckpt_000000030.h5"
        assert f.attrs["config"] == "[train]\nsteps = 90\n"


def test_rebuild_from_a_checkpoint_without_rows_says_what_is_lost(tmp_path):
    path = tmp_path / "metrics.h5"
    said = rebuild(path, *checkpoint_of(30, None), "ckpt_000000030.h5")
    assert "steps 1-30 are lost" in said and "damaged" not in said, said
    _, cols = read_metrics(path)
    assert all(len(c) == 0 for c in cols.values())


def test_a_file_written_before_the_added_columns_reads_and_resumes(tmp_path):
    """A metrics.h5 without curvature_evals, cg_iters and hf_lambda (written before they
    existed): read_metrics fills them (0, NaN, NaN), and reopening adds them at that length
    so appends line up."""
    from hessmpi.metrics import ADDED

    path = tmp_path / "old.h5"
    with h5py.File(path, "w") as f:
        f.attrs["status"] = "finished"
        for name, dtype in COLUMNS.items():
            if name not in ADDED:
                f.create_dataset(f"metrics/{name}", data=np.arange(3, dtype=dtype) + 1,
                                 maxshape=(None,))
    _, cols = read_metrics(path)
    assert cols["curvature_evals"].tolist() == [0.0] * 3
    assert np.isnan(cols["cg_iters"]).all() and len(cols["hf_lambda"]) == 3
    metrics = MetricsFile.reopen(path, 2, {})
    metrics.append([{**row(7), "step": 3}])
    _, cols = read_metrics(path)
    assert cols["step"].tolist() == [1, 2, 3]
    assert cols["curvature_evals"][:2].tolist() == [0.0, 0.0]
    assert cols["cg_iters"][-1] == row(7)["cg_iters"]
