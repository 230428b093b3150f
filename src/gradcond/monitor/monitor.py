"""``Monitor``: probes scheduled during training under a compute budget, writing long-format rows.

Use as a trainer callback (``fit(..., callbacks=[Monitor()])``, or ``[monitor]`` in a run config) or from a plain
loop with :meth:`Monitor.step`. Each probe has a configured schedule (``every:N`` steps, ``epoch``, ``log``).

Under DDP and FSDP2 (``torch.distributed``, more than one rank) the monitor runs on every rank and measures the
**whole model on the global probe batch** (issue 24): each rank takes its slice of the probe batch
(:func:`gradcond.distributed.rank_slice` of ``probe_batch_size``, from its own data), and the probes that can --
``grad_norm``, ``weight_norm``, ``update_size``, ``gsc``, ``domain`` and the distributed ``noise_scale`` -- compute
per-rank partial sums from rank-local values (FSDP2 shards, this rank's samples) and reduce them with one
all-reduce (:mod:`gradcond.probes.norms`, ``reduce=`` of the probes); the measurement gathers no parameter (forward
passes go through the FSDP2 model, which unshards a unit only for its computation, as in training). Probes that need the
full model (``conditioning``, ``representation``, the per-sample ``noise_scale``) are measured on rank 0 only under
DDP, on the inner module (``model.module``) and the gathered global probe batch (the probe batch's samples, never a
parameter, are gathered); under FSDP2 they are not run, and a ``probe_unavailable`` event (and the report) says why.
Rank 0 makes the plan and broadcasts it, failures are agreed between the ranks, and rank 0 alone logs rows.

The schedule is decided once, from counts, never from a clock
-------------------------------------------------------------
``budget`` is the share of the training time the monitor may spend measuring. With ``budget < 1`` the monitor
*plans* once, at the first optimizer step, before measuring anything, and the plan is a function of the config,
the model and the data shapes only -- not of the machine's speed or load -- so two runs of one config measure the
same steps on an idle and on a saturated machine (issue 26):

1. **Costs** (:mod:`gradcond.monitor.costs`): one forward+backward of a single sample of the probe batch is
   counted (ATen op calls, flops, elements written; no timing) and turned into modelled seconds of a training step
   (the training batch size, the optimizer's kind) and of one measurement of each probe (a formula per probe, e.g.
   ``conditioning`` = three forward+backward passes of the probe batch + the per-sample Gram + an eigen-decomposition),
   with constants fitted once and fixed in the code. The counts are stored in the plan (``cost_model``), so the plan
   says what it was decided from. A model the counting cannot run (it raises) gets no budget: every probe is then
   measured as configured, and the plan says why.
2. **Plan** (:func:`plan_schedule`, a pure function of those costs, the configured schedules, the budget, the steps
   per epoch and the number of epochs): the budget is split fairly between probes (a probe cheaper than its equal
   share keeps its schedule and leaves the rest to the others), and a probe that needs more is thinned by an
   integer factor -- ``every:N`` becomes every ``N*m`` steps, ``epoch`` every ``m``-th epoch (plus the last one),
   ``log`` is never thinned (it is already sparse). ``m`` is rounded up to a power of two.
3. **Minimum**: every enabled probe is measured at least ``min_measurements`` (default 3) times when the run has
   that many opportunities, *even when this exceeds the budget*; the plan states by how much (``fraction`` of the
   modelled training time per probe, and the reason sentence). A probe is left out entirely only when its guaranteed
   measurements alone would take longer than the whole training (then ``skipped`` says so and which setting would
   include it).

The budget is a share of the *modelled* training time; the share actually spent is measured and logged to the
timing file (``time_fraction``), for information only. Plans written before issue 26 (their probes timed during
three calibration steps: ``calibration_steps > 0``) are still followed exactly when given or resumed.

The plan is the contract dict written atomically to ``<run_dir>/monitor_schedule.json`` (see :func:`plan_schedule`)
and kept in :attr:`Monitor.plan`; it is part of the monitor's checkpoint state, so a resumed run uses the same plan
(and :class:`Monitor` accepts ``plan=`` -- a dict or the path of an earlier ``monitor_schedule.json`` -- to repeat
a run's schedule exactly). Given the plan, which rows are written depends only on the step and epoch counters:
two runs with the same plan write the same (step, probe, layer, name) rows. :func:`coverage_sentences` turns a plan
into plain-English sentences for a report. ``budget=1`` switches the budget off: nothing is counted, every
configured measurement runs.

Measurements due under the configured schedule but thinned out by the plan are counted per epoch
(``probe=monitor, name=skipped``, deterministic given the plan); the monitor's share of the time goes to the
timing file (``name=time_fraction``). A probe that raises is disabled, the failure is logged as a ``probe_failed``
event (and shown in the report), and training goes on. Probes run on a fixed probe batch (the first
``probe_batch_size`` training samples) so curves are comparable over time.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path

import torch

from .. import distributed as D
from ..distributed import is_main, unwrap
from ..train.run import RunLogger
from ..train.trainer import Callback, TrainState
from ..utils import atomic_write_text, plain_forward, selecting_output
from .schedule import PRESETS, PROBES, Schedule

SCHEDULE_FILE = "monitor_schedule.json"
DEFAULT_MIN_MEASUREMENTS = 3
# budgets suggested in the reasons ("set monitor.budget = X to measure it as configured")
_SUGGESTED_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


# ---- the plan: pure functions ------------------------------------------------------------------------------
def _multiples(lo: int, hi: int, k: int) -> int:
    """Number of multiples of ``k`` in the integer interval (lo, hi]."""
    return max(0, hi // k - lo // k) if hi > lo else 0


def _describe(sch: Schedule, m: int = 1) -> str:
    if sch.kind == "every":
        n = sch.n * m
        return "at every step" if n == 1 else f"every {n} steps"
    if sch.kind == "epoch":
        return "at the end of every epoch" if m == 1 else f"at the end of every {_ordinal(m)} epoch and of the last one"
    return "at log-spaced steps (1, 2, 4, 8, ...)"


def _ordinal(k: int) -> str:
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


def _fmt_budget(b: float) -> str:
    return f"{b:.0%}" if b * 100 == round(b * 100) else f"{b:.1%}"


def _fmt_s(s: float) -> str:
    return f"{s:.2g} s" if s >= 0.01 else f"{s * 1e3:.2g} ms"


class _Counts:
    """How many measurements a probe gets under thinning factor ``m`` (None when the run length is unknown)."""

    def __init__(self, spe, epochs, calib, calibration_measurement=True):
        self.spe, self.epochs, self.calib = spe, epochs, calib
        self.total = spe * epochs if spe is not None and epochs is not None else None
        # plans since the calibration measurement counts: every probe is measured once at the calibration step
        # unless its schedule already measured it during calibration (see Monitor._calibration_due)
        self.cm = bool(calibration_measurement) and calib > 0

    def calibration(self, sch: Schedule) -> int:
        if sch.kind == "every":
            k = _multiples(0, self.calib, sch.n)
            return k if k or not self.cm else 1
        if sch.kind == "log":
            return self.calib.bit_length()  # 1, 2, 4, ... <= calib
        return 1 if self.cm else 0  # epoch: the calibration measurement is the first epoch's measurement

    def target(self, sch: Schedule, n1, min_meas: int) -> int:
        """Measurements after calibration that the guaranteed minimum asks for (calibration measurements count)."""
        cal = self.calibration(sch)
        return max(0, min(min_meas, cal + n1) - cal)

    def after(self, sch: Schedule, m: int):
        """Measurements after calibration with thinning ``m``."""
        if sch.kind == "epoch":
            if self.epochs is None:
                return None
            if self.cm:  # epoch 0 was measured at the calibration step: epochs 1.. follow the plan
                return _multiples(1, self.epochs, m) + (1 if self.epochs % m and self.epochs > 1 else 0)
            return self.epochs // m + (1 if self.epochs % m else 0)
        if self.total is None:
            return None
        if sch.kind == "every":
            return _multiples(self.calib, self.total, sch.n * m)
        return self.total.bit_length() - self.calib.bit_length()

    def rate(self, sch: Schedule):
        """Measurements per training step under the configured schedule (None if unknown)."""
        if sch.kind == "every":
            return 1.0 / sch.n
        if sch.kind == "epoch":
            return None if self.spe is None else 1.0 / self.spe
        if self.total:
            return self.after(sch, 1) / self.total
        return 0.0  # log-spaced on an open-ended run: negligible per step


def _largest_factor(sch: Schedule, counts: _Counts, m: int, target: int) -> int:
    """A thinning factor <= m that still gives ``target`` measurements after calibration, found by bisection
    (counts fall with the factor, up to the alignment of multiples: the result always meets the target, and is the
    largest such factor up to that alignment)."""
    lo, hi = 1, m
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if counts.after(sch, mid) >= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _decide(sched, costs, step_time, budget, counts: _Counts, min_meas) -> dict:
    """name -> (m, skipped, why) for the enabled probes: ``m`` the thinning factor, ``why`` one of "fits",
    "thinned", "minimum" (thinned less than the budget asks, to keep the guaranteed minimum), "unknown" (no cost or
    rate to budget with), "too_costly", "never_due", "failed"."""
    out, frac = {}, {}
    for name, sch in sched.items():
        c, n1 = costs.get(name), counts.after(sch, 1)
        if c is None and costs.get(f"{name}:failed"):
            out[name] = (1, True, "failed")
        elif n1 == 0 and counts.calibration(sch) == 0 and not counts.cm:
            out[name] = (1, True, "never_due")
        elif budget >= 1:
            out[name] = (1, False, "fits")
        elif c is None or not step_time or step_time <= 0:
            out[name] = (1, False, "unknown")
        elif (counts.total is not None and n1 is not None
              and c * min(min_meas, counts.calibration(sch) + n1) > counts.total * step_time):
            out[name] = (1, True, "too_costly")
        elif counts.rate(sch) is None:
            out[name] = (1, False, "unknown")
        else:
            frac[name] = c * counts.rate(sch) / step_time
    left = budget
    for name in [n for n in frac if sched[n].kind == "log"]:  # log-spaced: never thinned, but it uses budget
        f = frac.pop(name)
        out[name] = (1, False, "fits" if f <= max(left, 0.0) else "log")
        left -= f
    # the guaranteed minimum first: a probe that needs more than its equal share of what is left even at its
    # sparsest schedule that keeps min_measurements gets that schedule, and the others share what remains (so a
    # budget eaten by minimums thins the cheap probes too, instead of letting them keep their shares on top)
    order = sorted(frac, key=lambda n: (frac[n], n))
    while order:
        share = max(left, 0.0) / len(order)
        bound = []
        for name in order:
            sch = sched[name]
            n1 = counts.after(sch, 1)
            if n1 is None:
                continue  # open-ended run: no minimum to keep
            m_min = _largest_factor(sch, counts, 2 ** 20, counts.target(sch, n1, min_meas))
            if frac[name] / m_min > share:
                bound.append((name, m_min))
        if not bound:
            break
        for name, m_min in bound:
            out[name] = (m_min, False, "minimum")
            left -= frac[name] / m_min
            order.remove(name)
    # fair split ("water-filling"): cheapest first; a probe under its equal share of what is left keeps its
    # schedule and leaves the rest to the others; a probe over it is thinned by a power of two
    for i, name in enumerate(order):
        sch, f = sched[name], frac[name]
        share = max(left, 0.0) / (len(order) - i)
        if f <= share:
            m, why = 1, "fits"
        else:
            m = 2 ** min(62, math.ceil(math.log2(f / share))) if share > 0 else 2 ** 62
            why = "thinned"
            n1 = counts.after(sch, 1)
            if n1 is not None:
                target = counts.target(sch, n1, min_meas)
                if counts.after(sch, m) < target:
                    m, why = _largest_factor(sch, counts, m, target), "minimum"
            elif m >= 2 ** 62:
                m = 2 ** 20  # open-ended run and no budget left: very sparse but not never
        left -= f / m
        out[name] = (m, False, why)
    return out


def plan_schedule(probes: dict, costs: dict, step_time: float | None, budget: float, steps_per_epoch: int | None,
                  epochs: int | None, min_measurements: int = DEFAULT_MIN_MEASUREMENTS, calibration_steps: int = 0,
                  *, cost_model: dict | None = None) -> dict:
    """Decide the monitor's schedule once: a pure function (no clock), so equal inputs give equal plans.

    ``probes``: name -> configured schedule (``Schedule`` or text) of the enabled probes; ``costs``: name -> seconds
    per measurement (``None`` when unknown; ``"<name>:failed"`` -> error text for a probe that raised);
    ``step_time``: seconds per training step (the :class:`Monitor` passes the modelled seconds of
    :mod:`gradcond.monitor.costs`; any unit works as long as costs and step time share it); ``budget``: share of the
    training time; ``cost_model``: stored in the plan as ``cost_model`` (with ``cost_source: "model"``), the counts
    the costs came from. ``calibration_steps`` (plans written before issue 26 timed their probes during the first
    steps; the Monitor now passes 0): the steps already run as configured before the plan applies. With
    ``calibration_steps > 0`` the measurements
    made to time the probes count (``calibration_measurement: true``): at the calibration step every probe that its
    schedule did not measure during calibration is measured once (for an ``epoch`` probe that is its first
    epoch's measurement, and epoch 0's end is not measured again), ``planned_measurements`` includes them, and the
    guaranteed minimum counts them. Returns the contract dict (written to ``monitor_schedule.json``)::

        {"budget", "steps_per_epoch", "epochs", "total_steps", "step_time_s", "min_measurements",
         "calibration_steps", "calibration_measurement", "planned_fraction",
         "probes": [{"name", "enabled", "configured", "every_steps", "every_epochs", "planned_measurements",
                     "cost_s", "fraction", "skipped", "reason"}]}

    with one entry per probe of :data:`PROBES` (``enabled=False`` for those not configured); ``reason`` is one
    plain-English sentence saying how often the probe is measured and, when it is thinned or left out, which setting
    would include it; ``fraction`` is the planned share of the training time of that probe (None when unknown).
    """
    sched = {n: Schedule.parse(s) for n, s in probes.items()}
    counts = _Counts(steps_per_epoch, epochs, calibration_steps)
    decided = _decide(sched, costs, step_time, budget, counts, min_measurements)
    total_time = counts.total * step_time if counts.total is not None and step_time else None
    entries = []
    planned_cost = 0.0
    for name in list(PROBES) + sorted(set(sched) - set(PROBES)):
        if name not in sched:
            entries.append({"name": name, "enabled": False, "configured": None, "every_steps": None,
                            "every_epochs": None, "planned_measurements": 0, "cost_s": None, "fraction": None,
                            "skipped": True, "reason": f"not enabled in this run; add {name} = \"epoch\" to "
                                                       f"monitor.probes to include it"})
            continue
        sch = sched[name]
        m, skipped, why = decided[name]
        c = costs.get(name)
        every_steps = every_epochs = None
        if not skipped:
            if sch.kind == "every":
                every_steps = sch.n * m
            elif sch.kind == "epoch":
                every_epochs = m
                every_steps = m * steps_per_epoch if steps_per_epoch is not None else None
        n_after = counts.after(sch, m)
        planned = 0 if skipped else (None if n_after is None else counts.calibration(sch) + n_after)
        fraction = (c * planned / total_time) if (c is not None and planned is not None and total_time) else None
        if fraction is not None:
            planned_cost += c * planned
        entries.append({"name": name, "enabled": True, "configured": _configured_text(sch), "every_steps": every_steps,
                        "every_epochs": every_epochs, "planned_measurements": planned, "cost_s": c,
                        "fraction": fraction, "skipped": skipped,
                        "reason": _reason(name, sch, m, why, planned, c, fraction, budget, counts, costs, step_time,
                                          sched, min_measurements, total_time)})
    plan = {"budget": budget, "steps_per_epoch": steps_per_epoch, "epochs": epochs, "total_steps": counts.total,
            "step_time_s": step_time, "min_measurements": min_measurements, "calibration_steps": calibration_steps,
            "calibration_measurement": counts.cm,
            "planned_fraction": planned_cost / total_time if total_time else None, "probes": entries}
    if cost_model is not None:
        plan["cost_source"] = "model"  # costs from gradcond.monitor.costs (counts, no clock)
        plan["cost_model"] = cost_model
    return plan


def _configured_text(sch: Schedule) -> str:
    return f"every:{sch.n}" if sch.kind == "every" else sch.kind


def _budget_to_include(name, sched, costs, step_time, budget, counts, min_meas):
    """Smallest suggested budget under which ``name`` runs as configured (the plan re-decided at that budget)."""
    for b in _SUGGESTED_BUDGETS:
        if b <= budget:
            continue
        m, skipped, why = _decide(sched, costs, step_time, b, counts, min_meas)[name]
        if m == 1 and not skipped and why == "fits":
            return b
    return 1.0


def _reason(name, sch, m, why, planned, c, fraction, budget, counts, costs, step_time, sched, min_meas, total_time):
    # a measurement made at the calibration step outside the configured schedule is named, so that the sentence
    # agrees with the rows (e.g. an epoch probe's first measurement is at step 3, not at the end of epoch 0)
    extra = counts.cm and (sch.kind == "epoch" or (sch.kind == "every" and _multiples(0, counts.calib, sch.n) == 0))
    at_cal = f", the first at calibration step {counts.calib}" if extra else ""
    at_cal = at_cal if planned else ""
    times = "" if planned is None else f" ({planned} time{'s' if planned != 1 else ''}{at_cal})"
    share = "" if fraction is None else f", about {_fmt_budget(fraction)} of the training time"
    if why == "failed":
        return (f"not run: it failed while its cost was being measured ({costs.get(f'{name}:failed')}); see the "
                f"probe_failed event")
    if why == "never_due":
        per = max(1, (counts.total or 0) // max(min_meas, 1))
        return (f"not run: its schedule {_configured_text(sch)} never falls within the {counts.total} training steps; "
                f"set monitor.probes.{name} = \"every:{per}\" to include it")
    if why == "too_costly":
        k = min(min_meas, counts.calibration(sch) + counts.after(sch, 1))
        return (f"not run: one measurement costs {_fmt_s(c)}, so even {k} measurement{'s' if k != 1 else ''} "
                f"({_fmt_s(k * c)}) would take longer than the whole training (about {_fmt_s(total_time)}); set "
                f"monitor.budget = 1 to include it")
    if why == "unknown":
        return (f"measured as configured, {_describe(sch)}{times}; the budget could not be applied because the "
                f"{'cost of a training step' if not step_time else 'number of steps per epoch'} is unknown")
    if why == "log":
        return (f"measured as configured, {_describe(sch)}{times}{share}, over the {_fmt_budget(budget)} budget: "
                f"log-spaced schedules are never thinned; set monitor.probes.{name} = \"epoch\" to measure it less")
    if why == "fits":
        if budget >= 1:
            return f"measured as configured, {_describe(sch)}{times}{share} (no budget: monitor.budget = 1)"
        return f"measured as configured, {_describe(sch)}{times}{share}, within the {_fmt_budget(budget)} budget"
    b = _budget_to_include(name, sched, costs, step_time, budget, counts, min_meas)
    if why == "minimum":
        how = ("as configured, " + _describe(sch) + times if m == 1
               else f"{_describe(sch, m)}{times} instead of {_describe(sch)}")
        return (f"measured {how} to keep the guaranteed minimum of {min_meas} measurements{share}, more "
                f"than its part of the {_fmt_budget(budget)} budget (set monitor.budget = {b:g} for this to be "
                f"within budget)" if m == 1 else
                f"measured {how} to keep the guaranteed minimum of {min_meas} measurements{share}, more "
                f"than its part of the {_fmt_budget(budget)} budget; set monitor.budget = {b:g} to measure it "
                f"as configured")
    return (f"measured {_describe(sch, m)}{times} instead of {_describe(sch)} to stay within the "
            f"{_fmt_budget(budget)} budget{share and ' (' + share[2:] + ')'}; set monitor.budget = {b:g} to measure "
            f"it as configured")


def coverage_sentences(schedule: dict) -> list[str]:
    """Plain-English sentences for a report: one overall sentence, then one per probe (``"<probe>: <reason>."``),
    measured probes first, then those left out, then those not enabled. A pure function of the plan dict that
    :func:`plan_schedule` returns (as written to ``monitor_schedule.json``)."""
    out = []
    budget = schedule.get("budget")
    probes = schedule.get("probes") or []
    if budget is not None:
        if budget >= 1:
            out.append("The monitor ran without a budget (monitor.budget = 1): every configured measurement was made.")
        else:
            pf = schedule.get("planned_fraction")
            st = schedule.get("step_time_s")
            if schedule.get("cost_source") == "model":
                err = (schedule.get("cost_model") or {}).get("error")
                txt = ("The monitor planned its measurements once, before the first, from a cost model (operation "
                       "and flop counts of the model on the batch shapes; no clock)")
                if err:
                    txt += f", which could not count this model ({err})"
                elif st:
                    txt += f" (a training step is modelled at about {_fmt_s(st)})"
            else:
                txt = (f"The monitor planned its measurements once, after {schedule.get('calibration_steps', 0)} "
                       f"calibration step(s)")
                if st:
                    txt += f" (a training step took about {_fmt_s(st)})"
            txt += f", to stay within a budget of {_fmt_budget(budget)} of the training time"
            if pf is not None:
                txt += f"; the planned measurements take about {_fmt_budget(pf)}"
                if pf > budget * 1.005:
                    txt += " (over the budget: the sentences below say which probe exceeds its part and why)"
            out.append(txt + ".")

    def rank(p):
        return (0 if p.get("enabled") and not p.get("skipped") else 1 if p.get("enabled") else 2)

    for p in sorted(probes, key=rank):
        out.append(f"{p['name']}: {p['reason']}.")
    return out


def _next_due(sch: Schedule, step: int) -> int:
    """The first step after ``step`` at which the configured schedule ``sch`` (every:N or log) is due."""
    if sch.kind == "every":
        return (step // sch.n + 1) * sch.n
    return 1 << step.bit_length()  # log-spaced: the next power of two


# ---- the callback -----------------------------------------------------------------------------------------
class Monitor(Callback):
    """Schedules the probes of :data:`PROBES` during training under ``budget`` (see the module docstring).

    ``probes``: a preset name (:data:`PRESETS`) or ``{probe: schedule}``; ``budget``: share of the training time
    in (0, 1] (1 = no budget); ``min_measurements``: measurements guaranteed to each enabled probe, its
    calibration measurements included (when the run has that many opportunities); ``plan``: a plan dict or the path of a
    ``monitor_schedule.json`` to reuse instead of planning (its probes must match the configured ones);
    ``output``: for models returning a ``ModelOutput`` / dataclass / dict / tuple, which tensor the probes and the
    loss see (default: the ``logits`` field, else the first tensor; :func:`gradcond.utils.select_output`).
    """

    def __init__(self, probes: str | dict = "default", budget: float = 0.05, probe_batch_size: int = 64,
                 tensorboard_dir: str | None = None, min_measurements: int = DEFAULT_MIN_MEASUREMENTS,
                 plan: dict | str | Path | None = None, output=None):
        self.output = output  # models returning a ModelOutput / dict / tuple: the tensor the probes see
        if isinstance(probes, str):
            if probes not in PRESETS:
                raise ValueError(f"unknown monitor preset {probes!r}; accepted: {', '.join(PRESETS)}.")
            probes = PRESETS[probes]
        unknown = sorted(set(probes) - set(PROBES))
        if unknown:
            raise ValueError(f"unknown probe(s) {', '.join(unknown)}; accepted: {', '.join(PROBES)}.")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not (0 < budget <= 1):
            raise ValueError(f"monitor budget must be a fraction in (0, 1], got {budget!r}.")
        if isinstance(min_measurements, bool) or not isinstance(min_measurements, int) or min_measurements < 1:
            raise ValueError(f"min_measurements must be an integer >= 1, got {min_measurements!r}.")
        self.schedules = {name: Schedule.parse(s) for name, s in probes.items()}
        self._step_schedules = [(name, sch) for name, sch in self.schedules.items() if sch.kind != "epoch"]
        self.budget = float(budget)
        self.min_measurements = min_measurements
        self.probe_batch_size = probe_batch_size
        self.plan: dict | None = self._check_plan(plan) if plan is not None else None
        self._given_plan = self.plan is not None
        self.spent = 0.0
        self.skipped: Counter = Counter()
        self.failed: dict[str, str] = {}
        self.batch = None
        self._t0 = None
        self._tb = None
        self._tb_dir = tensorboard_dir
        self._plain_state: TrainState | None = None
        self._plan_written = False
        self._resumed = False
        self._calls: Counter = Counter()  # measurements attempted per probe (the same on every rank)
        self._gathered = None  # DDP: the global probe batch on rank 0
        self._recorder = None  # DDP/FSDP2: the noise-scale recorder on the gradient communication
        self._before = None  # the layer weights before the optimizer step (update_size)
        self._samples = 0  # this rank's training samples since the last noise_scale measurement
        self.unavailable: dict[str, str] = {}  # probes left out under the active strategy -> why
        # the global batch of one optimizer step, when an integration knows it (else per-rank batch x ranks)
        self.global_batch_size: int | None = None
        self.samples_per_step: int | None = None  # this rank's samples per optimizer step, when an integration knows
        self._quiet_until = None  # the next step at which a step probe is due (None: look at every step)

    def use_plan(self, plan: dict | str | Path) -> None:
        """Pin the schedule to ``plan`` (a plan dict or the path of a ``monitor_schedule.json``) instead of planning:
        e.g. a comparison run that must measure at the same steps as the run it is compared with. Raises
        ``ValueError`` when the plan was written for other probes or schedules."""
        self.plan = self._check_plan(plan)
        self._given_plan = True

    def _check_plan(self, plan) -> dict:
        if isinstance(plan, (str, Path)):
            try:
                plan = json.loads(Path(plan).read_text())
            except (OSError, ValueError) as exc:
                raise ValueError(f"monitor plan {plan} cannot be read ({exc}); pass a monitor_schedule.json written "
                                 "by an earlier run, or a dict.") from None
        if not isinstance(plan, dict) or not isinstance(plan.get("probes"), list):
            raise ValueError("a monitor plan is a dict with a 'probes' list, as written to monitor_schedule.json.")
        enabled = {p.get("name") for p in plan["probes"] if p.get("enabled")}
        if enabled != set(self.schedules):
            raise ValueError(f"the monitor plan covers probes {sorted(enabled)} but this monitor measures "
                             f"{sorted(self.schedules)}; pass a plan written for the same probes.")
        for p in plan["probes"]:
            if p.get("enabled") and p.get("configured") != _configured_text(self.schedules[p["name"]]):
                raise ValueError(f"the monitor plan schedules {p['name']} as {p.get('configured')!r} but this monitor "
                                 f"configures {_configured_text(self.schedules[p['name']])!r}; pass a matching plan.")
        return plan

    # ---- planning ---------------------------------------------------------------------------------------------
    @staticmethod
    def _steps_per_epoch(state: TrainState):
        loader = state.train_loader
        try:
            return len(loader) if loader is not None else None
        except TypeError:
            return None

    @staticmethod
    def _epochs(state: TrainState):
        e = getattr(state, "epochs", None)
        if e is None:
            e = (state.config or {}).get("train", {}).get("epochs") if isinstance(state.config, dict) else None
        return e if isinstance(e, int) and e >= 0 else None

    def _calibration_due(self, name: str, calib: int) -> bool:
        """Whether ``name`` gets its calibration measurement at step ``calib``: an ``epoch`` probe always (it is its
        first epoch's measurement), an ``every:N`` probe when N > ``calib`` (its schedule did not measure it during
        calibration); ``log`` probes are measured at step 1."""
        sch = self.schedules[name]
        if calib <= 0:
            return False
        return sch.kind == "epoch" or (sch.kind == "every" and _multiples(0, calib, sch.n) == 0)

    def _train_batch_size(self, state: TrainState) -> int | None:
        bs = getattr(state.train_loader, "batch_size", None)
        if isinstance(bs, int) and bs > 0:
            return bs
        if state.batch is not None and isinstance(state.batch[0], torch.Tensor) and state.batch[0].dim():
            return int(state.batch[0].shape[0])
        return None

    def _make_plan(self, state: TrainState) -> None:
        """Plan once, from counts (:mod:`gradcond.monitor.costs`): a function of the configured probes, the budget,
        the run's length, the model, the loss, the batch shapes and the optimizer's kind -- never of a clock."""
        spe, epochs = self._steps_per_epoch(state), self._epochs(state)
        costs, step_cost, model_info = {}, None, None
        if self.budget < 1:
            from .costs import COST_MODEL_VERSION, ELEM_S, FLOP_S, OP_S, estimate_costs, profile_model

            model = unwrap(state.model)
            batch = self._probe_batch(state)
            try:
                prof = profile_model(model, state.loss_fn, batch, optimizer=state.optimizer,
                                     train_batch=self._train_batch_size(state) or int(batch[0].shape[0]),
                                     output=getattr(self, "output", None))
            except Exception as exc:  # the budget cannot be applied: every probe is measured as configured
                model_info = {"version": COST_MODEL_VERSION, "error": f"{type(exc).__name__}: {exc}"}
            else:
                costs, step_cost, notes = estimate_costs(prof, self.schedules)
                model_info = {"version": COST_MODEL_VERSION, "constants": {"op_s": OP_S, "flop_s": FLOP_S,
                                                                            "elem_s": ELEM_S},
                              "profile": prof.to_dict(), "default_cost": notes}
        plan = None
        if is_main():  # rank 0 decides; every rank follows the same plan (all ranks profiled: FSDP2's forward is
            # collective, and the counts are the same on every rank)
            plan = plan_schedule(dict(self.schedules), costs, step_cost, self.budget, spe, epochs,
                                 self.min_measurements, 0, cost_model=model_info)
        self.plan = D.broadcast_object(plan)
        self._write_plan(state)

    def _calibration_measurements(self, state: TrainState) -> None:
        """A given or resumed plan: the measurements its calibration step made, repeated at that step."""
        calib = self.plan.get("calibration_steps", 0)
        if not self.plan.get("calibration_measurement") or state.step != calib:
            return
        for name in self.schedules:
            if self._calibration_due(name, calib) and not self._entry(name)["skipped"]:
                self._run(name, state)

    def _write_plan(self, state: TrainState) -> None:
        path = getattr(state.run, "path", None) if state.run is not None and is_main() else None
        if path is not None and self.plan is not None:
            atomic_write_text(Path(path) / SCHEDULE_FILE, json.dumps(self.plan, indent=2) + "\n")
        self._plan_written = True

    def _entry(self, name: str) -> dict:
        cache = self.__dict__.get("_entries")
        if cache is None or cache[0] is not self.plan:  # one look-up table per plan object
            cache = self._entries = (self.plan, {p["name"]: p for p in self.plan["probes"]})
        return cache[1][name]

    def _planned(self, name: str, step: int | None = None, epoch: int | None = None, last_epoch=None) -> bool:
        """Whether the plan measures ``name`` at this step (step probes) or at the end of this epoch."""
        e = self._entry(name)
        if e["skipped"]:
            return False
        sch = self.schedules[name]
        if sch.kind == "epoch":
            if epoch == 0 and self.plan.get("calibration_measurement"):
                return False  # measured at the calibration step (the first epoch's measurement)
            k = e.get("every_epochs") or 1
            return (epoch + 1) % k == 0 or (last_epoch is not None and epoch == last_epoch)
        if step <= self.plan.get("calibration_steps", 0):
            return True  # calibration steps follow the configured schedule
        if sch.kind == "every":
            return step % e["every_steps"] == 0
        return True  # log-spaced: never thinned

    # ---- running probes ---------------------------------------------------------------------------------------
    def _fail(self, name: str, exc: Exception, state: TrainState) -> None:
        self.failed[name] = f"{type(exc).__name__}: {exc}"
        if is_main():
            state.log_event("probe_failed", probe=name, error=self.failed[name])

    def _probe_batch(self, state: TrainState):
        """This rank's probe batch: the first ``probe_batch_size`` training samples in one process; under DDP/FSDP2
        this rank's :func:`~gradcond.distributed.rank_slice` of that size, taken from the start of its own data
        (an integration that sees the full dataset on every rank sets :attr:`batch` to the rank's slice itself)."""
        if self.batch is None:
            n = len(range(self.probe_batch_size)[D.rank_slice(self.probe_batch_size)])
            ds = getattr(state.train_loader, "dataset", None)
            if ds is not None and hasattr(ds, "tensors"):
                x, y = ds.tensors[0][:n], ds.tensors[1][:n]
            else:
                x, y = state.batch
                x, y = x[:n], y[:n]
            p = next(unwrap(state.model).parameters())  # the dataset's tensors may sit on the CPU: move them to the model
            dtype, dev = p.dtype, D.local_tensor(p).device
            self.batch = (x.to(dev, dtype) if x.is_floating_point() else x.to(dev),
                          y.to(dev, dtype) if y.is_floating_point() else y.to(dev))
        return self.batch

    def _global_batch(self, state: TrainState):
        """The whole probe batch on rank 0 (the ranks' slices in rank order; gathered once, samples only) for the
        probes that run on rank 0's full replica under DDP; None on the other ranks."""
        local = self._probe_batch(state)
        if not D.active():
            return local
        if self._gathered is None:
            parts = [None] * D.world_size()
            torch.distributed.all_gather_object(parts, tuple(t.cpu() for t in local))
            if is_main():
                dev = local[0].device
                self._gathered = tuple(torch.cat([p[i] for p in parts]).to(dev) for i in range(2))
            else:
                self._gathered = ()
        return self._gathered if is_main() else None

    def _placement(self, name: str, state: TrainState):
        """Where probe ``name`` runs under the active strategy: ``"all"`` (every rank, partial sums reduced),
        ``"main"`` (rank 0 only, full replica, gathered probe batch) or ``("unavailable", reason)``."""
        strategy = D.strategy(state.model)
        if strategy == "single":
            return "all"
        reduced = {"grad_norm", "weight_norm", "update_size", "gsc", "domain"}
        if name in reduced or (name == "noise_scale" and self._recorder is not None):
            return "all"
        if strategy == "ddp":
            return "main"
        return ("unavailable", f"it needs every parameter of the model in one process, and under FSDP2 each rank "
                               f"holds only a shard (gradcond never gathers a parameter); measure {name} in a "
                               f"single-process or DDP run")

    def _probe_fn(self, name: str):
        """The function measuring ``name``: the registry's, or one bound to the monitor's own state (the weights
        before the step for ``update_size``, the gradient-communication recorder for ``noise_scale``)."""
        if name == "update_size":
            from .schedule import update_size

            return lambda m, lf, b, st: update_size(m, lf, b, st, before=self._before)
        if name == "noise_scale":
            from .schedule import noise_scale

            def fn(m, lf, b, st):
                samples, self._samples = self._samples, 0
                return noise_scale(m, lf, b, st, recorder=self._recorder, samples=samples,
                                   batch_size=self._batch_in_use(st))
            return fn
        return PROBES[name]

    def _batch_in_use(self, state: TrainState):
        """The global batch of an optimizer step (per-rank batch x ranks x accumulation), when known."""
        if self.global_batch_size is not None:
            return self.global_batch_size
        b = state.batch[0] if state.batch is not None else None
        return None if b is None or not hasattr(b, "shape") else int(b.shape[0]) * D.world_size()

    def _measure(self, name: str, state: TrainState):
        """Run probe ``name`` once: its rows, or None when it raised on some rank (then it is disabled on every rank
        and the failure logged) or ran on another rank. No decision reads its duration.
        Every rank calls it for the same probes in the same order (one small all-reduce agrees on failures)."""
        self._calls[name] += 1
        where = self._placement(name, state)
        rows, err = None, None
        if where == "all" or (where == "main" and is_main()):
            try:
                model = unwrap(state.model)
                batch = self._probe_batch(state) if where == "all" else self._global_batch(state)
                with plain_forward(model), selecting_output(model, getattr(self, "output", None)):
                    rows = self._probe_fn(name)(model, state.loss_fn, batch, state)
            except Exception as exc:  # a failing probe must not stop training
                err = exc
        elif where == "main":
            self._global_batch(state)  # the gather is collective: the other ranks take part
        if D.all_agree(err is not None):
            if err is None:
                err = RuntimeError("it failed on another rank (see rank 0's probe_failed event)")
            self._fail(name, err, state)
            return None
        if rows is None:
            return None
        return rows

    def _run(self, name: str, state: TrainState) -> None:
        if name in self.failed:
            return
        rows = self._measure(name, state)
        if rows is not None:
            self._log(name, rows, state)

    def _log(self, name: str, rows, state: TrainState) -> None:
        if not is_main():  # one writer: rank 0 logs the (reduced, identical) rows
            return
        state.log_metrics([(name, layer, metric, value) for layer, metric, value in rows])
        if self._tb is not None:
            for layer, metric, value in rows:
                self._tb.add_scalar(f"{name}/{metric}/{layer}" if layer else f"{name}/{metric}", value, state.step)

    # ---- callback hooks ---------------------------------------------------------------------------------------
    def _setup_distributed(self, state: TrainState) -> None:
        """Under DDP/FSDP2: attach the noise-scale recorder to the gradient communication (when ``noise_scale`` is
        enabled and the model allows it), and leave out, with a ``probe_unavailable`` event naming the reason, the
        probes that cannot run under the strategy."""
        self._recorder = None
        if D.strategy(state.model) == "single":
            return
        if "noise_scale" in self.schedules:
            from ..probes.noise import NoiseScaleRecorder

            try:
                self._recorder = NoiseScaleRecorder.attach(state.model)
            except (ValueError, RuntimeError):
                self._recorder = None  # e.g. an unwrapped DDP replica: the per-sample estimator on rank 0
        for name in list(self.schedules):
            where = self._placement(name, state)
            if isinstance(where, tuple):
                self.unavailable[name] = where[1]
                del self.schedules[name]
                if is_main():
                    state.log_event("probe_unavailable", probe=name, strategy=D.strategy(state.model),
                                    reason=where[1])

    def on_train_start(self, state: TrainState) -> None:
        self._setup_distributed(state)
        self._step_schedules = [(name, sch) for name, sch in self.schedules.items() if sch.kind != "epoch"]
        self._t0 = time.perf_counter()
        self._quiet_until = None
        if self._tb_dir is not None and self._tb is None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("tensorboard_dir needs the optional 'tensorboard' package (pip install gradcond[tensorboard]).") from None
            self._tb = SummaryWriter(self._tb_dir)
        if self._given_plan:
            self._write_plan(state)
        elif self.budget >= 1:
            self._make_plan(state)  # nothing to budget: the plan is the configured schedule
        else:
            # a fresh run plans at its first step, when the batch shapes are known (a resumed run gets its plan from
            # load_state_dict)
            self.plan = None
            self._plan_written = self._resumed = False

    def _ensure_written(self, state: TrainState) -> None:
        """After a resume: the plan comes from the checkpoint, or else from the run's ``monitor_schedule.json``;
        the file is rewritten if it went missing."""
        if self._plan_written:
            return
        path = getattr(state.run, "path", None) if state.run is not None else None
        file = Path(path) / SCHEDULE_FILE if path is not None else None
        if self.plan is None and self._resumed and file is not None and file.exists():
            self.plan = self._check_plan(file)
        if self.plan is not None:
            if file is not None and not file.exists():
                self._write_plan(state)
            self._plan_written = True

    def _due(self, name: str, step: int, state: TrainState) -> bool:
        """Whether ``name`` may be measured at the end of optimizer step ``step`` (calibration: all steps)."""
        sch = self.schedules[name]
        if self.plan is None:
            return True
        if sch.kind == "epoch":
            spe = self._steps_per_epoch(state)
            return spe is None or step % spe == 0
        return sch.due_at_step(step) and self._planned(name, step=step)

    def before_update(self, state: TrainState, step: int | None = None) -> None:
        """Call before the optimizer step that completes optimizer step ``step`` (default ``state.step + 1``):
        keeps the rank-local layer weights when ``update_size`` is due then (the relative update size needs the
        weights before the step). The trainer's ``on_step_start`` calls it."""
        self._before = None
        if "update_size" not in self.schedules or "update_size" in self.failed:
            return
        step = state.step + 1 if step is None else step
        if self._due("update_size", step, state):
            from ..probes.norms import snapshot_weights

            self._before = snapshot_weights(state.model)

    def on_step_start(self, state: TrainState) -> None:
        self.before_update(state)

    def on_step_end(self, state: TrainState) -> None:
        # this rank's samples since the last noise_scale read; with a recorder, only steps whose gradient
        # communication it saw (it may be attached after the first backward, e.g. from Monitor.step)
        if self._recorder is None or self._recorder.counts:
            if self.samples_per_step is not None:
                self._samples += self.samples_per_step
            elif state.batch is not None and hasattr(state.batch[0], "shape"):
                self._samples += int(state.batch[0].shape[0])
        if self._quiet_until is not None and state.step < self._quiet_until:
            return  # no step probe's configured schedule falls before _quiet_until: nothing to measure
        t = time.perf_counter()  # the monitor's own time (timings.csv only; no decision reads it)
        if self._t0 is None:
            self._t0 = t
        self._ensure_written(state)
        if self.plan is None:
            self._make_plan(state)
        step = state.step
        for name, sch in self._step_schedules:
            if sch.due_at_step(step):
                if self._planned(name, step=step):
                    self._run(name, state)
                else:
                    self.skipped[name] += 1
        if self.plan.get("calibration_measurement"):  # plans written before issue 26 only (calibration_steps > 0)
            self._calibration_measurements(state)
        elif self._plan_written:
            self._quiet_until = min((_next_due(sch, step) for _, sch in self._step_schedules), default=math.inf)
        self.spent += time.perf_counter() - t

    def on_epoch_end(self, state: TrainState) -> None:
        t = time.perf_counter()
        self._ensure_written(state)
        if self.plan is None:
            self._make_plan(state)  # an epoch without a step
        epochs = self._epochs(state)
        last = epochs - 1 if epochs is not None else None
        for name, sch in self.schedules.items():
            if sch.kind == "epoch":
                if state.epoch == 0 and self.plan.get("calibration_measurement"):
                    continue  # measured at the calibration step: neither run again nor thinned out
                if self._planned(name, epoch=state.epoch, last_epoch=last):
                    self._run(name, state)
                else:
                    self.skipped[name] += 1
        rows = [("monitor", probe, "skipped", n) for probe, n in sorted(self.skipped.items())]
        self.skipped.clear()
        self.spent += time.perf_counter() - t
        if is_main():  # one writer
            state.log_metrics(rows)
            # timing values vary between executions: they go to the timing file, never to metrics.csv
            elapsed = time.perf_counter() - (self._t0 or time.perf_counter())
            timing = [("monitor", "", "time_fraction", self.spent / max(elapsed, 1e-9))]
            (state.log_timings if hasattr(state, "log_timings") else state.log_metrics)(timing)

    def on_train_end(self, state: TrainState) -> None:
        if self._tb is not None:
            self._tb.flush()

    def state_dict(self) -> dict:
        elapsed = 0.0 if self._t0 is None else time.perf_counter() - self._t0
        # plain values only (checkpoints are read with weights_only=True)
        return {"spent": self.spent, "elapsed": elapsed, "failed": dict(self.failed),
                "plan": json.loads(json.dumps(self.plan)) if self.plan is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.spent = state.get("spent", 0.0)
        self._t0 = time.perf_counter() - state.get("elapsed", 0.0)
        self.failed = dict(state.get("failed", {}))
        if state.get("plan") is not None and not self._given_plan:
            self.plan = self._check_plan(state["plan"])
        self._plan_written = False
        self._resumed = True
        self._quiet_until = None

    # ---- plain loops --------------------------------------------------------------------------------------
    def step(self, model: torch.nn.Module, loss_fn, batch, optimizer=None, run: RunLogger | None = None,
             scaler=None) -> list[dict]:
        """Call after ``optimizer.step()`` in your own loop; returns the rows logged at this step.

        Mixed precision: call it after ``scaler.step(optimizer)`` and ``scaler.update()`` and pass ``scaler``
        (a ``torch.amp.GradScaler``): ``scaler.step`` has unscaled the gradients in place, so the monitor reads
        the true gradients; a step the scaler skipped (inf/NaN gradients -- checked on the gradients themselves,
        the scaler's own criterion) is not measured but logged as an ``optimizer_step_skipped`` event and a
        ``monitor/skipped_step`` row. Probes that run forward passes run outside autocast, in the parameters'
        dtype (accumulating in float32/float64). ``model`` and ``optimizer`` may be ``accelerator.prepare``-d:
        the monitor measures the inner module without accelerate's autocast wrapper.

        Rows accumulate in ``monitor.rows`` (and in ``run``'s directory when given). ``epoch`` probes run every
        ``len(loader)`` steps only under the trainer; here they run when :meth:`end_epoch` is called. The number of
        steps is unknown here, so the plan (:attr:`plan`) thins by rate only and cannot count measurements ahead.
        """
        from ..train import get_loss

        first = self._plain_state is None
        if first:
            self._plain_state = TrainState(model, optimizer, get_loss(loss_fn), None, run=run or RunLogger(None))
            self.on_train_start(self._plain_state)
        st = self._plain_state
        st.model, st.optimizer, st.batch = model, optimizer, batch
        if self.batch is None:
            x, y = batch
            self.batch = (x[: self.probe_batch_size], y[: self.probe_batch_size])
        n0 = len(st.run.metrics)
        st.step += 1
        skipped = bool(getattr(optimizer, "step_was_skipped", False))  # accelerate's AcceleratedOptimizer says so
        if not skipped and scaler is not None and getattr(scaler, "is_enabled", lambda: True)():
            from ..probes.norms import gradients_finite

            skipped = not gradients_finite(model)
        if skipped:
            if is_main():
                st.log_event("optimizer_step_skipped", reason="the gradient scaler found inf/NaN gradients and "
                                                              "skipped this step; it was not measured")
                st.log_metrics([("monitor", "", "skipped_step", 1.0)])
            return st.run.metrics[n0:]
        self.on_step_end(st)
        return st.run.metrics[n0:]

    def end_epoch(self) -> list[dict]:
        st = self._plain_state
        if st is None:
            return []
        n0 = len(st.run.metrics)
        self.on_epoch_end(st)
        st.epoch += 1
        return st.run.metrics[n0:]

    @property
    def rows(self) -> list[dict]:
        return [] if self._plain_state is None else self._plain_state.run.metrics

    @property
    def events(self) -> list[dict]:
        return [] if self._plain_state is None else self._plain_state.run.events
