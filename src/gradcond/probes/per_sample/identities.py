"""Step 3 of the per-sample path: the **identities** -- per-sample gradients, squared norms and Gram matrices of each
layer from its captured inputs and output gradients, without the b × P matrix ("ghost" norms; Goodfellow 2015,
Li et al. 2022 "mixed ghost clipping").

The capture (:mod:`gradcond.probes.per_sample.capture`) gives, from ONE batched forward and ONE backward, the inputs
``a`` and output gradients ``e = ∂(Σ_j ℓ_j)/∂out`` of every parameter-owning module. Because the measurement
treats samples independently (eval mode, BatchNorm statistics frozen or running), ``e_i = ∂ℓ_i/∂out_i``; every
per-sample parameter gradient of a supported layer is a per-sample contraction of ``a_i`` and ``e_i``, and so are its
squared norm and its inner products with the other samples' gradients. This module turns captured calls into
*factors* and reduces them to the per-sample squared norms ``‖h_i‖²`` (b,) and the Gram matrix ``⟨h_i, h_j⟩`` (b, b),
both accumulated in float64 over layers.

Identities (one factor per module; a module called several times adds its calls' gradients first)
------------------------------------------------------------------------------------------------
* **Linear** (inputs of any rank: positions ``t`` are all dims between batch and features), **Conv1d / Conv2d**
  (any stride, dilation, groups, padding, padding mode; patches from ``F.unfold`` on the padded input):
  with ``A`` (c, G, T, C) and ``E`` (c, G, T, O) per group ``g``, the per-sample weight gradient is
  ``Σ_t E_t A_tᵀ`` and

  - ``‖h_i‖² = Σ_g Σ_{t,s} (A_it·A_is)(E_it·E_is)`` (ghost; ``= ‖A_i‖²‖E_i‖²`` for T = 1), cost c·T²·(C+O), or the
    materialised per-layer gradient, cost c·T·O·C, whichever is cheaper;
  - ``⟨h_i, h_j⟩ = Σ_g Σ_{t,s} (A_it·A_js)(E_it·E_js)``, i.e. ``(A Aᵀ)∘(E Eᵀ)`` summed over position pairs
    (cost c²·T²·(C+O)), or the materialised per-layer gradients (cost c·T·O·C + c²·O·C), whichever is cheaper.
  Bias: ``Σ_t E_t``.
* **Embedding** (no ``max_norm``, no ``scale_grad_by_freq``): the per-sample gradient is non-zero only on the rows
  of the tokens the sample uses; it is formed on the batch's distinct tokens U only (c × |U| × D, never c × V × D),
  rows of ``padding_idx`` excluded.
* **BatchNorm** (eval / frozen statistics), **LayerNorm**, **GroupNorm** affine weight and bias: closed forms
  ``Σ e·x̂`` and ``Σ e`` (c × channels, tiny).

Anything else (a custom ``nn.Parameter`` in a bespoke op, Conv3d, attention, RNNs, ...) is a **fallback**: that module's
per-sample gradients are materialised by ``vmap`` of the ``vjp`` of the module alone, and its parameters are listed in
:attr:`PerSampleStats.fallback` with the reason. A model the layer path cannot handle at all (a parameter owned by the
root module or shared between modules, or read outside its module's forward) is measured by ``vmap(grad)`` of the
whole model; then every parameter is in ``fallback``.

First use on a model (:func:`validate`, once per model and parameter set): the
identities' per-sample gradients must sum to autograd's batch gradient and give sample 0 exactly its gradient when
evaluated alone, else the whole model falls back to ``vmap(grad)`` with the reason (a parameter read outside its module,
a layer whose dimension 0 is not the sample). Cost of that check: one backward to the parameters and one
forward+backward of a single sample.

Memory: besides the batch's activations and output gradients (what a training step holds), materialised layer
gradients are formed in chunks of about ``memory_bytes`` (at least one sample's gradient of one layer; on CPU at most
2^20 entries, which keeps a chunk in cache between the two GEMMs that write and read it), so memory does not grow
with b × P. BatchNorm in train mode couples the samples of a batch and per-sample gradients are not defined;
the Engine's ``bn`` policy decides (``"batch"``: statistics frozen from the batch, ``"eval"``: running statistics) and
buffers are never written.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from gradcond.probes.per_sample.plan import BN_TYPES, LayerPlan, Unsupported, mark_validated, plain_forward

__all__ = ["PerSampleStats", "assemble", "build_factors", "module_grads", "reduce_factors", "stats_from_calls",
           "validate", "whole_model_fallback"]


@dataclass
class PerSampleStats:
    """Per-sample gradient statistics of one batch (float64).

    sq_norms: (b,) ``‖h_W(w, x_i, t_i)‖²`` or None when not asked for; gram: (b, b) ``⟨h_i, h_j⟩`` or None;
    identities: parameter name -> the layer identity that gave its contribution (e.g. ``"Conv2d ghost"``);
    fallback: parameter name -> why its per-sample gradients had to be materialised (empty when every parameter has an
    identity); b: batch size; seconds: wall time.
    """

    sq_norms: torch.Tensor | None
    gram: torch.Tensor | None
    identities: dict[str, str] = field(default_factory=dict)
    fallback: dict[str, str] = field(default_factory=dict)
    b: int = 0
    seconds: float = 0.0

    @property
    def norms(self) -> torch.Tensor | None:
        """(b,) per-sample gradient norms ``‖h_i‖`` (float64), or None when ``sq_norms`` was not computed."""
        return None if self.sq_norms is None else self.sq_norms.sqrt()


# ---------------------------------------------------------------------------------------------------- factors


_CL_MIN_CHANNELS = 4  # input channels per group from which the channels-last patches are used (measured faster)


def conv_patches(mod: nn.Module, a: torch.Tensor) -> torch.Tensor | None:
    """Unfolded input patches (c, C_in·k, T) of a Conv1d/Conv2d call with input ``a`` — exactly the columns its weight
    multiplies (padding mode, string padding, stride and dilation applied) — or None for other convolutions."""
    if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or not plain_forward(mod) or getattr(mod, "transposed", False):
        return None
    k, dil, st = tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.stride)
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        # what the module's own forward does for non-zero modes; for padding='same' the same (left, right) amounts
        a = F.pad(a, mod._reversed_padding_repeated_twice,
                  mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
        pad = (0,) * len(k)
    else:
        pad = tuple(mod.padding)
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(2)
        k, dil, pad, st = (1,) + k, (1,) + dil, (0,) + pad, (1,) + st
    return F.unfold(a, k, dilation=dil, padding=pad, stride=st)


def _patches_channels_last(mod: nn.Module, a: torch.Tensor) -> torch.Tensor:
    """Input patches of a plain Conv1d/Conv2d call as (c, G, T, kh·kw·C_g) with the features ordered (kernel row,
    kernel column, channel) instead of ``F.unfold``'s (channel, kernel row, kernel column): a strided view of the padded
    input in channels-last layout copied once, whose contiguous runs are C_g channels long. Measured on one core, b = 64:
    2-3x faster than ``F.unfold`` for C_g >= 16 (e.g. 64 × 8 × 8 input, 3 × 3 kernel: 0.96 ms vs 3.2 ms), slower for
    C_g = 1. Norms and Gram matrices do not depend on the order of the features; :func:`_lin_sum` restores the
    weight's own order."""
    k, dil, st = tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.stride)
    if mod.padding_mode != "zeros" or isinstance(mod.padding, str):
        a = F.pad(a, mod._reversed_padding_repeated_twice,
                  mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    elif any(mod.padding):
        a = F.pad(a, mod._reversed_padding_repeated_twice)
    if isinstance(mod, nn.Conv1d):
        a = a.unsqueeze(2)
        k, dil, st = (1,) + k, (1,) + dil, (1,) + st
    a = a.permute(0, 2, 3, 1).contiguous()  # (c, H, W, C)
    c, H, W, C = a.shape
    G = mod.groups
    Ho = (H - dil[0] * (k[0] - 1) - 1) // st[0] + 1
    Wo = (W - dil[1] * (k[1] - 1) - 1) // st[1] + 1
    s0, s1, s2, s3 = a.stride()
    v = a.as_strided((c, Ho, Wo, G, k[0], k[1], C // G),
                     (s0, s1 * st[0], s2 * st[1], s3 * (C // G), s1 * dil[0], s2 * dil[1], s3))
    return v.reshape(c, Ho * Wo, G, -1).transpose(1, 2)


class _Lin:
    """Per-sample weight gradient Σ_t E_t A_tᵀ per group: A (c, G, T, C), E (c, G, T, O). ``kshape``: None when A's
    features are in the weight's own order, else (kh, kw, C_g) for patches ordered (kernel row, column, channel).
    ``vec``: for a Linear call on one vector per sample, the (c, C) and (c, O) matrices themselves (T = G = 1), from
    which A and E are made only when asked for (the reductions use the matrices: fewer kernels for small MLPs)."""

    def __init__(self, A, E, weight, bias, label, kshape=None, vec=None):
        self._A, self._E, self.weight, self.bias, self.label, self.kshape, self.vec = A, E, weight, bias, label, kshape, vec

    @property
    def A(self):
        if self._A is None:
            self._A = self.vec[0][:, None, None, :]
        return self._A

    @property
    def E(self):
        if self._E is None:
            self._E = self.vec[1][:, None, None, :]
        return self._E

    def add(self, other: "_Lin") -> None:  # another call of the same module: its positions add up
        self._A = torch.cat([self.A, other.A], 2)
        self._E = torch.cat([self.E, other.E], 2)
        self.vec = None


def lin_factor(mod: nn.Module, args: tuple, e: torch.Tensor, local: dict) -> _Lin | None:
    """The :class:`_Lin` factor of one Linear / Conv1d / Conv2d call, or None when the module is not one of them."""
    if len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    a, c = args[0], e.shape[0]
    if not plain_forward(mod):
        return None
    if isinstance(mod, nn.Linear):
        if a.ndim == 2:
            return _Lin(None, None, local.get("weight"), local.get("bias"), "Linear", vec=(a, e))
        A = a.reshape(c, 1, -1, a.shape[-1])
        E = e.reshape(c, 1, -1, e.shape[-1])
        label = "Linear"
    else:
        if not isinstance(mod, (nn.Conv1d, nn.Conv2d)) or getattr(mod, "transposed", False):
            return None
        G = mod.groups
        kshape = None
        if a.shape[1] // G >= _CL_MIN_CHANNELS:
            A = _patches_channels_last(mod, a)
            k = tuple(mod.kernel_size)
            kshape = ((1,) + k if len(k) == 1 else k) + (a.shape[1] // G,)
        else:
            U = conv_patches(mod, a)
            if U is None:
                return None
            # unfold orders patch rows (channel, kernel offsets): group g's rows are a contiguous block, as are its
            # output channels, so each group is its own Σ_t E_t A_tᵀ
            A = U.reshape(c, G, U.shape[1] // G, U.shape[2]).transpose(2, 3)
        E = e.reshape(c, G, e.shape[1] // G, -1).transpose(2, 3)
        label = type(mod).__name__ + (f" groups={G}" if G > 1 else "")
        return _Lin(A, E, local.get("weight"), local.get("bias"), label, kshape)
    return _Lin(A, E, local.get("weight"), local.get("bias"), label)


class _Emb:
    """Embedding call: token ids (c, T) and output gradients (c, T, D) (rows of ``padding_idx`` zeroed)."""

    def __init__(self, idx, E, weight):
        self.idx, self.E, self.weight = idx, E, weight

    def add(self, other: "_Emb") -> None:
        self.idx = torch.cat([self.idx, other.idx], 1)
        self.E = torch.cat([self.E, other.E], 1)


def emb_factor(mod: nn.Module, args: tuple, e: torch.Tensor, local: dict) -> _Emb | None:
    """The :class:`_Emb` factor of one plain Embedding call (no max_norm, no frequency scaling), or None."""
    if (not isinstance(mod, nn.Embedding) or not plain_forward(mod) or len(args) != 1 or mod.max_norm is not None
            or mod.scale_grad_by_freq or "weight" not in local):
        return None
    c = e.shape[0]
    idx = args[0].reshape(c, -1)
    E = e.reshape(c, -1, e.shape[-1])
    if mod.padding_idx is not None:  # the padding row gets no gradient
        E = E * (idx != mod.padding_idx).unsqueeze(-1).to(E.dtype)
    return _Emb(idx, E, local["weight"])


def norm_grads(mod: nn.Module, args: tuple, e: torch.Tensor, local: dict, buffers: dict, name: str):
    """Closed-form per-sample gradients {full name: (c, k)} of the affine parameters of a BatchNorm (eval mode / frozen
    statistics), LayerNorm or GroupNorm call, or None for other modules."""
    if len(args) != 1 or not plain_forward(mod):
        return None
    a = args[0]
    c = e.shape[0]
    if isinstance(mod, nn.modules.batchnorm._BatchNorm) and not mod.training:
        shape = [1, -1] + [1] * (a.ndim - 2)
        pre = f"{name}." if name else ""
        mean, var = buffers[pre + "running_mean"].view(shape), buffers[pre + "running_var"].view(shape)
        xhat = (a - mean) * torch.rsqrt(var + mod.eps)
        dims = tuple(range(2, a.ndim))
    elif isinstance(mod, nn.LayerNorm):
        nd = len(mod.normalized_shape)
        xhat = F.layer_norm(a, mod.normalized_shape, None, None, mod.eps)
        dims = tuple(range(1, a.ndim - nd))
    elif isinstance(mod, nn.GroupNorm):
        xhat = F.group_norm(a, mod.num_groups, None, None, mod.eps)
        dims = tuple(range(2, a.ndim))
    else:
        return None
    out = {}
    if "weight" in local:
        g = e * xhat
        out[local["weight"]] = (g.sum(dims) if dims else g).reshape(c, -1)
    if "bias" in local:
        out[local["bias"]] = (e.sum(dims) if dims else e).reshape(c, -1)
    return out


# ---------------------------------------------------------------------------------------------------- reductions


# materialised layer gradients are formed and reduced in chunks of at most this many entries (4 MiB in float32): a
# chunk that stays in cache between the GEMM that writes it and the one that reads it back. Measured on one core for
# b = 64: a (64, 128 × 1152) Gram 37 ms in one piece, 22-31 ms in chunks of about 2^20 entries; (64, 64 × 576)
# 8.2 ms vs 8.9 ms. CPU only: a GPU has no such cache to fit and would only get more launches
_CACHE_ELEMS = 2 ** 20


def _cache_budget(budget: int, t: torch.Tensor) -> int:
    """The chunk size in entries for materialised layer gradients: ``budget``, capped at :data:`_CACHE_ELEMS` on CPU."""
    return min(budget, _CACHE_ELEMS) if t.device.type == "cpu" else budget


def _chunk(n: int, step: int) -> int:
    """A step of at most ``max(1, step)`` that splits ``n`` items into chunks of (nearly) equal size."""
    step = max(1, step)
    k = -(-n // step)
    return -(-n // k)


def _lin_sq_norms(A, E, budget: int, bias: bool = False) -> torch.Tensor:
    """(c,) float64 ‖Σ_t E_t A_tᵀ‖² summed over groups (+ ‖Σ_t E_t‖² with ``bias``: the bias acts as an input
    feature that is always 1, so in the ghost forms it adds 1 to every A_t·A_s)."""
    c, G, T, C = A.shape
    O = E.shape[3]
    one = 1.0 if bias else 0.0
    if T == 1:
        return (((A[:, :, 0] * A[:, :, 0]).sum(2, dtype=torch.float64) + one)
                * (E[:, :, 0] * E[:, :, 0]).sum(2, dtype=torch.float64)).sum(1)
    out = torch.empty(c, dtype=torch.float64, device=A.device)
    if T * (C + O) <= O * C:  # ghost: Σ_{t,s} (A_t·A_s)(E_t·E_s), c·G·T² entries at a time per chunk
        step = max(1, budget // (G * T * T))
        for s in range(0, c, step):
            a, ee = A[s:s + step], E[s:s + step]
            ka = a @ a.mT
            out[s:s + step] = ((ka + one if bias else ka) * (ee @ ee.mT)).sum((2, 3), dtype=torch.float64).sum(1)
        return out
    # materialised per-layer gradients, a chunk of samples at a time (cache-sized chunks, see _chunk)
    step = _chunk(c, _cache_budget(budget, A) // (G * O * C))
    for s in range(0, c, step):
        g = E[s:s + step].mT @ A[s:s + step]  # (c', G, O, C)
        out[s:s + step] = (g * g).sum((1, 2, 3), dtype=torch.float64)
    if bias:
        bs = E.sum(2)
        out += (bs * bs).sum((1, 2), dtype=torch.float64)
    return out


def _lin_gram(A, E, budget: int, bias: bool = False) -> torch.Tensor:
    """(c, c) float64 Gram of the per-sample gradients Σ_t E_t A_tᵀ (summed over groups; bias included with
    ``bias``), by the cheaper of the ghost and the materialised form (module docstring)."""
    c, G, T, C = A.shape
    O = E.shape[3]
    if T == 1:
        if G == 1:  # plain 2-D products (the batched form costs a few dispatches more; matters for small MLPs)
            a, ee = A[:, 0, 0], E[:, 0, 0]
            ka = a @ a.T
            if bias:
                ka += 1
            return ka.mul_(ee @ ee.T).double()
        a, ee = A[:, :, 0].transpose(0, 1), E[:, :, 0].transpose(0, 1)  # (G, c, C)
        ka = a @ a.mT
        return ((ka + 1 if bias else ka).double() * (ee @ ee.mT).double()).sum(0)
    if c * T * T * (C + O) <= T * O * C + c * O * C:
        # ghost: ⟨h_i, h_j⟩ = Σ_{t,s} (A_it·A_js)(E_it·E_js), a block of samples i against all j at a time
        Af = A.transpose(0, 1).reshape(G, c * T, C)
        Ef = E.transpose(0, 1).reshape(G, c * T, O)
        out = torch.empty(c, c, dtype=torch.float64, device=A.device)
        step = max(1, budget // (G * c * T * T))
        for s in range(0, c, step):
            n = min(step, c - s)
            ka = Af[:, s * T:(s + n) * T] @ Af.mT
            if bias:
                ka += 1
            # in place and one position axis at a time: a third faster than one multi-axis float64 reduction
            out[s:s + n] = ka.mul_(Ef[:, s * T:(s + n) * T] @ Ef.mT).reshape(G, n, T, c, T).sum(4).sum(2).sum(0)
        return out
    # materialised per-layer gradients, a block of output rows at a time (all samples, so the Gram is exact)
    out = torch.zeros(c, c, dtype=torch.float64, device=A.device)
    step = _chunk(O, _cache_budget(budget, A) // (c * G * C))
    for s in range(0, O, step):
        g = (E[..., s:s + step].mT @ A).reshape(c, -1)
        out += _sym_gram(g).double()
    if bias:
        bs = E.sum(2).reshape(c, -1)
        out += (bs @ bs.T).double()
    return out


def _sym_gram(M: torch.Tensor) -> torch.Tensor:
    """``M Mᵀ`` of a (c, k) matrix with long rows from its upper triangle of row blocks (4 blocks: 10 of the 16 block
    products; measured on one core, (64, 4608): 0.37 ms instead of 0.45 ms), mirrored; plain ``M Mᵀ`` for short M."""
    c = M.shape[0]
    if c < 32 or M.shape[1] < 4 * c or M.device.type != "cpu":
        return M @ M.T
    s = -(-c // 4)
    out = torch.empty(c, c, dtype=M.dtype, device=M.device)
    for a in range(0, c, s):
        blk = M[a:a + s] @ M[a:].T  # rows a.., columns a.. (the diagonal block and those to its right)
        out[a:a + s, a:] = blk
        out[a + s:, a:a + s] = blk[:, s:].T
    return out


def _lin_sum(f: _Lin):
    """(Σ_i weight gradient (G·O, C), Σ_i |per-sample weight gradient| bound, Σ_i bias grad, its |·| bound)."""
    c, G, T, C = f.A.shape
    O = f.E.shape[3]
    Af = f.A.transpose(0, 1).reshape(G, c * T, C)
    Ef = f.E.transpose(0, 1).reshape(G, c * T, O)
    w = (Ef.mT @ Af).reshape(G * O, C)
    wa = (Ef.abs().mT @ Af.abs()).reshape(G * O, C)
    if f.kshape is not None:  # features (kernel row, column, channel) back to the weight's (channel, row, column)
        w = w.reshape(G * O, *f.kshape).permute(0, 3, 1, 2).reshape(G * O, C)
        wa = wa.reshape(G * O, *f.kshape).permute(0, 3, 1, 2).reshape(G * O, C)
    return w, wa, Ef.sum(1).reshape(-1), Ef.abs().sum(1).reshape(-1)


def _emb_rows(f: _Emb, d0: int, d1: int):
    """Per-sample gradients of the embedding restricted to the batch's distinct tokens, columns d0:d1: (c, |U|, d)."""
    c, T = f.idx.shape
    uniq, inv = torch.unique(f.idx, return_inverse=True)
    k = uniq.numel()
    rows = (torch.arange(c, device=inv.device).unsqueeze(1) * k + inv).reshape(-1)
    E = f.E[..., d0:d1].reshape(c * T, d1 - d0)
    return torch.zeros(c * k, d1 - d0, dtype=E.dtype, device=E.device).index_add_(0, rows, E).reshape(c, k, -1), uniq


def _emb_reduce(f: _Emb, want_sq: bool, want_gram: bool, budget: int):
    c, T = f.idx.shape
    D = f.E.shape[-1]
    k = int(torch.unique(f.idx).numel())
    step = max(1, budget // max(1, c * k))
    sq = torch.zeros(c, dtype=torch.float64, device=f.E.device) if want_sq else None
    gram = torch.zeros(c, c, dtype=torch.float64, device=f.E.device) if want_gram else None
    for d0 in range(0, D, step):
        g, _ = _emb_rows(f, d0, min(D, d0 + step))
        g = g.reshape(c, -1)
        if want_sq:
            sq += (g * g).sum(1, dtype=torch.float64)
        if want_gram:
            gram += (g @ g.T).double()
    return sq, gram


def build_factors(eng, calls) -> tuple[dict, dict, dict, dict]:
    """Group captured calls (``(module name, inputs, e)``, step 2) by module and turn them into factors. ``eng``: the
    engine's layout (``plan``, ``buffers``, ``w``, ``all_params``). Returns (lin factors, embedding factors, dense
    per-sample gradients {name: (c, k)}, identities/fallback labels {name: (kind, text)}) with kind ``"identity"`` or
    ``"fallback"``."""
    plan = eng.plan
    lins: dict[str, _Lin] = {}
    embs: dict[str, _Emb] = {}
    dense: dict[str, torch.Tensor] = {}
    labels: dict[str, tuple[str, str]] = {}
    for name, args, e in calls:
        mod = plan.modules[name]
        local = plan.params[name]
        f = lin_factor(mod, args, e, local)
        if f is not None:
            if name in lins:
                lins[name].add(f)
            else:
                lins[name] = f
            for full in (f.weight, f.bias):
                if full is not None:
                    labels[full] = ("identity", f.label)
            rest = set(local) - {"weight", "bias"}
            if not rest:
                continue
        else:
            f = emb_factor(mod, args, e, local)
            if f is not None and set(local) == {"weight"}:
                if name in embs:
                    embs[name].add(f)
                else:
                    embs[name] = f
                labels[f.weight] = ("identity", "Embedding")
                continue
        grads = norm_grads(mod, args, e, local, eng.buffers, name)
        if grads is not None and set(grads) == set(local.values()):
            for full, g in grads.items():
                dense[full] = dense[full] + g if full in dense else g
                labels[full] = ("identity", type(mod).__name__)
            continue
        # no identity: materialise this module's per-sample gradients (vmap of its own vjp)
        grads = module_grads(eng, name, args, e, eng.w, None)
        for full, g in grads.items():
            if lins.get(name) is not None and full in (lins[name].weight, lins[name].bias):
                continue
            dense[full] = dense[full] + g if full in dense else g
            labels[full] = ("fallback", f"no per-sample identity for {type(mod).__name__} {name!r}: its per-sample "
                                        "gradients were materialised (vmap of the module's vjp)")
    return lins, embs, dense, labels


def reduce_factors(lins, embs, dense, c: int, want_sq: bool, want_gram: bool, budget: int, device):
    """Per-sample squared norms (c,) and Gram (c, c) in float64 from factors (either may be None)."""
    # with the Gram asked for, the squared norms are its diagonal (no second pass)
    want_sq, diag = want_sq and not want_gram, want_sq and want_gram
    sq = torch.zeros(c, dtype=torch.float64, device=device) if want_sq else None
    gram = torch.zeros(c, c, dtype=torch.float64, device=device) if want_gram else None
    for f in lins.values():
        if f.weight is not None and (f.vec is not None or (f.A.shape[1] == 1 and f.A.shape[2] == 1)):
            # one position, one group (Linear on a vector per sample): four kernels, the layer's term in float32
            # (as every layer term) accumulated in float64; with a bias, (AAᵀ + 1)∘(EEᵀ) = (AAᵀ)∘(EEᵀ) + EEᵀ
            a, ee = f.vec if f.vec is not None else (f.A[:, 0, 0], f.E[:, 0, 0])
            if want_sq:
                sa, se = torch.linalg.vecdot(a, a), torch.linalg.vecdot(ee, ee)
                sq.add_(torch.addcmul(se, sa, se) if f.bias is not None else sa.mul_(se))
            if want_gram:
                ka, ke = a @ a.T, ee @ ee.T
                gram.add_(torch.addcmul(ke, ka, ke) if f.bias is not None else ka.mul_(ke))
        elif f.weight is not None:
            if want_sq:
                sq += _lin_sq_norms(f.A, f.E, budget, bias=f.bias is not None)
            if want_gram:
                gram += _lin_gram(f.A, f.E, budget, bias=f.bias is not None)
        elif f.bias is not None:
            bsum = f.E.sum(2).reshape(c, -1)
            if want_sq:
                sq += (bsum * bsum).sum(1, dtype=torch.float64)
            if want_gram:
                gram += (bsum @ bsum.T).double()
    for f in embs.values():
        s, g = _emb_reduce(f, want_sq, want_gram, budget)
        if want_sq:
            sq += s
        if want_gram:
            gram += g
    for g in dense.values():
        if want_sq:
            sq += (g * g).sum(1, dtype=torch.float64)
        if want_gram:
            gram += (g @ g.T).double()
    if diag:
        sq = gram.diagonal().clone()
    return sq, gram


def factor_sums(lins, embs, dense, like: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per parameter: (Σ_i per-sample gradient, an upper bound of Σ_i |per-sample gradient|), shaped like ``like``;
    used to check the factors against autograd's batch gradient on first use (no per-sample matrix formed)."""
    out = {}
    for f in lins.values():
        w, wa, b, ba = _lin_sum(f)
        if f.weight is not None:
            out[f.weight] = (w.reshape(like[f.weight].shape), wa.reshape(like[f.weight].shape))
        if f.bias is not None:
            out[f.bias] = (b.reshape(like[f.bias].shape), ba.reshape(like[f.bias].shape))
    for f in embs.values():
        W = like[f.weight]
        idx = f.idx.reshape(-1)
        E = f.E.reshape(-1, W.shape[1])
        s = torch.zeros_like(W).index_add_(0, idx, E)
        sa = torch.zeros_like(W).index_add_(0, idx, E.abs())
        out[f.weight] = (s, sa)
    for full, g in dense.items():
        out[full] = (g.sum(0).reshape(like[full].shape), g.abs().sum(0).reshape(like[full].shape))
    return out


def first_sample(lins, embs, dense):
    """The factors restricted to sample 0 (for the first-use check against a sample evaluated alone)."""
    return ({k: _Lin(f.A[:1], f.E[:1], f.weight, f.bias, f.label, f.kshape) for k, f in lins.items()},
            {k: _Emb(f.idx[:1], f.E[:1], f.weight) for k, f in embs.items()},
            {k: g[:1] for k, g in dense.items()})


@torch.no_grad()
def stats_from_calls(eng, calls, want_sq: bool, want_gram: bool, budget_bytes: int) -> PerSampleStats:
    """:class:`PerSampleStats` of one captured batch (``calls`` from :func:`gradcond.probes.per_sample.capture.capture`;
    ``eng``: the engine's layout, see :func:`build_factors`)."""
    t0 = time.perf_counter()
    lins, embs, dense, labels = build_factors(eng, calls)
    c = calls[0][2].shape[0]
    elem = max(1, torch.finfo(eng.dtype).bits // 8) if eng.dtype.is_floating_point else 8
    budget = max(1, int(budget_bytes) // elem)
    sq, gram = reduce_factors(lins, embs, dense, c, want_sq, want_gram, budget, calls[0][2].device)
    identities = {n: labels[n][1] for n in eng.names if labels.get(n, ("", ""))[0] == "identity"}
    fallback = {n: labels[n][1] for n in eng.names if labels.get(n, ("", ""))[0] == "fallback"}
    return PerSampleStats(sq, gram, identities, fallback, c, time.perf_counter() - t0)


def whole_model_fallback(names, reason: str) -> dict[str, str]:
    """The ``fallback`` dict when the whole model is measured by vmap(grad)."""
    text = f"the layer path cannot handle this model ({reason}); per-sample gradients materialised by vmap(grad)"
    return {n: text for n in names}


# ---------------------------------------------------------------------------------------------------- materialised
# per-sample gradients (c, k) of every parameter, for Engine.per_sample_grads (masks, perturbed points, vmap-free)

_BMM_DIRECT_MIN = 4096  # O·C above which per-sample Linear/Conv weight gradients are written in place by bmm


def _conv_fast_ok(mod) -> bool:
    return (mod.groups == 1 and mod.padding_mode == "zeros" and not isinstance(mod.padding, str)
            and not getattr(mod, "transposed", False))


def _as_lin(mod, args, e):
    """(A, E) of shapes (c, T, C) and (c, T, O) such that the per-sample weight gradient is Σ_t E_t A_tᵀ, for Linear
    and zero-padded, ungrouped Conv1d/Conv2d (A = unfolded patches in the weight's own feature order, T = output
    positions); None otherwise."""
    if len(args) != 1 or not plain_forward(mod):  # a subclass with its own forward computes something else
        return None
    a, c = args[0], e.shape[0]
    if isinstance(mod, nn.Linear):
        return a.reshape(c, -1, a.shape[-1]), e.reshape(c, -1, e.shape[-1])
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and _conv_fast_ok(mod):
        k, dil, pad, st = (tuple(mod.kernel_size), tuple(mod.dilation), tuple(mod.padding), tuple(mod.stride))
        if isinstance(mod, nn.Conv1d):
            a, e = a.unsqueeze(2), e.unsqueeze(2)
            k, dil, pad, st = (1,) + k, (1,) + dil, (0,) + pad, (1,) + st
        U = F.unfold(a, k, dilation=dil, padding=pad, stride=st)  # (c, C·kk, T)
        return U.transpose(1, 2), e.reshape(c, e.shape[1], -1).transpose(1, 2)
    return None


def select_map(eng, select) -> dict[str, tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Per parameter: (local indices into its flat gradient, positions in the selected output); None = all.
    ``eng``: ``names`` and ``offsets`` of the flat layout; ``select``: flat indices or None."""
    if select is None:
        return {n: (None, None) for n in eng.names}
    out = {}
    for n in eng.names:
        start, k = eng.offsets[n]
        pos = ((select >= start) & (select < start + k)).nonzero().reshape(-1)
        out[n] = (select[pos] - start, pos)
    return out


def module_grads(eng, name, args, e, w, smap, dest=None) -> dict[str, torch.Tensor | None]:
    """Per-sample gradients (c, k) of the parameters module ``name`` owns, for one call with inputs ``args`` and
    output gradient ``e``; k = all entries, or those in ``smap`` (from :func:`select_map`; None = all). ``w``: the
    trainable weights the call was made at; ``eng``: ``plan``, ``buffers`` and ``all_params`` of the engine. A weight
    whose (c, k) view is in ``dest`` may be written there directly, in which case its entry is None.

    Linear / zero-padded ungrouped Conv: the outer-product sums Σ_t E_t A_tᵀ (bmm); BatchNorm (eval / frozen
    statistics) and LayerNorm: closed forms; anything else: ``vmap`` over samples of the ``vjp`` of this module alone
    (its own parameters only)."""
    from torch.func import functional_call, vjp, vmap

    mod = eng.plan.modules[name]
    local = eng.plan.params[name]  # local name -> full name
    a = args[0]
    c = e.shape[0]
    out: dict[str, torch.Tensor] = {}

    def pick(full, full_grad):
        idx = None if smap is None else smap[full][0]
        g = full_grad.reshape(c, -1)
        return g if idx is None else g[:, idx]

    lin = _as_lin(mod, args, e)
    if lin is not None:
        A, E = lin  # (c, T, C), (c, T, O): per-sample weight gradient Σ_t E_t A_tᵀ, shape (O, C)
        if "weight" in local:
            full = local["weight"]
            idx = None if smap is None else smap[full][0]
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
    if isinstance(mod, BN_TYPES) and len(args) == 1 and not mod.training and plain_forward(mod):
        shape = [1, -1] + [1] * (a.ndim - 2)
        dims = list(range(2, a.ndim))
        if "weight" in local:
            pre = f"{name}." if name else ""
            mean = eng.buffers[pre + "running_mean"].view(shape)
            var = eng.buffers[pre + "running_var"].view(shape)
            xhat = (a - mean) / torch.sqrt(var + mod.eps)
            out[local["weight"]] = pick(local["weight"], (e * xhat).sum(dims) if dims else e * xhat)
        if "bias" in local:
            out[local["bias"]] = pick(local["bias"], e.sum(dims) if dims else e)
        return out
    if isinstance(mod, nn.LayerNorm) and len(args) == 1 and plain_forward(mod):
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
    rest = {ln: t for ln, t in LayerPlan.module_tensors(name, eng.all_params(w), eng.buffers).items() if ln not in own}

    def one(e_i, *a_i):
        def f(p):
            return functional_call(mod, {**rest, **p}, tuple(t.unsqueeze(0) for t in a_i))
        _, pull = vjp(f, own)
        return pull(e_i.unsqueeze(0))[0]

    g = vmap(one)(e, *args)
    return {local[ln]: pick(local[ln], g[ln]) for ln in own}


@torch.no_grad()
def assemble(eng, calls, w, select, smap) -> torch.Tensor:
    """Flat (c, m) — or (c, len(select)) — per-sample gradients from captured module calls (``eng``: ``names``,
    ``offsets``, ``m``, ``dtype``, ``plan`` of the flat layout). With ``select`` (and its ``smap``) only the selected
    coordinates of Linear/Conv weights are ever computed (c·T·k work instead of c·T·O·C)."""
    c = calls[0][2].shape[0]
    dev = calls[0][2].device  # the model's device: the captured outputs live there
    if select is None:
        out = torch.empty(c, eng.m, dtype=eng.dtype, device=dev)
    else:
        out = torch.zeros(c, int(select.numel()), dtype=eng.dtype, device=dev)
    written: set[str] = set()
    for name, args, e in calls:
        dest = None
        if select is None:  # unwritten Linear/Conv weights are computed straight into the output (no temporary)
            dest = {}
            for full in eng.plan.params[name].values():
                if full not in written:
                    start, k = eng.offsets[full]
                    dest[full] = out[:, start:start + k]
        for full, g in module_grads(eng, name, args, e, w, smap, dest).items():
            if g is None:  # written in place
                pass
            elif select is None:
                start, k = eng.offsets[full]
                dst = out[:, start:start + k]
                dst.add_(g) if full in written else dst.copy_(g)
            else:
                out.index_add_(1, smap[full][1], g)
            written.add(full)
    if len(written) != len(eng.names):  # cannot happen after the capture's checks; guard against silent zeros
        raise Unsupported("some parameters received no per-sample gradient")
    return out


# ---------------------------------------------------------------------------------------------------- first-use check
_VALIDATION_RTOL = {torch.float64: 1e-9, torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def _validation_rtol(t: torch.Tensor) -> float:
    """Tolerance of the first-use check for ``t``'s dtype and device. On CUDA, float32 convolutions and matmuls may
    run in TF32 (10-bit mantissa; cuDNN convolutions do by default), so autograd's reference gradient is only good to
    about 1e-3 of the summed magnitudes there; a parameter read outside its module still differs by O(1)."""
    tol = _VALIDATION_RTOL.get(t.dtype, 1e-4)
    if t.dtype == torch.float32 and t.is_cuda and (torch.backends.cudnn.allow_tf32
                                                   or torch.backends.cuda.matmul.allow_tf32):
        tol = max(tol, 1e-2)
    return tol


@torch.no_grad()
def validate(eng, calls, ref: dict, ref0: dict) -> None:
    """First use of the layer path on a model, two checks per parameter (relative to a bound of the summed magnitudes):

    * the per-sample gradients implied by the captured calls sum to autograd's gradient of Σ_i ℓ_i (``ref``), else
      some parameter is also used outside its module's forward (e.g. a parent reading a child's weight);
    * the gradient they give sample 0 equals autograd's gradient of sample 0 evaluated alone (``ref0``), else the
      layers do not keep samples apart along dimension 0 (a sequence-first layout whose length happens to equal the
      batch size, an op mixing samples) — a split that the sum check cannot see.

    Raises :class:`Unsupported` on either failure; on success the model is remembered as validated (for
    ``eng.names``). Both sides come from the layer factors (one matmul per layer), so no b × P matrix is formed."""
    lins, embs, dense, _ = build_factors(eng, calls)
    # one check at a time, so that at most one set of parameter-sized sums is alive
    checks = ((lambda: factor_sums(lins, embs, dense, ref), ref, "is used outside its module's forward"),
              (lambda: factor_sums(*first_sample(lins, embs, dense), ref0), ref0,
               "gets per-sample gradients that do not match a sample evaluated alone (dimension 0 of some layer's "
               "input is not the sample dimension, or the model mixes samples)"))
    for make_sums, target, why in checks:
        sums = make_sums()
        for n in eng.names:
            if n not in sums:
                raise Unsupported(f"parameter {n!r} received no per-sample gradient")
            s, a = sums[n]
            tol = _validation_rtol(s)
            if not a.numel():
                continue
            scale = max(float(a.max()), float(target[n].abs().max()))
            if float((s - target[n]).abs().max()) > tol * (scale or 1.0):
                raise Unsupported(f"parameter {n!r} {why}")
    mark_validated(eng.model, eng.names)
