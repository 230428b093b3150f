"""Per-sample gradient norms and Gram matrix without the b × P matrix (issue 18): time / one forward+backward.

For the zoo MLP, the simple CNN and the 11M-parameter ResNet (depth 18, width 64) on a digits batch of 64 (float32,
one thread), prints the wall time of :func:`gradcond.probes.per_sample_stats` (norms and Gram together, and norms
alone) divided by the time of one plain forward+backward (``loss.backward()``) of the same batch, measured in this run
with the two calls alternated (median of per-pair ratios, interquartile range in brackets), so load changes on a
shared machine hit both alike. Target: <= 1.5x. ``markdown_table()`` gives the README section (``make bench``,
``benchmarks/_readme.py``). Also says which parameters took the materialised fallback (none expected) and the largest relative difference of the Gram diagonal to the squared norms computed alone (the two use
different identities per layer).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/per_sample.py [--repeats 15] [--batch 64]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.probes import per_sample_stats

TARGET = 1.5


def paired(fa, fb, repeats):
    """Per-pair ratios t_a / t_b with the two calls alternated (after one warm-up call of each)."""
    fa(), fb()
    ratios, ta, tb = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fa()
        t1 = time.perf_counter()
        fb()
        t2 = time.perf_counter()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ta), statistics.median(tb), sorted(ratios)


def measure(repeats: int = 15, b: int = 64) -> tuple[list, list[str]]:
    """(table rows, notes): per model and quantity the paired ratio per_sample_stats / plain forward+backward."""
    torch.set_num_threads(1)
    rows, notes = [], []
    for label, name, form, kw, reps in [("MLP", "mlp", "flat", {}, repeats),
                                        ("CNN", "simple_cnn", "image", {}, repeats),
                                        ("ResNet-18 w64", "resnet", "image", {"depth": 18, "width": 64},
                                         max(3, repeats // 3))]:
        d = load_dataset("digits", form=form)
        X, Y = d.train.tensors
        x, y = X[:b], Y[:b]
        torch.manual_seed(0)
        model = zoo.build(name, **{**zoo.model_kwargs_for(name, d), **kw})
        loss = F.cross_entropy
        P = sum(p.numel() for p in model.parameters())

        def plain():
            model.zero_grad(set_to_none=True)
            loss(model(x), y).backward()

        st = per_sample_stats(model, loss, (x, y))
        sq = per_sample_stats(model, loss, (x, y), gram=False).sq_norms  # the norms' own code path
        diag = float(((st.gram.diagonal() - sq).abs() / sq).max())
        for what, kwargs in (("norms + Gram", {}), ("norms", {"gram": False})):
            t, base, r = paired(lambda: per_sample_stats(model, loss, (x, y), **kwargs), plain, reps)
            q = statistics.median(r)
            rows.append((label, P, what, base * 1e3, t * 1e3, q, r[len(r) // 4], r[(3 * len(r)) // 4]))
        model.zero_grad(set_to_none=True)
        notes.append(f"{label}: {P:,} parameters, fallback {sorted(st.fallback) or 'none'}, max |Gram diagonal - "
                     f"squared norm| / squared norm = {diag:.1e}")
    return rows, notes


def markdown_table(repeats: int = 15, batch: int = 64) -> str:
    """The README section: what is measured, the target (issue 18) and one row per model and quantity."""
    rows, notes = measure(repeats, batch)
    out = [f"Per-sample gradient squared norms and b × b Gram matrix without the b × P matrix "
           f"(`gradcond.probes.per_sample_stats`: ghost identities per layer; digits, batch {batch}, float32, 1 thread) "
           f"relative to one plain forward+backward of the same batch, measured side by side (median of per-pair "
           f"ratios, interquartile range in brackets). Target (issue 18): <= {TARGET:g}x (before: 1.95x MLP, 2.18x "
           "CNN). " + "; ".join(notes) + ".", "",
           "| model | parameters | quantity | fwd+bwd ms | per-sample ms | ratio | target | met |",
           "|---|---:|---|---:|---:|---:|---|---|"]
    for label, P, what, base, t, q, lo, hi in rows:
        out.append(f"| {label} | {P:,} | {what} | {base:.2f} | {t:.2f} | {q:.2f}x [{lo:.2f}-{hi:.2f}] | "
                   f"<= {TARGET:g}x | {'yes' if q <= TARGET else '**no**'} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    print(markdown_table(args.repeats, args.batch))


if __name__ == "__main__":
    main()
