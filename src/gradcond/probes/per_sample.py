"""Per-sample gradient engine on ``torch.func`` (seed 004, §1.0 notation; Def 1.3).

Everything here is *functional*: the model's parameters and buffers are read, never written. Perturbed weights
(w + ω) and perturbed inputs (x + δ) are evaluated with ``torch.func.functional_call`` on new tensors, so the
``state_dict`` of the model is bit-identical after every call (tested in ``tests/test_per_sample.py``).

Conventions (decisions where the source is silent)
---------------------------------------------------
* **Per-sample loss.** ``loss_fn(output, target)`` is applied to a batch of one sample: ``ℓ_i = loss_fn(f(x_i)[None],
  t_i[None])``. The batch objective is the *mean* of the per-sample losses, so the batch gradient is
  ``h̄_W(w, χ) = (1/b) Σ_i h_W(w, x_i, t_i)`` exactly as in Def 1.3, whatever reduction ``loss_fn`` uses.
  ``loss_fn`` must be traceable by ``torch.vmap`` (no ``.item()`` or data-dependent Python control flow).
* **Module mode.** During a measurement every module is switched to ``eval()`` (flags restored afterwards), so
  dropout is off and results are deterministic.
* **BatchNorm** (``bn=`` argument). Per-sample gradients of a BN network in train mode are not defined by the
  source (Opacus, which it used, cannot compute them; notes erratum 8). Two policies:

  - ``bn="batch"`` (default): *batch statistics frozen from the batch*. One forward pass of the clean batch at the
    base weights records each BN layer's batch mean and biased variance (exactly what a train-mode forward
    normalizes with); every evaluation of the measurement (perturbed weights and perturbed inputs included) then
    runs BN in eval mode with those statistics in place of the running buffers. Per-sample outputs therefore equal
    the train-mode batch outputs, but the statistics are treated as constants: no gradient flows through them and
    they do not move with ω or δ. The function measured is ``L(w, x; s(w₀, χ))``.
  - ``bn="eval"``: use the running statistics (the model's eval-mode function).

  For a model already in eval mode the two coincide (running statistics are used). A BN layer that does not track
  running statistics has no buffers to substitute and is rejected with a ValueError.
* **Flat vectors.** The weight space 𝕎 is the concatenation of all parameters with ``requires_grad=True`` in
  ``named_parameters()`` order (biases and normalization parameters included; notes erratum 5).

Cost: a per-sample gradient pass costs about one batched forward+backward of the same batch (``vmap(grad)``);
memory is bounded by ``chunk_size`` per-sample gradients of ``m`` floats at a time.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn
from torch.nn import functional as F
from torch.func import functional_call, grad, jvp, vjp, vmap

__all__ = [
    "Engine",
    "as_batch",
    "flatten",
    "unflatten",
    "weight_vector",
    "DEFAULT_MEMORY_BYTES",
]

DEFAULT_MEMORY_BYTES = 256 * 2**20  # bound for one chunk of per-sample gradients

_BN_TYPES = (nn.modules.batchnorm._BatchNorm,)


def flatten(tensors: dict[str, torch.Tensor], names: list[str], batched: bool = False) -> torch.Tensor:
    """Concatenate ``tensors[name]`` in ``names`` order into one vector (or (B, m) matrix when ``batched``)."""
    if batched:
        return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in names], dim=1)
    return torch.cat([tensors[n].reshape(-1) for n in names])


def unflatten(vec: torch.Tensor, like: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped like ``like`` (inverse of :func:`flatten`)."""
    out, i = {}, 0
    for n in names:
        k = like[n].numel()
        out[n] = vec[i : i + k].view_as(like[n])
        i += k
    if i != vec.numel():
        raise ValueError(f"flat vector has {vec.numel()} entries but the model has {i} trainable parameters.")
    return out


def weight_vector(model: nn.Module) -> torch.Tensor:
    """All trainable parameters of ``model`` as one detached flat vector (a copy)."""
    return torch.cat([p.detach().reshape(-1) for p in model.parameters() if p.requires_grad]).clone()


def as_batch(batch_or_loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(x, y)`` from a batch ``(x, y, ...)`` or the first batch of a loader / iterable of batches."""
    if isinstance(batch_or_loader, (tuple, list)) and len(batch_or_loader) >= 2 and all(
        isinstance(t, torch.Tensor) for t in batch_or_loader[:2]
    ):
        x, y = batch_or_loader[0], batch_or_loader[1]
    else:
        try:
            first = next(iter(batch_or_loader))
        except (TypeError, StopIteration):
            raise ValueError(
                "expected a batch (x, y) of tensors or a non-empty loader/iterable of such batches, got "
                f"{type(batch_or_loader).__name__}."
            ) from None
        return as_batch(first)
    if x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]:
        raise ValueError(
            f"batch tensors must share a leading batch dimension; got x {tuple(x.shape)} and y {tuple(y.shape)}."
        )
    if x.shape[0] == 0:
        raise ValueError("the batch is empty; pass at least one sample.")
    return x, y


@contextlib.contextmanager
def _eval_flags(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        yield
    finally:
        for m, t in flags:
            m.training = t


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or inf; the metric is undefined for non-finite gradients.")


# ---------------------------------------------------------------------------------------------- layer fast path
class _Unsupported(Exception):
    """The layer fast path cannot handle this model; the engine falls back to vmap(grad)."""


_UNSUPPORTED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_VALIDATED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_BMM_DIRECT_MIN = 4096  # O·C above which per-sample Linear/Conv weight gradients are written in place by bmm
_VALIDATION_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _conv_fast_ok(mod) -> bool:
    return (mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
            and not getattr(mod, "transposed", False))


class _Plan:
    """Which module owns each trainable parameter (its *direct* parameter), for the layer fast path.

    ``ok`` is False (with ``reason``) when the fast path cannot be used: a parameter owned by the root module, a
    parameter shared between modules, or the model previously failed at run time (cached per model object)."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.modules: dict[str, nn.Module] = {}
        self.params: dict[str, dict[str, str]] = {}
        self.ok, self.reason = True, ""
        trainable = set(names)
        seen: dict[int, str] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            for pname, p in mod.named_parameters(recurse=False):
                if not p.requires_grad:
                    continue
                full = _join(mname, pname)
                if id(p) in seen and seen[id(p)] != full or full not in trainable:
                    self.ok, self.reason = False, f"parameter {full!r} is shared between modules"
                    return
                seen[id(p)] = full
                if not mname:
                    self.ok, self.reason = False, f"parameter {pname!r} belongs to the root module"
                    return
                self.modules[mname] = mod
                self.params.setdefault(mname, {})[pname] = full
        bad = _UNSUPPORTED.get(model)
        if bad is not None and bad[0] == tuple(names):
            self.ok, self.reason = False, bad[1]

    @staticmethod
    def module_tensors(name: str, params: dict, buffers: dict) -> dict[str, torch.Tensor]:
        """Parameters and buffers below module ``name``, keyed relative to it (for functional_call on the module)."""
        pre = name + "."
        out = {k[len(pre):]: v for k, v in params.items() if k.startswith(pre)}
        out.update({k[len(pre):]: v for k, v in buffers.items() if k.startswith(pre)})
        return out


_PLANS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _layer_plan(model: nn.Module, names: list[str], param_ids: tuple) -> _Plan:
    """The model's :class:`_Plan`, cached per model object while its trainable parameters (names and tensor
    identities) are unchanged, so repeated metric calls do not re-walk the module tree."""
    cached = _PLANS.get(model)
    if cached is not None and cached[0] == (tuple(names), param_ids) and cached[1].ok:
        bad = _UNSUPPORTED.get(model)
        if bad is None or bad[0] != tuple(names):
            return cached[1]
    plan = _Plan(model, names)
    _PLANS[model] = ((tuple(names), param_ids), plan)
    return plan


def _as_lin(mod, args, e):
    """(A, E) of shapes (c, T, C) and (c, T, O) such that the per-sample weight gradient is Σ_t E_t A_tᵀ, for Linear
    and zero-padded, ungrouped Conv1d/Conv2d (A = unfolded patches, T = output positions); None otherwise."""
    if len(args) != 1:
        return None
    a, c = args[0], e.shape[0]
    if isinstance(mod, nn.Linear):
        return a.reshape(c, -1, a.shape[-1]), e.reshape(c, -1, e.shape[-1])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and _conv_fast_ok(mod):
        k, dil, pad, st = (tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.padding), tuple(mod.stride))
        if isinstance(mod, nn.Conv1d):
            a, e = a.unsqueeze(2), e.unsqueeze(2)
            k, dil, pad, st = (1,) + k, (1,) + dil, (0,) + pad, (1,) + st
        U = torch.nn.functional.unfold(a, k, dilation=dil, padding=pad, stride=st)  # (c, C·kk, T)
        return U.transpose(1, 2), e.reshape(c, e.shape[1], -1).transpose(1, 2)
    return None


def _is_batch_mean_loss(loss_fn, out: torch.Tensor, y: torch.Tensor) -> bool:
    """True when ``loss_fn(out, y)`` is *known* to be the plain mean of the per-sample losses
    ``ℓ_i = loss_fn(out[i:i+1], y[i:i+1])``, so that Σ_i ℓ_i = b · loss_fn(out, y):

    * ``F.cross_entropy``, ``gradcond.train`` ``cross_entropy`` and ``nn.CrossEntropyLoss`` (mean reduction, no class
      weights): with class-index targets none may equal ``ignore_index`` (those are dropped from the batch mean);
    * ``F.mse_loss`` / ``nn.MSELoss`` (mean reduction) with ``y`` shaped like ``out``; ``gradcond.train`` ``mse`` (which
      reshapes ``y``) with as many entries as ``out``; ``gradcond.train`` ``dot`` with ``y`` shaped like ``out``.

    Anything else (user losses, weighted or summed reductions) returns False and is evaluated per sample."""
    from gradcond.train import losses as _L  # local: the probes do not otherwise depend on training code

    f = loss_fn
    if isinstance(f, nn.CrossEntropyLoss):
        if f.reduction != "mean" or f.weight is not None:
            return False
        ignore = f.ignore_index
    elif f is F.cross_entropy or f is _L.cross_entropy:
        ignore = -100
    elif isinstance(f, nn.MSELoss):
        return f.reduction == "mean" and y.shape == out.shape
    elif f is F.mse_loss:
        return y.shape == out.shape
    elif f is _L.mse:
        return y.numel() == out.numel() and y.is_floating_point()
    elif f is _L.dot_error:
        return y.shape == out.shape
    else:
        return False
    if out.ndim < 2 or y.shape[0] != out.shape[0]:
        return False
    if y.is_floating_point():  # class probabilities: every sample counts with weight 1
        return y.shape == out.shape
    return not bool((y == ignore).any())


def _is_validated(model: nn.Module, names: list[str]) -> bool:
    return _VALIDATED.get(model) == tuple(names)


def _validate(model, names, G: torch.Tensor, batch_g: torch.Tensor, offsets: dict) -> None:
    """First use of the fast path on a model: the per-sample gradients ``G`` (c, m) must sum to autograd's gradient
    of Σ_i ℓ_i, parameter by parameter (relative to Σ_i |g_i|), else some parameter is also used outside its
    module's forward (e.g. a parent reading a child's weight) and the fast path is switched off for this model."""
    tol = _VALIDATION_RTOL.get(G.dtype, 1e-4)
    s, a = G.sum(0), G.abs().sum(0)
    for n in names:
        start, k = offsets[n]
        sl = slice(start, start + k)
        scale = float(a[sl].max()) or 1.0
        if float((s[sl] - batch_g[sl]).abs().max()) > tol * scale:
            raise _Unsupported(f"parameter {n!r} is used outside its module's forward")
    _VALIDATED[model] = tuple(names)


@dataclass
class _State:
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor]


class Engine:
    """Functional view of ``model`` + ``loss_fn`` for one measurement.

    Use as a context manager (``with Engine(model, loss_fn, x, y) as e: ...``): entering switches modules to eval
    mode and freezes BN statistics from the batch ``(x, y)`` according to ``bn``; leaving restores the modules'
    training flags. Parameters and buffers are never written.

    Args:
        model: any ``nn.Module``; inputs are cast to its parameter dtype if floating point.
        loss_fn: ``loss_fn(output, target) -> scalar``; see the module docstring for the per-sample convention.
        x, y: the batch that defines the base point (and the frozen BN statistics).
        bn: ``"batch"`` or ``"eval"`` (module docstring).
        chunk_size: per-sample gradients computed at most this many at a time (default: from ``memory_bytes``).
        memory_bytes: memory bound for one chunk of per-sample gradients when ``chunk_size`` is not given.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: Callable,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        bn: str = "batch",
        chunk_size: int | None = None,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        backend: str = "auto",
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable(output, target) -> scalar, got {type(loss_fn).__name__}.")
        if bn not in ("batch", "eval"):
            raise ValueError(f"bn must be 'batch' (statistics frozen from the batch) or 'eval', got {bn!r}.")
        if backend not in ("auto", "func"):
            raise ValueError(f"backend must be 'auto' (layer fast paths) or 'func' (vmap(grad) only), got {backend!r}.")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}.")
        self.model, self.loss_fn, self.bn = model, loss_fn, bn
        raw = dict(model.named_parameters())
        self.names = [n for n, p in raw.items() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to measure.")
        params = {n: p.detach() for n, p in raw.items()}
        self.dtype = params[self.names[0]].dtype
        self.fixed = {n: t for n, t in params.items() if n not in self.names}
        self.w = {n: params[n] for n in self.names}
        self.m = sum(self.w[n].numel() for n in self.names)
        self.x, self.y = self.cast(x), y
        self.b = x.shape[0]
        if chunk_size is None:
            chunk_size = max(1, int(memory_bytes // max(1, self.m * self.w[self.names[0]].element_size() * 3)))
        self.chunk_size = chunk_size
        self._flags = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.backend = backend
        self._offsets, start = {}, 0
        for n in self.names:
            self._offsets[n] = (start, self.w[n].numel())
            start += self.w[n].numel()
        self.plan = _layer_plan(model, self.names, tuple(id(raw[n]) for n in self.names)) if backend == "auto" else None

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Engine":
        self._ctx = _eval_flags(self.model)
        training = {m: m.training for m in self.model.modules()}
        bns = [(n, m) for n, m in self.model.named_modules() if isinstance(m, _BN_TYPES)]
        self._ctx.__enter__()
        try:
            buffers = {n: b.detach() for n, b in self.model.named_buffers()}
            if self.bn == "batch" and any(training[m] for _, m in bns):
                buffers = self._batch_statistics(bns, training, buffers)
            else:
                for n, m in bns:
                    if m.running_mean is None:
                        raise ValueError(
                            f"BatchNorm layer {n!r} does not track running statistics; per-sample gradients "
                            "need track_running_stats=True."
                        )
            self.buffers = buffers
            # the model's own tensors can be used directly (no functional_call) when nothing is overridden
            self._own_buffers = all(buffers[n] is b or buffers[n].data_ptr() == b.data_ptr()
                                    for n, b in self.model.named_buffers())
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def _batch_statistics(self, bns, training, buffers):
        stats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        handles = []
        for name, mod in bns:
            if mod.running_mean is None:
                raise ValueError(
                    f"BatchNorm layer {name!r} does not track running statistics; per-sample gradients need "
                    "track_running_stats=True."
                )

            def hook(module, args, output, name=name):
                inp = args[0]
                dims = [0] + list(range(2, inp.ndim))
                if training[module]:
                    mean = inp.mean(dims)
                    var = inp.var(dims, unbiased=False)
                else:
                    mean, var = self.buffers_in_use[name + ".running_mean"], self.buffers_in_use[name + ".running_var"]
                stats[name] = (mean.detach(), var.detach())
                # normalize with the recorded statistics so downstream layers see the train-mode batch activations
                shape = [1, -1] + [1] * (inp.ndim - 2)
                out = (inp - mean.view(shape)) / torch.sqrt(var.view(shape) + module.eps)
                if module.affine:
                    out = out * module.weight.view(shape) + module.bias.view(shape)
                return out.detach()

            handles.append(mod.register_forward_hook(hook))
        self.buffers_in_use = buffers
        try:
            with torch.no_grad():
                functional_call(self.model, ({**self.fixed, **self.w}, buffers), (self.x,))
        finally:
            for h in handles:
                h.remove()
            del self.buffers_in_use
        new = dict(buffers)
        for name, (mean, var) in stats.items():
            new[name + ".running_mean"] = mean
            new[name + ".running_var"] = var
        return new

    # ------------------------------------------------------------------ basics
    def cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype) if x.is_floating_point() and x.dtype != self.dtype else x

    def _all(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**self.fixed, **w}

    def _loss_single(self, w, x, y):
        out = functional_call(self.model, (self._all(w), self.buffers), (x.unsqueeze(0),))
        return self.loss_fn(out, y.unsqueeze(0))

    def _loss_batch(self, w, x, y):
        out = functional_call(self.model, (self._all(w), self.buffers), (x,))
        per = vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        return per.mean()

    def _direct(self, w) -> bool:
        """True when ``w`` are the base weights and no buffer is overridden: the model can be called as it is."""
        return w is self.w and getattr(self, "_own_buffers", False)

    def _loss_sum(self, w, x, y):
        """Σ_i ℓ_i over a batch from one batched forward (per-sample losses as in the module docstring).

        For the known batch-mean losses (:func:`_is_batch_mean_loss`) this is ``b · loss_fn(out, y)``, which equals
        Σ_i ℓ_i exactly in real arithmetic and skips the vmapped per-sample loss (about 0.4 ms of a 2 ms capture on
        the zoo CNN); any other loss is evaluated per sample with ``vmap``."""
        out = self.model(x) if w is None else functional_call(self.model, (self._all(w), self.buffers), (x,))
        if _is_batch_mean_loss(self.loss_fn, out, y):
            return self.loss_fn(out, y) * out.shape[0]
        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y).sum()

    # ------------------------------------------------------------------ layer fast path
    def _use_fast(self) -> bool:
        return self.plan is not None and self.plan.ok

    def _capture(self, w, x, y) -> list[tuple[str, tuple, torch.Tensor]]:
        """ONE batched forward and ONE backward to the outputs of every parameter-owning module.

        Returns, per module call, ``(module name, detached inputs, e)`` with ``e = ∂(Σ_i ℓ_i)/∂output``. Because the
        measurement treats samples independently (eval mode, frozen BN statistics), ``e_i = ∂ℓ_i/∂output_i``, so
        per-sample parameter gradients are per-sample contractions of the inputs and ``e``
        (:meth:`_module_grads`). The first use on a model also checks that these per-sample gradients sum to
        autograd's gradient of Σ_i ℓ_i (``_validate``); a model that fails any check uses vmap(grad) instead."""
        plan = self.plan
        direct = self._direct(w)
        if direct:  # base weights: differentiate through the model's own parameters, skipping functional_call
            own = dict(self.model.named_parameters())
            leaves = {n: own[n] for n in self.names}
        else:
            leaves = {n: t.detach().requires_grad_(True) for n, t in w.items()}
        rec: dict[str, list] = {name: [] for name in plan.modules}
        b = x.shape[0]

        def make_hook(name):
            def hook(module, args, kwargs, output):
                if not isinstance(output, torch.Tensor) or kwargs or not args or any(
                    not isinstance(a, torch.Tensor) or a.ndim == 0 or a.shape[0] != b for a in args
                ) or output.ndim == 0 or output.shape[0] != b:
                    raise _Unsupported(f"module {name!r} is called with keyword, non-tensor or non-batched "
                                       "arguments or returns a non-batched output")
                rec[name].append((tuple(a.detach() for a in args), output))
                return output.clone()  # later in-place ops must not touch the tensor we differentiate against
            return hook

        handles = [mod.register_forward_hook(make_hook(name), with_kwargs=True) for name, mod in plan.modules.items()]
        try:
            with torch.enable_grad():
                loss = self._loss_sum(None if direct else leaves, x, y)
        finally:
            for h in handles:
                h.remove()
        missing = [name for name in plan.modules if not rec[name]]
        if missing:
            raise _Unsupported(f"module(s) {missing} own parameters but were not called in the forward pass")
        calls = [(name, args, out) for name, lst in rec.items() for args, out in lst]
        outs = [o for _, _, o in calls]
        validate = not _is_validated(self.model, self.names)
        targets = outs + ([leaves[n] for n in self.names] if validate else [])
        with torch.enable_grad():
            es = torch.autograd.grad(loss, targets, allow_unused=True)
        result = [(name, args, torch.zeros_like(o) if e is None else e.detach())
                  for (name, args, o), e in zip(calls, es[: len(outs)])]
        if validate:
            ref = [torch.zeros_like(w[n]) if g is None else g.detach() for n, g in zip(self.names, es[len(outs):])]
            _validate(self.model, self.names, self._assemble(result, w, None), flatten(dict(zip(self.names, ref)),
                      self.names), self._offsets)
        return result

    def _select_map(self, select) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
        """Per parameter: (local indices into its flat gradient, positions in the selected output); None = all."""
        if select is None:
            return {n: (None, None) for n in self.names}
        key = id(select)
        if getattr(self, "_sel_key", None) != key:
            out = {}
            for n in self.names:
                start, k = self._offsets[n]
                pos = ((select >= start) & (select < start + k)).nonzero().reshape(-1)
                out[n] = (select[pos] - start, pos)
            self._sel_key, self._sel_cache, self._sel_ref = key, out, select
        return self._sel_cache

    def _assemble(self, calls, w, select) -> torch.Tensor:
        """Flat (c, m) — or (c, len(select)) — per-sample gradients from captured module calls. With ``select`` only
        the selected coordinates of Linear/Conv weights are ever computed (c·T·k work instead of c·T·O·C)."""
        c = calls[0][2].shape[0]
        smap = self._select_map(select)
        if select is None:
            out = torch.empty(c, self.m, dtype=self.dtype)
        else:
            out = torch.zeros(c, int(select.numel()), dtype=self.dtype)
        written: set[str] = set()
        for name, args, e in calls:
            dest = None
            if select is None:  # unwritten Linear/Conv weights are computed straight into the output (no temporary)
                dest = {}
                for full in self.plan.params[name].values():
                    if full not in written:
                        start, k = self._offsets[full]
                        dest[full] = out[:, start:start + k]
            for full, g in self._module_grads(name, args, e, w, smap, dest).items():
                if g is None:  # written in place
                    pass
                elif select is None:
                    start, k = self._offsets[full]
                    dst = out[:, start:start + k]
                    dst.add_(g) if full in written else dst.copy_(g)
                else:
                    out.index_add_(1, smap[full][1], g)
                written.add(full)
        if len(written) != len(self.names):  # cannot happen after _capture's checks; guard against silent zeros
            raise _Unsupported("some parameters received no per-sample gradient")
        return out

    def _module_grads(self, name, args, e, w, smap, dest=None) -> dict[str, torch.Tensor | None]:
        """Per-sample gradients (c, k) of the parameters module ``name`` owns, for one call with inputs ``args`` and
        output gradient ``e``; k = all entries, or those in ``smap``. A weight whose (c, k) view is in ``dest`` may be
        written there directly, in which case its entry is None."""
        mod = self.plan.modules[name]
        local = self.plan.params[name]  # local name -> full name
        a = args[0]
        c = e.shape[0]
        out: dict[str, torch.Tensor] = {}

        def pick(full, full_grad):
            idx = smap[full][0]
            g = full_grad.reshape(c, -1)
            return g if idx is None else g[:, idx]

        lin = _as_lin(mod, args, e)
        if lin is not None:
            A, E = lin  # (c, T, C), (c, T, O): per-sample weight gradient Σ_t E_t A_tᵀ, shape (O, C)
            if "weight" in local:
                full = local["weight"]
                idx = smap[full][0]
                C = A.shape[2]
                if idx is None:
                    O = E.shape[2]
                    d = None if dest is None or full not in dest else dest[full].view(c, O, C)
                    if A.shape[1] == 1:
                        g = torch.mul(E[:, 0, :, None], A[:, 0, None, :], **({} if d is None else {"out": d}))
                    elif d is not None and O * C <= _BMM_DIRECT_MIN:
                        # bmm into a strided slice of the output runs one GEMM per sample (measured: 3-4x slower than
                        # a batched GEMM plus a copy for small O·C); large blocks are written in place
                        d.copy_(torch.bmm(E.transpose(1, 2), A))
                    else:
                        g = torch.bmm(E.transpose(1, 2), A, **({} if d is None else {"out": d}))
                    out[full] = None if d is not None else g.reshape(c, -1)
                else:
                    o, ci = idx // C, idx % C
                    out[full] = (E[:, :, o] * A[:, :, ci]).sum(1)
            if "bias" in local:
                out[local["bias"]] = pick(local["bias"], E.sum(1))
            return out
        if isinstance(mod, _BN_TYPES) and len(args) == 1 and not mod.training:
            shape = [1, -1] + [1] * (a.ndim - 2)
            dims = list(range(2, a.ndim))
            if "weight" in local:
                mean = self.buffers[_join(name, "running_mean")].view(shape)
                var = self.buffers[_join(name, "running_var")].view(shape)
                xhat = (a - mean) / torch.sqrt(var + mod.eps)
                out[local["weight"]] = pick(local["weight"], (e * xhat).sum(dims) if dims else e * xhat)
            if "bias" in local:
                out[local["bias"]] = pick(local["bias"], e.sum(dims) if dims else e)
            return out
        if isinstance(mod, nn.LayerNorm) and len(args) == 1:
            nd = len(mod.normalized_shape)
            red = tuple(range(a.ndim - nd, a.ndim))
            lead = tuple(range(1, a.ndim - nd))
            if "weight" in local:
                mean = a.mean(red, keepdim=True)
                var = a.var(red, unbiased=False, keepdim=True)
                xhat = (a - mean) / torch.sqrt(var + mod.eps)
                out[local["weight"]] = pick(local["weight"], (e * xhat).sum(lead) if lead else e * xhat)
            if "bias" in local:
                out[local["bias"]] = pick(local["bias"], e.sum(lead) if lead else e)
            return out
        # generic: vmap over samples of the vjp of this module alone (torch.func), its own parameters only
        own = {ln: w[fn] for ln, fn in local.items()}
        rest = {ln: t for ln, t in _Plan.module_tensors(name, self._all(w), self.buffers).items() if ln not in own}

        def one(e_i, *a_i):
            def f(p):
                return functional_call(mod, {**rest, **p}, tuple(t.unsqueeze(0) for t in a_i))
            _, pull = vjp(f, own)
            return pull(e_i.unsqueeze(0))[0]

        g = vmap(one)(e, *args)
        return {local[ln]: pick(local[ln], g[ln]) for ln in own}

    def _fast_sq_norms(self, calls) -> torch.Tensor | None:
        """Per-sample ‖h_W‖² without materializing Linear/Conv weight gradients where the "ghost" form is cheaper:
        ‖Σ_t E_t A_tᵀ‖_F² = Σ_{t,s} (A_t·A_s)(E_t·E_s) (= ‖A‖²‖E‖² for T = 1). None when a module is called more
        than once (per-sample gradients then add up across calls and norms do not)."""
        names = [n for n, _, _ in calls]
        if len(set(names)) != len(names):
            return None
        c = calls[0][2].shape[0]
        total = torch.zeros(c, dtype=torch.float64)
        smap = self._select_map(None)
        for name, args, e in calls:
            local = self.plan.params[name]
            lin = _as_lin(self.plan.modules[name], args, e)
            if lin is None:
                for g in self._module_grads(name, args, e, self.w, smap).values():
                    total += (g.double() ** 2).sum(1)
                continue
            A, E = lin
            T, C, O = A.shape[1], A.shape[2], E.shape[2]
            if "weight" in local:
                if T == 1:
                    total += (A[:, 0].double() ** 2).sum(1) * (E[:, 0].double() ** 2).sum(1)
                elif T * T * (C + O) < T * O * C:
                    Ad, Ed = A.double(), E.double()
                    total += (torch.bmm(Ad, Ad.transpose(1, 2)) * torch.bmm(Ed, Ed.transpose(1, 2))).sum((1, 2))
                else:
                    total += (torch.bmm(E.transpose(1, 2), A).double() ** 2).sum((1, 2))
            if "bias" in local:
                total += (E.sum(1).double() ** 2).sum(1)
        return total

    def _fast_gram(self, calls, select) -> torch.Tensor:
        """b×b Gram matrix (float64) of the per-sample gradients. Unmasked Linear layers with one position per sample
        use the ghost form (A Aᵀ)∘(E Eᵀ) (never forming the O×C gradients); everything else is materialized."""
        names = [n for n, _, _ in calls]
        if select is not None or len(set(names)) != len(names):
            G = self._assemble(calls, self.w, select).double()
            return G @ G.T
        c = calls[0][2].shape[0]
        gram = torch.zeros(c, c, dtype=torch.float64)
        smap = self._select_map(None)
        for name, args, e in calls:
            local = self.plan.params[name]
            lin = _as_lin(self.plan.modules[name], args, e)
            if lin is not None and lin[0].shape[1] == 1 and "weight" in local:
                A, E = lin[0][:, 0].double(), lin[1][:, 0].double()
                gram += (A @ A.T) * (E @ E.T)
                if "bias" in local:
                    gram += E @ E.T
                continue
            for g in self._module_grads(name, args, e, self.w, smap).values():
                g = g.double()
                gram += g @ g.T
        return gram

    def flat_w(self) -> torch.Tensor:
        return flatten(self.w, self.names)

    def add(self, omega: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights ``w + ω`` as a new dict (ω flat, full length m)."""
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        return {n: self.w[n] + d[n] for n in self.names}

    # ------------------------------------------------------------------ gradients
    def batch_grad(self, omega: torch.Tensor | None = None, x=None, y=None) -> torch.Tensor:
        """Flat batch-mean gradient h̄_W(w + ω, χ) (one batched forward+backward)."""
        w = self.w if omega is None else self.add(omega)
        x = self.x if x is None else self.cast(x)
        y = self.y if y is None else y
        g = grad(self._loss_batch)(w, x, y)
        return flatten(g, self.names)

    def _chunks(self, b: int) -> Iterator[slice]:
        for s in range(0, b, self.chunk_size):
            yield slice(s, min(b, s + self.chunk_size))

    def per_sample_grads(self, x=None, y=None, omega=None, *, wrt: str = "weight", select=None) -> Iterator[
        tuple[slice, torch.Tensor]
    ]:
        """Yield ``(slice, G)`` chunks, ``G`` of shape (c, m) (weights, optionally masked by ``select``) or (c, k)
        (inputs, flattened). ``select`` is an index tensor applied to the flat weight gradient."""
        x = self.x if x is None else self.cast(x)
        y = self.y if y is None else y
        w = self.w if omega is None else self.add(omega)
        if wrt not in ("weight", "input"):
            raise ValueError(f"wrt must be 'weight' or 'input', got {wrt!r}.")
        if wrt == "input" and not x.is_floating_point():
            raise ValueError("input gradients need floating-point inputs; got integer inputs (token ids?).")
        chunks = list(self._chunks(x.shape[0]))
        if wrt == "input" and self._use_fast():
            for sl in chunks:  # one batched backward: ∂(Σ_j ℓ_j)/∂x_i = ∂ℓ_i/∂x_i for sample-independent models
                xs = x[sl].detach().requires_grad_(True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(self._loss_sum(w, xs, y[sl]), xs)
                yield sl, gx.reshape(gx.shape[0], -1)
            return
        for k, sl in enumerate(chunks):
            if not self._use_fast():
                break
            try:
                G = self._assemble(self._capture(w, x[sl], y[sl]), w, select)
            except _Unsupported as err:
                self._disable_fast(str(err))
                break
            yield sl, G
        else:
            return
        if wrt == "weight":
            f = vmap(grad(self._loss_single), in_dims=(None, 0, 0))
        else:
            f = vmap(grad(self._loss_single, argnums=1), in_dims=(None, 0, 0))
        for sl in chunks[k:]:
            g = f(w, x[sl], y[sl])
            if wrt == "weight":
                G = flatten(g, self.names, batched=True)
                if select is not None:
                    G = G[:, select]
            else:
                G = g.reshape(g.shape[0], -1)
            yield sl, G

    def _disable_fast(self, reason: str) -> None:
        _UNSUPPORTED[self.model] = (tuple(self.names), reason)
        self.plan.ok, self.plan.reason = False, reason

    def per_sample_matrix(self, x=None, y=None, omega=None, *, wrt="weight", select=None) -> torch.Tensor:
        """All per-sample gradients stacked as a (b, d) matrix (materialized)."""
        parts = [G for _, G in self.per_sample_grads(x, y, omega, wrt=wrt, select=select)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def per_sample_sq_norms(self, *, select=None) -> torch.Tensor:
        """Per-sample squared gradient norms ‖h_W(w, x_i, t_i)‖² streamed chunk by chunk (never all stored); on the
        fast path without a mask, Linear/Conv layers use the ghost form and their gradients are never formed
        (accumulated in float64, returned in the model dtype)."""
        if select is None and self._use_fast():
            try:
                out = []
                for sl in self._chunks(self.b):
                    sq = self._fast_sq_norms(self._capture(self.w, self.x[sl], self.y[sl]))
                    if sq is None:
                        break
                    out.append(sq)
                else:
                    return torch.cat(out).to(self.dtype)
            except _Unsupported as err:
                self._disable_fast(str(err))
        return torch.cat([(G * G).sum(1) for _, G in self.per_sample_grads(select=select)])

    def per_sample_gram(self, *, select=None) -> torch.Tensor:
        """b×b Gram matrix (float64) of the (optionally selected) per-sample weight gradients of the batch; on the fast
        path with one chunk, unmasked Linear layers use the ghost form. Otherwise ``A Aᵀ`` of the materialized A."""
        if self._use_fast() and self.chunk_size >= self.b:
            try:
                return self._fast_gram(self._capture(self.w, self.x, self.y), select)
            except _Unsupported as err:
                self._disable_fast(str(err))
        A = self.per_sample_matrix(select=select).double()
        return A @ A.T

    def hvp(self, omega: torch.Tensor) -> torch.Tensor:
        """Exact Hessian-vector product H ω of the batch loss (forward-over-reverse ``jvp(grad)``)."""
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        _, t = jvp(lambda w: grad(self._loss_batch)(w, self.x, self.y), (self.w,), (d,))
        return flatten(t, self.names)

    def mixed_jvp(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *, select=None) -> torch.Tensor:
        """Per-sample mixed derivative (∂h_W/∂x)(w, x_i, t_i)·δ_i, shape (c, m); exact (forward-over-reverse)."""
        x, delta = self.cast(x), self.cast(delta)

        def one(xi, yi, di):
            _, t = jvp(lambda xx: grad(self._loss_single)(self.w, xx, yi), (xi,), (di,))
            return t

        out = []
        for sl in self._chunks(x.shape[0]):
            t = vmap(one)(x[sl], y[sl], delta[sl])
            G = flatten(t, self.names, batched=True)
            out.append(G if select is None else G[:, select])
        return torch.cat(out, 0)


def chunk_count(b: int, chunk: int) -> int:
    return math.ceil(b / chunk)
