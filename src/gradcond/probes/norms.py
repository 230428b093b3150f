"""Per-layer weight and gradient norms, and the relative update size, from rank-local values (issue 24).

One implementation for a single process, DDP and FSDP2: each layer's sum of squares is taken over the rank-local
tensor (:func:`gradcond.distributed.local_tensor`: the shard of a ``DTensor`` parameter or gradient, the whole tensor
otherwise), the sums of sharded tensors are added over the ranks with **one** all-reduce of a packed float64 vector
(:func:`gradcond.distributed.all_reduce_sum`), and replicated tensors (DDP replicas, whose gradients DDP has already
averaged) are counted once. No parameter or gradient is gathered. Sums of squares accumulate in float64 whatever the
parameter dtype (bf16/fp16 models included).

A "layer" is a module owning a ``weight`` parameter of dimension >= 2 (Linear, Conv, Embedding, GPT-2's Conv1D...),
named by its module name (``"<root>"`` for the root).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import distributed as D

__all__ = ["weight_layers", "layer_norms", "snapshot_weights", "update_norms", "gradients_finite"]


def weight_layers(model: nn.Module):
    """(module name, weight) for every module owning a ``weight`` parameter of dim >= 2 (Linear, Conv, Embedding...),
    in module order (a weight shared by several modules, e.g. tied embeddings, is listed under each name)."""
    for name, mod in model.named_modules():
        w = getattr(mod, "weight", None)
        if isinstance(w, nn.Parameter) and w.dim() >= 2:
            yield name or "<root>", w


def _squares(tensors: list[torch.Tensor | None]) -> list[torch.Tensor]:
    """Sums of squares (float64, on the CPU) of the rank-local parts of ``tensors`` (None or empty: 0): one fused
    ``torch._foreach_norm`` per device and one host transfer, instead of a kernel chain and a sync per tensor."""
    out = [torch.zeros((), dtype=torch.float64)] * len(tensors)
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t is None:
            continue
        loc = D.local_tensor(t).detach()
        if loc.numel():
            groups.setdefault(loc.device, []).append((i, loc))
    for items in groups.values():
        norms = torch.stack(torch._foreach_norm([t for _, t in items], 2, dtype=torch.float64)).cpu()
        for (i, _), n in zip(items, norms.pow(2)):
            out[i] = n
    return out


def _reduced(pairs: list[tuple[torch.Tensor, bool]]) -> list[float]:
    """Sums of squares, those of sharded tensors added over the ranks in one all-reduce."""
    vals = [v for v, _ in pairs]
    idx = [i for i, (_, sharded) in enumerate(pairs) if sharded]
    if idx and D.active():
        packed = D.all_reduce_sum(torch.stack([vals[i] for i in idx]))
        for j, i in enumerate(idx):
            vals[i] = packed[j]
    return [float(v) for v in vals]


def layer_norms(model: nn.Module) -> dict[str, dict[str, float]]:
    """Per layer: ``weight_norm`` = ||W||_F and, where the weight has a gradient, ``grad_norm`` = ||dL/dW||_F (the
    ``.grad`` left by the last backward). Collective under FSDP2 (every rank must call it); cost: one fused norm
    kernel over the rank-local weights and gradients (float64 accumulation), one host transfer, and one all-reduce of
    2 floats per sharded layer."""
    layers = list(weight_layers(D.unwrap(model)))
    tensors, sharded = [], []
    for _, w in layers:
        s = D.is_sharded(w)
        tensors += [w, w.grad]
        sharded += [s, s]
    sq = _squares(tensors)
    vals = _reduced(list(zip(sq, sharded)))
    out = {}
    for i, (name, w) in enumerate(layers):
        out[name] = {"weight_norm": math.sqrt(vals[2 * i])}
        if w.grad is not None:
            out[name]["grad_norm"] = math.sqrt(vals[2 * i + 1])
    return out


def snapshot_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Rank-local copies of the layer weights (the shard under FSDP2), for :func:`update_norms` after an optimizer
    step. Memory: one copy of the rank's share of the layer weights."""
    return {name: D.local_tensor(w).detach().clone() for name, w in weight_layers(D.unwrap(model))}


def update_norms(model: nn.Module, before: dict[str, torch.Tensor]) -> dict[str, float]:
    """Relative update size per layer, ``||W_after - W_before||_F / ||W_before||_F``, from a :func:`snapshot_weights`
    taken before the optimizer step (layers missing from ``before`` are left out). Collective under FSDP2."""
    layers = [(n, w) for n, w in weight_layers(D.unwrap(model)) if n in before]
    tensors, sharded = [], []
    for name, w in layers:
        s = D.is_sharded(w)
        loc = D.local_tensor(w).detach()
        b = before[name].to(loc.device)
        tensors += [loc - b, b]
        sharded += [s, s]
    vals = _reduced(list(zip(_squares(tensors), sharded)))
    out = {}
    for i, (name, _) in enumerate(layers):
        d2, b2 = vals[2 * i], vals[2 * i + 1]
        if b2 > 0:
            out[name] = math.sqrt(d2) / math.sqrt(b2)
    return out


def gradients_finite(model: nn.Module) -> bool:
    """False when any parameter's ``.grad`` holds an inf or NaN on any rank -- the criterion by which a gradient
    scaler (``torch.amp.GradScaler``) skips an optimizer step. Collective under DDP/FSDP2 (one tiny all-reduce);
    cost: one pass over the rank-local gradients."""
    bad = False
    for p in D.unwrap(model).parameters():
        if p.grad is not None:
            g = D.local_tensor(p.grad)
            if g.numel() and not bool(torch.isfinite(g).all()):
                bad = True
                break
    return not D.all_agree(bad)
