"""Cost of the gradient-conditioning metrics (issue 6).

Prints, for the zoo MLP and simple CNN on a digits batch of 64 (float32, one thread), each metric's wall time divided
by the time of one plain forward+backward on the same batch, and the per-sample engine versus an explicit per-sample
autograd loop, for both engine backends: ``auto`` (layer fast paths: one batched forward/backward, per-sample
Linear/Conv/norm gradients from captured inputs and output gradients) and ``func`` (generic vmap(grad)). All ratios are
measured in this run: metric times are medians of repeats; the engine/loop speed-up is the median (and interquartile
range) of per-pair ratios with the two calls alternated, which is robust to load changes on a shared machine.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/conditioning.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.probes import conditioning as C
from gradcond.probes.per_sample import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import paired  # noqa: E402


def timeit(fn, repeats):
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    torch.set_num_threads(1)
    b = args.batch
    for name, form, kw in [("mlp", "flat", {}), ("simple_cnn", "image", {})]:
        d = load_dataset("digits", form=form)
        X, Y = d.train.tensors
        x, y = X[:b], Y[:b]
        batches = [(X[i * b:(i + 1) * b], Y[i * b:(i + 1) * b]) for i in range(4)]
        torch.manual_seed(0)
        model = zoo.build(name, **kw)
        loss = F.cross_entropy

        def plain():
            model.zero_grad()
            loss(model(x), y).backward()

        base = timeit(plain, args.repeats)
        m = sum(p.numel() for p in model.parameters())
        print(f"\n== {name}: {m} parameters, batch {b}; one plain forward+backward = {base * 1e3:.2f} ms")
        metrics = {
            "step_consistency (lim. targeted, n=2)": lambda: C.step_consistency(model, loss, (x, y)),
            "step_consistency jvp (n=2)": lambda: C.step_consistency(model, loss, (x, y), mode="jvp"),
            "step_metrics C*/D/H (n=2)": lambda: C.step_metrics(model, loss, (x, y)),
            "batch_dissonance (targeted, n=8)": lambda: C.batch_dissonance(model, loss, (x, y), n=8),
            "relative_gradient_rank input": lambda: C.relative_gradient_rank(model, loss, (x, y)),
            "relative_gradient_rank weight": lambda: C.relative_gradient_rank(model, loss, (x, y), wrt="weight"),
            "gradient_confusion (4 batches)": lambda: C.gradient_confusion(model, loss, batches, n_batches=4),
            "gradient_diversity (4 batches)": lambda: C.gradient_diversity(model, loss, batches, n_batches=4),
            "gradient_coherence": lambda: C.gradient_coherence(model, loss, (x, y)),
            "batch_efficiency_ratio (1 batch)": lambda: C.batch_efficiency_ratio(model, loss, (x, y)),
        }
        print(f"{'metric':42s} {'ms':>9s} {'x fwd+bwd':>10s}")
        for label, fn in metrics.items():
            t = timeit(fn, args.repeats)
            print(f"{label:42s} {t * 1e3:9.2f} {t / base:10.1f}")

        def engine(backend="auto"):
            with Engine(model, loss, x, y, backend=backend) as e:
                return e.per_sample_matrix()

        def naive():
            rows = []
            model.eval()
            for i in range(b):
                model.zero_grad()
                loss(model(x[i:i + 1]), y[i:i + 1]).backward()
                rows.append(torch.cat([p.grad.reshape(-1) for p in model.parameters()]))
            model.train()
            return torch.stack(rows)

        ref = naive()
        for backend in ("auto", "func"):
            tn, te, ratios = paired(naive, lambda: engine(backend), max(args.repeats, 11))  # ratios: naive / engine
            err = float((engine(backend) - ref).abs().max() / ref.abs().max())
            label = "layer fast paths" if backend == "auto" else "generic vmap(grad)"
            print(f"per-sample gradients, engine backend={backend!r} ({label}): engine {te * 1e3:.2f} ms, naive loop "
                  f"{tn * 1e3:.2f} ms, speed-up {statistics.median(ratios):.1f}x (interquartile "
                  f"{quantile(ratios, .25):.1f}-{quantile(ratios, .75):.1f}x; target >= 5x); max rel. difference "
                  f"{err:.1e}")


def quantile(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


if __name__ == "__main__":
    main()
