"""The rules every reproduction judges by, in one place: preconditions and the statistics behind a verdict.

A reproduction row (:class:`~gradcond.experiments.registry.Row`) is a test of a claim only when the claim *could*
have held in the setting we ran. Each row therefore carries its **preconditions** (:class:`Precondition`), each a
measured value against a threshold fixed before the run. When one is not met the row's verdict is **untestable**
(it names the precondition and its measured value), never "no"; an entry with an untestable row does not hold.

The preconditions used across the entries (each constructor below returns a :class:`Precondition`):

* **the treatment happened** -- :func:`treatment_gain` (a teleport's median gradient-norm gain >= 1.5,
  :data:`MIN_TREATMENT_GAIN`), :func:`treatment_happened` (a filter removed data, a coded run compressed, ...);
* **the baseline learns** -- :func:`baseline_learns` (the untreated arm's best accuracy leaves chance by a stated
  margin) or :func:`loss_decreases` (its loss falls by a stated fraction);
* **power** -- :func:`enough_samples` (a comparison judged by a standard-error rule has at least :data:`MIN_SEEDS`
  = 5 seeds or networks) and :func:`critical_value_reachable` (the sample size can reach the statistic's critical
  value at all, e.g. Spearman's rho needs >= 5 pairs for a two-sided 5 % test, and at 5 only a perfect
  ordering is significant);
* **the setting is the claim's** -- :func:`setting_matches` (e.g. effective depth is judged only on networks of
  >= 30 layers).

The statistical rules (:func:`mean_se`, :func:`t_quantile`, :func:`one_sided_t`, :func:`spearman`,
:func:`spearman_critical`) are the only ones the entries use, so one reading of "significant" holds everywhere:
a difference is significant when a one-sided t test at level :data:`ALPHA` = 0.05 rejects "no difference", over at
least :data:`MIN_SEEDS` seeds. (The former "mean > 2 SE over 2-3 seeds" rule has a false-positive rate near 15 %:
with n = 3 the one-sided critical t is 2.92, not 2.)
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

#: Smallest number of seeds (or networks) for a comparison judged by a standard-error rule.
MIN_SEEDS = 5
#: Level of every significance test of the reproductions (one-sided unless a row says otherwise).
ALPHA = 0.05
#: A teleport "happened" when its median gradient-norm gain over the teleports is at least this (issue-level rule:
#: a gain of 1.03 moves nothing a training curve could show).
MIN_TREATMENT_GAIN = 1.5


@dataclass(frozen=True)
class Precondition:
    """A condition the setting must meet for a row to test its claim, with the value measured in this run.

    ``name``: what must hold ("the baseline learns"); ``requirement``: the threshold in words, fixed before the run
    ("best test accuracy >= chance + 20 pp = 30 %"); ``measured``: the measured value in words ("best test accuracy
    10.1 %"); ``met``: whether it holds; ``value``: the measured number when there is one (NaN never meets a
    threshold)."""

    name: str
    requirement: str
    measured: str
    met: bool
    value: float | None = None

    def __post_init__(self):
        object.__setattr__(self, "met", _strict_bool(self.met, "Precondition.met"))

    def describe(self) -> str:
        """``"the baseline learns: best test accuracy 10.1 % (needs >= 30 %)"``."""
        return f"{self.name}: {self.measured} (needs {self.requirement})"

    def to_dict(self) -> dict:
        return asdict(self)


def _strict_bool(v, what: str) -> bool:
    """``v`` as a Python bool. Accepts bools and numpy/torch scalar booleans (a numpy or torch False is False, never
    "not False"); refuses anything else (a multi-element tensor, a string, None) with a ValueError."""
    if isinstance(v, bool):
        return v
    item = getattr(v, "item", None)
    if callable(item) and getattr(v, "ndim", 0) == 0 and getattr(v, "dtype", None) is not None:
        x = item()
        if isinstance(x, bool):
            return x
        if isinstance(x, (int, float)) and x in (0, 1):
            return bool(x)
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise ValueError(f"{what} must be a boolean (True or False), got {v!r} of type {type(v).__name__}.")


def _finite(x) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _fmt(x: float, fmt: str) -> str:
    return format(x, fmt) if _finite(x) else str(x)


def at_least(name: str, value: float, threshold: float, what: str, fmt: str = ".3g", unit: str = "") -> Precondition:
    """Precondition ``value >= threshold`` (NaN or infinite ``value``: not met). ``what`` names the quantity
    ("median gradient-norm gain"); ``fmt``/``unit`` format both numbers."""
    met = _finite(value) and float(value) >= threshold
    return Precondition(name, f"{what} >= {_fmt(threshold, fmt)}{unit}", f"{what} {_fmt(value, fmt)}{unit}", met,
                        float(value) if _finite(value) else float("nan"))


def at_most(name: str, value: float, threshold: float, what: str, fmt: str = ".3g", unit: str = "") -> Precondition:
    """Precondition ``value <= threshold`` (NaN: not met)."""
    met = _finite(value) and float(value) <= threshold
    return Precondition(name, f"{what} <= {_fmt(threshold, fmt)}{unit}", f"{what} {_fmt(value, fmt)}{unit}", met,
                        float(value) if _finite(value) else float("nan"))


def treatment_gain(gains: Sequence[float], threshold: float = MIN_TREATMENT_GAIN,
                   what: str = "median gradient-norm gain per teleport") -> Precondition:
    """**The treatment happened**: the median of ``gains`` (e.g. each teleport's gradient-norm ratio after/before)
    is at least ``threshold`` (default 1.5). No gains at all (no teleport ran) is not met."""
    fin = [float(g) for g in gains if _finite(g)]
    med = statistics.median(fin) if fin else float("nan")
    p = at_least("the treatment happened", med, threshold, what, fmt=".3f")
    if not fin:
        return Precondition(p.name, p.requirement, f"no finite {what.split(' per ')[0]} was measured (0 teleports)",
                            False, float("nan"))
    return Precondition(p.name, p.requirement, f"{p.measured} over {len(fin)}", p.met, p.value)


def treatment_happened(value: float, threshold: float, what: str, fmt: str = ".3g", unit: str = "") -> Precondition:
    """**The treatment happened**: a measured size of the treatment (share of data a filter removed, compression
    ratio, ...) is at least ``threshold``."""
    return at_least("the treatment happened", value, threshold, what, fmt, unit)


def baseline_learns(best_accuracy: float, chance: float, margin: float = 0.2,
                    what: str = "the untreated arm's best test accuracy") -> Precondition:
    """**The baseline learns**: the untreated arm's best accuracy (a fraction) is at least ``chance + margin``
    within the budget. Reported in percent."""
    thr = chance + margin
    met = _finite(best_accuracy) and float(best_accuracy) >= thr
    return Precondition("the baseline learns", f"{what} >= chance {chance:.1%} + {margin:.0%} = {thr:.1%}",
                        f"{what} {_fmt(100 * float(best_accuracy), '.1f')} %" if _finite(best_accuracy)
                        else f"{what} {best_accuracy}", met,
                        float(best_accuracy) if _finite(best_accuracy) else float("nan"))


def loss_decreases(first: float, last: float, min_drop: float = 0.2,
                   what: str = "the untreated arm's training loss") -> Precondition:
    """**The baseline learns**: ``what`` falls by at least the fraction ``min_drop`` from ``first`` to ``last``."""
    drop = 1.0 - float(last) / float(first) if _finite(first) and _finite(last) and float(first) > 0 else float("nan")
    met = _finite(drop) and drop >= min_drop
    return Precondition("the baseline learns", f"{what} falls by >= {min_drop:.0%}",
                        f"{what} {_fmt(first, '.4g')} -> {_fmt(last, '.4g')} ({_fmt(100 * drop, '.1f')} % lower)",
                        met, drop)


def enough_samples(n: int, minimum: int = MIN_SEEDS, what: str = "seeds") -> Precondition:
    """**Power**: a comparison judged by a standard-error rule has at least ``minimum`` ``what`` (default 5 seeds)."""
    return Precondition("power", f">= {minimum} {what}", f"{n} {what}", int(n) >= minimum, float(n))


def critical_value_reachable(n: int, critical: float, best_possible: float = 1.0,
                             statistic: str = "|Spearman rho|") -> Precondition:
    """**Power**: with ``n`` samples the statistic can reach its critical value at all (``critical`` <=
    ``best_possible``; e.g. Spearman's |rho| <= 1: at n = 5 only a perfect ordering reaches the two-sided 5 %
    critical value 1.0, at n = 4 nothing does)."""
    return Precondition("power", f"critical {statistic} at n = {n} <= {best_possible:g} (reachable)",
                        f"critical {statistic} {_fmt(critical, '.3f')} at n = {n}",
                        _finite(critical) and critical <= best_possible, float(critical) if _finite(critical) else
                        float("inf"))


def setting_matches(ok: bool, requirement: str, measured: str, value: float | None = None) -> Precondition:
    """**The setting is the claim's**: e.g. ``setting_matches(depth >= 30, ">= 30 layers (the claim is about deep
    networks)", f"{depth} layers")``."""
    return Precondition("the setting is the claim's", requirement, measured, _strict_bool(ok, "ok"), value)


# ---- statistics ------------------------------------------------------------------------------------------------


def mean_se(xs: Iterable[float]) -> tuple[float, float, int]:
    """``(mean, standard error, n)`` of the finite values of ``xs``: SE = sample standard deviation (n - 1) /
    sqrt(n); NaN SE with fewer than 2 values."""
    v = [float(x) for x in xs if _finite(x)]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = statistics.fmean(v)
    se = statistics.stdev(v) / math.sqrt(n) if n > 1 else float("nan")
    return m, se, n


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom (``scipy.stats.t.ppf``); NaN for df < 1."""
    if df < 1:
        return float("nan")
    from scipy.stats import t as student_t  # lazily: `gradcond repro list` imports every entry module

    return float(student_t.ppf(q, df))


@dataclass(frozen=True)
class TTest:
    """A one-sided t test of ``mean > margin``: the sample's mean, SE, n, t statistic, critical value at ``alpha``
    and whether it is significant (never significant with fewer than 2 values or a zero SE of unequal values)."""

    mean: float
    se: float
    n: int
    t: float
    critical: float
    alpha: float
    margin: float
    significant: bool

    def describe(self, unit: str = "", fmt: str = ".3g") -> str:
        """``"mean 0.31 +- 0.05 (SE, n = 5), t = 6.2 >= t_0.95,4 = 2.13"``."""
        rel = ">=" if self.significant else "<"
        return (f"mean {_fmt(self.mean, fmt)}{unit} +- {_fmt(self.se, fmt)}{unit} (SE, n = {self.n}), "
                f"t = {_fmt(self.t, '.2f')} {rel} t_{1 - self.alpha:g},{max(self.n - 1, 0)} = "
                f"{_fmt(self.critical, '.2f')}")


def one_sided_t(xs: Iterable[float], margin: float = 0.0, alpha: float = ALPHA) -> TTest:
    """One-sided t test of ``mean(xs) > margin`` at level ``alpha`` over the finite values of ``xs`` (e.g. the
    per-seed differences treated - baseline). Significant iff t = (mean - margin) / SE >= t_{1-alpha, n-1}.
    A zero SE (all values equal) is significant iff the common value exceeds ``margin``. Cost: O(n)."""
    m, se, n = mean_se(xs)
    crit = t_quantile(1 - alpha, n - 1)
    if n < 2:
        return TTest(m, se, n, float("nan"), crit, alpha, margin, False)
    if se == 0:
        t = math.inf if m > margin else (-math.inf if m < margin else 0.0)
    else:
        t = (m - margin) / se
    return TTest(m, se, n, t, crit, alpha, margin, bool(t >= crit))


def spearman(a: Sequence[float], b: Sequence[float]) -> tuple[float, int]:
    """``(rho, n)``: Spearman's rank correlation over the pairs where both values are finite (ties share their
    average rank, ``scipy.stats.spearmanr``); rho NaN with fewer than 3 such pairs or a constant side."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    n = int(a.size)
    if n < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), n
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic), n


# two-sided 5 % critical values of Spearman's rho (Zar 1972, Table B.20), by number of pairs
_RHO_CRIT_05 = {5: 1.0, 6: 0.886, 7: 0.786, 8: 0.738, 9: 0.700, 10: 0.648, 11: 0.618, 12: 0.587, 13: 0.560,
                14: 0.538, 15: 0.521, 16: 0.503, 17: 0.488, 18: 0.472, 19: 0.460, 20: 0.447, 21: 0.436, 22: 0.425,
                23: 0.416, 24: 0.407, 25: 0.398, 26: 0.390, 27: 0.383, 28: 0.375, 29: 0.368, 30: 0.362}


def spearman_critical(n: int) -> float:
    """Two-sided 5 % critical value of Spearman's rho for ``n`` pairs: Zar's exact table up to 30 pairs, then the
    t approximation ``t / sqrt(n - 2 + t^2)`` with t = t_0.975,n-2; ``inf`` below 5 pairs."""
    if n < 5:
        return math.inf
    if n in _RHO_CRIT_05:
        return _RHO_CRIT_05[n]
    t = t_quantile(0.975, n - 2)
    return t / math.sqrt(n - 2 + t * t)


def rho_power(n: int) -> Precondition:
    """**Power** of a two-sided 5 % Spearman test over ``n`` pairs: its critical value must be below 1."""
    return critical_value_reachable(n, spearman_critical(n))


def unmet(preconditions: Iterable[Precondition]) -> list[Precondition]:
    """The preconditions that are not met."""
    return [p for p in preconditions if not p.met]
