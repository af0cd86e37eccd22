"""``hessmpi report`` end to end on real runs (``mpiexec -n 2``): the table, the CSV, the
plot (a real PNG, read back), targets, a missing run, and runs still going or stopped."""

from __future__ import annotations

import csv
import os
import re
import signal
import struct
import subprocess
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from clirun import HESSMPI, hessmpi, mpiexec, set_args, train

from hessmpi.metrics import read_metrics

pytestmark = pytest.mark.timeout(150)

FIGURE_PX = (1760, 572)      # report.plot: figsize (16, 5.2) inches at 110 dpi


def table(text: str) -> list[dict]:
    """The rows of the aligned table as {column: cell}; cells start under their header."""
    lines = text.rstrip("\n").splitlines()
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    return [dict(zip(names, [line[a:b].strip() for a, b in
                             zip(starts, [*starts[1:], None], strict=True)], strict=True))
            for line in lines[1:]]


def png_chunks(path: Path) -> tuple[int, int, bytes]:
    """(width, height, decompressed image data) of a PNG, each chunk's CRC checked."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    pos, chunks = 8, []
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, f"bad CRC in chunk {kind}"
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color = struct.unpack(">IIBB", chunks[0][1][:10])
    assert depth == 8 and color in (2, 6), (depth, color)   # RGB or RGBA
    pixels = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    assert len(pixels) == height * (1 + width * (3 if color == 2 else 4))
    return width, height, pixels


def colour_pixels(path: Path, rgb: str) -> int:
    """How many pixels of the PNG have the colour ``rgb`` (#rrggbb), within antialiasing."""
    import matplotlib.image

    img = matplotlib.image.imread(path)[..., :3]
    want = np.array([int(rgb[i:i + 2], 16) / 255 for i in (1, 3, 5)])
    return int((np.abs(img - want).max(axis=-1) < 0.03).sum())


@pytest.fixture(scope="module")
def secant_run(workdir, run_config):
    """The small run of conftest with the secant method (a second, different run)."""
    cfg, sets = run_config
    out = workdir / "secant"
    result = train("--config", cfg, *set_args([*sets, "optim.name=secant", "optim.lr=0.05"]),
                   "--out", out)
    assert result.rc == 0, str(result)
    return out


def test_report_of_two_runs_prints_both_and_writes_png_and_csv(finished_run, secant_run,
                                                               tmp_path):
    sgd_run = finished_run[0]
    png, table_csv = tmp_path / "cmp.png", tmp_path / "cmp.csv"
    result = hessmpi("report", sgd_run, secant_run, "--plot", png, "--csv", table_csv,
                     "--target-loss", "0.6", "--target-acc", "0.5")
    assert result.rc == 0, str(result)
    rows = table(result.stdout)
    assert [r["run"] for r in rows] == [str(sgd_run), str(secant_run)]
    assert rows[0]["method"].startswith("sgd lr=0.1 mom=0.9")
    assert rows[1]["method"].startswith("secant lr=0.05 mom=0.9 K=1 bfgs")
    assert all(r["status"] == "finished" and r["ranks"] == "2" and r["steps"] == "23"
               and r["backend"] == "numpy" for r in rows), rows
    assert rows[0]["grad_evals"] == "23" and rows[1]["grad_evals"] == "46"  # probes counted

    with open(table_csv, newline="") as f:
        records = list(csv.DictReader(f))
    assert [r["run"] for r in records] == [str(sgd_run), str(secant_run)]
    for record, run in zip(records, (sgd_run, secant_run), strict=True):
        _, cols = read_metrics(run / "metrics.h5")
        assert float(record["final_loss"]) == float(cols["train_loss"][-1])
        assert float(record["best_loss"]) == float(cols["train_loss"].min())
        hit = np.flatnonzero(cols["train_loss"] <= 0.6)
        if hit.size:
            assert int(record["to_loss_steps"]) == cols["step"][hit[0]]
            assert float(record["to_loss_s"]) == float(cols["wall_time"][hit[0]])
        else:
            assert record["to_loss_steps"] == "nan"
        acc = np.nan_to_num(cols["test_acc"], nan=-1)
        assert int(record["to_acc_steps"]) == cols["step"][np.flatnonzero(acc >= 0.5)[0]]
        for col in ("t_grad_ms", "t_comm_ms", "t_solve_ms"):
            assert float(record[col]) >= 0, col
        assert float(record["t_grad_ms"]) == pytest.approx(np.median(cols["t_grad"]) * 1e3)

    width, height, _ = png_chunks(png)
    assert (width, height) == FIGURE_PX
    assert png.stat().st_size > 20_000        # three panels of lines and text, not blank
    # one line per run, in matplotlib's first two colours
    assert colour_pixels(png, "#1f77b4") > 200 and colour_pixels(png, "#ff7f0e") > 200
    assert f"wrote the plot to {png}" in result.stderr


def test_report_of_a_missing_run_exits_2_and_writes_nothing(finished_run, tmp_path):
    missing = tmp_path / "no-such-run"
    png, table_csv = tmp_path / "x.png", tmp_path / "x.csv"
    result = hessmpi("report", finished_run[0], missing, "--plot", png, "--csv", table_csv)
    assert result.rc == 2, str(result)
    errors = [line for line in result.stderr.splitlines() if "hessmpi: error" in line]
    assert len(errors) == 1 and str(missing) in errors[0], str(result)
    assert "Traceback" not in result.stderr
    assert not png.exists() and not table_csv.exists()


@pytest.mark.parametrize("flag, value", [("--target-acc", "95"), ("--target-loss", "-1")])
def test_report_refuses_a_target_out_of_range(flag, value, finished_run):
    result = hessmpi("report", finished_run[0], flag, value)
    assert result.rc == 2, str(result)
    assert flag in result.stderr and "Traceback" not in result.stderr


def test_report_of_a_run_going_and_then_stopped_by_usr1(finished_run, run_config, tmp_path):
    cfg, sets = run_config
    out = tmp_path / "long"
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(
        [*mpiexec(2), HESSMPI, "train", "--config", str(cfg),
         *set_args([*sets, "train.steps=1000000", "train.log_every=1"]), "--out", str(out)],
        stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
        start_new_session=True, env={**os.environ, "MPIEXEC_TIMEOUT": "120"})
    try:
        deadline = time.monotonic() + 60
        while True:         # wait for rows (the signal handlers are in place by then)
            try:
                if read_metrics(out / "metrics.h5")[1]["step"].size >= 5:
                    break
            except (OSError, KeyError):
                pass
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()
            assert time.monotonic() < deadline, "no metrics rows after 60 s"
            time.sleep(0.1)
        going = hessmpi("report", out, "--plot", tmp_path / "going.png")
        assert going.rc == 0, str(going)
        row = table(going.stdout)[0]
        assert row["status"] == "running" and int(row["steps"]) >= 5, going.stdout
        png_chunks(tmp_path / "going.png")
        proc.send_signal(signal.SIGUSR1)          # hydra passes it on to every rank
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
    stderr = (tmp_path / "stderr.txt").read_text()
    assert rc == 75, stderr
    stop = int(re.search(r"stopped by a signal after step (\d+)", stderr).group(1))
    stopped = hessmpi("report", out, finished_run[0])
    assert stopped.rc == 0, str(stopped)
    rows = table(stopped.stdout)
    assert rows[0]["status"] == "stopped" and rows[0]["steps"] == str(stop), stopped.stdout
    assert rows[1]["status"] == "finished"

