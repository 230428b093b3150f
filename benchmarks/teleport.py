"""Teleportation speed: analysis time and teleport time relative to cloning all parameters.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/teleport.py [--repeats N] [--rounds R]``.
Targets (issue 9): in-place teleport <= 2x a parameter clone on every model; densenet analysis <= 0.5 s.

How it measures (all in this one run, float32 parameters, ``torch.set_num_threads(1)``):
* baseline ``clone``: ``[p.detach().clone() for p in model.parameters()]``;
* ``inplace``: ``teleport(model, cob, inplace=True, check=False)`` -- the target quantity (the self-check, on by
  default, adds a forward pass of the original and of the teleported model on the analysis example and a copy of
  the teleported parameters; it is not timed here).  Each timed call uses a fresh
  :class:`CoB` object (so no per-CoB cache is reused) and teleports by ``cob`` then by ``cob.inverse()`` (so the
  weights stay O(1) and, for models whose activations need rewriting -- the transformer's GELUs under a random
  CoB -- every pair wraps and then unwraps those modules); the time per teleport is half the pair;
* ``params``: ``teleported_params(model, structure, cob)`` (new tensors, no module; informational);
* ``copy``: ``teleport(model, cob)`` (also deep-copies the module: buffers, module objects; informational).
Clone and teleport timings are interleaved (clone, teleport pair, clone, ...) after a warm-up, so load changes on
a shared machine hit both alike; each ratio is median(teleport) / median(clone) over ``repeats`` interleaved
samples.  With ``--rounds R`` the whole measurement is repeated R times and the min / median / max of each ratio
over rounds is printed (the spread shows the machine's noise).
For models of a few thousand parameters both times are dominated by per-call overhead (tens of microseconds),
so there the ratio compares Python/dispatch overheads: a clone is one call per parameter, a teleport a fixed
number of vectorised calls (see ``gradcond.teleport.teleport``) plus the parameter walk.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcond import zoo
from gradcond.graph import analyze
from gradcond.teleport import CoB, random_cob, teleport, teleported_params

TARGET = 2.0


def cases():
    return [
        ("mlp", lambda: zoo.build("mlp"), (2, 64)),
        ("vgg(BN)", lambda: zoo.build("vgg", batch_norm=True), (2, 1, 8, 8)),
        ("resnet18 w64", lambda: zoo.build("resnet", depth=18, width=64), (2, 1, 8, 8)),
        ("densenet", lambda: zoo.build("densenet"), (2, 1, 8, 8)),
        ("transformer", lambda: zoo.build("transformer"), (2, 8, 8)),
    ]


def _interleaved(fns: list, repeats: int, warmup: int = 3) -> list[float]:
    """Median wall time of each function, sampled in turn ``repeats`` times after ``warmup`` calls each."""
    for f in fns:
        for _ in range(warmup):
            f()
    samples = [[] for _ in fns]
    clock = time.perf_counter
    for _ in range(repeats):
        for f, s in zip(fns, samples):
            t0 = clock()
            f()
            s.append(clock() - t0)
    return [statistics.median(s) for s in samples]


def measure(name: str, build, shape, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build().to(torch.float32)
    x = torch.randn(*shape)
    t0 = time.perf_counter()
    s = analyze(model, x)
    t_first = time.perf_counter() - t0
    t_an = min(t_first, min(_timed(lambda: analyze(model, x)) for _ in range(3)))
    cob = random_cob(s, 0.9, "intra", torch.Generator().manual_seed(0))
    tau, itau = cob.tau.clone(), cob.inverse().tau.clone()
    n_calls = 2 * repeats + 16
    pairs = iter([(CoB(s, tau.clone()), CoB(s, itau.clone())) for _ in range(n_calls)])
    singles = iter([CoB(s, tau.clone()) for _ in range(2 * n_calls)])
    params = list(model.parameters())

    def clone():
        [p.detach().clone() for p in model.parameters()]

    def tp_pair():
        a, b = next(pairs)
        teleport(model, a, inplace=True, check=False)
        teleport(model, b, inplace=True, check=False)

    def tp_params():
        with torch.no_grad():
            teleported_params(model, s, next(singles), check=False)

    def tp_copy():
        teleport(model, next(singles), check=False)

    before = [p.detach().clone() for p in params]
    t_clone, t_pair = _interleaved([clone, tp_pair], repeats)
    t_clone2, t_par, t_copy = _interleaved([clone, tp_params, tp_copy], max(3, repeats // 4))
    drift = max(float((p.detach() - b).abs().max() / b.abs().max().clamp_min(1e-30)) for p, b in zip(params, before))
    return dict(name=name, params=sum(p.numel() for p in params), num_free=s.num_free, analyze_s=t_an,
                clone_ms=1e3 * t_clone, inplace_ms=1e3 * t_pair / 2, inplace=t_pair / 2 / t_clone,
                params_ratio=t_par / t_clone2, copy_ratio=t_copy / t_clone2, drift=drift)


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=200, help="interleaved samples per timing (resnet: / 10)")
    ap.add_argument("--rounds", type=int, default=1, help="repeat the whole measurement; report min/median/max")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, float32, median of {args.repeats} "
          f"interleaved samples, {args.rounds} round(s); target: inplace teleport / clone <= {TARGET}")
    hdr = (f"{'model':<13} {'params':>9} {'num_free':>8} {'analyze_s':>9} {'clone_ms':>9} {'inplace_ms':>10} "
           f"{'inplace/clone':>13} {'params/clone':>12} {'copy/clone':>10} {'target':>6}")
    print(hdr)
    results = {}
    for _ in range(args.rounds):
        for name, build, shape in cases():
            reps = max(10, args.repeats // 10) if name.startswith("resnet") else args.repeats
            r = measure(name, build, shape, reps)
            assert r["drift"] < 1e-4, f"{name}: teleport then inverse moved the weights by {r['drift']:.2e}"
            results.setdefault(name, []).append(r)
            print(f"{name:<13} {r['params']:>9} {r['num_free']:>8} {r['analyze_s']:>9.3f} {r['clone_ms']:>9.3f} "
                  f"{r['inplace_ms']:>10.3f} {r['inplace']:>13.2f} {r['params_ratio']:>12.2f} "
                  f"{r['copy_ratio']:>10.2f} {'ok' if r['inplace'] <= TARGET else 'MISS':>6}", flush=True)
    if args.rounds > 1:
        print(f"\nover {args.rounds} rounds: min / median / max")
        print(f"{'model':<13} {'inplace/clone':>22} {'analyze_s':>22}")
        for name, rs in results.items():
            ratios = sorted(r["inplace"] for r in rs)
            an = sorted(r["analyze_s"] for r in rs)
            print(f"{name:<13} {ratios[0]:>6.2f} / {statistics.median(ratios):>5.2f} / {ratios[-1]:>5.2f}   "
                  f"{an[0]:>6.3f} / {statistics.median(an):>5.3f} / {an[-1]:>5.3f}"
                  f"   {'ok' if ratios[-1] <= TARGET else 'MISS'}")


if __name__ == "__main__":
    main()
