"""Symmetry teleportation for MLPs (Zhao et al. 2022), the baseline of seed 001 (Section 2.1).

For an MLP  h_m = sigma(W_m h_{m-1})  with an invertible activation sigma (LeakyReLU with a
positive slope, or none), each pair of consecutive layers carries a GL(d_m) action (seed 001,
eq. after (2); Zhao et al. eq. 8), with h = h_{m-2} the pair's input on the teleport batch:

    W_m     -> W_m g^{-1}
    W_{m-1} -> sigma^{-1}( g sigma(W_{m-1} h) ) h^+           (h^+ = pseudo-inverse)

If h has full column rank (h^+ h = I, i.e. n <= d_{m-2} [+1]) the network output on the batch
is unchanged *exactly*. A teleport step does gradient ascent on the Lie-algebra element:
T_m = eta * d/dT_m [ 1/2 ||grad_W L(g.W)||^2 ] at T = 0 (all pairs jointly, derivative taken
through the pseudo-inverses), then applies g_m to the pairs in order m = 1, 2, ..., each pair
using the activations produced by the already-transformed layers. Decision: the derivative is
the exact chain rule - G = d/dW 1/2||grad_W L||^2 with the weights as independent leaves, then
the vector-Jacobian product of T -> g.W against G. (The published code differentiates L with
respect to the *intermediate* transformed weights, whose graph links each layer to the previous
one through h and h^+, which adds spurious terms to grad_W L; tested against finite
differences in tests/test_symmetry.py.)

``action`` chooses how g acts:

* ``"inverse"`` (default): g = I + T, W_m g^{-1} by a linear solve - the exact group action.
* ``"expm"``: g = exp(T), g^{-1} = exp(-T) - also exact.
* ``"first_order"``: the authors' published code - W_m (I - T) instead of W_m (I + T)^{-1}, every
  pair transformed with the *untransformed* activations and their pseudo-inverses, and the lower
  layer replaced by sigma^{-1}(g sigma(W h)) h^+. It keeps the loss only to first order in T
  (compared side by side in ``benchmarks/nullspace_vs_symmetry.py`` and the
  ``nullspace-error-control`` reproduction).

Decision (the source writes h^{-1}, i.e. assumes a square invertible h): with n < d the
published form sigma^{-1}(g sigma(W h)) h^+ is *not* the identity at g = I - it projects the rows
of W onto the span of the batch inputs, so even T = 0 changes the weights (and the held-out
loss). The exact modes use  W_{m-1} -> W_{m-1} + [sigma^{-1}(g sigma(W_{m-1} h)) - W_{m-1} h] h^+,
which equals the published form on the batch, is the identity at g = I and is a group action
(g2.(g1.W) = (g2 g1).W) whenever h^+ h = I. The ascent direction is the derivative at g = I of
the action used (published parameterisation for ``first_order``).

Biases are folded in as a constant-1 input row (h^+ is the pseudo-inverse of [h; 1]); the
published code has no biases. The objective carries the factor 1/2 (the published code uses
||.||^2, i.e. its learning rate is half of ``eta`` here). Exactness needs h^+ h = I, i.e. every
pair input [h; 1] of full column rank n (n <= d + 1); otherwise the batch loss changes.

Cost per step: (l-1) pseudo-inverses of a (d+1) x n matrix in the forward pass plus their
backward in a double-backward pass, then (l-1) more pseudo-inverses and linear solves to apply
the action: O(d^2 n l) per step, O(d^2 n l b t) per teleport (seed 001, Section 2.1).

Optimizer state: ``"keep"`` or ``"reset"`` as for the null-space teleport
(``level_set.apply_optimizer_state``); no exact transport exists because the action on W_{m-1}
is not linear in W_{m-1}.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradcond.losses import get_loss
from gradcond.utils import as_batches

from .errors import TeleportError, TeleportRejected
from .level_set import (
    BatchRecord,
    TeleportGuards,
    TeleportResult,
    apply_optimizer_state,
    check_ascent_options,
    finite,
    run_teleport,
)
from .level_set_callback import LevelSetTeleportCallback

__all__ = ["SymmetryTeleport", "SymmetryTeleportCallback", "ACTIONS", "parse_mlp", "TeleportError",
           "TeleportRejected", "TeleportGuards"]

ACTIONS = ("inverse", "expm", "first_order")
_MAX_HALVINGS = 20  # step-size control: T is halved at most this often per step (2**-20 ~ 1e-6)
_NEEDS = ("SymmetryTeleport needs an nn.Sequential MLP: optional leading nn.Flatten, then nn.Linear "
          "layers with at most one invertible activation between consecutive ones (nn.LeakyReLU "
          "with negative_slope > 0, or nn.Identity)")


@dataclass
class _MLP:
    prefix: list[nn.Module]  # leading Flatten/Identity modules
    linears: list[tuple[str, nn.Linear]]
    slopes: list[float]  # activation slope after linear m (1.0 = identity), len = L-1


def parse_mlp(model: nn.Module) -> _MLP:
    """Check that ``model`` is an MLP the group action applies to; ``ValueError`` otherwise."""
    if not isinstance(model, nn.Sequential):
        raise ValueError(f"{_NEEDS}; got {type(model).__name__}")
    prefix, linears, slopes = [], [], []
    pending: float | None = None
    for name, m in model.named_children():
        if isinstance(m, nn.Linear):
            if linears:
                slopes.append(1.0 if pending is None else pending)
            linears.append((name, m))
            pending = None
        elif isinstance(m, (nn.Flatten, nn.Identity)) and not linears:
            prefix.append(m)
        elif isinstance(m, nn.Identity):
            continue
        elif isinstance(m, nn.LeakyReLU) and linears:
            if pending is not None or not m.negative_slope > 0:
                raise ValueError(f"{_NEEDS}; layer {name!r} ({m}) is not allowed there")
            pending = float(m.negative_slope)
        else:
            raise ValueError(f"{_NEEDS}; layer {name!r} ({type(m).__name__}) is not supported")
    if len(linears) < 2:
        raise ValueError(f"{_NEEDS}; it needs at least two nn.Linear layers, found {len(linears)}")
    if pending is not None:
        raise ValueError(f"{_NEEDS}; the last module must be an nn.Linear (no final activation)")
    return _MLP(prefix, linears, slopes)


def _act(z: torch.Tensor, slope: float) -> torch.Tensor:
    return z if slope == 1.0 else F.leaky_relu(z, slope)


def _act_inv(z: torch.Tensor, slope: float) -> torch.Tensor:
    return z if slope == 1.0 else F.leaky_relu(z, 1.0 / slope)


def _aug(h: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([h, h.new_ones(1, h.shape[1])], 0) if bias else h


class SymmetryTeleport:
    """GL(d) symmetry teleport of an MLP (Zhao et al. 2022), exact group action by default.

    Parameters: ``loss`` (name or callable; or per call), ``eta`` (learning rate on the Lie
    algebra), ``steps`` (t per batch), ``action`` ("inverse" | "expm" | "first_order"), ``cap``
    (stop a batch's steps once the gradient norm reaches it), ``cap_ratio`` (stop once it reaches
    this multiple of the batch's starting value). ``teleport()`` has the same signature and result
    as ``NullSpaceTeleport.teleport``.

    ``max_step_change`` (ours, issue 20; default ``"auto"`` = 0.05 for the exact actions, None for
    ``first_order``): step-size control. The ascent on 1/2||grad||^2 is super-linear and, with a
    LeakyReLU of small slope (sigma^{-1} multiplies negative values by 1/slope), one step of
    ``eta * dT`` can multiply the weights and the gradient norm many times over or overflow (the
    default callback on the zoo MLP failed on every call). Each step's T is therefore halved
    (at most 20 times, ``BatchRecord.backtracks`` counts them) until the new weights are finite and
    every layer moves by at most ``max_step_change * ||W_m||_F``; a step that cannot qualify ends
    the batch. ``None`` = the plain ascent (non-finite values raise ``TeleportError``). The
    published ``first_order`` action changes W even at T = 0, so the control is off for it.

    Guards ``batch_loss_tol``, ``held_out_tol``, ``max_weight_growth`` (defaults 1e-3, 0.05, 4.0):
    as for ``NullSpaceTeleport``, see ``TeleportGuards``; ``first_order`` changes the batch loss by
    design and usually needs ``batch_loss_tol=None``.
    """

    method = "symmetry"

    def __init__(self, loss: str | Callable | None = None, *, eta: float = 1e-2, steps: int = 8,
                 action: str = "inverse", cap: float | None = None, cap_ratio: float | None = None,
                 max_step_change: float | None | str = "auto",
                 batch_loss_tol: float | None = 1e-3, held_out_tol: float | None = 0.05,
                 max_weight_growth: float | None = 4.0):
        if action not in ACTIONS:
            raise ValueError(f"action must be one of {ACTIONS}, got {action!r}")
        check_ascent_options(steps, eta, cap, cap_ratio)
        self.loss = get_loss(loss) if loss is not None else None
        self.eta, self.steps, self.action, self.cap, self.cap_ratio = float(eta), int(steps), action, cap, cap_ratio
        if action != "inverse":
            self.method = f"symmetry-{action}"
        if max_step_change is False:  # TOML configs have no null
            max_step_change = None
        if max_step_change == "auto":  # the published first-order action moves W even at T = 0
            max_step_change = None if action == "first_order" else 0.05
        if max_step_change is not None and not (isinstance(max_step_change, (int, float)) and max_step_change > 0):
            raise ValueError(f"max_step_change must be > 0 or None, got {max_step_change}")
        self.max_step_change = None if max_step_change is None else float(max_step_change)
        self.guards = TeleportGuards(batch_loss_tol, held_out_tol, max_weight_growth)

    def default_batch_size(self, model: nn.Module) -> int:
        """Teleport-batch size for the callback's ``batch_size=None``: min(32, D // 2), D the
        smallest layer-pair input dimension (hidden width [+1 for the bias]).

        The action keeps the loss only when every pair input [h; 1] (D x n) has full column rank
        n, and its pseudo-inverse (and the derivative through it) is ill-conditioned as n nears D;
        n = D // 2 keeps the smallest singular value away from 0 on typical data. (With the
        source's n = 32 on a width-32 MLP the first teleport step is already non-finite.)
        """
        mlp = parse_mlp(model)
        dims = [lin.in_features + (lin.bias is not None) for _, lin in mlp.linears[:-1]]
        return max(1, min(32, min(dims) // 2))

    def teleport(self, model: nn.Module, batches, *, loss: str | Callable | None = None,
                 optimizer: torch.optim.Optimizer | None = None, optimizer_state: str = "keep",
                 held_out: Sequence[torch.Tensor] | None = None) -> TeleportResult:
        """Teleport ``model`` in place on one ``(x, y)`` batch or a list of them; see the module doc."""
        loss_fn = get_loss(loss) if loss is not None else self.loss
        if loss_fn is None:
            raise ValueError("no loss given: pass loss= to SymmetryTeleport or to teleport()")
        batches = as_batches(batches)
        apply_optimizer_state(None, (), optimizer_state)
        mlp = parse_mlp(model)
        others = [n for n, p in model.named_parameters()
                  if p.requires_grad and not any(n.startswith(ln + ".") for ln, _ in mlp.linears)]
        if others:  # pragma: no cover - parse_mlp admits only Linear parameters
            raise ValueError(f"{_NEEDS}; unexpected parameters {others}")
        moved = [p for _, lin in mlp.linears for p in (lin.weight, lin.bias) if p is not None]
        groups = {n: [p for p in (lin.weight, lin.bias) if p is not None] for n, lin in mlp.linears}
        return run_teleport(self.method, model, loss_fn, batches, held_out, optimizer, optimizer_state, moved,
                            lambda x, y: self._one_batch(model, mlp, loss_fn, x, y), self.guards, groups)

    # ---------------------------------------------------------------------------------------
    def _weights(self, mlp: _MLP) -> list[torch.Tensor]:
        out = []
        for _, lin in mlp.linears:
            w = lin.weight.detach()
            out.append(torch.cat([w, lin.bias.detach().unsqueeze(1)], 1) if lin.bias is not None else w.clone())
        return out

    def _params(self, mlp: _MLP, Ws: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
        d = {}
        for (name, lin), W in zip(mlp.linears, Ws):
            if lin.bias is not None:
                d[f"{name}.weight"], d[f"{name}.bias"] = W[:, :-1], W[:, -1]
            else:
                d[f"{name}.weight"] = W
        return d

    def _loss_grad(self, model, mlp, loss_fn, x, y, Ws, create_graph):
        L = loss_fn(functional_call(model, self._params(mlp, Ws), (x,)), y)
        if not finite(L):
            raise TeleportError(f"non-finite primary loss ({float(L.detach())}) during a symmetry "
                                "teleport; model and optimizer were restored to their pre-teleport state")
        g = torch.autograd.grad(L, Ws, create_graph=create_graph)
        sq = sum((gi * gi).sum() for gi in g)
        if not finite(sq):
            raise TeleportError("non-finite gradient during a symmetry teleport; model and optimizer "
                                "were restored to their pre-teleport state")
        return L, sq

    def _input(self, mlp: _MLP, x: torch.Tensor) -> torch.Tensor:
        for m in mlp.prefix:
            x = m(x)
        if x.dim() != 2:
            raise ValueError(f"SymmetryTeleport needs (n, features) inputs after the leading Flatten, got shape {tuple(x.shape)}")
        return x.T  # (d0, n)

    def _one_batch(self, model, mlp: _MLP, loss_fn, x, y) -> BatchRecord:
        biases = [lin.bias is not None for _, lin in mlp.linears]
        dims = [lin.out_features for _, lin in mlp.linears]
        X = self._input(mlp, x).detach()
        Ws = self._weights(mlp)
        L0, sq0 = self._loss_grad(model, mlp, loss_fn, x, y, [W.requires_grad_() for W in Ws], False)
        Ws = [W.detach() for W in Ws]
        loss0, gn0 = float(L0.detach()), float(sq0.detach().sqrt())
        steps, capped, backtracks = 0, False, 0
        ltrace, gtrace = [], []
        nL = len(Ws)
        for s in range(self.steps):
            # ---- gradient of the objective w.r.t. T at T = 0 (Zhao et al.) ----------------
            Ts = [torch.zeros(dims[m], dims[m], dtype=X.dtype, device=X.device, requires_grad=True)
                  for m in range(nL - 1)]
            gW = list(Ws)
            h = _aug(X, biases[0])
            for m in range(nL - 1):
                I = torch.eye(dims[m], dtype=X.dtype, device=X.device)
                U = gW[m + 1]
                gW[m + 1] = torch.cat([U[:, : dims[m]] @ (I - Ts[m]), U[:, dims[m]:]], 1)
                gW[m] = self._lower(gW[m], h, I + Ts[m], mlp.slopes[m])
                h = _aug(_act(gW[m] @ h, mlp.slopes[m]), biases[m + 1])
            # gradient of the objective w.r.t. the weights as independent leaves, then the
            # vector-Jacobian product of the parameterisation (exact chain rule)
            Wl = [w.detach().requires_grad_() for w in gW]
            L, sq = self._loss_grad(model, mlp, loss_fn, x, y, Wl, True)
            gn = float(sq.detach().sqrt())
            ltrace.append(float(L.detach()))
            gtrace.append(gn)
            if (self.cap is not None and gn >= self.cap) or (
                    self.cap_ratio is not None and gn >= self.cap_ratio * gn0):
                capped = True
                break
            G = torch.autograd.grad(0.5 * sq, Wl)
            dT = torch.autograd.grad(gW, Ts, grad_outputs=G)
            if not all(finite(d) for d in dT):
                raise TeleportError("non-finite Lie-algebra gradient during a symmetry teleport; model "
                                    "and optimizer were restored to their pre-teleport state")
            Ts = [self.eta * d.detach() for d in dT]
            del gW, Wl, L, sq, G, dT
            # ---- apply the group elements (with the step-size control) --------------------
            new, halvings = self._step(mlp, X, Ws, Ts, biases, dims)
            backtracks += halvings
            if new is None:  # no acceptable step even at eta / 2**_MAX_HALVINGS: stop this batch
                break
            Ws = new
            steps += 1
        with torch.no_grad():
            for (_, lin), W in zip(mlp.linears, Ws):
                if lin.bias is not None:
                    lin.weight.copy_(W[:, :-1])
                    lin.bias.copy_(W[:, -1])
                else:
                    lin.weight.copy_(W)
        L1, sq1 = self._loss_grad(model, mlp, loss_fn, x, y, [W.requires_grad_() for W in self._weights(mlp)], False)
        ltrace.append(float(L1.detach()))
        gtrace.append(float(sq1.detach().sqrt()))
        return BatchRecord(loss0, ltrace[-1], gn0, gtrace[-1], steps, capped, {},
                           {n: d for (n, _), d in zip(mlp.linears, dims)}, [], ltrace, gtrace,
                           backtracks=backtracks)

    def _step(self, mlp: _MLP, X, Ws, Ts, biases, dims) -> tuple[list[torch.Tensor] | None, int]:
        """Apply the group elements ``Ts``; returns ``(new weights or None, halvings)``.

        With ``max_step_change`` (default): T is halved (at most ``_MAX_HALVINGS`` times) until the
        result is finite and every layer moves by at most ``max_step_change * ||W_m||_F``; None if
        no halving qualifies. Without it: one application, non-finite values raise TeleportError.
        Cost per halving: one application of the action (l-1 pseudo-inverses and solves, no
        backward pass).
        """
        limit = self.max_step_change
        for k in range(_MAX_HALVINGS + 1):
            with torch.no_grad():
                try:
                    new = self._apply(mlp, X, Ws, Ts, biases, dims)
                    ok = all(finite(W) for W in new)
                except torch.linalg.LinAlgError as e:
                    if limit is None:
                        raise TeleportError(f"linear-algebra failure (singular group element or non-finite values) "
                                            f"during a symmetry teleport ({e}); model and optimizer were restored "
                                            "to their pre-teleport state") from None
                    ok = False
            if limit is None:
                if not ok:
                    raise TeleportError("non-finite parameters after a symmetry teleport step; model and "
                                        "optimizer were restored to their pre-teleport state")
                return new, 0
            if ok and all(float((a - b).norm()) <= limit * float(b.norm()) for a, b in zip(new, Ws)):
                return new, k
            Ts = [0.5 * t for t in Ts]
        return None, _MAX_HALVINGS + 1

    def _apply(self, mlp: _MLP, X, Ws, Ts, biases, dims) -> list[torch.Tensor]:
        Ws = list(Ws)
        nL = len(Ws)
        h = _aug(X, biases[0])
        if self.action == "first_order":
            # published code: stale activations of the untransformed network, W (I - T)
            hs = [h]
            for m in range(nL - 2):
                hs.append(_aug(_act(Ws[m] @ hs[-1], mlp.slopes[m]), biases[m + 1]))
            for m in range(nL - 1):
                I = torch.eye(dims[m], dtype=X.dtype, device=X.device)
                U = Ws[m + 1]
                Ws[m + 1] = torch.cat([U[:, : dims[m]] @ (I - Ts[m]), U[:, dims[m]:]], 1)
                Ws[m] = self._lower(Ws[m], hs[m], I + Ts[m], mlp.slopes[m])
            return Ws
        for m in range(nL - 1):
            I = torch.eye(dims[m], dtype=X.dtype, device=X.device)
            if self.action == "expm":
                g, ginv = torch.linalg.matrix_exp(Ts[m]), torch.linalg.matrix_exp(-Ts[m])
                Uw = Ws[m + 1][:, : dims[m]] @ ginv
            else:
                g = I + Ts[m]
                Uw = torch.linalg.solve(g, Ws[m + 1][:, : dims[m]], left=False)  # U g^{-1}
            Ws[m + 1] = torch.cat([Uw, Ws[m + 1][:, dims[m]:]], 1)
            Ws[m] = self._lower(Ws[m], h, g, mlp.slopes[m])
            h = _aug(_act(Ws[m] @ h, mlp.slopes[m]), biases[m + 1])
        return Ws

    def _lower(self, V: torch.Tensor, h: torch.Tensor, g: torch.Tensor, slope: float) -> torch.Tensor:
        """Action on the lower layer of a pair: the new V with  V' h = sigma^{-1}(g sigma(V h)).

        first_order (published): sigma^{-1}(g sigma(V h)) h^+  (at g = I this is V h h^+, the
        projection of V's rows onto span(h)). Exact modes: V + [sigma^{-1}(g sigma(V h)) - V h] h^+,
        which agrees with it on the batch, is the identity at g = I and is a group action
        (g2.(g1.V) = (g2 g1).V when h^+ h = I).
        """
        Z = V @ h
        target = _act_inv(g @ _act(Z, slope), slope)
        hp = torch.linalg.pinv(h)
        if self.action == "first_order":
            return target @ hp
        return V + (target - Z) @ hp


class SymmetryTeleportCallback(LevelSetTeleportCallback):
    """Trainer callback running :class:`SymmetryTeleport` on a schedule (same options and events
    as ``NullSpaceTeleportCallback``; keywords not of :class:`LevelSetTeleportCallback` go to
    :class:`SymmetryTeleport`). Default ``batch_size=None``: ``SymmetryTeleport.default_batch_size``
    (min(32, D // 2), D the smallest layer-pair input dimension), since the exact action needs
    n < D."""

    def __init__(self, teleporter: SymmetryTeleport | None = None, **kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in LevelSetTeleportCallback.OPTIONS}
        own.setdefault("batch_size", None)  # SymmetryTeleport.default_batch_size: n below the layer widths
        super().__init__(teleporter if teleporter is not None else SymmetryTeleport(**kwargs), **own)
        if teleporter is not None and kwargs:
            raise TypeError(f"pass either a teleporter or its options, not both: {sorted(kwargs)}")
