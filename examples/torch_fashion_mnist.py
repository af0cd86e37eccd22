"""Train a small PyTorch CNN on Fashion-MNIST with hessmpi's secant method, from your own
script, on 2 ranks (hessmpi's Python API: hessmpi.DistributedOptimizer).

    make install                      # installs PyTorch (the hessmpi[torch] extra)
    .venv/bin/hessmpi data fashion-mnist \
        --images ../shared/data/fashion-mnist/train-images-idx3-ubyte.gz \
        --labels ../shared/data/fashion-mnist/train-labels-idx1-ubyte.gz \
        --test-images ../shared/data/fashion-mnist/t10k-images-idx3-ubyte.gz \
        --test-labels ../shared/data/fashion-mnist/t10k-labels-idx1-ubyte.gz \
        --out data/fashion-mnist.h5
    .venv/bin/mpiexec -n 2 .venv/bin/python -m mpi4py examples/torch_fashion_mnist.py \
        --data data/fashion-mnist.h5 --steps 300

Every rank runs this script: it reads its own slab of the training rows, draws its own
minibatches, and steps the same optimizer; the step is taken on the global batch (every
rank's rows), so every rank holds the same parameters. ``python -m mpi4py`` ends every
rank if one raises.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

import hessmpi


class SmallCNN(torch.nn.Module):
    """conv 5x5 (8) -> ReLU -> max-pool 2, conv 5x5 (16) -> ReLU -> max-pool 2, linear:
    (B, H*W) pixel rows to (B, 10) logits."""

    def __init__(self, height: int = 28, width: int = 28, classes: int = 10):
        super().__init__()
        self.height, self.width = height, width
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 8, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(8, 16, 5, padding=2), torch.nn.ReLU(), torch.nn.MaxPool2d(2))
        self.classify = torch.nn.Linear(16 * (height // 4) * (width // 4), classes)

    def forward(self, x):
        x = self.features(x.view(-1, 1, self.height, self.width))
        return self.classify(x.flatten(1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="data/fashion-mnist.h5", help="a hessmpi dataset file")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64, help="rows per rank and step")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    torch.set_num_threads(1)                  # one core per rank
    torch.manual_seed(args.seed)              # the module's initial weights (rank 0's are used)
    train = hessmpi.read_shard(args.data, "train")
    test = hessmpi.read_shard(args.data, "test")
    height, width = train.image_shape[:2]
    model = hessmpi.TorchModel(SmallCNN(height, width), l2=1e-4, dtype=np.float32)
    opt = hessmpi.DistributedOptimizer(
        model, seed=args.seed, steps=args.steps,
        optim={"name": "secant", "lr": args.lr, "momentum": 0.9, "memory": 2})
    sampler = hessmpi.Sampler(len(train.y), args.batch, args.seed, opt.rank)
    x_test, y_test = test.x.astype(np.float32), test.y
    started = time.perf_counter()
    for step in range(args.steps):
        rows = sampler.next()
        info = opt.step(train.x[rows], train.y[rows])
        if opt.rank == 0 and (step + 1) % max(1, args.steps // 10) == 0:
            print(f"step {step + 1}: loss {info.loss:.4f}", flush=True)
    loss, accuracy = opt.evaluate(x_test, y_test)
    opt.check_consistency()
    if opt.rank == 0:
        print(f"{args.steps} steps on {opt.size} ranks in {time.perf_counter() - started:.1f} "
              f"s: test loss {loss:.4f}, test accuracy {accuracy:.4f}; identical parameters "
              "on every rank", flush=True)


if __name__ == "__main__":
    main()
