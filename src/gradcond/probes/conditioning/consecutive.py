"""The free in-training step-consistency κ≈_W (notes §1.2; seed 004 eq. 2.24 with n = 1, i ≠ j) from two
successive optimizer steps: the pure :func:`consecutive_ratio`, the one-off :func:`consecutive_step_consistency`
(on copies of model and optimizer) and the training callback :class:`ConsecutiveStepConsistency`.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from gradcond.probes.conditioning.common import (
    Result,
    Timer,
    check_finite,
    check_int,
    check_nonzero,
    mask_select,
    take_batches,
)
from gradcond.probes.flat_vectors import weight_vector
from gradcond.utils import accepts_model_output

__all__ = ["consecutive_ratio", "consecutive_step_consistency", "ConsecutiveStepConsistency"]


def consecutive_ratio(g_prev: torch.Tensor, g_curr: torch.Tensor, delta_w: torch.Tensor, w_prev: torch.Tensor,
                      mask=None) -> float:
    """Free in-training κ≈_W (notes §1.2; eq. 2.24 with n = 1, i ≠ j): ‖g_curr − g_prev‖·‖w_prev‖ / (‖Δw‖·‖g_prev‖),
    with the *actual* step Δw (so it is valid for momentum/Adam; for plain SGD ‖Δw‖ = lr‖g_prev‖). Flat vectors;
    ``mask`` (a LayerwiseMask) selects gradient coordinates only."""
    gp, gc = g_prev, g_curr
    if mask is not None:
        gp, gc = mask.apply(gp), mask.apply(gc)
    for v, what in ((gp, "the previous gradient"), (gc, "the current gradient"), (delta_w, "the weight step")):
        check_finite(v, what)
    check_nonzero(gp.norm(), "the previous gradient")
    check_nonzero(delta_w.norm(), "the weight step Δw")
    return float((gc - gp).norm() * w_prev.norm() / (delta_w.norm() * gp.norm()))


def _clone_optimizer(opt: torch.optim.Optimizer, model_copy: nn.Module, model: nn.Module) -> torch.optim.Optimizer:
    index = {id(p): i for i, p in enumerate(model.parameters())}
    params_copy = list(model_copy.parameters())
    groups = []
    for g in opt.param_groups:
        try:
            ps = [params_copy[index[id(p)]] for p in g["params"]]
        except KeyError:
            raise ValueError("the optimizer holds parameters that are not in the model.") from None
        groups.append({**{k: v for k, v in g.items() if k != "params"}, "params": ps})
    new = type(opt)(groups, **opt.defaults)
    new.load_state_dict(copy.deepcopy(opt.state_dict()))
    return new


@accepts_model_output
def consecutive_step_consistency(
    model: nn.Module,
    loss_fn: Callable,
    batch_or_loader,
    *,
    optimizer: torch.optim.Optimizer,
    mask=None,
) -> Result:
    """κ≈_W from two successive optimizer steps (notes §1.2, the thesis's free variant; not a joint W×X measure).

    On a deep copy of ``model`` and ``optimizer`` (the originals are untouched): gradient g_0 on batch χ_0 at w_0,
    one optimizer step to w_1, gradient g_1 on batch χ_1 at w_1; value = :func:`consecutive_ratio`. χ_0, χ_1 are the
    first two batches of a loader, or the same batch twice when a single batch is given. The gradients are ordinary
    training gradients (``loss_fn(model(x), y).backward()`` in the model's own mode, e.g. train-mode BatchNorm).
    Cost: two forward+backward passes and one optimizer step.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}.")
    with Timer() as t:
        batches = take_batches(batch_or_loader, 2, "consecutive_step_consistency")
        if len(batches) == 1:
            batches = batches * 2
        if mask is not None:
            mask_select(mask, model)
        mc = copy.deepcopy(model)
        oc = _clone_optimizer(optimizer, mc, model)
        dtype = next(mc.parameters()).dtype

        def grad_at(x, y):
            oc.zero_grad(set_to_none=False)
            x = x.to(dtype) if x.is_floating_point() else x
            loss_fn(mc(x), y).backward()
            return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                              for p in mc.parameters() if p.requires_grad]).clone()

        w0 = weight_vector(mc)
        g0 = grad_at(*batches[0])
        check_finite(g0, "the first gradient")
        oc.step()
        w1 = weight_vector(mc)
        g1 = grad_at(*batches[1])
        value = consecutive_ratio(g0, g1, w1 - w0, w0, mask)
    return Result(value, {"step_norm": float((w1 - w0).norm()), "g_prev_norm": float(g0.norm())}, 1,
                  int(batches[0][0].shape[0]), None, None if mask is None else mask.fraction, t.seconds,
                  "consecutive_step_consistency")


from gradcond.callbacks import Callback


class ConsecutiveStepConsistency(Callback):
    """Training callback logging the free κ≈_W every ``every`` steps (probe "conditioning", name
    "consecutive_step_consistency"). Records w before each step and the gradient left in ``p.grad`` after it, so
    κ at step t uses (g_{t-1}, g_t, Δw_{t-1} = w_t − w_{t-1}, w_{t-1}). Cost: two flat copies of the weights per step.
    Values are also kept in ``self.values`` as (step, value)."""

    def __init__(self, every: int = 1, mask=None):
        check_int("every", every)
        self.every, self.mask = every, mask
        self.values: list[tuple[int, float]] = []
        self._prev = None  # (w_before, g, w_after)

    def on_step_start(self, state) -> None:
        self._w_before = weight_vector(state.model)

    def on_step_end(self, state) -> None:
        ps = [p for p in state.model.parameters() if p.requires_grad]
        if any(p.grad is None for p in ps):
            self._prev = None
            return
        g = torch.cat([p.grad.detach().reshape(-1) for p in ps]).clone()
        w_after = weight_vector(state.model)
        prev, self._prev = self._prev, (self._w_before, g, w_after)
        if prev is None or state.step % self.every:
            return
        w_prev, g_prev, w_prev_after = prev
        if not torch.equal(w_prev_after, self._w_before):  # weights changed between steps (e.g. teleport)
            return
        try:
            v = consecutive_ratio(g_prev, g, w_prev_after - w_prev, w_prev, self.mask)
        except ValueError:
            v = float("nan")
        self.values.append((state.step, v))
        if hasattr(state, "log_metric"):
            state.log_metric("conditioning", "consecutive_step_consistency", v)

    def state_dict(self) -> dict:
        return {"values": list(self.values)}

    def load_state_dict(self, d: dict) -> None:
        self.values = [tuple(v) for v in d.get("values", [])]
