"""Monitor overhead: time of the demo training with the monitor / without it, in one run.

Prints ratios for the "default" preset (its default budget, 5% of training time) and the "full" preset (budget off), each the
median of interleaved repetitions (range in brackets), on the demo model (MLP on digits). Target for the default: <= 1.15.

The default monitor plans its schedule once (calibration: 3 steps, and each probe timed twice) and guarantees every
enabled probe 3 measurements; on a run as short as the demo (8 epochs of ~23 steps of < 1 ms) the guaranteed
conditioning measurements alone can exceed the 5% budget. The plan says so: its coverage sentences (printed below,
the same as in the run report) give the planned share of the training time and what was thinned or left out.
"""

from __future__ import annotations

import statistics
import time

import torch

from gradcond import config, zoo
from gradcond.data import load_dataset
from gradcond.monitor import Monitor, coverage_sentences
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


def main(reps: int = 9) -> None:
    torch.set_num_threads(1)
    train_once()  # warm-up: imports, allocator, and each probe's first call
    train_once(Monitor("full", budget=1.0))
    # interleave the runs so that load changes on a shared machine hit both arms alike; report median ratios
    ratios = {"default": [], "full": []}
    bases = []
    plan = None
    for _ in range(reps):
        base = train_once()
        bases.append(base)
        mon = Monitor("default")
        ratios["default"].append(train_once(mon) / base)
        plan = mon.plan
        ratios["full"].append(train_once(Monitor("full", budget=1.0)) / base)
    q = {k: sorted(v) for k, v in ratios.items()}
    print(f"demo training without monitor: {statistics.median(bases):.3f} s (median of {reps})")
    print(f"default monitor (budget {Monitor().budget}) / none = {statistics.median(q['default']):.2f}x "
          f"[{q['default'][0]:.2f}-{q['default'][-1]:.2f}]  (target <= 1.15)")
    print(f"full monitor (no budget)      / none = {statistics.median(q['full']):.2f}x "
          f"[{q['full'][0]:.2f}-{q['full'][-1]:.2f}]")
    if plan is not None:
        print("default monitor coverage (last repetition):")
        for sentence in coverage_sentences(plan):
            print(f"  - {sentence}")


if __name__ == "__main__":
    main()
