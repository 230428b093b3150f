"""``gradcond diagnose``: one-shot gradient-health analysis of a model at its current weights.

Sections (each computed independently: a failing section is recorded under ``errors`` and the others go on):

- ``gsc``: GSC(l, 0) profile (seed 003 Def. 2) and the fitted explosion rate;
- ``domain``: pre-activation std and sign diversity per nonlinearity;
- ``conditioning``: gradient coherence, step-consistency, relative weight-gradient rank (seed 004);
- ``cob``: the change-of-basis structure (free groups, frozen nodes and why; seed 000);
- ``cob_optimization``: how far an optimised teleport raises the gradient norm without changing the function.

``report.json`` keys: ``model``, ``data``, ``n_samples``, ``gsc``, ``domain``, ``conditioning``, ``cob``,
``cob_optimization``, ``findings`` (plain-language, most important first), ``errors``, ``seconds``.
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

from ..utils import UserError, atomic_write_text

REPORT_KEYS = ("model", "data", "n_samples", "gsc", "domain", "conditioning", "cob", "cob_optimization", "findings",
               "errors", "seconds")


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
    from .. import data as dmod
    from .. import zoo
    from ..config import _parse_value
    from ..runner import _auto_form, model_kwargs_for

    if ":" in model_spec and model_spec.rsplit(":", 1)[0].endswith(".py"):
        model, example, loss = load_factory(model_spec)
        forms = ["flat", "image", "sequence"]
    else:
        if model_spec not in zoo.names():
            raise UserError(f"unknown model {model_spec!r}; accepted: {', '.join(zoo.names())} or path/to/file.py:factory.")
        model, example, loss = None, None, None
        forms = [_auto_form(model_spec)]
    kw = {}
    for item in sets:
        if "=" not in item:
            raise UserError(f"--set takes key=value (a zoo model option such as depth=8), got {item!r}.")
        k, v = item.split("=", 1)
        kw[k.strip()] = _parse_value(v.strip())
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
                from ..train import get_loss

                get_loss(loss_fn)(m(x), y)
                m.train(was)
            return m, bundle, loss_fn, example
        except Exception as exc:
            last_err = exc
    raise UserError(f"model {model_spec!r} does not fit dataset {data_name!r} (input shape "
                    f"{tuple(bundle.input_shape)}, {bundle.num_outputs} outputs): {str(last_err).splitlines()[0]}")


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else None


def diagnose(model: nn.Module, loss_fn, batches: list[tuple], example_input=None, cob_steps: int = 20) -> dict:
    """Run every diagnostic section on ``batches`` (a list of (x, y)); returns the ``report.json`` dict."""
    from ..train import get_loss

    loss = get_loss(loss_fn)
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    result: dict = {"n_samples": int(len(x)), "errors": {}}
    t0 = time.perf_counter()

    def section(name, fn):
        try:
            result[name] = fn()
        except Exception as exc:
            result[name] = None
            result["errors"][name] = f"{type(exc).__name__}: {exc}"

    def gsc_section():
        from ..probes.scale import gsc_profile

        prof = gsc_profile(model, loss, (x, y), per_sample=False)
        out = {"layers": prof.layers, "kinds": prof.kinds, "gsc": [_finite(v) for v in prof.gsc], "lowest": _finite(prof.lowest)}
        try:
            fit = prof.fit_explosion()
            out.update(explosion_rate=fit.rate, intercept=fit.intercept, r2=fit.r2)
        except ValueError as exc:
            out.update(explosion_rate=None, note=str(exc))
        result["_gsc_profile"] = prof
        return out

    def domain_section():
        from ..probes.domain import domain_stats

        st = domain_stats(model, (x, y))
        return {"layers": st.layers, "std": st.std, "sign_diversity": st.sign_diversity}

    def conditioning_section():
        from ..probes import conditioning as C

        out = {}
        for name, fn, kw in (("coherence", C.gradient_coherence, {}), ("step_consistency", C.step_consistency, {}),
                             ("relative_rank_weight", C.relative_gradient_rank, {"wrt": "weight"}),
                             ("relative_rank_input", C.relative_gradient_rank, {"wrt": "input"})):
            try:
                out[name] = _finite(float(fn(model, loss, batches[0], bn="eval", **kw).value))
            except Exception as exc:
                out[name] = None
                result["errors"][f"conditioning.{name}"] = f"{type(exc).__name__}: {exc}"
        return out

    def cob_section():
        from ..graph import analyze

        st = analyze(model, example_input if example_input is not None else x[:2])
        result["_structure"] = st
        return {"num_free": int(st.num_free), "groups": [g.to_dict() for g in st.groups],
                "frozen": [f.to_dict() if hasattr(f, "to_dict") else str(f) for f in st.frozen],
                "summary": str(st)}

    def cob_opt_section():
        from ..teleport.optimize import optimize_cob

        if result.get("_structure") is None:
            raise RuntimeError("no CoB structure (see errors.cob)")
        return _cob_optimization(model, loss, batches, result["_structure"], optimize_cob, cob_steps)

    section("gsc", gsc_section)
    section("domain", domain_section)
    section("conditioning", conditioning_section)
    section("cob", cob_section)
    section("cob_optimization", cob_opt_section)
    result["findings"] = findings(result)
    result["seconds"] = time.perf_counter() - t0
    return result


def _grad_norm(model, loss, batches) -> float:
    g2 = 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    for xb, yb in batches:
        grads = torch.autograd.grad(loss(model(xb), yb), params, allow_unused=True)
        g2 += sum(float(g.pow(2).sum()) for g in grads if g is not None)
    return math.sqrt(g2)


def _cob_optimization(model, loss, batches, structure, optimize_cob, steps) -> dict:
    """Gradient norm before/after an optimised teleport on a copy of the model (the model itself is untouched)."""
    import copy

    from ..teleport.core import teleport

    work = copy.deepcopy(model)
    before = _grad_norm(work, loss, batches)
    out = optimize_cob(work, loss, batches, structure=structure, steps=steps)
    cob = out[0] if isinstance(out, tuple) else out
    tp = teleport(work, cob, inplace=False)
    after = _grad_norm(tp, loss, batches)
    with torch.no_grad():
        xb = batches[0][0]
        was, was_tp = work.training, tp.training
        work.eval(), tp.eval()
        f0, f1 = work(xb), tp(xb)
        work.train(was), tp.train(was_tp)
        change = float((f0 - f1).abs().max() / f0.abs().max().clamp_min(1e-30))
    return {"grad_norm_before": before, "grad_norm_after": after, "ratio": after / before if before > 0 else None,
            "max_function_change": change, "steps": steps}


def findings(r: dict) -> list[str]:
    """Plain-language findings, most important first (a severity score orders them)."""
    scored = []
    g = r.get("gsc")
    if g and g.get("explosion_rate"):
        rate = g["explosion_rate"]
        layers = g["layers"]
        if rate > 1.05:
            scored.append((math.log(rate) * len(layers), f"gradients explode at rate {rate:.2f} per linear layer towards "
                           f"the input (GSC(L,0) = {g['lowest']:.3g} at {layers[0]!r})"))
        elif rate < 0.95:
            scored.append((-math.log(rate) * len(layers), f"gradients shrink at rate {rate:.2f} per linear layer towards "
                           f"the input (GSC(L,0) = {g['lowest']:.3g})"))
        else:
            scored.append((0.1, f"gradient scale is stable across depth (explosion rate {rate:.2f} per linear layer)"))
    d = r.get("domain")
    if d and d.get("sign_diversity"):
        i = min(range(len(d["sign_diversity"])), key=lambda k: d["sign_diversity"][k])
        sd = d["sign_diversity"][i]
        if sd < 0.1:
            scored.append((5 * (0.1 - sd) * 10, f"the domain collapses at {d['layers'][i]!r}: sign diversity {sd:.3f} "
                           "(most pre-activations share one sign, the layer acts almost linearly)"))
    c = r.get("cob_optimization")
    if c and c.get("ratio"):
        scored.append((abs(math.log(max(c["ratio"], 1e-12))), f"an optimised teleport raises the gradient norm "
                       f"{c['ratio']:.2f}x ({c['grad_norm_before']:.3g} -> {c['grad_norm_after']:.3g}) while the "
                       f"function changes by at most {c['max_function_change']:.1e} (relative)"))
    cob = r.get("cob")
    if cob is not None:
        frozen = cob.get("frozen") or []
        if frozen:
            scored.append((1.0, f"{len(frozen)} operation(s) could not be teleported and were pinned (see cob.frozen)"))
        else:
            scored.append((0.2, f"the whole model is teleportable: {cob['num_free']} free change-of-basis factors"))
    cond = r.get("conditioning") or {}
    if cond.get("coherence") is not None:
        scored.append((0.3, f"gradient coherence {cond['coherence']:.3f} on the first batch (1 = all samples agree, "
                       "1/b = orthogonal per-sample gradients)"))
    for name, err in (r.get("errors") or {}).items():
        scored.append((0.05, f"section {name} could not be computed: {err.splitlines()[0]}"))
    return [text for _, text in sorted(scored, key=lambda t: -t[0])]


def _figures(result: dict):
    from ..report import Figure
    from ..report.figures import _plt

    plt = _plt()
    figs = []
    prof = result.get("_gsc_profile")
    if prof is not None:
        figs.append(Figure("gsc_profile", prof.plot() if hasattr(prof, "plot") else None, "GSC(l, 0) per measured layer."))
    d = result.get("domain")
    if d:
        fig, ax = plt.subplots(1, 2, figsize=(8, 3.4))
        ax[0].plot(d["std"], marker=".")
        ax[0].set_title("pre-activation std")
        ax[0].set_xlabel("nonlinearity (input side first)")
        ax[0].set_ylabel("std")
        ax[1].plot(d["sign_diversity"], marker=".")
        ax[1].set_ylim(0, 0.55)
        ax[1].set_title("sign diversity")
        ax[1].set_xlabel("nonlinearity (input side first)")
        ax[1].set_ylabel("mean min(pos, 1 - pos)")
        fig.tight_layout()
        figs.append(Figure("domain", fig, "Domain statistics per nonlinearity."))
    c = result.get("cob_optimization")
    if c:
        fig, ax = plt.subplots(figsize=(4, 3.2))
        ax.bar(["before", "after teleport"], [c["grad_norm_before"], c["grad_norm_after"]], color=["gray", "crimson"])
        ax.set_ylabel("||dL/dW|| over the batches")
        ax.set_title("Gradient norm: optimised teleport")
        fig.tight_layout()
        figs.append(Figure("cob_optimization", fig, "Same function, larger gradient: CoB optimisation."))
    return [f for f in figs if f.fig is not None]


def write_diagnosis(result: dict, out: Path, title: str) -> Path:
    import html

    from ..report import Section, write_report

    out.mkdir(parents=True, exist_ok=True)
    public = {k: v for k, v in result.items() if not k.startswith("_")}
    atomic_write_text(out / "report.json", json.dumps(public, indent=2, default=str))
    text = "<ol>" + "".join(f"<li>{html.escape(f)}</li>" for f in result["findings"][:3]) + "</ol>"
    sections = [Section("Findings", f"<div class='finding'>{text}</div>", figures=_figures(result))]
    if result.get("conditioning"):
        sections.append(Section("Gradient conditioning", tables=[("metrics", [{"metric": k, "value": v} for k, v in result["conditioning"].items()])]))
    if result.get("cob"):
        sections.append(Section("Change-of-basis structure", f"<pre>{html.escape(result['cob']['summary'])}</pre>"))
    if result["errors"]:
        sections.append(Section("Sections that failed", "<ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(v)}</li>" for k, v in result["errors"].items()) + "</ul>"))
    return write_report(out / "report.html", title, sections, links={"report.json": "report.json"})


def diagnose_cli(args) -> int:
    if args.batches < 1 or args.batch_size < 2:
        raise UserError(f"--batches must be >= 1 and --batch-size >= 2, got {args.batches} and {args.batch_size}.")
    model, bundle, loss, example = _resolve_model_and_data(args.model, args.data, args.set, args.seed)
    out = Path(args.out)
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
    for f in result["findings"][:3]:
        print(f"  - {f}")
    print(path)
    return 0
