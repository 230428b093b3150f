"""Monitor overhead: time of the demo training with the monitor / without it, in one run.

Prints ratios for the "default" preset (budget 0.1 of training time) and the "full" preset (budget off), each the
median of a few repetitions, on the demo model (MLP on digits). Target for the default: <= 1.15.
"""

from __future__ import annotations

import statistics
import time

import torch

from gradcond import config, zoo
from gradcond.data import load_dataset
from gradcond.monitor import Monitor
from gradcond.train import fit


def train_once(monitor=None, epochs=8) -> float:
    cfg = config.resolve(config.DEMO)
    d = load_dataset("digits")
    torch.manual_seed(0)
    m = zoo.build("mlp", in_features=64, out_features=10, **{k: v for k, v in cfg["model"].items() if k != "name"})
    tr, te = d.loaders(cfg["data"]["batch_size"], seed=0)
    t = time.perf_counter()
    fit(m, tr, te, optimizer=cfg["optim"]["name"], lr=cfg["optim"]["lr"], epochs=epochs, callbacks=[monitor] if monitor else [])
    return time.perf_counter() - t


def main(reps: int = 5) -> None:
    torch.set_num_threads(1)
    train_once()  # warm-up
    base = statistics.median(train_once() for _ in range(reps))
    default = statistics.median(train_once(Monitor("default", budget=0.1)) for _ in range(reps))
    full = statistics.median(train_once(Monitor("full", budget=1.0)) for _ in range(reps))
    print(f"demo training without monitor: {base:.3f} s (median of {reps})")
    print(f"default monitor (budget 0.1) / none = {default / base:.2f}x  (target <= 1.15)")
    print(f"full monitor (no budget)     / none = {full / base:.2f}x")


if __name__ == "__main__":
    main()
