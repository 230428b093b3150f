"""``gradcond diagnose``: one-shot gradient-health analysis of a model at its current weights.

Sections (each computed independently: a failing section is recorded under ``errors`` and the others go on):

- ``gsc``: GSC(l, 0) profile (seed 003 Def. 2) and the fitted explosion rate;
- ``domain``: pre-activation std and sign diversity per nonlinearity;
- ``conditioning``: gradient coherence, step-consistency, relative weight-gradient rank (seed 004);
- ``cob``: the change-of-basis structure (free groups, frozen nodes and why; seed 000);
- ``cob_optimization``: how far an optimised teleport raises the gradient norm without changing the function.

``report.json`` keys: ``model``, ``data``, ``n_samples``, ``gsc``, ``domain``, ``conditioning``, ``cob``,
``cob_optimization``, ``findings`` (plain-language, most important first), ``errors``, ``seconds``,
``section_seconds`` (wall time of each section and of each conditioning metric, ``conditioning.<metric>``).

Public API: :func:`diagnose` (a model, a loss, batches -> the result dict), :func:`findings`,
:func:`write_diagnosis`, :func:`load_factory`; ``gradcond.cli`` calls :func:`diagnose_cli`.  The module sits at the
runner's layer (it used to be ``monitor/diagnose.py``, which imported the runner and the report from below them):
it imports the data, the zoo (``input_form``, ``model_kwargs_for``), ``config.parse_value``, the probes, the graph,
the teleports and the report, and nothing imports it but the command line.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .utils import UserError, accepts_model_output, atomic_write_text, module_device, progress, resolve_device

REPORT_KEYS = ("model", "data", "n_samples", "gsc", "domain", "conditioning", "cob", "cob_optimization", "findings",
               "errors", "seconds", "section_seconds")


def load_factory(spec: str):
    """``path/to/file.py:factory`` -> (model, example_input or None, loss or None) from that file."""
    path_s, _, attr = spec.rpartition(":")
    path = Path(path_s)
    if not path.is_file():
        raise UserError(f"factory file {path} does not exist; MODEL is a zoo name or path/to/file.py:factory.")
    mod_name = f"_gradcond_user_{abs(hash(str(path.resolve())))}"
    try:
        s = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(s)
        sys.modules[mod_name] = module
        s.loader.exec_module(module)
    except Exception as exc:
        raise UserError(f"factory file {path} raised {type(exc).__name__} on import: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{path} has no callable {attr!r}; MODEL is path/to/file.py:factory with factory() -> nn.Module.")
    try:
        model = fn()
    except Exception as exc:
        raise UserError(f"factory {attr}() in {path} raised {type(exc).__name__}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {attr}() in {path} returned {type(model).__name__}, not a torch.nn.Module.")
    return model, getattr(module, "example_input", None), getattr(module, "loss", None)


def _resolve_model_and_data(model_spec: str, data_name: str, sets: list[str], seed: int):
    from . import data as dmod
    from . import zoo
    from .config import parse_value
    from .zoo import input_form, model_kwargs_for

    if ":" in model_spec and model_spec.rsplit(":", 1)[0].endswith(".py"):
        model, example, loss = load_factory(model_spec)
        forms = ["flat", "image", "sequence"]
    else:
        if model_spec not in zoo.names():
            raise UserError(f"unknown model {model_spec!r}; accepted: {', '.join(zoo.names())} or path/to/file.py:factory.")
        model, example, loss = None, None, None
        forms = [input_form(model_spec)]
    kw = {}
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set takes key=value (a zoo model option such as depth=8), got {item!r}.")
        k, v = item.split("=", 1)
        kw[k.strip()] = parse_value(v.strip())
    if model_spec in zoo.names():
        try:
            zoo.check_options(model_spec, kw)  # types and ranges of the zoo options, before any work
        except ValueError as exc:
            raise UserError(str(exc)) from None
    last_err = None
    for form in forms:
        try:
            bundle = dmod.load_dataset(data_name, form=form, seed=seed)
        except ValueError as exc:
            if "has no form" in str(exc):
                last_err = exc
                continue
            raise UserError(str(exc)) from None
        if model is None:
            torch.manual_seed(seed)
            try:
                m = zoo.build(model_spec, **{**model_kwargs_for(model_spec, bundle), **kw})
            except (ValueError, TypeError) as exc:
                raise UserError(str(exc)) from None
        else:
            m = model
        loss_fn = loss if loss is not None else bundle.loss
        x, y = bundle.train.tensors[0][:2], bundle.train.tensors[1][:2]
        try:
            with torch.no_grad():
                was = m.training
                m.eval()
                from .losses import get_loss

                get_loss(loss_fn)(m(x), y)
                m.train(was)
            return m, bundle, loss_fn, example
        except Exception as exc:
            last_err = exc
    raise UserError(f"model {model_spec!r} does not fit dataset {data_name!r} (input shape "
                    f"{tuple(bundle.input_shape)}, {bundle.num_outputs} outputs): {str(last_err).splitlines()[0]}")


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def diagnose(model: nn.Module, loss_fn, batches: list[tuple], example_input=None, cob_steps: int = 20, *,
             output=None) -> dict:
    """Run every diagnostic section on ``batches`` (a list of (x, y)); returns the ``report.json`` dict.

    ``model`` may be wrapped for training: ``DistributedDataParallel`` (its ``.module`` is diagnosed, no collective
    is called: run it on one rank) or ``accelerate.Accelerator.prepare``-d (accelerate's autocast wrapper is set
    aside while diagnosing, so the sections run in the parameters' dtype; it is back afterwards).

    ``output=`` (keyword): for models returning a ``ModelOutput`` / dataclass / dict / tuple (a Hugging Face
    model), which tensor ``loss_fn`` and every probe see -- by default the ``logits`` field, else the first tensor
    (:func:`gradcond.utils.select_output`); no wrapper module needed.

    Runs on the model's device (the batches and ``example_input`` are moved there); a progress bar over the
    sections shows on a terminal (:func:`gradcond.utils.progress`)."""
    from .distributed import unwrap
    from .utils import plain_forward

    inner = unwrap(model)
    with plain_forward(inner):
        return _diagnose(inner, loss_fn, batches, example_input, cob_steps, output=output)


@accepts_model_output
def _diagnose(model: nn.Module, loss_fn, batches: list[tuple], example_input=None, cob_steps: int = 20) -> dict:
    """:func:`diagnose` on an unwrapped model.

    ``output=`` (keyword): for models returning a ``ModelOutput`` / dataclass / dict / tuple (a Hugging Face
    model), which tensor ``loss_fn`` and every probe see -- by default the ``logits`` field, else the first tensor
    (:func:`gradcond.utils.select_output`); no wrapper module needed.

    Runs on the model's device (the batches and ``example_input`` are moved there); a progress bar over the
    sections shows on a terminal (:func:`gradcond.utils.progress`)."""
    from .losses import get_loss

    loss = get_loss(loss_fn)
    dev = module_device(model)
    batches = [tuple(t.to(dev) if torch.is_tensor(t) else t for t in b) for b in batches]
    if torch.is_tensor(example_input):
        example_input = example_input.to(dev)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    result: dict = {"n_samples": int(len(x)), "errors": {}, "section_seconds": {},
                    "_first_batch": int(len(batches[0][0]))}
    t0 = time.perf_counter()

    def section(name, fn):
        ts = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = None
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
        result["section_seconds"][name] = time.perf_counter() - ts

    def gsc_section():
        from .probes.scale import gsc_profile

        prof = gsc_profile(model, loss, (x, y), per_sample=False)
        out = {"layers": prof.layers, "kinds": prof.kinds, "gsc": [_finite(v) for v in prof.gsc], "lowest": _finite(prof.lowest)}
        try:
            fit = prof.fit_explosion()
            out.update(explosion_rate=fit.rate, intercept=fit.intercept, r2=fit.r2, fit_layers=fit.n_points,
                       rate_low=_finite(fit.rate_low), rate_high=_finite(fit.rate_high))
        except ValueError as exc:
            out.update(explosion_rate=None, note=str(exc))
        result["_gsc_profile"] = prof
        return out

    def domain_section():
        from .probes.domain import domain_stats

        st = domain_stats(model, (x, y))
        return {"layers": st.layers, "std": st.std, "sign_diversity": st.sign_diversity}

    def conditioning_section():
        from .probes import conditioning as C

        out = {}
        for name, fn, kw in (("coherence", C.gradient_coherence, {}), ("step_consistency", C.step_consistency, {}),
                             ("relative_rank_weight", C.relative_gradient_rank, {"wrt": "weight"}),
                             ("relative_rank_input", C.relative_gradient_rank, {"wrt": "input"})):
            ts = time.perf_counter()
            try:
                out[name] = _finite(float(fn(model, loss, batches[0], bn="eval", **kw).value))
            except Exception as exc:
                out[name] = None
                result["errors"][f"conditioning.{name}"] = f"{type(exc).__name__}: {exc}"
            result["section_seconds"][f"conditioning.{name}"] = time.perf_counter() - ts
        return out

    def cob_section():
        from .graph import analyze

        st = analyze(model, example_input if example_input is not None else x[:2])
        result["_structure"] = st
        return {"num_free": int(st.num_free), "groups": [g.to_dict() for g in st.groups],
                "frozen": [f.to_dict() if hasattr(f, "to_dict") else str(f) for f in st.frozen],
                "summary": str(st), **teleport_coverage(model, st)}

    def cob_opt_section():
        from .teleport.optimize import optimize_cob

        if result.get("_structure") is None:
            raise RuntimeError("no CoB structure (see errors.cob)")
        return _cob_optimization(model, loss, batches, result["_structure"], optimize_cob, cob_steps)

    # module classes by name, for display only (figures label layers "Linear 2" instead of "2"); not in report.json
    result["_modules"] = [(name or "<root>", type(mod).__name__) for name, mod in model.named_modules()]
    sections = (("gsc", gsc_section), ("domain", domain_section), ("conditioning", conditioning_section),
                ("cob", cob_section), ("cob_optimization", cob_opt_section))
    bar = progress(total=len(sections), desc="diagnose", unit="section")
    try:
        for name, fn in sections:
            bar.set_postfix_str(name, refresh=False)
            section(name, fn)
            bar.update(1)
    finally:
        bar.close()
    result["findings"] = findings(result)
    result["seconds"] = time.perf_counter() - t0
    return result


def _grad_norm(model, loss, batches) -> float:
    """||dL/dtheta|| over the trainable parameters, summed over ``batches`` in squares, in the model's current mode.

    A measurement: nothing of ``model`` changes. The forward passes run through ``torch.func.functional_call`` on
    clones of the buffers, so a BatchNorm in train mode normalises with the batch statistics (as in training) but
    updates only the clones, never the model's running statistics; gradients come from ``torch.autograd.grad``, so
    no ``.grad`` is written. Cost: one forward and one backward pass per batch, plus one copy of the buffers.
    """
    from torch.func import functional_call

    named = dict(model.named_parameters())
    trainable = [n for n, p in named.items() if p.requires_grad]
    g2 = 0.0
    for xb, yb in batches:
        buffers = {n: b.clone() for n, b in model.named_buffers()}
        out = functional_call(model, {**named, **buffers}, (xb,))
        grads = torch.autograd.grad(loss(out, yb), [named[n] for n in trainable], allow_unused=True)
        g2 += sum(float(g.pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(g2)


def _cob_optimization(model, loss, batches, structure, optimize_cob, steps) -> dict:
    """Gradient norm before/after an optimised teleport on a copy of the model (the model itself is untouched).

    Every measurement here is pure (see :func:`_grad_norm`): the teleported copy keeps exactly the BatchNorm
    running statistics of the model, so ``max_function_change`` (eval-mode outputs of the model vs the teleported
    copy on the first batch, relative to the largest output) measures the teleport alone -- it used to include the
    drift of running statistics that a train-mode gradient pass had written into the copy.
    """
    import copy

    from .teleport import teleport

    work = copy.deepcopy(model)
    before = _grad_norm(work, loss, batches)
    out = optimize_cob(work, loss, batches, structure=structure, steps=steps)
    cob = out[0] if isinstance(out, tuple) else out
    tp = teleport(work, cob, inplace=False, check_inputs=batches[0][0])  # self-check on this batch too
    after = _grad_norm(tp, loss, batches)
    with torch.no_grad():
        xb = batches[0][0]
        # compare against a fresh copy of the untouched model, in eval mode (eval forwards never write buffers)
        ref = copy.deepcopy(model).eval()
        was_tp = tp.training
        tp.eval()
        f0, f1 = ref(xb), tp(xb)
        tp.train(was_tp)
        change = float((f0 - f1).abs().max() / f0.abs().max().clamp_min(1e-30))
    return {"grad_norm_before": before, "grad_norm_after": after, "ratio": after / before if before > 0 else None,
            "max_function_change": change, "steps": steps}


def teleport_coverage(model: nn.Module, structure) -> dict:
    """How much of ``model`` a change of basis reaches: ``parameters`` (trainable values), ``teleportable_parameters``
    (values a generic CoB changes), and the same counted in tensors (``tensors``, ``teleportable_tensors``).

    Exact for a generic CoB: every rule's factor ``prod_k ext[gidx_k]`` is evaluated at fixed random taus in
    [1.5, 2.5] (float64); a value counts when its factor differs from 1 (a tau and its inverse on the same value
    cancel). Cost: one pass over the parameters' shapes."""
    gen = torch.Generator().manual_seed(0)
    tau = 1.5 + torch.rand(int(structure.num_free), generator=gen, dtype=torch.float64)
    ext = structure.ext_table(tau)
    total = touched = n_tensors = n_touched = 0
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        n_tensors += 1
        total += p.numel()
        rule = structure.rules.get(name)
        if rule is None or not structure.num_free:
            continue
        factor = torch.ones(tuple(rule.shape), dtype=torch.float64)
        for g in rule.gidx:
            factor = factor * ext[torch.as_tensor(g).long()]
        moved = int(((factor - 1).abs() > 1e-9).sum())
        touched += moved
        n_touched += moved > 0
    return {"parameters": int(total), "teleportable_parameters": int(touched), "tensors": int(n_tensors),
            "teleportable_tensors": int(n_touched)}


# Evidence thresholds of the findings (documented in docs/cli.md, "gradcond diagnose"): a domain-collapse verdict
# needs the sign diversity of at least MIN_DOMAIN_SAMPLES samples (with fewer, the fraction of positive values per
# neuron moves in steps of 1/n); GSC verdicts follow gradcond.probes.scale.gsc_verdict (>= 3 layers and a 95%
# interval of the rate on one side of the band [0.95, 1.05]).
MIN_DOMAIN_SAMPLES = 32
COLLAPSE_SIGN_DIVERSITY = 0.1
# the sections a finding may rest on: a finding is made only when all of its sections were computed
_LOSS_SECTIONS = ("gsc", "conditioning", "cob_optimization")


def findings(r: dict) -> list[str]:
    """Plain-language findings, each stating its evidence, in this order: the sections that failed (first, so a
    reader knows what the rest does not cover), then the findings ordered by a severity score.

    Every finding rests on named sections and is made only when they were computed (a failed section never feeds
    a finding). Verdicts are withheld below the evidence thresholds, with a sentence starting "not enough
    evidence": GSC (:func:`gradcond.probes.scale.gsc_verdict`: points, r², the rate's 95% interval), domain
    collapse (:data:`MIN_DOMAIN_SAMPLES` samples). Teleport findings state the fraction of parameters (and the
    number of free factors) a change of basis reaches."""
    from .probes.scale import gsc_verdict

    errors = r.get("errors") or {}
    # a section failed when it has no result, or (conditioning) when every one of its metrics failed
    failed = {name.split(".")[0] for name in errors
              if r.get(name.split(".")[0]) is None or (isinstance(r.get(name.split(".")[0]), dict) and all(
                  v is None for v in r[name.split(".")[0]].values()))}
    head = []
    for name, err in errors.items():
        rests = ("; no finding below uses it" if name.split(".")[0] in failed else
                 "; the other metrics of the section were computed" if "." in name else "")
        head.append(f"section {name} failed: {err.splitlines()[0].rstrip('.')}{rests}")
    if failed & set(_LOSS_SECTIONS) == set(_LOSS_SECTIONS):
        head.insert(0, "every section that needs the loss failed (gsc, conditioning, cob_optimization): the loss "
                       "probably does not fit the model's output; only the loss-free sections are reported below")
    scored = []
    classes = dict(r.get("_modules") or [])
    n = r.get("n_samples")

    def where(name):  # the module name with its class: '0' (Linear)
        return f"{name!r} ({classes[name]})" if name in classes else repr(name)

    g = r.get("gsc")
    if g and "gsc" not in failed:
        rate, k = g.get("explosion_rate"), g.get("fit_layers")
        lowest = g.get("lowest")
        first = where(g["layers"][0]) if g.get("layers") else "?"
        at = f"GSC(L,0) = {lowest:.3g} at {first}" if isinstance(lowest, (int, float)) else f"lowest layer {first}"
        verdict, sentence = gsc_verdict(rate, k, _nan(g.get("rate_low")), _nan(g.get("rate_high")), g.get("r2"))
        if rate is None:
            sentence = f"{sentence} ({g.get('note', 'no finite GSC')})"
        if verdict in ("exploding", "vanishing"):
            scored.append((abs(math.log(rate)) * k, f"{sentence}; {at}; on {n} samples"))
        else:
            scored.append((0.15 if verdict is None else 0.1, f"{sentence}; on {n} samples"))
    d = r.get("domain")
    if d and d.get("sign_diversity") and "domain" not in failed:
        i = min(range(len(d["sign_diversity"])), key=lambda k: d["sign_diversity"][k])
        sd = d["sign_diversity"][i]
        basis = f"lowest of {len(d['sign_diversity'])} nonlinearities, over {n} samples"
        if n is not None and n < MIN_DOMAIN_SAMPLES:
            scored.append((0.12, f"not enough evidence on a collapsing domain: sign diversity {sd:.3f} at "
                           f"{where(d['layers'][i])} ({basis}; at least {MIN_DOMAIN_SAMPLES} samples are needed)"))
        elif sd < COLLAPSE_SIGN_DIVERSITY:
            scored.append((5 * (COLLAPSE_SIGN_DIVERSITY - sd) * 10, f"the domain collapses at {where(d['layers'][i])}: "
                           f"sign diversity {sd:.3f} ({basis}; collapse below {COLLAPSE_SIGN_DIVERSITY}): most "
                           "pre-activations share one sign, the layer acts almost linearly"))
        else:
            scored.append((0.08, f"no domain collapses: the lowest sign diversity is {sd:.3f} at "
                           f"{where(d['layers'][i])} ({basis}; 0.5 = balanced signs, collapse below "
                           f"{COLLAPSE_SIGN_DIVERSITY})"))
    cob = r.get("cob") if "cob" not in failed else None
    coverage = ""
    if cob is not None and cob.get("parameters"):
        tp, tot = int(cob.get("teleportable_parameters") or 0), int(cob["parameters"])
        coverage = (f"{tp:,} of {tot:,} parameter values ({100 * tp / tot:.1f}%) in {cob.get('teleportable_tensors')} "
                    f"of {cob.get('tensors')} tensors, {cob['num_free']} free change-of-basis factors")
    c = r.get("cob_optimization")
    if c and c.get("ratio") and _teleportable(r) and not failed & {"cob", "cob_optimization"}:
        verb = "raises" if c["ratio"] > 1 else "lowers" if c["ratio"] < 1 else "keeps"
        scored.append((abs(math.log(max(c["ratio"], 1e-12))), f"an optimised teleport {verb} the gradient norm "
                       f"{c['ratio']:.2f}x ({c['grad_norm_before']:.3g} -> {c['grad_norm_after']:.3g}) while the "
                       f"function changes by at most {c['max_function_change']:.1e} (relative); {c.get('steps')} "
                       f"optimisation steps on {n} samples, reaching {coverage}"))
    if cob is not None:
        frozen = cob.get("frozen") or []
        if frozen:
            scored.append((1.0, f"{len(frozen)} operation(s) could not be teleported and were pinned (see cob.frozen)"
                           + (f"; a change of basis reaches {coverage}" if coverage else "")))
        if int(cob.get("num_free") or 0) > 0 and coverage:
            tp, tot = int(cob.get("teleportable_parameters") or 0), int(cob["parameters"])
            whole = "the whole model is teleportable" if tp == tot else "part of the model is teleportable"
            scored.append((0.2, f"{whole}: a change of basis reaches {coverage}"))
        elif int(cob.get("num_free") or 0) == 0:
            scored.append((0.2, "nothing can be teleported: the model has no free change-of-basis factor (a teleport "
                           "needs hidden units between two linear maps)"))
    cond = r.get("conditioning") or {}
    if cond.get("coherence") is not None and "conditioning" not in failed:
        scored.append((0.3, f"gradient coherence {cond['coherence']:.3f} on the first batch of "
                       f"{r.get('_first_batch', n)} samples (1 = all samples agree, 1/b = orthogonal per-sample "
                       "gradients)"))
    return head + [text for _, text in sorted(scored, key=lambda t: -t[0])]


def _nan(v):
    return float("nan") if v is None else v


def _teleportable(r: dict) -> bool:
    """Whether the CoB structure has a free factor, i.e. a teleport can change anything at all."""
    cob = r.get("cob") or {}
    return int(cob.get("num_free") or 0) > 0


def _figures(result: dict):
    """The diagnose figures, each on its own Agg canvas with constrained layout (no clipped labels, titled)."""
    from .report import Figure
    from .report.figures import layer_labels, new_figure

    labels = layer_labels(result.get("_modules") or [])
    figs = []
    prof = result.get("_gsc_profile")
    if prof is not None:
        fig, ax = new_figure(figsize=(6, 3.8))
        prof.plot(ax=ax)
        names = [labels.get(n, n) for n in prof.layers]
        if len(names) <= 20:  # name the layers when they fit under the axis
            ax.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        g = result.get("gsc") or {}
        rate, k = g.get("explosion_rate"), g.get("fit_layers")
        sub = f"rate {rate:.2f} per linear layer, fit through {k} layers" if rate is not None and k else "no rate fitted"
        ax.set_title(f"GSC(l, 0) per measured layer\n({sub})", fontsize=10)
        ax.grid(alpha=0.3)
        figs.append(Figure("gsc_profile", fig, "GSC(l, 0) per measured layer, input side first."))
    d = result.get("domain")
    if d:
        fig, ax = new_figure(figsize=(8, 3.6), ncols=2)
        names = [labels.get(n, n) for n in d.get("layers", [])]
        ax[0].plot(d["std"], marker=".")
        ax[0].set_title("pre-activation std")
        ax[0].set_xlabel("nonlinearity (input side first)")
        ax[0].set_ylabel("std")
        ax[1].plot(d["sign_diversity"], marker=".")
        ax[1].set_ylim(0, 0.55)
        ax[1].set_title("sign diversity")
        ax[1].set_xlabel("nonlinearity (input side first)")
        ax[1].set_ylabel("mean min(pos, 1 - pos)")
        if 0 < len(names) <= 12:
            for a in ax:
                a.set_xticks(range(len(names)), names, rotation=45, ha="right", fontsize=7)
        fig.suptitle("Domain statistics per nonlinearity")
        figs.append(Figure("domain", fig, "Domain statistics per nonlinearity."))
    c = result.get("cob_optimization")
    if c and _teleportable(result):  # with no free factor nothing was teleported: no before/after to show
        fig, ax = new_figure(figsize=(4.4, 3.4))
        ax.bar(["before", "after teleport"], [c["grad_norm_before"], c["grad_norm_after"]], color=["gray", "crimson"])
        ax.set_ylabel("||dL/dW|| over the batches")
        ax.set_title("Gradient norm: optimised teleport")
        ratio = c.get("ratio")
        change = c.get("max_function_change")
        same = f"same function (outputs change by at most {change:.1e}, relative)" if isinstance(change, float) else \
            "same function"
        if ratio is not None and ratio > 1:
            caption = f"Same function, larger gradient: CoB optimisation raised the gradient norm {ratio:.2f}x; {same}."
        else:
            caption = f"CoB optimisation did not raise the gradient norm ({c['grad_norm_before']:.3g} -> " \
                      f"{c['grad_norm_after']:.3g}); {same}."
        figs.append(Figure("cob_optimization", fig, caption))
    return [f for f in figs if f.fig is not None]


def write_diagnosis(result: dict, out: Path, title: str) -> Path:
    import html

    from .report import Section, write_report

    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(out / "report.json", json.dumps(public, indent=2, default=str))
    text = "<ol>" + "".join(f"<li>{html.escape(f)}</li>" for f in result["findings"]) + "</ol>"
    sections = [Section("Findings", f"<div class='finding'>{text}</div>", figures=_figures(result))]
    if result.get("conditioning"):
        sections.append(Section("Gradient conditioning", tables=[("metrics", [{"metric": k, "value": v} for k, v in result["conditioning"].items()])]))
    if result.get("cob"):
        sections.append(Section("Change-of-basis structure", f"<pre>{html.escape(result['cob']['summary'])}</pre>"))
    if result["errors"]:
        sections.append(Section("Sections that failed", "<ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in result["errors"].items()) + "</ul>"))
    return write_report(out / "report.html", title, sections, links={"report.json": "report.json"})


def _model_slug(spec: str) -> str:
    """A directory name for MODEL: the zoo name, or ``<file stem>-<factory>`` for ``path/to/file.py:factory``."""
    if ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        path, _, factory = spec.rpartition(":")
        spec = f"{Path(path).stem}-{factory}"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in spec).lstrip(".") or "model"


def diagnose_cli(args) -> int:
    if args.batches < 1 or args.batch_size < 2:
        raise UserError(f"--batches must be >= 1 and --batch-size >= 2, got {args.batches} and {args.batch_size}.")
    device = resolve_device(getattr(args, "device", None) or "cpu")
    model, bundle, loss, example = _resolve_model_and_data(args.model, args.data, args.set, args.seed)
    model.to(device)  # after the CPU fit check in _resolve_model_and_data; diagnose() moves the batches
    out = Path(args.out) if args.out is not None else Path("runs") / "diagnose" / _model_slug(args.model)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"output directory {out} cannot be created ({exc.strerror}); pass a writable --out.") from None
    x, y = bundle.train.tensors
    dtype = next(model.parameters()).dtype
    batches = []
    for i in range(args.batches):
        sl = slice(i * args.batch_size, (i + 1) * args.batch_size)
        if len(x[sl]) < 2:
            break
        batches.append((x[sl].to(dtype) if x.is_floating_point() else x[sl], y[sl].to(dtype) if y.is_floating_point() else y[sl]))
    result = diagnose(model, loss, batches, example)
    result["model"], result["data"] = args.model, args.data
    path = write_diagnosis(result, out, f"gradcond diagnose: {args.model} on {args.data}")
    print(f"{args.model} on {args.data} ({result['n_samples']} samples):")
    for f in result["findings"]:  # all of them: the GSC verdict of a healthy model ranks low but must show
        print(f"  - {f}")
    print(path)
    return 0
