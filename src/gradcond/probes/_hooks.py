"""Shared machinery of the gradient-scale probes (seed 003): layer selection, per-sample losses,
measurement guards (BatchNorm buffers, in-place activations, hooks) and a recording forward pass.

Conventions used by every probe in ``gsc``, ``domain``, ``dilution``, ``tracking``:

* A *measured layer* is one call of a module; its value ``f_l`` is the module's output (the first element when
  the output is a tuple). Dimension 0 is the batch dimension; ``d_l`` is the number of entries per sample.
* The default layer set is every leaf module that is a linear map (Linear, Conv*, Embedding, Bilinear), a
  normalisation (``*Norm*`` classes, incl. BatchNorm, LayerNorm, GroupNorm, LONorm) or an activation
  (``torch.nn`` activations except MultiheadAttention, plus CReLU), in forward order -- seed 003 I.2 evaluates the
  GSC "at every linear, normalisation and nonlinearity layer".
* A module called several times in one forward gives several layers, named ``name``, ``name[1]``, ``name[2]``...
* Data is normalised by :func:`gradcond.utils.as_batches` (``targets=False`` where a probe needs inputs only) and
  loss names are resolved by :func:`gradcond.losses.get_loss`: one way for the whole package.
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

_LINEAR_TYPES = (nn.Linear, nn.Bilinear, nn.Embedding, nn.modules.conv._ConvNd)
_ACT_NAMES = ("relu", "tanh", "selu", "elu", "gelu", "sigmoid", "silu", "swish", "softplus", "mish", "hardtanh")


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"``, ``"norm"``, ``"act"`` or ``None`` (not measured by default) for a module."""
    if isinstance(module, _LINEAR_TYPES):
        return "linear"
    cls = type(module)
    if cls.__name__ == "Conv1D" and (cls.__module__ or "").startswith("transformers"):
        return "linear"  # Hugging Face's Conv1D (GPT-2): x @ W + b with W stored (in, out), a linear layer
    if "norm" in cls.__name__.lower() and not isinstance(module, nn.MultiheadAttention):
        return "norm"
    if cls.__module__ == "torch.nn.modules.activation" and not isinstance(module, nn.MultiheadAttention):
        return "act"
    if any(a in cls.__name__.lower() for a in _ACT_NAMES):
        return "act"
    return None


def default_layers(model: nn.Module, kinds: Iterable[str] = ("linear", "norm", "act")) -> dict[str, nn.Module]:
    """Leaf modules of the given kinds, in registration order, keyed by their qualified name."""
    kinds = set(kinds)
    out = {}
    for name, m in model.named_modules():
        if name and not any(True for _ in m.children()) and layer_kind(m) in kinds:
            out[name] = m
    return out


_CALL_RE = re.compile(r"^(.*)\[(\d+)\]$")


def split_call(name: str) -> tuple[str, int]:
    """``"a.b[2]"`` -> ``("a.b", 2)``; ``"a.b"`` -> ``("a.b", 0)``."""
    m = _CALL_RE.match(name)
    return (m.group(1), int(m.group(2))) if m else (name, 0)


def select_layers(model: nn.Module, layers) -> tuple[dict[str, nn.Module], set[str] | None]:
    """Resolve ``layers`` (None = default set, or a list of module names, optionally with a ``[i]`` call index).

    Returns (modules to hook keyed by module name, wanted layer names or None for "every call").
    Raises ValueError naming the unknown names.
    """
    if layers is None:
        mods = default_layers(model)
        if not mods:
            raise ValueError("the model has no Linear/Conv, normalisation or activation modules to measure; "
                             "pass layers=[module names].")
        return mods, None
    if isinstance(layers, str):
        layers = [layers]
    named = dict(model.named_modules())
    mods, wanted, unknown = {}, set(), []
    for name in layers:
        if not isinstance(name, str):
            raise TypeError(f"layer names must be strings, got {type(name).__name__}.")
        base, _ = split_call(name)
        if base not in named or base == "":
            unknown.append(name)
            continue
        mods[base] = named[base]
        wanted.add(name)
    if unknown:
        sample = ", ".join(list(default_layers(model))[:8])
        raise ValueError(f"unknown layer name(s) {', '.join(map(repr, unknown))}; accepted: module names of the "
                         f"model such as {sample}, optionally with a call index like 'name[1]'.")
    return mods, wanted


# ----------------------------------------------------------------------------------------------- data and loss


def _known_per_sample(loss_fn, out, y):
    """The per-sample losses of the known batch-mean losses in one kernel (cross-entropy with class indices or
    probabilities, mean-squared error: ``gradcond.probes.per_sample.plan.is_batch_mean_loss``), else None: equal to
    what ``vmap`` of the loss over batches of one gives, without its per-call cost (a tenth of a gradient-scale
    measurement of a small MLP)."""
    from torch.nn import functional as F

    from gradcond import losses as L
    from gradcond.probes.per_sample.plan import is_batch_mean_loss

    if not is_batch_mean_loss(loss_fn, out, y):
        return None
    if isinstance(loss_fn, nn.CrossEntropyLoss):
        return F.cross_entropy(out, y, reduction="none", ignore_index=loss_fn.ignore_index,
                               label_smoothing=loss_fn.label_smoothing).reshape(out.shape[0], -1).mean(1)
    if loss_fn is F.cross_entropy or loss_fn is L.cross_entropy:
        return F.cross_entropy(out, y, reduction="none").reshape(out.shape[0], -1).mean(1)
    if isinstance(loss_fn, nn.MSELoss) or loss_fn is F.mse_loss or loss_fn is L.mse:
        return F.mse_loss(out, y.reshape(out.shape), reduction="none").reshape(out.shape[0], -1).mean(1)
    return None


def per_sample_losses(loss_fn: Callable, out: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Per-sample error values ``f_0`` of shape (B,), and the batch reduction (``"mean"``/``"sum"``/``"other"``).

    ``loss_fn(out, y)`` must return a scalar (0-dim) tensor -- a ValueError otherwise. Per-sample values come from
    ``torch.func.vmap`` over ``loss_fn`` applied to batches of one (a Python loop when vmap cannot run the loss); the
    known batch-mean losses (cross-entropy, mean-squared error) give them in one kernel with ``reduction="none"``.
    """
    fast = _known_per_sample(loss_fn, out, y)
    if fast is not None:
        return fast, "mean"
    full = loss_fn(out, y)
    if not torch.is_tensor(full) or full.dim() != 0:
        shape = tuple(full.shape) if torch.is_tensor(full) else type(full).__name__
        raise ValueError(f"loss_fn must return a scalar (0-dim) tensor, got {shape}; reduce it over the batch "
                         f"(e.g. .mean()).")
    try:
        ell = torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
    except Exception:  # pragma: no cover - losses vmap cannot trace
        ell = torch.stack([loss_fn(out[i : i + 1], y[i : i + 1]) for i in range(out.shape[0])])
    ell = ell.reshape(-1)
    with torch.no_grad():
        f, s, m = float(full), float(ell.sum()), float(ell.mean())
        tol = 1e-4 * max(1.0, abs(s))
        red = "mean" if abs(f - m) <= tol else ("sum" if abs(f - s) <= tol else "other")
    return ell, red


# ----------------------------------------------------------------------------------------------- guards


@contextlib.contextmanager
def measurement(model: nn.Module):
    """Guard for a measurement: BatchNorm (all) buffers are restored bit-identically afterwards, in-place
    activations are switched off temporarily (a hooked output must not be overwritten), and ``.grad`` of the
    parameters is left untouched (the probes only call ``torch.autograd.grad``)."""
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    inplace = [m for m in model.modules() if getattr(m, "inplace", False) is True]
    for m in inplace:
        m.inplace = False
    try:
        yield
    finally:
        for m in inplace:
            m.inplace = True
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


def first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    return None


def per_sample_norm(t: torch.Tensor) -> torch.Tensor:
    """Euclidean norm over all non-batch dims, in float64 (shape (B,))."""
    t = t.detach()
    return torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=1, dtype=torch.float64)  # one kernel


@dataclass
class Call:
    """One recorded layer call."""

    name: str
    module_name: str
    kind: str
    dim: int
    linear_after: int = 0  # number of linear-kind calls that complete after this one
    linear_seq: int = 0  # number of linear-kind calls completed up to and including this one
    value: torch.Tensor | None = None  # the output (with its graph) when keep=True
    act_norm: torch.Tensor | None = None
    grad_norm: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


class Recorder:
    """Forward hooks that record each measured call in forward (completion) order.

    ``norms=True`` stores per-sample ``||f_l||`` at once and registers a tensor hook storing per-sample
    ``||df0/df_l||`` during the backward pass; ``keep=True`` keeps the output tensors themselves.
    ``replace`` maps a layer name to a tensor that replaces that call's output (used to build f_k -> f_l maps).
    """

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], wanted: set[str] | None, *,
                 norms: bool = True, keep: bool = False, grad_hook: Callable | None = None):
        self.model, self.modules, self.wanted = model, modules, wanted
        self.norms, self.keep, self.grad_hook = norms, keep, grad_hook
        self.calls: list[Call] = []
        self.replace: dict[str, torch.Tensor] = {}
        self._handles = []
        self._counts: dict[str, int] = {}
        self._linear_seen = 0
        self.batch_size: int | None = None  # outputs whose dim 0 differs (e.g. position tables) are skipped

    def __enter__(self):
        hooked = set()
        for name, m in self.modules.items():
            self._handles.append(m.register_forward_hook(self._make_hook(name, layer_kind(m) or "other", measured=True)))
            hooked.add(id(m))
        # count every linear-kind leaf (measured or not) to index layers by the number of linear layers above them
        for name, m in self.model.named_modules():
            if id(m) not in hooked and layer_kind(m) == "linear" and not any(True for _ in m.children()):
                self._handles.append(m.register_forward_hook(self._make_hook(name, "linear", measured=False)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        return False

    def reset(self):
        self.calls = []
        self._counts = {}
        self._linear_seen = 0

    def _make_hook(self, name: str, kind: str, measured: bool):
        leaf = not any(True for _ in self.modules.get(name, nn.Module()).children()) if measured else True

        def hook(module, inputs, output):
            if kind == "linear" and leaf:
                self._linear_seen += 1
            if not measured:
                return None
            idx = self._counts.get(name, 0)
            self._counts[name] = idx + 1
            lname = name if idx == 0 else f"{name}[{idx}]"
            if self.wanted is not None and lname not in self.wanted:
                return None
            t = first_tensor(output)
            if t is None or not t.is_floating_point() or t.dim() == 0:
                return None
            if self.batch_size is not None and t.shape[0] != self.batch_size:
                return None
            if lname in self.replace:
                new = self.replace[lname]
                if new.shape != t.shape:
                    raise ValueError(f"replacement for layer {lname!r} has shape {tuple(new.shape)}, expected {tuple(t.shape)}.")
                t = new
                output = new if torch.is_tensor(output) else (new, *output[1:])
            call = Call(lname, name, kind, int(t[0].numel()), linear_seq=self._linear_seen)
            if self.norms:
                call.act_norm = per_sample_norm(t)
                if t.requires_grad:
                    def ghook(g, c=call):
                        c.grad_norm = per_sample_norm(g)
                        if self.grad_hook is not None:
                            self.grad_hook(c, g)
                    t.register_hook(ghook)
            if self.keep:
                call.value = t
            self.calls.append(call)
            return output if lname in self.replace else None

        return hook

    def finish(self):
        total = self._linear_seen
        for c in self.calls:
            c.linear_after = total - c.linear_seq
        return self.calls


def check_names(calls: list[Call], wanted: set[str] | None):
    if wanted is None:
        return
    got = {c.name for c in calls}
    missing = sorted(wanted - got)
    if missing:
        raise ValueError(f"layer(s) {', '.join(map(repr, missing))} produced no floating-point tensor output with the "
                         f"batch as dimension 0 in the forward pass (never called, called fewer times, or not "
                         f"per-sample); measured: {', '.join(sorted(got))}.")


def prepare_input(x: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``x`` that requires grad (floating inputs), so every layer output is on the gradient path."""
    if x.is_floating_point():
        return x.detach().clone().requires_grad_(True)
    return x


def model_dtype(model: nn.Module) -> torch.dtype | None:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return None


def nan_warning(what: str):
    warnings.warn(what, RuntimeWarning, stacklevel=3)


def qmean(sq_sum: float, n: int) -> float:
    return math.sqrt(sq_sum / n) if n else float("nan")
