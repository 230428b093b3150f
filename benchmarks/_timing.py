"""Timing helper shared by the benchmarks (not a benchmark itself: the leading underscore keeps `make bench` off it)."""

from __future__ import annotations

import statistics
import time


def paired(fa, fb, repeats: int, clock=time.perf_counter):
    """Alternate ``fa`` and ``fb`` (after one warm-up call of each) and time each pair, so load changes on a shared
    machine hit both alike. Returns ``(median t_a, median t_b, sorted per-pair ratios t_a / t_b)``. ``clock``: wall
    time by default; ``time.thread_time`` (this thread's CPU time) is much less disturbed by other processes on a
    busy machine, for work that runs on the calling thread."""
    fa(), fb()
    ta, tb, ratios = [], [], []
    for _ in range(repeats):
        t0 = clock()
        fa()
        t1 = clock()
        fb()
        t2 = clock()
        ta.append(t1 - t0)
        tb.append(t2 - t1)
        ratios.append((t1 - t0) / (t2 - t1))
    return statistics.median(ta), statistics.median(tb), sorted(ratios)
