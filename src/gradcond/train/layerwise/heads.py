"""Decision heads, gradient dropout and the input-dropout schedule of layer-wise training (seed 002 §6.2.2, §6.6.3).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from .memory import MemoryReport, memory_accounting


class GradientDropout(torch.autograd.Function):
    """Identity in the forward pass; dropout on the gradient in the backward pass (the thesis's "grad noise",
    §6.6.3, applied only to the gradient flowing from the decision head back into the trained block).

    ``GradientDropout.apply(x, p, rescale)``: each element of the incoming gradient is zeroed with probability
    ``p``; with ``rescale=True`` the kept ones are multiplied by ``1 / (1 - p)`` so that the gradient is unbiased
    (its expectation is unchanged), with ``rescale=False`` they are kept as they are (the expected gradient shrinks
    by ``1 - p``). The thesis does not say which it used; :func:`fit_layerwise` defaults to ``rescale=True``.
    The mask is drawn from the global torch generator of the gradient's device. Cost: one Bernoulli draw per
    gradient element.
    """

    @staticmethod
    def forward(ctx, x, p: float, rescale: bool):
        ctx.p, ctx.rescale = float(p), bool(rescale)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        p = ctx.p
        if p <= 0.0:
            return grad, None, None
        if p >= 1.0:
            return torch.zeros_like(grad), None, None
        keep = torch.empty_like(grad).bernoulli_(1.0 - p)
        if ctx.rescale:
            keep = keep / (1.0 - p)
        return grad * keep, None, None


def gradient_dropout(x: torch.Tensor, p: float, rescale: bool = True) -> torch.Tensor:
    """``x`` unchanged, with :class:`GradientDropout` (probability ``p``) on its gradient; ``p`` in [0, 1]."""
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"gradient dropout probability must be in [0, 1], got {p!r}.")
    return GradientDropout.apply(x, float(p), bool(rescale))


def input_dropout_p(epoch: int, p0: float = 0.8, decay: float = 0.95) -> float:
    """The input-dropout probability at 0-based ``epoch`` of a block's training: ``p0 * decay**epoch`` (§6.6.3 and
    Table 6.3: p0 = 0.8 by default, decaying by 0.95 after each epoch)."""
    return float(p0) * float(decay) ** int(epoch)


# ----------------------------------------------------------------------------------------------- decision heads


def head_configs(feature_shape: Sequence[int], max_decision_convs: int = 2) -> list[dict]:
    """The decision-head configurations for features of per-sample shape ``feature_shape``, richest first.

    Image features ``(C, H, W)``: ``n = max_decision_convs, ..., 1`` down-convs (3x3, stride 2, padding 1, C
    channels, each + ReLU; only as many as halve the smaller side while it is at least 2), then Flatten + Linear;
    then no conv (Flatten + Linear on the full map); last, global average pooling + Linear on C features (the
    cheapest head). Any other shape: Flatten + Linear (the single affine decision layer of Table 6.1's CNN-4).
    Each configuration is a dict ``{"convs": n, "pool": bool}``.
    """
    shape = tuple(int(s) for s in feature_shape)
    if len(shape) != 3:
        return [{"convs": 0, "pool": False}]
    h, w = shape[1], shape[2]
    possible = 0
    while possible < max_decision_convs and min(h, w) >= 2:
        h, w, possible = (h + 1) // 2, (w + 1) // 2, possible + 1
    configs = [{"convs": n, "pool": False} for n in range(possible, 0, -1)]
    configs.append({"convs": 0, "pool": False})
    if shape[1] * shape[2] > 1:
        configs.append({"convs": 0, "pool": True})
    return configs


def describe_head(config: dict) -> str:
    """A few words for a head configuration (used in messages and results)."""
    if config.get("pool"):
        return "global average pool + Linear"
    n, p = config["convs"], config.get("down_pool", 0)
    parts = [f"{p} down-pool(s)"] if p else []
    if n:
        width = config.get("width")
        kind = config.get("kind", "conv")
        what = "down-conv(s)" if kind == "conv" else "hidden Linear+ReLU layer(s)"
        parts.append(f"{n} {what}" + (f" of width {width}" if width is not None else ""))
    parts.append("Flatten + Linear" if not n or config.get("kind", "conv") == "conv" else "Linear")
    return " + ".join(parts)


def make_head(feature_shape: Sequence[int], num_classes: int, config: dict, dtype=None, device=None) -> nn.Module:
    """The ``nn.Sequential`` decision head of one configuration (:func:`head_configs`, :func:`search_head`).

    Keys: ``convs`` (number of down-convs -- 3x3, stride 2, padding 1, each + ReLU -- for image features, or of
    hidden Linear + ReLU layers for flat features), ``width`` (their channels / units; default: the feature's
    channels / size), ``down_pool`` (2x2 max-pools before the convs, default 0), ``pool`` (global average pool +
    Linear instead)."""
    shape = tuple(int(s) for s in feature_shape)
    layers: list[nn.Module] = []
    if config.get("pool"):
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(shape[0], num_classes)]
    elif len(shape) == 3:
        c, h, w = shape
        for _ in range(config.get("down_pool", 0)):
            layers.append(nn.MaxPool2d(2, ceil_mode=True))
            h, w = (h + 1) // 2, (w + 1) // 2
        width = config.get("width") or c
        for _ in range(config["convs"]):
            layers += [nn.Conv2d(c, width, 3, stride=2, padding=1), nn.ReLU()]
            c = width
            h, w = (h + 1) // 2, (w + 1) // 2
        layers += [nn.Flatten(), nn.Linear(c * h * w, num_classes)]
    else:
        n_in = 1
        for s in shape:
            n_in *= s
        layers.append(nn.Flatten())
        width = config.get("width") or n_in
        for _ in range(config["convs"]):
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        layers.append(nn.Linear(n_in, num_classes))
    return nn.Sequential(*layers).to(dtype=dtype or torch.get_default_dtype(), device=device)


class NoHeadFits(ValueError):
    """No decision-head configuration meets the memory budget."""


def choose_head(feature_shape, num_classes: int, measure: Callable[[nn.Module], MemoryReport], budget: float | None,
                *, max_decision_convs: int = 2, dtype=None, device=None,
                describe_budget: Callable[[int], str] | None = None) -> tuple[nn.Module, dict, MemoryReport | None]:
    """The richest head (:func:`head_configs` order) whose ``measure(head).total <= budget`` bytes.

    Returns ``(head, config, report)`` (``report`` None when ``budget`` is None: then the richest head is taken
    without measuring). Raises :class:`NoHeadFits` naming the cheapest head's need and the budget when none fits.
    """
    configs = head_configs(feature_shape, max_decision_convs)
    if budget is None:
        return make_head(feature_shape, num_classes, configs[0], dtype, device), configs[0], None
    best = None
    for config in configs:
        head = make_head(feature_shape, num_classes, config, dtype, device)
        report = measure(head)
        if report.total <= budget:
            return head, config, report
        if best is None or report.total < best[1].total:
            best = (config, report)
    config, report = best
    what = describe_budget(report.total) if describe_budget else (
        f"needs {report.total} bytes per training step but the budget is {int(budget)} bytes; raise memory_budget or "
        "lower the batch size.")
    raise NoHeadFits(f"no decision head meets the memory budget: the cheapest ({describe_head(config)}) {what}")


def search_head(feature_shape, num_classes: int, measure: Callable[[nn.Module], MemoryReport], reference: int,
                target: float, tolerance: float = 0.005, *, max_decision_convs: int = 4, max_down_pools: int = 2,
                dtype=None, device=None) -> tuple[nn.Module, dict, MemoryReport, list[dict]]:
    """Decision-block search with a memory *target* (§6.2.2, Table 6.3: "searching for a suitable decision-block
    configuration that meets the memory restriction of 30 +- 0.5 %").

    ``measure(head)`` gives the step's :class:`MemoryReport`; ``reference`` is the bytes the target is a fraction
    of (full backprop's peak); the band is ``[target - tolerance, target + tolerance]``.  The search covers the
    head's **depth** (0 .. ``max_decision_convs`` down-convs, or hidden Linear layers for flat features), its
    **width** (channels / units of those layers: for each depth and down-pooling, a bisection for the widest head
    under the band's top, since memory grows with width) and **down-pooling** (0 .. ``max_down_pools`` 2x2
    max-pools before the convs, image features only), plus the fixed heads without convs (flatten + linear, global
    average pool).  Choice: among heads inside the band, the deepest, then the one with the fewest down-pools, then
    the widest; when none lands inside the band (the block and its feednet alone are too large, or every head is
    too small), the head closest below the top of the band -- then the target is missed and the log says so.  No
    head under the top of the band raises :class:`NoHeadFits`.

    Returns ``(head, config, report, log)``; ``log`` lists every configuration measured (``config``, ``bytes``,
    ``ratio``) and, last, the choice (``chosen``, ``ratio``, ``in_band``, ``reason``).  Cost: one forward + backward
    per configuration measured -- about ``(depths x down-pools) x log2(4 x width)`` of them.
    """
    shape = tuple(int(s) for s in feature_shape)
    image = len(shape) == 3
    base = shape[0] if image else int(torch.tensor(shape).prod())
    lo_band, hi_band = target - tolerance, target + tolerance
    log: list[dict] = []
    cache: dict[str, tuple[nn.Module, MemoryReport]] = {}

    def run(config: dict) -> tuple[nn.Module, MemoryReport, float]:
        key = str(sorted(config.items()))
        if key not in cache:
            head = make_head(shape, num_classes, config, dtype, device)
            cache[key] = (head, measure(head))
            rep = cache[key][1]
            log.append({"config": dict(config), "bytes": rep.total, "ratio": rep.total / reference})
        head, rep = cache[key]
        return head, rep, rep.total / reference

    fixed: list[dict] = []
    families: list[dict] = []
    if image:
        h, w = shape[1], shape[2]
        for p in range(max_down_pools + 1):
            hp, wp = h, w
            for _ in range(p):
                hp, wp = (hp + 1) // 2, (wp + 1) // 2
            if p and min(h, w) < 2 ** p:
                break
            fixed.append({"convs": 0, "pool": False, "down_pool": p, "kind": "conv"})
            depth, hh, ww = 0, hp, wp
            while depth < max_decision_convs and min(hh, ww) >= 2:
                hh, ww, depth = (hh + 1) // 2, (ww + 1) // 2, depth + 1
                families.append({"convs": depth, "pool": False, "down_pool": p, "kind": "conv"})
        if shape[1] * shape[2] > 1:
            fixed.append({"convs": 0, "pool": True, "kind": "conv"})
    else:
        fixed.append({"convs": 0, "pool": False, "kind": "linear"})
        families += [{"convs": d, "pool": False, "kind": "linear"} for d in range(1, max_decision_convs + 1)]
    points: list[tuple[dict, float]] = []
    for cfg in fixed:
        _, _, r = run(cfg)
        points.append((cfg, r))
    for fam in families:
        lo, hi = 1, 4 * base
        _, _, r_lo = run({**fam, "width": lo})
        if r_lo > hi_band:
            continue  # even the narrowest head of this depth is over the band
        _, _, r_hi = run({**fam, "width": hi})
        if r_hi <= hi_band:
            lo = hi
        else:
            while hi - lo > 1:  # largest width under the top of the band (memory grows with the width)
                mid = (lo + hi) // 2
                _, _, r_mid = run({**fam, "width": mid})
                if r_mid <= hi_band:
                    lo = mid
                else:
                    hi = mid
        cfg = {**fam, "width": lo}
        points.append((cfg, run(cfg)[2]))
    feasible = [(c, r) for c, r in points if r <= hi_band]
    if not feasible:
        cheapest = min(log, key=lambda e: e["bytes"])
        raise NoHeadFits(f"no decision head meets the memory target of {100 * target:g} +- {100 * tolerance:g} % of "
                         f"full backprop: the cheapest ({describe_head(cheapest['config'])}) needs "
                         f"{100 * cheapest['ratio']:.1f} %; raise the target or lower the batch size.")
    in_band = [(c, r) for c, r in feasible if r >= lo_band]

    def richness(item):
        c, r = item
        return (c["convs"], -c.get("down_pool", 0), c.get("width") or 0, r)

    if in_band:
        cfg, r = max(in_band, key=richness)
        reason = f"in the band {100 * lo_band:.1f}-{100 * hi_band:.1f} %: the deepest, least pooled, widest head"
    else:
        cfg, r = max(feasible, key=lambda item: (item[1], richness(item)))
        reason = (f"no head lands in the band {100 * lo_band:.1f}-{100 * hi_band:.1f} %; the closest below it "
                  f"({100 * r:.1f} %): target missed")
    head, rep, _ = run(cfg)
    log.append({"chosen": dict(cfg), "ratio": r, "in_band": bool(in_band), "reason": reason})
    return head, cfg, rep, log


def build_head(feature_shape: Sequence[int], num_classes: int, *, max_decision_convs: int = 2,
               memory_budget: int | None = None, batch_size: int = 128, optimizer: str = "adamw",
               dtype=None, device=None) -> nn.Module:
    """An auto-built decision head for features of per-sample shape ``feature_shape`` (§6.2.2 "decision block").

    ``feature_shape``: a block's output shape without the batch dimension, e.g. ``(32, 8, 8)`` or ``(128,)``.
    Without ``memory_budget`` the richest configuration of :func:`head_configs` is built (``max_decision_convs``
    stride-2 down-convs keeping the channel count, then Flatten + Linear; flat features get one Linear). With
    ``memory_budget`` (bytes) the richest head whose own training step on a batch of ``batch_size`` samples fits
    is chosen, as counted by :func:`memory_accounting` (parameters, gradients, ``optimizer`` state, saved
    activations); :func:`fit_layerwise` instead budgets the whole subnet (feednet + block + head) against a
    fraction of full backprop. No configuration fitting raises ``ValueError`` (:class:`NoHeadFits`): "no decision
    head meets the memory budget: the cheapest (...) needs N bytes per training step but the budget is B bytes;
    raise memory_budget or lower the batch size." Cost: one forward + backward per configuration tried.
    """
    shape = tuple(int(s) for s in feature_shape)
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"feature_shape must be a non-empty tuple of positive sizes, got {feature_shape!r}.")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}.")
    if isinstance(max_decision_convs, bool) or not isinstance(max_decision_convs, int) or max_decision_convs < 0:
        raise ValueError(f"max_decision_convs must be an integer >= 0, got {max_decision_convs!r}.")
    if memory_budget is not None and not (isinstance(memory_budget, (int, float)) and memory_budget > 0):
        raise ValueError(f"memory_budget must be a positive number of bytes, got {memory_budget!r}.")
    dtype = dtype or torch.get_default_dtype()

    def measure(head):
        x = torch.zeros((batch_size,) + shape, dtype=dtype, device=device)
        y = torch.zeros(batch_size, dtype=torch.long, device=device)
        return memory_accounting(head, (x, y), optimizer=optimizer)

    head, _, _ = choose_head(shape, num_classes, measure, memory_budget, max_decision_convs=max_decision_convs,
                             dtype=dtype, device=device)
    return head
