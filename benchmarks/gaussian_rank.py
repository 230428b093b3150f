"""Gaussian baseline R(Y) of the relative gradient rank (issue 18): Wishart/Bartlett sampler vs brute-force draws.

Prints, for b = 64 and P = 10⁶ (and larger P for the fast path only), the time of
:func:`gradcond.probes.conditioning.gaussian_effective_rank` (the b × b Gram sampled directly, O(b³)) and of the former
brute-force draw of ``samples`` Gaussian b × P matrices (O(b² P)), the speed-up, and both values (they are two
estimates of the same mean, so they differ by sampling noise only). Both are measured in this run, one thread.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/gaussian_rank.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from gradcond.probes.conditioning import rank as R


def timeit(fn, repeats):
    ts, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--samples", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    b, s = args.batch, args.samples
    P = 10 ** 6
    # the public function is cached per arguments: time the uncached sampler behind it
    tf, vf = timeit(lambda: float(R._gaussian_stable_ranks(P, b, s, 0).mean()), max(args.repeats, 5))
    tb, vb = timeit(lambda: float(R._gaussian_stable_ranks_bruteforce(P, b, s, 0).mean()), args.repeats)
    print(f"Gaussian baseline R(Y), b = {b}, P = {P:.0e}, {s} samples: Wishart/Bartlett {tf * 1e3:.2f} ms, brute force "
          f"{tb * 1e3:.0f} ms, speed-up {tb / tf:.0f}x; values {vf:.3f} vs {vb:.3f}")
    for P in (10 ** 7, 10 ** 9):
        t, v = timeit(lambda: float(R._gaussian_stable_ranks(P, b, s, 0).mean()), max(args.repeats, 5))
        print(f"Gaussian baseline R(Y), b = {b}, P = {P:.0e}: Wishart/Bartlett {t * 1e3:.2f} ms "
              f"(brute force would draw {b * P * s:.1e} normals); value {v:.3f}, Marchenko-Pastur "
              f"{b * P / (b ** .5 + P ** .5) ** 2:.3f}")


if __name__ == "__main__":
    main()
