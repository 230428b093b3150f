"""Pure Voronoi maps (issue 28 item 1): the heuristic's gap to the optimum and to the lower bounds, and its cost.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/pure_entropy.py``.

:func:`gradcond.probes.pure_entropy` is exact (branch and bound) on small sets and heuristic beyond
(``gradcond/probes/voronoi.py`` documents both).  Measured here, in one run:

* **tiny sets** (random 2-D points, 8-14 samples, 2-3 random labels): the heuristic against the exact optimum --
  how often it finds the optimal cell count, and its mean excess in cells and (at the optimal count) in bits;
* **2-D sinusoid problems of Fig. 5.11** (100 points in [0, 1]^2, label = above ``0.5 + 0.25 sin(2 pi f x)``,
  f = 1, 2, 4, 3 seeds): the same comparison, where the exact search still finishes;
* **larger sets**: 1,000 and 2,000 sinusoid points, the hidden-layer features of an MLP trained on ``digits``
  (1,797 samples) and 5,000 x 64 clustered features -- the heuristic's cells and entropy against the proven lower
  bounds (cells: the number of classes, raised by an exact search run with a 2,000-node budget where it applies;
  entropy: the label entropy H(Y), which every pure map's entropy is at least), and its cost: the CPU time of
  this thread (one core's work, what a busy machine does not change) and the wall time.

Target (issue 28): a layer's features for a few thousand samples in seconds; the gaps are reported, not judged.
"""

from __future__ import annotations

import math
import statistics
import time

import torch


def _sinusoid(n: int, f: float, seed: int):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 2, generator=g, dtype=torch.float64)
    y = (X[:, 1] > 0.5 + 0.25 * torch.sin(2 * math.pi * f * X[:, 0])).long()
    return X, y


def _tiny(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = 8 + seed % 7
    X = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return X, torch.randint(0, 2 + seed % 2, (n,), generator=g)


def _digits_features():
    from gradcond import data, zoo
    from gradcond.train import fit

    b = data.load_dataset("digits", seed=0, dtype=torch.float32)
    X, y = b.train.tensors
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = zoo.mlp(64, 10, depth=3, width=[128, 64], seed=0)
        fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, y), batch_size=32, shuffle=True,
                                               generator=torch.Generator().manual_seed(0)),
            loss="cross_entropy", optimizer="momentum", lr=0.05, epochs=15, seed=0, progress=False)
    with torch.no_grad():
        h = model[1](model[0](X))  # first hidden layer, post-ReLU
    return h, y


def _clusters(n: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    centres = torch.randn(10, d, generator=g)
    return torch.randn(n, d, generator=g) * 0.35 + centres[y], y


def compare_to_optimum(sets):
    """``[(name, exact result, heuristic result)]`` for the given ``(name, X, y)`` sets."""
    from gradcond.probes import pure_entropy

    out = []
    for name, X, y in sets:
        ex = pure_entropy(X, y, method="exact", max_nodes=2_000_000)
        he = pure_entropy(X, y, method="heuristic")
        out.append((name, ex, he))
    return out


def _summary(rows) -> dict:
    gaps = [he.num_cells - ex.num_cells for _, ex, he in rows]
    hgaps = [he.entropy - ex.entropy for _, ex, he in rows if he.num_cells == ex.num_cells]
    return {"n": len(rows), "optimal_cells": sum(g == 0 for g in gaps), "mean_cell_gap": statistics.mean(gaps),
            "max_cell_gap": max(gaps), "mean_bits_gap": statistics.mean(hgaps) if hgaps else float("nan"),
            "exact_seconds": statistics.median(ex.seconds for _, ex, _ in rows),
            "heuristic_seconds": statistics.median(he.seconds for _, _, he in rows)}


def large_sets():
    from gradcond.probes import pure_entropy

    sets = [("sinusoid f=4, 1,000 points (2-D)", *_sinusoid(1000, 4, 0), True),
            ("sinusoid f=2, 2,000 points (2-D)", *_sinusoid(2000, 2, 0), True),
            ("digits MLP hidden layer 1 (1,797 x 128)", *_digits_features(), False),
            ("clustered features (5,000 x 64, 10 classes)", *_clusters(5000, 64), False)]
    out = []
    for name, X, y, bound in sets:
        c0 = time.thread_time()
        he = pure_entropy(X, y, method="heuristic")
        he.cpu_seconds = time.thread_time() - c0  # this thread's CPU time: the work, whatever the machine's load
        lb = he.lower_bound_cells
        if bound:  # an exact search with a small budget: the largest cell count it refutes is a proven bound
            lb = pure_entropy(X, y, method="auto", exact_max_samples=len(y), max_nodes=2_000).lower_bound_cells
        out.append((name, he, lb, not bound))
    return out


def markdown_table() -> str:
    tiny = compare_to_optimum([(f"tiny {s}", *_tiny(s)) for s in range(30)])
    sin = compare_to_optimum([(f"f={f} seed {s}", *_sinusoid(100, f, s)) for f in (1, 2, 4) for s in range(3)])
    big = large_sets()
    lines = [
        "`probes.pure_entropy` (issue 28): exact branch and bound on small sets, heuristic beyond "
        "(FCNN + Gates + large-neighbourhood search with the exact search as sub-solver, 20,000 nodes). "
        "Target: a layer's features for a few thousand samples in seconds; gaps reported, not judged.",
        "",
        "| sets | heuristic optimal (cells) | mean / max excess cells | mean excess bits (at optimal count) | "
        "median time exact / heuristic |",
        "|---|---|---|---|---|",
    ]
    for name, rows in (("30 tiny random 2-D sets (8-14 points, 2-3 labels)", tiny),
                       ("9 sinusoid sets of Fig. 5.11 (100 points, f = 1, 2, 4)", sin)):
        s = _summary(rows)
        lines.append(f"| {name} | {s['optimal_cells']} of {s['n']} | {s['mean_cell_gap']:.2f} / {s['max_cell_gap']} "
                     f"| {s['mean_bits_gap']:.3f} | {s['exact_seconds']:.2f} s / {s['heuristic_seconds']:.2f} s |")
    lines += ["", "| larger set | heuristic cells | lower bound (cells) | H (bits) | H(Y) lower bound | CPU time (wall) | "
              "features within 10 s of CPU time? |", "|---|---|---|---|---|---|---|"]
    for name, he, lb, features in big:
        met = ("yes" if he.cpu_seconds <= 10 else "no") if features else "-"
        lines.append(f"| {name} | {he.num_cells} | {lb} | {he.entropy:.3f} | {he.label_entropy:.3f} | "
                     f"{he.cpu_seconds:.1f} s ({he.seconds:.1f} s) | {met} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    t0 = time.perf_counter()
    print(markdown_table())
    print(f"({time.perf_counter() - t0:.0f} s in all)")
