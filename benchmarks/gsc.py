"""gsc_profile cost relative to one plain forward + backward pass (target ratio <= 1.5).

Prints, per model, the median wall time of ``gsc_profile`` (one forward + one backward with hooks, per-sample
norms at every Linear/norm/activation layer, vmapped per-sample loss) over the median time of
``loss_fn(model(x), y).backward()`` on the same batch, measured in this run.
Usage: OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gsc.py [--n 2000] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcond.data import load_dataset
from gradcond.probes.scale import gsc_profile
from gradcond.train.losses import dot_error
from gradcond.zoo import mlp, resnet_mlp


def _median_time(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    x, y = load_dataset("gaussian", n=args.n, dim=100, seed=0).train.tensors
    models = {
        "depth-50 MLP (batch-ReLU, width 100)": mlp(100, 100, depth=50, width=100, act="relu", norm="batch",
                                                     init="gaussian", bias=False, affine=False, final_norm=True, seed=0),
        "zoo resnet_mlp (25 blocks, layer-tanh)": resnet_mlp(100, None, 100, 25, act="tanh", norm="layer", seed=0),
    }
    print(f"batch {args.n}, torch threads {torch.get_num_threads()}, median of {args.repeats}")
    for name, model in models.items():
        def plain():
            model.zero_grad(set_to_none=True)
            dot_error(model(x), y).backward()

        def probe():
            gsc_profile(model, "dot", (x, y))

        tp, tg = _median_time(plain, args.repeats), _median_time(probe, args.repeats)
        model.zero_grad(set_to_none=True)
        print(f"{name}: forward+backward {tp * 1e3:.1f} ms, gsc_profile {tg * 1e3:.1f} ms, ratio {tg / tp:.2f} "
              f"(target <= 1.5)")


if __name__ == "__main__":
    main()
