"""Per-sample gradient norms and Gram matrix without the b × P matrix (issues 18, 26): time / one forward+backward.

For the zoo MLP, the simple CNN and the 11M-parameter ResNet (depth 18, width 64) on a digits batch of 64 (float32,
one thread), prints the time (CPU time of the thread) of :func:`gradcond.probes.per_sample_stats` (norms and Gram
together, and norms alone) divided by the time of one plain forward+backward (``loss.backward()``) of the same batch,
measured in this run with the two calls alternated (median of per-pair ratios, interquartile range in brackets), so
load changes on a shared machine hit both alike. Target (issue 26): <= 1.5x for both quantities on every model. ``markdown_table()`` gives the README section (``make bench``,
``benchmarks/_readme.py``). Also says which parameters took the materialised fallback (none expected) and the largest
relative difference of the Gram diagonal to the squared norms computed alone (the two use different identities per
layer).

Where a target is missed the table says why: the column "capture" is the paired ratio of the part every call needs
before any identity is evaluated (engine set-up, the hooked forward with BatchNorm batch statistics recorded in it, and
the backward to the layer outputs: :meth:`gradcond.probes.per_sample.Engine.capture`), so per-sample ms minus
capture ms is the cost of the identities themselves. For the Gram that cost has a floor of about b² · P_layer
multiply-adds for every layer with many output positions (the materialised form; the ghost form costs b² · T² · (C + O)
there, more), which on the CNN and ResNet is of the order of the whole forward+backward; on the MLP (0.25 ms per step) the
per-call Python work of set-up, hooks and a dozen small kernels is what remains.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/per_sample.py [--repeats 15] [--batch 64]
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
from gradcond.probes import per_sample_stats
from gradcond.probes.per_sample import Engine

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import paired  # noqa: E402

TARGET = 1.5


MODELS = [("MLP", "mlp", "flat", {}), ("CNN", "simple_cnn", "image", {}),
          ("ResNet-18 w64", "resnet", "image", {"depth": 18, "width": 64})]


def measure(repeats: int = 15, b: int = 64, models=None) -> tuple[list, list[str]]:
    """(table rows, notes): per model and quantity the paired ratio per_sample_stats / plain forward+backward, in
    CPU time of this thread (``time.thread_time``: everything runs on it with one torch thread, and other processes
    on a busy machine disturb it much less than wall time). ``models``: labels to measure (default all)."""
    torch.set_num_threads(1)
    rows, notes = [], []
    for label, name, form, kw in MODELS:
        if models is not None and label not in models:
            continue
        reps = repeats if name != "resnet" else max(3, repeats // 3)
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
        def capture():  # what per_sample_stats does before evaluating any identity
            e = Engine(model, loss, x, y)
            e._defer_bn = True  # as per_sample_stats: BN batch statistics recorded in the capture forward
            with e:
                e.capture(e.w, e.x, e.y)

        tc, basec, rc = paired(capture, plain, reps, clock=time.thread_time)
        cap = (tc * 1e3, statistics.median(rc))
        for what, kwargs in (("norms + Gram", {}), ("norms", {"gram": False})):
            t, base, r = paired(lambda: per_sample_stats(model, loss, (x, y), **kwargs), plain, reps,
                               clock=time.thread_time)
            q = statistics.median(r)
            rows.append((label, P, what, base * 1e3, t * 1e3, q, r[len(r) // 4], r[(3 * len(r)) // 4], cap))
        model.zero_grad(set_to_none=True)
        notes.append(f"{label}: {P:,} parameters, fallback {sorted(st.fallback) or 'none'}, max |Gram diagonal - "
                     f"squared norm| / squared norm = {diag:.1e}")
    return rows, notes


def markdown_table(repeats: int = 15, batch: int = 64, models=None) -> str:
    """The README section: what is measured, the target (issue 18) and one row per model and quantity."""
    rows, notes = measure(repeats, batch, models)
    out = [f"Per-sample gradient squared norms and b × b Gram matrix without the b × P matrix "
           f"(`gradcond.probes.per_sample_stats`: ghost identities per layer; digits, batch {batch}, float32, 1 thread) "
           f"relative to one plain forward+backward of the same batch, measured side by side in CPU time of the thread "
           f"(median of per-pair ratios, interquartile range in brackets). Target (issue 26): <= {TARGET:g}x for norms "
           "and for norms + Gram on every model, judged on the unrounded median (issue 18's README: norms + Gram / "
           "norms MLP 2.22x / 2.13x, CNN 1.84x / 1.40x, ResNet 1.69x / 1.02x). Capture: engine set-up, hooked forward and "
           "backward to the layer outputs, the part every call "
           "needs before any identity (same pairing); per-sample minus capture is the identities' own cost, which for "
           "the Gram is at least about b² · P_layer multiply-adds on layers with many output positions. "
           + "; ".join(notes) + ".", "",
           "| model | parameters | quantity | fwd+bwd ms | per-sample ms | ratio | capture ms (ratio) | target | met |",
           "|---|---:|---|---:|---:|---:|---:|---|---|"]
    for label, P, what, base, t, q, lo, hi, (cms, cq) in rows:
        out.append(f"| {label} | {P:,} | {what} | {base:.2f} | {t:.2f} | {q:.2f}x [{lo:.2f}-{hi:.2f}] | "
                   f"{cms:.2f} ({cq:.2f}x) | <= {TARGET:g}x | {'yes' if q <= TARGET else '**no**'} |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--models", nargs="*", default=None, help="labels to measure, e.g. MLP CNN (default all)")
    args = ap.parse_args()
    print(markdown_table(args.repeats, args.batch, args.models))


if __name__ == "__main__":
    main()
