"""Trainer callbacks of seed 003: the residual-trick tracker (§4.2) and the effective-depth estimator (App. D.2).

Both subclass :class:`gradcond.train.Callback` and log long-format metrics through ``state.log_metric``.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from ..callbacks import Callback
from ..losses import get_loss
from . import _hooks as H

__all__ = ["ResidualTracker", "EffectiveDepth", "power_op_norm"]


def _weights(model: nn.Module, layers=None) -> dict[str, nn.Parameter]:
    """Weight matrices of the linear-kind layers (Linear / Conv; conv kernels are flattened to (out, -1))."""
    named = dict(model.named_modules())
    if layers is None:
        names = [n for n, m in named.items() if H.layer_kind(m) == "linear" and isinstance(getattr(m, "weight", None), torch.Tensor)]
    else:
        names = list(layers)
        bad = [n for n in names if n not in named or not isinstance(getattr(named[n], "weight", None), torch.Tensor)]
        if bad:
            raise ValueError(f"unknown or weight-less layer(s) {', '.join(map(repr, bad))}; accepted: names of "
                             f"Linear/Conv modules.")
    return {n: named[n].weight for n in names}


@torch.no_grad()
def power_op_norm(mat: torch.Tensor, v: torch.Tensor | None = None, iters: int = 2) -> tuple[float, torch.Tensor]:
    """Spectral norm of ``mat`` (2-D) by power iteration on mat^T mat, warm-started from ``v``; returns (sigma, v).

    Each iteration costs two mat-vec products; warm starting across training steps makes 1-2 iterations enough
    because the residual matrix changes slowly. The estimate is a lower bound that converges from below."""
    m = mat.reshape(mat.shape[0], -1).double()
    if v is None or v.shape[0] != m.shape[1]:
        v = torch.randn(m.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v = v / v.norm().clamp_min(1e-300)
    for _ in range(max(1, iters)):
        w = m.T @ (m @ v)
        nw = w.norm()
        if nw == 0:
            return 0.0, v
        v = w / nw
    return float((m @ v).norm()), v


class ResidualTracker(Callback):
    """Residual-trick diagnostics (seed 003 §4.2; notes §1.6): snapshots theta(0) at the start of training and
    logs per linear layer, every ``every`` steps:

    * ``delta_op`` = ||W - W(0)||_op (warm-started power iteration, ``power_iters`` per call);
    * ``rel_update`` = ||W(t) - W(t-1)||_F / ||W(t-1)||_F, the relative update size of the step (weights only);
    * ``inv_gsc`` = 1 / GSC(l, 0) at the layer's output on the current batch, every ``gsc_every`` steps (0 = never;
      the paper's Fig. 2A compares the best relative update size with this bound).

    Metrics go to ``state.log_metric("residual", name, value, layer)``; :attr:`history` keeps them as dicts.
    Cost: a copy of the weights per step plus 2 * power_iters mat-vecs per layer; ``inv_gsc`` one forward+backward.
    """

    def __init__(self, layers=None, every: int = 1, power_iters: int = 2, gsc_every: int = 0):
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}.")
        if not isinstance(gsc_every, int) or gsc_every < 0:
            raise ValueError(f"gsc_every must be a non-negative integer, got {gsc_every!r}.")
        self.layers, self.every, self.power_iters, self.gsc_every = layers, every, power_iters, gsc_every
        self.theta0: dict[str, torch.Tensor] = {}
        self._v: dict[str, torch.Tensor] = {}
        self._prev: dict[str, torch.Tensor] = {}
        self.history: list[dict] = []
        self.last_op: dict[str, float] = {}

    def _w(self, model):
        return _weights(model, self.layers)

    def on_train_start(self, state) -> None:
        if not self.theta0:  # keep a resumed snapshot
            self.theta0 = {n: w.detach().clone() for n, w in self._w(state.model).items()}

    def on_step_start(self, state) -> None:
        if (state.step + 1) % self.every == 0:
            self._prev = {n: w.detach().clone() for n, w in self._w(state.model).items()}

    def delta_op_norms(self, model) -> dict[str, float]:
        """||W - W(0)||_op per tracked layer (updates the warm-start vectors)."""
        out = {}
        for n, w in self._w(model).items():
            if n not in self.theta0:
                raise ValueError(f"layer {n!r} has no theta(0) snapshot; was on_train_start called?")
            sigma, self._v[n] = power_op_norm(w.detach() - self.theta0[n], self._v.get(n), self.power_iters)
            out[n] = sigma
        self.last_op = out
        return out

    def on_step_end(self, state) -> None:
        if state.step % self.every or not self._prev:
            return
        rows = []
        ops = self.delta_op_norms(state.model)
        for n, w in self._w(state.model).items():
            prev = self._prev[n]
            rel = float((w.detach() - prev).norm() / prev.norm().clamp_min(1e-300))
            rows += [("residual", n, "delta_op", ops[n]), ("residual", n, "rel_update", rel)]
        if self.gsc_every and state.step % self.gsc_every == 0 and state.batch is not None:
            from .scale import gsc_profile

            names = list(self._w(state.model))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                prof = gsc_profile(state.model, state.loss_fn, state.batch, layers=names, per_sample=False)
            for n, g in zip(prof.layers, prof.gsc):
                rows.append(("residual", n, "inv_gsc", 1.0 / g if g and math.isfinite(g) else float("nan")))
        state.log_metrics(rows)
        self.history += [{"step": state.step, "layer": l, "name": nm, "value": v} for _, l, nm, v in rows]
        self._prev = {}

    def state_dict(self) -> dict:
        return {"theta0": self.theta0, "v": self._v}

    def load_state_dict(self, sd: dict) -> None:
        self.theta0 = dict(sd.get("theta0", {}))
        self._v = dict(sd.get("v", {}))


class EffectiveDepth(Callback):
    """Conservative effective-depth estimator of seed 003 App. D.2 (notes §1.7), as a trainer callback.

    Before every optimizer step (``on_step_start``, parameters theta(t-1)) it runs one forward + backward on the
    step's batch with hooks and, per sample b, walks the layer chain from the error down with the dynamic
    program of D.2: ``arr[i]`` bounds the norm of the gradient terms with exactly i residual Jacobians; a layer k
    multiplies by ``ratio_k = ||df0/df_{k+1}|| / ||df0/df_k||`` and, if linear, mixes in ``||W_k - W_k(0)||_op``.
    For every linear layer l the λ-contribution estimate ``c_l ||f_{l+1}|| sum_{i>=λ} arr[i]`` is summed over
    samples and steps. The effective depth is the largest λ with ``max_l est_l(λ) >= threshold`` (h = 1e-6).

    ResNet rule (D.2 "ResNet"): residual blocks are modules with ``skip`` and ``branch`` attributes
    (``gradcond.zoo`` ``ResidualBlock``). Crossing a block top-down, arr is copied at the block output f_n, the
    branch layers use the branch-only gradient at the block input f_m in their lowest ratio, and afterwards
    ``arr[i] += arr_copy[i] * (||df0/df_m|| - ||df0/drho drho/df_m||) / ||df0/df_n||``. The skip path's own
    parameters (Gaussian skips) are treated as fixed initial functions (their residuals are not counted).

    Decisions: the gradient is that of the trainer's batch loss (for a mean loss each sample's term carries 1/B,
    so ``c_l`` is the param group's learning rate, matching the paper's summed-gradient SGD); BatchNorm in train
    mode couples samples, so per-sample rows are rows of the summed-error gradient. Conv layers use
    ``||g|| ||input||`` per sample as the weight-gradient norm bound. Other optimizers: ``c_l`` is still the
    learning rate, so the estimate measures the λ-contributions of lr * gradient, not of the optimizer's actual
    (momentum / adaptive) update -- a warning says so once. ``every=k`` evaluates every k-th step and multiplies
    its contribution by k (approximation). Cost: one extra forward + backward per evaluated step and
    O(B * N^2) for the DP with N linear layers.
    """

    def __init__(self, threshold: float = 1e-6, tracker: ResidualTracker | None = None, every: int = 1,
                 power_iters: int = 2):
        if not (threshold > 0):
            raise ValueError(f"threshold must be positive, got {threshold!r}.")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}.")
        self.threshold, self.tracker, self.every = threshold, tracker, every
        self._own = ResidualTracker(power_iters=power_iters) if tracker is None else None
        self.est = None  # (n_linear, n_linear + 2) accumulated estimates, rows in forward order
        self.linear_names: list[str] = []
        self.history: list[dict] = []
        self._warned = False

    @property
    def _trk(self) -> ResidualTracker:
        return self.tracker if self.tracker is not None else self._own

    def on_train_start(self, state) -> None:
        if self._own is not None:
            self._own.on_train_start(state)
        elif not self.tracker.theta0:
            self.tracker.on_train_start(state)
        opt = state.optimizer
        if not self._warned and (type(opt) is not torch.optim.SGD or any(g.get("momentum", 0) for g in opt.param_groups)):
            warnings.warn("EffectiveDepth assumes plain SGD (App. D.2); with this optimizer c_l is the learning rate "
                          "and the estimate describes lr * gradient, not the actual update.", RuntimeWarning)
            self._warned = True

    @property
    def value(self) -> int:
        """Current effective depth: the largest λ with max_l est_l(λ) >= threshold (0 before any step)."""
        if self.est is None:
            return 0
        mx = self.est.max(0).values
        ok = (mx >= self.threshold).nonzero()
        return int(ok.max()) if len(ok) else 0

    def contributions(self) -> list[float]:
        """max over layers of the accumulated λ-contribution estimate, for λ = 0, 1, ..."""
        return [] if self.est is None else [float(v) for v in self.est.max(0).values]

    def _lr_of(self, optimizer) -> dict[int, float]:
        return {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}

    def on_step_start(self, state) -> None:
        if state.batch is None or (state.step + 1) % self.every:
            return
        model = state.model
        x, y = state.batch[0], state.batch[1]
        ops = self._trk.delta_op_norms(model)
        lrs = self._lr_of(state.optimizer)
        est = self.estimate_step(model, state.loss_fn, x, y, ops, lrs)
        if self.est is None:
            self.est = torch.zeros_like(est)
        self.est += self.every * est
        d = self.value
        self.history.append({"step": state.step, "effective_depth": d})
        state.log_metric("effective_depth", "lambda", d)

    def estimate_step(self, model, loss_fn, x, y, ops: dict, lrs: dict) -> torch.Tensor:
        """The D.2 estimate of one update on batch (x, y): tensor (n_linear, n_linear + 2), row l = linear layer l
        (forward order), column λ = sum over samples of c_l ||f_{l+1}|| sum_{i>=λ} arr[i]."""
        loss = get_loss(loss_fn)
        named = dict(model.named_modules())
        blocks = {n: m for n, m in named.items() if n and hasattr(m, "skip") and hasattr(m, "branch")}
        skip_prefixes = tuple(f"{n}.skip" for n in blocks)
        leaves = {n: m for n, m in H.default_layers(model).items() if not (n.startswith(skip_prefixes))}
        events = []  # events in forward order

        def leaf_hook(name):
            def hook(mod, inp, out):
                t_in, t_out = (inp[0] if inp else None), H.first_tensor(out)
                if t_out is None or not torch.is_tensor(t_in) or t_out.dim() == 0 or t_out.shape[0] != x.shape[0]:
                    return
                events.append({"type": "layer", "name": name, "kind": H.layer_kind(mod), "in": t_in, "out": t_out,
                               "in_norm": H.per_sample_norm(t_in) if t_in.is_floating_point() else None})
            return hook

        def block_pre(name):
            def hook(mod, inp):
                events.append({"type": "start", "name": name, "u": inp[0]})
            return hook

        def block_post(name):
            def hook(mod, inp, out):
                ev = next(e for e in reversed(events) if e["type"] == "start" and e["name"] == name)
                events.append({"type": "end", "name": name, "o": out, "start": ev})
            return hook

        skip_outs = {}

        def skip_hook(name):
            def hook(mod, inp, out):
                skip_outs[name] = (inp[0], out)
            return hook

        handles = []
        with H.measurement(model):
            try:
                for n, m in leaves.items():
                    handles.append(m.register_forward_hook(leaf_hook(n)))
                for n, m in blocks.items():
                    handles.append(m.register_forward_pre_hook(block_pre(n)))
                    handles.append(m.register_forward_hook(block_post(n)))
                    handles.append(m.skip.register_forward_hook(skip_hook(n)))
                xi = H.prepare_input(x)
                out = model(xi)
            finally:
                for h in handles:
                    h.remove()
            ell, red = H.per_sample_losses(loss, out, y)
            b = ell.shape[0]
            if red == "other":
                raise ValueError("EffectiveDepth needs a loss that is the mean or the sum of per-sample losses.")
            g0 = 1.0 / b if red == "mean" else 1.0
            total = ell.sum() * g0
            tensors = [out]
            for e in events:
                if e["type"] == "layer":
                    tensors += [e["out"], e["in"]]
                elif e["type"] == "start":
                    tensors.append(e["u"])
                else:
                    tensors.append(e["o"])
            idx = {}
            uniq = []
            for t in tensors:
                if id(t) not in idx and t.requires_grad:
                    idx[id(t)] = len(uniq)
                    uniq.append(t)
            grads = torch.autograd.grad(total, uniq, retain_graph=bool(blocks), allow_unused=True)

            def gn(t):
                i = idx.get(id(t))
                g = None if i is None else grads[i]
                return torch.zeros(t.shape[0], dtype=torch.float64) if g is None else H.per_sample_norm(g)

            def gfull(t):
                i = idx.get(id(t))
                return None if i is None else grads[i]

            # branch-only gradient at each block input: g_u - (skip VJP of the output gradient)
            branch_in = {}
            for e in events:
                if e["type"] == "end":
                    u, o = e["start"]["u"], e["o"]
                    g_o, g_u = gfull(o), gfull(u)
                    s_in, s_out = skip_outs[e["name"]]
                    if s_out is s_in:
                        g_s = g_o
                    else:
                        (g_s,) = torch.autograd.grad(s_out, [s_in], g_o, retain_graph=True)
                    branch_in[e["name"]] = H.per_sample_norm(g_u - g_s)
        lin_names = [e["name"] for e in events if e["type"] == "layer" and e["kind"] == "linear"]
        if not self.linear_names:
            self.linear_names = lin_names
        n_lin = len(lin_names)
        if n_lin == 0:
            raise ValueError("EffectiveDepth found no linear layer in the forward pass.")
        params = {n: named[n].weight for n in lin_names}
        arr = torch.zeros(b, n_lin + 2, dtype=torch.float64)
        arr[:, 0] = gn(out)  # the error layer's ratio ||df0/df1|| / ||df0/df0|| (per-sample df0/df0 = g0)
        est = torch.zeros(n_lin, n_lin + 2, dtype=torch.float64)
        stack = []
        # the lowest branch layer of each block uses the branch-only gradient at the block input
        first_in_block = {}
        for i, e in enumerate(events):
            if e["type"] == "start":
                j = i + 1
                while j < len(events) and events[j]["type"] != "layer":
                    j += 1
                if j < len(events):
                    first_in_block[j] = e["name"]
        li = n_lin
        for i in range(len(events) - 1, -1, -1):
            e = events[i]
            if e["type"] == "end":
                stack.append((arr.clone(), gn(e["o"]), e["name"]))
                continue
            if e["type"] == "start":
                arr_copy, g_n, name = stack.pop()
                g_m = gn(e["u"])
                fac = torch.where(g_n > 0, (g_m - branch_in[name]) / g_n.clamp_min(1e-300), torch.zeros_like(g_n))
                arr = arr + arr_copy * fac[:, None]
                continue
            g_out = gn(e["out"])
            g_in = branch_in[first_in_block[i]] if i in first_in_block else gn(e["in"])
            ratio = torch.where(g_out > 0, g_in / g_out.clamp_min(1e-300), torch.zeros_like(g_out))
            if e["kind"] == "linear":
                li -= 1
                c = lrs.get(id(params[e["name"]]), 0.0)
                tail = arr.flip(1).cumsum(1).flip(1)  # sum_{i >= λ} arr[i]
                est[li] = (c * e["in_norm"][:, None] * tail).sum(0)
                op = ops.get(e["name"], 0.0)
            else:
                op = 0.0
            shifted = torch.zeros_like(arr)
            shifted[:, 1:] = arr[:, :-1]
            arr = arr * ratio[:, None] + shifted * op
        return est

    def state_dict(self) -> dict:
        return {"est": self.est, "linear_names": self.linear_names,
                "tracker": self._own.state_dict() if self._own is not None else None}

    def load_state_dict(self, sd: dict) -> None:
        self.est = sd.get("est")
        self.linear_names = list(sd.get("linear_names", []))
        if self._own is not None and sd.get("tracker"):
            self._own.load_state_dict(sd["tracker"])
