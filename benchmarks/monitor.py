"""Monitor overhead: time of the demo training with the monitor / without it, in one run.

Prints CPU-time ratios (``time.process_time``: other processes on a shared machine disturb it much less than wall
time) for the "default" preset (its default budget, 5% of training time) and the "full" preset (budget off), each the
median of interleaved repetitions (range in brackets), on the demo model (MLP on digits). Target for the default: <= 1.15.

The default monitor plans its schedule once (calibration: 3 steps, then each probe measured once -- that
measurement is logged and counts) and guarantees every enabled probe 3 measurements; on a run as short as the demo (8 epochs of ~23 steps of < 1 ms) the guaranteed
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


TARGET = 1.15  # default monitor / no monitor, CPU time


def train_once(monitor=None, epochs=8) -> float:
    """CPU seconds of the process (time.process_time) for one demo training: on a machine shared with other
    benchmarks, CPU time is disturbed much less than wall time by the other processes."""
    cfg = config.resolve(config.DEMO)
    d = load_dataset("digits")
    torch.manual_seed(0)
    m = zoo.build("mlp", in_features=64, out_features=10, **{k: v for k, v in cfg["model"].items() if k != "name"})
    tr, te = d.loaders(cfg["data"]["batch_size"], seed=0)
    t = time.process_time()
    fit(m, tr, te, optimizer=cfg["optim"]["name"], lr=cfg["optim"]["lr"], epochs=epochs, callbacks=[monitor] if monitor else [])
    return time.process_time() - t


def measure(reps: int = 9) -> dict:
    """Interleaved repetitions (none, default, full in turn, so load changes hit every arm alike): per-arm CPU-time
    ratios to the no-monitor run of the same repetition, the base times and the last default plan."""
    torch.set_num_threads(1)
    train_once()  # warm-up: imports, allocator, and each probe's first call
    train_once(Monitor("full", budget=1.0))
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
    return {"reps": reps, "base": statistics.median(bases), "plan": plan,
            **{k: sorted(v) for k, v in ratios.items()}}


def main(reps: int = 9) -> None:
    r = measure(reps)
    q = r
    print(f"demo training without monitor: {r['base']:.3f} s CPU time (median of {reps})")
    print(f"default monitor (budget {Monitor().budget}) / none = {statistics.median(q['default']):.2f}x CPU time "
          f"[{q['default'][0]:.2f}-{q['default'][-1]:.2f}]  (target <= {TARGET})")
    print(f"full monitor (no budget)      / none = {statistics.median(q['full']):.2f}x CPU time "
          f"[{q['full'][0]:.2f}-{q['full'][-1]:.2f}]")
    if r["plan"] is not None:
        print("default monitor coverage (last repetition):")
        for sentence in coverage_sentences(r["plan"]):
            print(f"  - {sentence}")


def markdown_table(reps: int = 9) -> str:
    """README section (benchmarks/_readme.py convention): the default monitor's CPU-time overhead against its target."""
    r = measure(reps)
    d, f = statistics.median(r["default"]), statistics.median(r["full"])
    return (f"CPU-time ratio of the demo training (MLP on digits, 8 epochs, {r['base']:.2f} s CPU without a monitor) "
            f"with the monitor to without it, median of {reps} interleaved repetitions (range in brackets). "
            f"Target: the default monitor <= {TARGET}x.\n\n"
            "| monitor | CPU time / no monitor | target | met |\n|---|---|---|---|\n"
            f"| default (budget 5%) | {d:.2f}x [{r['default'][0]:.2f}-{r['default'][-1]:.2f}] | <= {TARGET}x | "
            f"{'yes' if d <= TARGET else 'no'} |\n"
            f"| full (no budget) | {f:.2f}x [{r['full'][0]:.2f}-{r['full'][-1]:.2f}] | - | - |\n")


if __name__ == "__main__":
    main()
