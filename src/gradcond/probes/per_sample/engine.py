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
    (:func:`gradcond.probes.per_sample_stats` records the same statistics in its own capture forward instead of a
    separate pass; every other method computes them on entry, or on first use when deferred:
    :meth:`Engine.resolve_batch_statistics`.)
  - ``bn="eval"``: use the running statistics (the model's eval-mode function).

  For a model already in eval mode the two coincide (running statistics are used). A BN layer that does not track
  running statistics has no buffers to substitute and is rejected with a ValueError.
* **Flat vectors.** The weight space 𝕎 is the concatenation of all parameters with ``requires_grad=True`` in
  ``named_parameters()`` order (biases and normalization parameters included; notes erratum 5); see
  :mod:`gradcond.probes.flat_vectors`.

Cost: a per-sample gradient pass costs about one batched forward+backward of the same batch (``vmap(grad)``);
memory is bounded by ``chunk_size`` per-sample gradients of ``m`` floats at a time.

What lives where (step 4 of the per-sample path, see :mod:`gradcond.probes.per_sample.plan` for the order): this
module holds the :class:`Engine` (construction, eval-mode/BatchNorm context, losses, the public gradient API, the
layer path's capture-and-check and the ``vmap(grad)`` fallback) and :func:`per_sample_stats`; the layer plan is in
:mod:`~gradcond.probes.per_sample.plan`, the hooked forward and backward in :mod:`~gradcond.probes.per_sample.capture`,
the per-layer identities (norms, Grams, materialised per-sample gradients, the first-use check) in
:mod:`~gradcond.probes.per_sample.identities`; ``flatten``/``unflatten``/``weight_vector`` are in
:mod:`gradcond.probes.flat_vectors`.
"""

from __future__ import annotations

import contextlib
import functools
import time
from typing import Callable, Iterator

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from gradcond.probes.flat_vectors import flatten, unflatten
from gradcond.probes.per_sample.capture import Capture, capture
from gradcond.probes.per_sample.identities import (
    PerSampleStats,
    assemble,
    select_map,
    stats_from_calls,
    validate,
    whole_model_fallback,
)
from gradcond.probes.per_sample.plan import (
    BN_TYPES,
    Unsupported,
    is_batch_mean_loss,
    is_validated,
    layer_plan,
    mark_unsupported,
)
from gradcond.utils import as_batch, eval_mode  # as_batch re-exported: the package's one batch normaliser

__all__ = ["DEFAULT_MEMORY_BYTES", "Engine", "PerSampleStats", "as_batch", "per_sample_stats"]

DEFAULT_MEMORY_BYTES = 256 * 2**20  # bound for one chunk of per-sample gradients



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
        backend: ``"auto"`` (the layer path -- capture and identities -- where the model allows it, ``vmap(grad)``
            otherwise) or ``"func"`` (``vmap(grad)`` only).

    Attributes: ``names`` (trainable parameter names, flat order), ``offsets`` (name -> (start, numel) in the flat
    vector), ``m`` (flat length), ``w`` (detached weights), ``dtype``, ``b`` (batch size), ``plan`` (the layer path's
    :class:`~gradcond.probes.per_sample.plan.LayerPlan`, None for ``backend="func"``).
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
        # one walk of the module tree for modules, parameters and buffers (named_parameters / named_buffers order)
        self._named_modules = list(model.named_modules())
        raw, bufs, seen = {}, {}, {}
        # every place a tensor sits (a tied parameter sits in several modules), for swapping weights in and out
        self._slots: dict[str, list] = {}
        for mname, mod in self._named_modules:
            pre = mname + "." if mname else ""
            for kind, store, out in (("_parameters", mod._parameters, raw), ("_buffers", mod._buffers, bufs)):
                for k, t in store.items():
                    if t is None:
                        continue
                    first = seen.get(id(t))
                    if first is None:
                        seen[id(t)] = first = pre + k
                        out[first] = t
                    self._slots.setdefault(first, []).append((store, k))
        self._own_buffer_tensors = bufs
        self._own_params = raw  # the model's own parameters (the layer path differentiates through them directly)
        self.names = [n for n, p in raw.items() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters (requires_grad=True); nothing to measure.")
        first = raw[self.names[0]]
        self.dtype = first.dtype
        self.offsets, start = {}, 0
        for n in self.names:
            k = raw[n].numel()
            self.offsets[n] = (start, k)
            start += k
        self.m = start
        self.x, self.y = self.cast(x), y
        self.b = x.shape[0]
        self._chunk_given = chunk_size is not None
        if chunk_size is None:
            chunk_size = max(1, int(memory_bytes // max(1, self.m * first.element_size() * 3)))
        self.chunk_size = chunk_size
        self.memory_bytes = memory_bytes
        self._flags = None
        self.buffers: dict[str, torch.Tensor] = {}
        self.backend = backend
        self.plan = layer_plan(model, self.names, tuple(id(raw[n]) for n in self.names)) if backend == "auto" else None
        self._sel = (None, None)  # (select tensor, its select_map): repeated calls with one mask reuse the map

    @functools.cached_property
    def w(self) -> dict[str, torch.Tensor]:
        """The trainable weights, detached (the base point of every functional evaluation); made on first use."""
        return {n: self._own_params[n].detach() for n in self.names}

    @functools.cached_property
    def fixed(self) -> dict[str, torch.Tensor]:
        """The parameters with ``requires_grad=False``, detached (passed along in every ``functional_call``)."""
        trainable = set(self.names)
        return {n: p.detach() for n, p in self._own_params.items() if n not in trainable}

    # ------------------------------------------------------------------ context
    def __enter__(self) -> "Engine":
        named = self._named_modules
        self._ctx = eval_mode(self.model, [m for _, m in named])
        training = {m: m.training for _, m in named}
        bns = [(n, m) for n, m in named if isinstance(m, BN_TYPES)]
        self._ctx.__enter__()
        try:
            own = {n: b.detach() for n, b in self._own_buffer_tensors.items()}
            buffers = own
            self._pending_bn = None
            if self.bn == "batch" and any(training[m] for _, m in bns):
                if getattr(self, "_defer_bn", False) and self._use_fast():
                    # statistics recorded by the layer path's own capture forward (Engine.capture), which saves
                    # one forward pass; resolve_batch_statistics() computes them here if that path is not taken
                    for n, m in bns:
                        if m.running_mean is None:
                            raise ValueError(
                                f"BatchNorm layer {n!r} does not track running statistics; per-sample gradients "
                                "need track_running_stats=True."
                            )
                    self._pending_bn = (bns, training)
                else:
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
            self._own_buffers = buffers is own
        except BaseException:
            self._ctx.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._ctx.__exit__(*exc)

    def resolve_batch_statistics(self) -> None:
        """Compute deferred BatchNorm batch statistics now (one no-grad forward), if they are still pending."""
        if getattr(self, "_pending_bn", None) is not None:
            bns, training = self._pending_bn
            self.buffers = self._batch_statistics(bns, training, self.buffers)
            self._own_buffers = False
            self._pending_bn = None

    def set_batch_statistics(self, stats: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Install deferred BatchNorm batch statistics {BN module name: (mean, biased variance)} recorded by a forward
        of the engine's batch at the base weights (what :meth:`_batch_statistics` would have recorded)."""
        new = dict(self.buffers)
        for name, (mean, var) in stats.items():
            new[name + ".running_mean"] = mean
            new[name + ".running_var"] = var
        self.buffers, self._own_buffers, self._pending_bn = new, False, None

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

    def all_params(self, w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Trainable weights ``w`` plus the frozen (``requires_grad=False``) parameters, for ``functional_call``."""
        return {**self.fixed, **w}

    def _loss_single(self, w, x, y):
        out = functional_call(self.model, (self.all_params(w), self.buffers), (x.unsqueeze(0),))
        return self.loss_fn(out, y.unsqueeze(0))

    def _loss_batch(self, w, x, y):
        out = functional_call(self.model, (self.all_params(w), self.buffers), (x,))
        per = vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)
        return per.mean()

    def _direct(self, w) -> bool:
        """True when ``w`` are the base weights and no buffer is overridden: the model can be called as it is."""
        return (w is None or w is self.__dict__.get("w")) and getattr(self, "_own_buffers", False)

    def loss_sum(self, w, x, y):
        """Σ_i ℓ_i over a batch from one batched forward (per-sample losses as in the module docstring).

        For the known batch-mean losses (:func:`is_batch_mean_loss`) this is ``b · loss_fn(out, y)``, which equals
        Σ_i ℓ_i exactly in real arithmetic and skips the vmapped per-sample loss (about 0.4 ms of a 2 ms capture on
        the zoo CNN); any other loss is evaluated per sample with ``vmap``."""
        loss, scale = self.scaled_loss(w, x, y)
        return loss * scale if scale != 1 else loss

    def scaled_loss(self, w, x, y) -> tuple[torch.Tensor, int]:
        """``(loss, k)`` with Σ_i ℓ_i = k · loss, from one batched forward (see :meth:`loss_sum`): the batch-mean loss
        and k = b for the known batch-mean losses, else the vmapped per-sample sum and k = 1. The capture passes k as
        the backward's seed instead of multiplying (one kernel fewer). ``w``: None for the model as it is, else the
        trainable weights to evaluate at (with the engine's buffers), swapped in for the call (:meth:`_swapped`)."""
        if w is None:
            out = self.model(x)
        else:
            with self._swapped(w):
                out = self.model(x)
        if is_batch_mean_loss(self.loss_fn, out, y):
            return self.loss_fn(out, y), out.shape[0]
        return vmap(lambda o, t: self.loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y).sum(), 1

    @contextlib.contextmanager
    def _swapped(self, w):
        """The model evaluated at trainable weights ``w`` and the engine's buffers: each parameter and buffer entry of
        the modules' own tensor dicts is replaced for the block and put back afterwards (the tensors themselves are
        never written). What ``functional_call`` does, without its per-call generality (a third of a perturbed
        gradient of a small MLP); tied parameters are replaced everywhere they sit."""
        saved = []
        try:
            for group in (w, self.buffers if not getattr(self, "_own_buffers", False) else {}):
                for name, t in group.items():
                    for store, key in self._slots.get(name, ()):
                        saved.append((store, key, store[key]))
                        store[key] = t
            yield
        finally:
            for store, key, old in reversed(saved):
                store[key] = old

    # ------------------------------------------------------------------ the layer path (capture.py, identities.py)
    def _use_fast(self) -> bool:
        return self.plan is not None and self.plan.ok

    def capture(self, w, x, y, *, param_grads: bool = False) -> Capture:
        """ONE batched forward and ONE backward to the outputs of every parameter-owning module at weights ``w`` on
        ``(x, y)`` (:func:`gradcond.probes.per_sample.capture.capture`); with ``param_grads`` also autograd's gradients
        of Σ_i ℓ_i for the trainable parameters (in :attr:`names` order). Deferred ``bn="batch"`` statistics are
        recorded by this forward when it is the engine's own batch at the base weights. The first use on a model
        checks the identities against autograd (:func:`~gradcond.probes.per_sample.identities.validate`: one
        backward to the parameters, shared with ``param_grads``, and one forward+backward of sample 0 alone); a model
        that fails raises :class:`Unsupported` (the caller switches to ``vmap(grad)``)."""
        pending = getattr(self, "_pending_bn", None)
        if pending is not None and not ((w is None or w is self.__dict__.get("w")) and x is self.x):
            self.resolve_batch_statistics()
            pending = None
        direct = self._direct(w)
        if direct:  # base weights: differentiate through the model's own parameters, skipping functional_call
            wl = None
            leaves = [self._own_params[n] for n in self.names]
        else:
            w = self.w if w is None else w
            wl = {n: t.detach().requires_grad_(True) for n, t in w.items()}
            leaves = [wl[n] for n in self.names]
        bn_layers = [(n, m) for n, m in pending[0] if pending[1][m]] if pending is not None else ()
        check = not is_validated(self.model, self.names)
        cap = capture(self.plan, lambda xx, yy: self.scaled_loss(wl, xx, yy), x, y,
                      leaves=leaves if (param_grads or check) else None, bn_layers=bn_layers)
        if cap.bn_stats:
            if any(len(v) != 1 for v in cap.bn_stats.values()):
                # a BN module called more than once: the frozen statistics are those of its last call (as
                # _batch_statistics records them); redo the capture with them
                self.resolve_batch_statistics()
                return self.capture(w, x, y, param_grads=param_grads)
            self.set_batch_statistics({k: v[0] for k, v in cap.bn_stats.items()})
            if wl is None:  # the frozen statistics now override the buffers: the model's own parameters, functionally
                wl = {n: self._own_params[n] for n in self.names}
        if check:
            ref = {n: g for n, g in zip(self.names, cap.param_grads)}
            # sample 0 evaluated alone (a batch of one, no hooks): its gradient is the per-sample gradient by definition
            with torch.enable_grad():
                loss1 = self.loss_sum(wl if not self._direct(w) else None, x[:1], y[:1])
                g1 = torch.autograd.grad(loss1, leaves, allow_unused=True)
            ref1 = {n: torch.zeros_like(self._own_params[n]) if g is None else g.detach() for n, g in zip(self.names, g1)}
            validate(self, cap.calls, ref, ref1)
        return cap

    def _select_map(self, select):
        if select is None:
            return None
        if self._sel[0] is not select:
            self._sel = (select, select_map(self, select))
        return self._sel[1]

    def flat_w(self) -> torch.Tensor:
        return flatten(self.w, self.names)

    def add(self, omega: torch.Tensor) -> dict[str, torch.Tensor]:
        """Weights ``w + ω`` as a new dict (ω flat, full length m)."""
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        return {n: self.w[n] + d[n] for n in self.names}

    # ------------------------------------------------------------------ gradients
    def batch_grad(self, omega: torch.Tensor | None = None, x=None, y=None) -> torch.Tensor:
        """Flat batch-mean gradient h̄_W(w + ω, χ) (one batched forward+backward)."""
        self.resolve_batch_statistics()
        w = self.w if omega is None else self.add(omega)
        x = self.x if x is None else self.cast(x)
        y = self.y if y is None else y
        # plain autograd (no torch.func transform: its per-call overhead was a third of a step-consistency call);
        # the base weights are differentiated through the model's own parameters (torch.autograd.grad writes no .grad)
        if self._direct(w):
            own = self._own_params
            leaves, wl = [own[n] for n in self.names], None
        elif omega is not None and not omega.requires_grad:  # w + ω: new tensors of our own (no graph), the leaves
            wl = {n: t.requires_grad_(True) for n, t in w.items()}
            leaves = [wl[n] for n in self.names]
        else:
            wl = {n: t.detach().requires_grad_(True) for n, t in w.items()}
            leaves = [wl[n] for n in self.names]
        with torch.enable_grad():
            loss, k = self.scaled_loss(wl, x, y)
            # Σ_i ℓ_i / b: the batch-mean loss itself for the known batch-mean losses (k = b)
            g = torch.autograd.grad(loss if k == x.shape[0] else loss * k / x.shape[0], leaves, allow_unused=True)
        return torch.cat([(torch.zeros_like(p) if gi is None else gi).reshape(-1) for p, gi in zip(leaves, g)])

    def _chunks(self, b: int) -> Iterator[slice]:
        for s in range(0, b, self.chunk_size):
            yield slice(s, min(b, s + self.chunk_size))

    def per_sample_grads(self, x=None, y=None, omega=None, *, wrt: str = "weight", select=None) -> Iterator[
        tuple[slice, torch.Tensor]
    ]:
        """Yield ``(slice, G)`` chunks, ``G`` of shape (c, m) (weights, optionally masked by ``select``) or (c, k)
        (inputs, flattened). ``select`` is an index tensor applied to the flat weight gradient."""
        self.resolve_batch_statistics()
        x = self.x if x is None else self.cast(x)
        y = self.y if y is None else y
        w = self.w if omega is None else self.add(omega)
        if wrt not in ("weight", "input"):
            raise ValueError(f"wrt must be 'weight' or 'input', got {wrt!r}.")
        if wrt == "input" and not x.is_floating_point():
            raise ValueError("input gradients need floating-point inputs; got integer inputs (token ids?).")
        chunks = list(self._chunks(x.shape[0]))
        if wrt == "input" and self._use_fast():
            # input gradients take (c, input size) floats, not (c, m): the whole batch in one pass unless the caller
            # chose a chunk size (the default chunk size bounds weight gradients and is 1 for an 11M-parameter model)
            for sl in (chunks if self._chunk_given else [slice(0, x.shape[0])]):
                # one batched backward: ∂(Σ_j ℓ_j)/∂x_i = ∂ℓ_i/∂x_i for sample-independent models
                xs = x[sl].detach().requires_grad_(True)
                with torch.enable_grad():
                    (gx,) = torch.autograd.grad(self.loss_sum(None if self._direct(w) else w, xs, y[sl]), xs)
                yield sl, gx.reshape(gx.shape[0], -1)
            return
        for k, sl in enumerate(chunks):
            if not self._use_fast():
                break
            try:
                G = assemble(self, self.capture(w, x[sl], y[sl]).calls, w, select, self._select_map(select))
            except Unsupported as err:
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
        """Switch the layer path off for this engine and remember ``reason`` for the model (same trainable names)."""
        mark_unsupported(self.model, self.names, reason)
        self.plan.ok, self.plan.reason = False, reason

    def per_sample_matrix(self, x=None, y=None, omega=None, *, wrt="weight", select=None) -> torch.Tensor:
        """All per-sample gradients stacked as a (b, d) matrix (materialized)."""
        parts = [G for _, G in self.per_sample_grads(x, y, omega, wrt=wrt, select=select)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def per_sample_stats(self, *, norms: bool = True, gram: bool = True) -> PerSampleStats:
        """Per-sample squared gradient norms (b,) and/or the b×b Gram matrix (float64) of the batch, as a
        :class:`~gradcond.probes.per_sample.PerSampleStats` that also says which layer identity served each parameter
        and which parameters took the materialised fallback (and why).

        Layer path (``backend="auto"``): ONE batched forward and ONE backward to the layer outputs over the whole batch
        (``chunk_size`` does not apply: nothing of size b × P is formed), then per layer the cheaper of the ghost and
        the materialised identity (:mod:`gradcond.probes.per_sample.identities`); materialised layer gradients are
        formed in chunks of about ``memory_bytes``. A model the layer path cannot handle uses ``vmap(grad)`` in chunks
        (b × m floats are then stored for the Gram) and lists every parameter in ``fallback``."""
        return self.stats_and_batch_grad(norms=norms, gram=gram, batch_grad=False)[0]

    def stats_and_batch_grad(self, *, norms: bool = True, gram: bool = True, batch_grad: bool = True):
        """``(PerSampleStats, ḡ)``: :meth:`per_sample_stats` and, with ``batch_grad``, the flat batch-mean gradient
        h̄_W(w, χ) (as :meth:`batch_grad`; else None) -- on the layer path from the SAME capture (the backward to the
        layer outputs also goes to the parameters: one forward and one backward for both), otherwise by
        ``vmap(grad)`` and one more forward+backward. Used where several metrics share one engine (the monitor's
        conditioning probe: coherence, step-consistency and the weight-gradient rank)."""
        if not (norms or gram):
            raise ValueError("per_sample_stats needs norms=True or gram=True (nothing to compute otherwise).")
        t0 = time.perf_counter()
        if self._use_fast():
            try:
                cap = self.capture(None, self.x, self.y, param_grads=batch_grad)
                st = stats_from_calls(self, cap.calls, norms, gram, self.memory_bytes)
                st.seconds = time.perf_counter() - t0
                g = None
                if batch_grad:
                    g = torch.cat([t.reshape(-1) for t in cap.param_grads]).div_(self.b)
                return st, g
            except Unsupported as err:
                self._disable_fast(str(err))
        self.resolve_batch_statistics()
        reason = self.plan.reason if self.plan is not None else "backend='func' was asked for"
        sq = g = None
        if gram:
            A = self.per_sample_matrix()
            g = A.double() @ A.double().T
            sq = g.diagonal().clone() if norms else None
        else:
            sq = torch.cat([(G.double() ** 2).sum(1) for _, G in self.per_sample_grads()])
        st = PerSampleStats(sq, g, {}, whole_model_fallback(self.names, reason), self.b, time.perf_counter() - t0)
        return st, (self.batch_grad() if batch_grad else None)

    def per_sample_sq_norms(self, *, select=None) -> torch.Tensor:
        """Per-sample squared gradient norms ‖h_W(w, x_i, t_i)‖² (model dtype). Without a mask: from
        :meth:`per_sample_stats` (layer identities, nothing of size b × P formed); with ``select``: the selected
        coordinates are materialised chunk by chunk (never all stored)."""
        if select is None:
            return self.per_sample_stats(norms=True, gram=False).sq_norms.to(self.dtype)
        return torch.cat([(G * G).sum(1) for _, G in self.per_sample_grads(select=select)])

    def per_sample_gram(self, *, select=None) -> torch.Tensor:
        """b×b Gram matrix (float64) of the (optionally selected) per-sample weight gradients of the batch. Without a
        mask: from :meth:`per_sample_stats` (layer identities); with ``select``: ``A Aᵀ`` of the materialised
        selected coordinates A (b × len(select))."""
        if select is None:
            return self.per_sample_stats(norms=False, gram=True).gram
        A = self.per_sample_matrix(select=select).double()
        return A @ A.T

    def hvp(self, omega: torch.Tensor) -> torch.Tensor:
        """Exact Hessian-vector product H ω of the batch loss (forward-over-reverse ``jvp(grad)``)."""
        self.resolve_batch_statistics()
        d = unflatten(omega.to(self.dtype), self.w, self.names)
        _, t = jvp(lambda w: grad(self._loss_batch)(w, self.x, self.y), (self.w,), (d,))
        return flatten(t, self.names)

    def mixed_jvp(self, x: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, *, select=None) -> torch.Tensor:
        """Per-sample mixed derivative (∂h_W/∂x)(w, x_i, t_i)·δ_i, shape (c, m); exact (forward-over-reverse)."""
        self.resolve_batch_statistics()
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



def per_sample_stats(model: nn.Module, loss_fn, batch, *, gram: bool = True, norms: bool = True, bn: str = "batch",
                     memory_bytes: int | None = None) -> PerSampleStats:
    """Per-sample gradient squared norms and/or Gram matrix of ``model`` on one batch ``(x, y)`` without forming the
    b × P per-sample gradient matrix (layer identities of :mod:`gradcond.probes.per_sample.identities`; float64
    results).

    ``loss_fn(output, target)`` follows the Engine's per-sample convention (``ℓ_i = loss_fn(f(x_i)[None], t_i[None])``);
    ``bn``: ``"batch"`` or ``"eval"`` (see :class:`Engine`). Cost: one batched forward, one backward to the layer
    outputs, plus per layer the cheaper of the ghost and materialised forms; with ``bn="batch"`` and BatchNorm layers in
    train mode their batch statistics are recorded by that same forward (:meth:`Engine.capture`) instead of a separate
    pass (a BN module called more than once takes the separate pass); the model (parameters, buffers, ``.grad``,
    modes) is left unchanged. ValueError for neither ``gram`` nor ``norms`` asked for."""
    if not (gram or norms):
        raise ValueError("per_sample_stats needs gram=True or norms=True (nothing to compute otherwise).")
    x, y = as_batch(batch)
    e = Engine(model, loss_fn, x, y, bn=bn, memory_bytes=DEFAULT_MEMORY_BYTES if memory_bytes is None else memory_bytes)
    e._defer_bn = True  # bn="batch" statistics are recorded by the capture forward itself (one forward fewer)
    with e:
        return e.per_sample_stats(norms=norms, gram=gram)
