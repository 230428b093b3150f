"""Teleportation speed: analysis time and teleport time relative to cloning all parameters.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/teleport.py [--repeats N]``.
Targets (issue 9): teleport <= 2x a parameter clone on every model; densenet analysis <= 0.5 s.
Reported ratios are measured in this one run (median of ``repeats`` timings each):
* ``inplace``: ``teleport(model, cob, inplace=True)`` -- the parameter arithmetic itself;
* ``copy``: ``teleport(model, cob)`` -- also deep-copies the module (buffers, module objects);
* ``params``: ``teleported_params(model, structure, cob)`` -- the functional form (new tensors, no module).
The baseline ``clone`` is ``[p.detach().clone() for p in model.parameters()]``.
For models of a few thousand parameters both times are dominated by per-call dispatch overhead (tens of
microseconds: the lookup table, one gather per factor term, two batched ``_foreach_mul`` calls), so the ratio
there measures Python/dispatch overhead, not memory traffic; the absolute times are printed next to it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcond import zoo
from gradcond.graph import analyze
from gradcond.teleport.core import CoB, random_cob, teleport, teleported_params


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def cases():
    return [
        ("mlp", zoo.build("mlp"), torch.randn(2, 64)),
        ("vgg(BN)", zoo.build("vgg", batch_norm=True), torch.randn(2, 1, 8, 8)),
        ("resnet18 w64", zoo.build("resnet", depth=18, width=64), torch.randn(2, 1, 8, 8)),
        ("densenet", zoo.build("densenet"), torch.randn(2, 1, 8, 8)),
        ("transformer", zoo.build("transformer"), torch.randn(2, 8, 8)),
    ]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    print(f"{'model':<14} {'params':>9} {'num_free':>8} {'analyze_s':>9} {'clone_ms':>9} {'inplace_ms':>10} "
          f"{'inplace/clone':>13} {'params/clone':>12} {'copy/clone':>10}")
    for name, model, x in cases():
        t0 = time.perf_counter()
        s = analyze(model, x)
        t_an = time.perf_counter() - t0
        t_an = min(t_an, _median_time(lambda: analyze(model, x), 3))
        cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0))
        inv = cob.inverse()
        # fresh CoB objects per call, so no per-CoB cache (lookup table) is reused across timings
        fresh = iter([(CoB(s, cob.tau.clone()), CoB(s, inv.tau.clone())) for _ in range(3 * args.repeats + 3)])
        n_params = sum(p.numel() for p in model.parameters())
        t_clone = _median_time(lambda: [p.detach().clone() for p in model.parameters()], args.repeats)

        def tp_inplace():
            a, b = next(fresh)
            teleport(model, a, inplace=True)
            teleport(model, b, inplace=True)

        t_in = _median_time(tp_inplace, args.repeats) / 2
        with torch.no_grad():
            t_par = _median_time(lambda: teleported_params(model, s, next(fresh)[0], check=False), args.repeats)
        t_copy = _median_time(lambda: teleport(model, next(fresh)[0]), args.repeats)
        print(f"{name:<14} {n_params:>9} {s.num_free:>8} {t_an:>9.3f} {1e3 * t_clone:>9.3f} {1e3 * t_in:>10.3f} "
              f"{t_in / t_clone:>13.2f} {t_par / t_clone:>12.2f} {t_copy / t_clone:>10.2f}")


if __name__ == "__main__":
    main()
