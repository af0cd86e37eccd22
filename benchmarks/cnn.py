"""The built-in cnn: its step time against PyTorch's on one core, and SGD+momentum against the
recommended recipe on Fashion-MNIST.

    .venv/bin/python benchmarks/cnn.py                  (about 5 minutes)
    .venv/bin/python benchmarks/cnn.py --part speed --batches 32 128 --reps 9
    .venv/bin/python benchmarks/cnn.py --part recipe --rows 2048 --steps 150

Part "speed" (the main figure), one process, one BLAS/torch thread, float32: the DeepOBS
"2c2d" network on 28x28 images (conv 5x5 32, ReLU, max-pool 2, conv 5x5 64, ReLU, max-pool
2, dense 1024, dense 10). One step is F and its gradient on a batch: hessmpi's
``ConvNet.loss_grad`` against the same network in PyTorch (``torch.nn`` layers, forward,
``backward``), repetitions alternating between the two, medians of wall and thread CPU time
(the CPU time leaves out time other processes held the core). GFLOP/s count the network's
matrix-product FLOPs (forward, weight gradients, input gradients but the first layer's) and
are set against a 1024x1024 float32 matrix product timed in between. Also the time of
hessmpi's Gauss-Newton product (PyTorch has no built-in equivalent). Aim: hessmpi's step
within 1.5x of PyTorch's.

Part "recipe", one rank: a smaller cnn (channels [8, 16], dense [64]: the 2c2d takes about
2 s a full-batch step of 1,024 rows on one core) on the first ``--rows`` training rows of
Fashion-MNIST at full batch. SGD+momentum (0.9) is tuned as in batch_scaling.py: learning
rates a factor 2 apart, widened until the best final training objective after ``--steps``
steps is interior; its best final F is the target. The recommended recipe
(jobs/configs/recommended_fullbatch.toml) runs until it reaches the target; the table gives
steps and time to it (CPU time of the steps alone: the machine may be shared; F over the
training rows after each step is not counted).

The dataset data/fashion-mnist.h5 is built from ../shared/data/fashion-mnist by the importer
if it is missing. Prints the tables; saves every figure to bench-results/cnn.json (a run of
one part keeps the other part's figures there).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench-results" / "cnn.json"
DATA = ROOT / "data" / "fashion-mnist.h5"
SHARED = ROOT.parent / "shared" / "data" / "fashion-mnist"
CHANNELS, DENSE = [32, 64], [1024]                 # 2c2d
SMALL = {"channels": [8, 16], "dense": [64]}      # part "recipe"
RECIPE = ROOT / "jobs" / "configs" / "recommended_fullbatch.toml"


def flops(shape, channels, dense, classes, batch) -> float:
    """Matrix-product FLOPs of one gradient: forward, weight gradients, and the input
    gradients of every layer but the first (2 per multiply-add)."""
    h, w, c = shape
    layers = []
    for c_out in channels:
        layers.append(h * w * 25 * c * c_out)
        h, w, c = h // 2, w // 2, c_out
    sizes = [h * w * c, *dense, classes]
    layers += [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    return 2.0 * batch * (2 * sum(layers) + sum(layers[1:]))


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


def torch_net(torch):
    layers, c = [], 1
    for c_out in CHANNELS:
        layers += [torch.nn.Conv2d(c, c_out, 5, padding=2), torch.nn.ReLU(),
                   torch.nn.MaxPool2d(2)]
        c = c_out
    layers += [torch.nn.Flatten(), torch.nn.Linear(7 * 7 * c, DENSE[0]), torch.nn.ReLU(),
               torch.nn.Linear(DENSE[0], 10)]
    return torch.nn.Sequential(*layers)


def speed(batches: list[int], reps: int) -> list[dict]:
    import torch

    from hessmpi.models.cnn import ConvNet

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    model = ConvNet((28, 28), CHANNELS, DENSE, 10, 1e-4, dtype=np.float32)
    theta = model.init_params(0)
    grad, v = np.empty_like(theta), rng.standard_normal(model.n_params).astype(np.float32)
    net = torch_net(torch)
    a = rng.random((1024, 1024), dtype=np.float32)
    rows = []
    for batch in batches:
        x = rng.random((batch, 784), dtype=np.float32)
        y = rng.integers(0, 10, batch)
        xt, yt = torch.from_numpy(x.reshape(batch, 1, 28, 28)), torch.from_numpy(y)

        def ours(x=x, y=y):
            model.loss_grad(theta, x, y, grad)

        def theirs(xt=xt, yt=yt):
            net.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(net(xt), yt).backward()

        def gn(x=x, y=y):
            model.curvature_product(theta, v, x, y, grad)

        def matmul():
            a @ a

        samples = {k: [] for k in ("hessmpi", "torch", "gn", "matmul")}
        for fn in (ours, theirs, gn, matmul):
            fn()                                    # warm: buffers, caches
        for _ in range(reps):
            for key, fn in (("hessmpi", ours), ("torch", theirs), ("gn", gn),
                            ("matmul", matmul)):
                samples[key].append(timed(fn))
        med = {k: (statistics.median(s[0] for s in v_), statistics.median(s[1] for s in v_))
               for k, v_ in samples.items()}
        work = flops((28, 28, 1), CHANNELS, DENSE, 10, batch)
        peak = 2 * 1024**3 / med["matmul"][1] / 1e9
        rows.append(dict(batch=batch, flops=work, samples=samples, peak_gflops=peak,
                         hessmpi_s=med["hessmpi"], torch_s=med["torch"], gn_s=med["gn"],
                         ratio_wall=med["hessmpi"][0] / med["torch"][0],
                         ratio_cpu=med["hessmpi"][1] / med["torch"][1]))
    print(f"\n2c2d on 28x28, float32, 1 thread ({model.n_params:,} parameters); medians of "
          f"{reps}; the matrix-product rate: 1024^2 float32 (CPU time)")
    print(f"{'batch':>5} {'hessmpi ms':>11} {'torch ms':>9} {'ratio':>6} {'(wall)':>7} "
          f"{'hessmpi GF/s':>12} {'torch GF/s':>10} {'matmul GF/s':>11} {'of matmul':>9} "
          f"{'GN product ms':>13}")
    for r in rows:
        ours_gf = r["flops"] / r["hessmpi_s"][1] / 1e9
        torch_gf = r["flops"] / r["torch_s"][1] / 1e9
        print(f"{r['batch']:>5} {1e3 * r['hessmpi_s'][1]:>11.1f} {1e3 * r['torch_s'][1]:>9.1f} "
              f"{r['ratio_cpu']:>6.2f} {r['ratio_wall']:>7.2f} {ours_gf:>12.1f} "
              f"{torch_gf:>10.1f} {r['peak_gflops']:>11.1f} "
              f"{ours_gf / r['peak_gflops']:>9.2f} {1e3 * r['gn_s'][1]:>13.1f}")
    verdict = all(r["ratio_cpu"] <= 1.5 for r in rows)
    print(f"aim (hessmpi's step within 1.5x of PyTorch's): {'met' if verdict else 'NOT met'}")
    return rows


def dataset() -> Path:
    if DATA.is_file():
        return DATA
    from hessmpi.data import write_dataset
    from hessmpi.importers import mnist

    files = [SHARED / f"{s}-{k}-idx{n}-ubyte.gz" for s in ("train", "t10k")
             for k, n in (("images", 3), ("labels", 1))]
    train, test, attrs = mnist(*files, kind="fashion-mnist")
    write_dataset(DATA, train, test, **attrs)
    print(f"built {DATA} from {SHARED}")
    return DATA


def recipe(rows: int, steps: int, max_grid: int) -> dict:
    from mpi4py import MPI

    from hessmpi import config
    from hessmpi.backend import make_backend
    from hessmpi.comm import Communicator
    from hessmpi.data import Shard, read_shard
    from hessmpi.trainer import Training

    path = dataset()
    full = read_shard(path, "train", 0, 1, equal=True)
    test = read_shard(path, "test", 0, 1, equal=False)
    train = Shard(x=full.x[:rows], y=full.y[:rows], offset=0, total=rows,
                  n_classes=full.n_classes, source=full.source, image_shape=full.image_shape)
    test = Shard(x=test.x[:2000], y=test.y[:2000], offset=0, total=2000,
                 n_classes=test.n_classes, source=test.source, image_shape=test.image_shape)
    comm = Communicator(MPI.COMM_SELF)
    backend = make_backend("cpu", "float32", 1)
    model = ["model.name=cnn", f"model.channels={SMALL['channels']}",
             f"model.dense={SMALL['dense']}", "train.batch_size=0", "backend.device=cpu",
             "backend.threads=1", f"data.path={json.dumps(str(path))}"]

    def train_run(files, sets, limit, target=None):
        cfg = config.load(files, [*model, f"train.steps={limit}", *sets])
        t = Training(cfg, comm, backend, shards=(train, test))
        history, seconds = [], 0.0
        for k in range(limit):
            started = time.thread_time()       # the step alone, CPU time of this thread
            t.step(k)
            seconds += time.thread_time() - started
            f = t.objective.full_value(t.theta)
            history.append((k + 1, f, seconds))
            if target is not None and f <= target:
                break
        return history, t.evaluate()[1]

    sgd, lrs = {}, [0.05, 0.1, 0.2]
    while True:
        for lr in lrs:
            if lr not in sgd:
                hist, acc = train_run(None, ["optim.name=sgd", f"optim.lr={lr}"], steps)
                sgd[lr] = dict(history=hist, final=hist[-1][1], test_acc=acc)
                print(f"SGD+momentum lr {lr:g}: F after {steps} steps {hist[-1][1]:.4f}, "
                      f"test accuracy {acc:.3f}", flush=True)
        grid = sorted(sgd)
        best = min(grid, key=lambda k: sgd[k]["final"] if np.isfinite(sgd[k]["final"])
                   else np.inf)
        if 0 < grid.index(best) < len(grid) - 1 or len(grid) >= max_grid:
            break
        lrs = [best / 2] if grid.index(best) == 0 else [best * 2]
    target = sgd[best]["final"]
    hist, acc = train_run(str(RECIPE), [], 4 * steps, target)
    reached = hist[-1][1] <= target
    sgd_time = sgd[best]["history"][-1][2]
    out = dict(rows=rows, steps=steps, sgd={str(k): v for k, v in sgd.items()}, best_lr=best,
               interior=0 < grid.index(best) < len(grid) - 1, target=target,
               recipe=dict(history=hist, reached=reached, test_acc=acc))
    print(f"\nsmall cnn {SMALL} on {rows} Fashion-MNIST rows, full batch, 1 rank, 1 thread; "
          f"target F = {target:.4f} (SGD+momentum at its best lr {best:g}"
          f"{'' if out['interior'] else ', NOT interior'} after {steps} steps)")
    print(f"{'method':<28} {'steps':>6} {'cpu s':>7} {'steps ratio':>11} {'time ratio':>10} "
          f"{'test acc':>8}")
    print(f"{'SGD+momentum':<28} {steps:>6} {sgd_time:>7.1f} {1:>11.2f} {1:>10.2f} "
          f"{sgd[best]['test_acc']:>8.3f}")
    label = "recommended recipe"
    if reached:
        print(f"{label:<28} {hist[-1][0]:>6} {hist[-1][2]:>7.1f} {hist[-1][0] / steps:>11.2f} "
              f"{hist[-1][2] / sgd_time:>10.2f} {acc:>8.3f}")
    else:
        print(f"{label:<28} not reached in {len(hist)} steps (F {hist[-1][1]:.4f})")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("speed", "recipe", "both"), default="both")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--rows", type=int, default=1024)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--max-grid", type=int, default=6)
    args = p.parse_args()
    threadpool_limits(1)
    results = dict(started=datetime.now(UTC).isoformat(timespec="seconds"),
                   machine=platform.processor() or platform.machine(), args=vars(args))
    if args.part in ("speed", "both"):
        results["speed"] = speed(args.batches, args.reps)
    if args.part in ("recipe", "both"):
        results["recipe"] = recipe(args.rows, args.steps, args.max_grid)
    RESULTS.parent.mkdir(exist_ok=True)
    if RESULTS.is_file():          # keep the other part of an earlier run
        earlier = json.loads(RESULTS.read_text())
        results = {**{k: earlier[k] for k in ("speed", "recipe") if k in earlier}, **results}
    RESULTS.write_text(json.dumps(results, indent=1, default=float))
    print(f"\nsaved {RESULTS}")


if __name__ == "__main__":
    main()
