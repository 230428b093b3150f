"""Teleportation with null-space gradient projection (seed 001, Algorithm 1).

A teleport moves the weights of selected layers along directions that leave every layer's
pre-activation unchanged on a teleport batch, so the loss on that batch is unchanged, while
ascending the teleport objective (eq. 4)

    L_teleport = 1/2 * || grad_W L_primary ||^2        (W = all trainable parameters)

with the projected update (eq. 5)  W_l <- W_l + eta * pi_l(grad_{W_l} L_teleport).

Per teleport batch of n samples and per selected layer l (one SVD per batch, eqs. 8-10, 3):

* capture the layer's inputs during a forward pass (forward hooks) and build the representation
  matrix R_l with one column per "input row": a sample for an MLP layer (eq. 8), an unfolded
  patch per output position for a convolution (eq. 9, groups handled block by block), a token
  for attention projections and for Linear layers applied to sequences (eq. 10). Biases fold in
  as a constant-1 input row.
* SVD R_l = U S V^T; keep the top-k left singular vectors B_l, k = min{k : ||R_k||_F^2 >=
  tau ||R||_F^2} (eq. 3). Decision: k is capped by the numerical rank (singular values above
  ``s_max * max(R.shape) * eps(dtype)``, the ``torch.linalg.matrix_rank`` rule); with
  ``tau = 1`` k *is* the numerical rank, i.e. B_l spans the inputs and its complement is the
  exact (numerical) input null space.
* for ``t`` steps: g = grad L_teleport (double backward), pi_l(G) = G - G B_l B_l^T in the
  (out, in[+1]) layout (eqs. 11-13 are this same map written in the layer's own layout), and
  W_l += eta * pi_l(G).
* Numerics: the SVD and the projection run in float64 whatever the model's dtype (the update is
  rounded to it afterwards). In float32 both leak the move into the kept space: on an MLP
  [256, 256] on digits (32 batches of 32, 8 steps, CAP 3) the largest relative batch-loss change
  of one teleport was 2.6e-4 with a float32 SVD and projection, ~5e-5 with a float64 SVD only,
  and ~1.6e-6 with both (a float64 model: ~1e-13). The steps of a batch stop early once the primary gradient norm reaches
  ``cap`` (the source's CAP).

Decisions where the source is silent:

* The teleport objective is the gradient norm w.r.t. *all* trainable parameters; only the
  selected layers move (other parameters, e.g. LayerNorm, cannot be moved without changing the
  function).
* Forward passes in a teleport run with dropout off and all buffers restored afterwards
  (``teleport_mode``): BatchNorm running statistics never move during a teleport.
* A layer whose input null space is empty on a batch (k equals the input dimension, e.g. a
  first conv layer with 10-dim patches) is skipped for that batch with a ``UserWarning`` and
  listed in ``BatchRecord.skipped``.
* Guards, on by default (``TeleportGuards``, issue 20): after every teleport batch the relative
  change of that batch's loss (``batch_loss_tol`` = 1e-3), the rise of the held-out loss
  (``held_out_tol`` = 0.05, when ``held_out`` is given), each moved layer's parameter-norm growth
  since the teleport started (``max_weight_growth`` = 4) and finiteness are checked. Why: with a
  too large ``eta`` the super-linear ascent runs away (weights ~1e16); the move is exact only in
  exact arithmetic, so the held-out loss is destroyed (+259 % on a Transformer in issue 20) and,
  through rounding, the teleport-batch loss too - and the teleport used to report success.
  A batch that trips a guard (or hits a non-finite value) is undone and ends the teleport,
  keeping the earlier batches; if it is the first batch, model and
  optimizer are restored bit-identically and ``TeleportRejected`` (``TeleportError`` for
  non-finite values, both ``FloatingPointError``) is raised with ``reason``; the trainer
  callback turns that into a ``teleport_failed`` event with the reason and one warning.
  Cost: one held-out forward per batch, one parameter copy and norm per batch.
* Optimizer state: see ``apply_optimizer_state`` (``"keep"`` by default, or ``"reset"``).

Cost per batch: one forward with hooks, one float64 SVD per distinct layer input (O(D^2 N) for a
D x N representation), then per step one primary backward with ``create_graph`` and one
Hessian-vector product; the projection is O(out * D * k).  The source's O(d^2 n l b) for MLPs.

Assumption (the source's, Section 3.2): the gradient of every selected layer lies in the span
of its inputs, i.e. the layer is used as ``x @ W^T + b`` on the captured inputs only. Weight
sharing between two selected modules is not supported.
"""

from __future__ import annotations

from collections import Counter

import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from gradcond.losses import get_loss
from gradcond.utils import as_batches, select_output

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

__all__ = [
    "NullSpaceTeleport",
    "NullSpaceTeleportCallback",
    "TeleportError",
    "TeleportRejected",
    "TeleportGuards",
    "TeleportResult",
    "BatchRecord",
    "SUPPORTED_LAYERS",
    "supported_layers",
    "null_space_basis",
    "project_out",
]

SUPPORTED_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention, nn.Embedding)
_SUPPORTED_TEXT = ("nn.Linear, nn.Conv1d, nn.Conv2d, nn.MultiheadAttention and nn.Embedding (without max_norm or "
                   "sparse gradients)")


# --------------------------------------------------------------------------------------------
# layers and their weight blocks
# --------------------------------------------------------------------------------------------


@dataclass
class _Block:
    """One weight block W (out x D) acting as ``feature_row @ W^T`` on the rows of one source."""

    name: str  # for reporting, e.g. "0", "conv.g1", "attn.q"
    weight: nn.Parameter
    bias: nn.Parameter | None
    rows: slice | None  # slice of the parameter's first dim (groups / packed q,k,v)
    source: tuple[str, str]  # key of the captured features
    cols: slice | None  # slice of the features' columns (conv groups)

    def w_view(self, t: torch.Tensor) -> torch.Tensor:
        t = t if self.rows is None else t[self.rows]
        return t.reshape(t.shape[0], -1)

    def b_view(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        return t if self.rows is None else t[self.rows]

    @property
    def basis_key(self) -> tuple:
        c = (self.cols.start, self.cols.stop) if self.cols is not None else None
        return (self.source, c, self.bias is not None)


def _mha_out_children(model: nn.Module) -> set[int]:
    return {id(m.out_proj) for m in model.modules() if isinstance(m, nn.MultiheadAttention)}


def supported_layers(model: nn.Module) -> list[str]:
    """Names of every module of ``model`` that NullSpaceTeleport can move (trainable weight)."""
    skip = _mha_out_children(model)
    out = []
    for name, m in model.named_modules():
        if id(m) in skip or not isinstance(m, SUPPORTED_LAYERS):
            continue
        if isinstance(m, nn.MultiheadAttention):
            ws = [m.in_proj_weight, m.q_proj_weight, m.out_proj.weight]
            if not any(w is not None and w.requires_grad for w in ws):
                continue
        elif not m.weight.requires_grad:
            continue
        elif isinstance(m, nn.Embedding) and (m.max_norm is not None or m.sparse):
            continue  # max_norm renormalises the rows it reads (not a linear map); sparse gradients: not supported
        out.append(name)
    return out


def _resolve_layers(model: nn.Module, layers) -> list[tuple[str, nn.Module]]:
    skip = _mha_out_children(model)
    if layers is None:
        names = supported_layers(model)
        if not names:
            raise ValueError(
                f"model has no layer NullSpaceTeleport can move; supported: {_SUPPORTED_TEXT}"
            )
        return [(n, model.get_submodule(n)) for n in names]
    if isinstance(layers, (str, nn.Module)):
        layers = [layers]
    by_id = {id(m): n for n, m in model.named_modules()}
    out = []
    for item in layers:
        if isinstance(item, nn.Module):
            if id(item) not in by_id:
                raise ValueError("a selected layer module is not part of the model")
            name, mod = by_id[id(item)], item
        elif isinstance(item, str):
            try:
                mod = model.get_submodule(item)
            except AttributeError:
                raise ValueError(f"the model has no layer named {item!r}") from None
            name = item
        else:
            raise TypeError(f"layers must be names or modules, got {type(item).__name__}")
        if id(mod) in skip:
            raise ValueError(
                f"layer {name!r} is the output projection of a MultiheadAttention module; "
                "select the MultiheadAttention module itself (its q, k, v and output "
                "projections are teleported together)"
            )
        if not isinstance(mod, SUPPORTED_LAYERS) or (isinstance(mod, nn.Embedding)
                                                     and (mod.max_norm is not None or mod.sparse)):
            raise ValueError(
                f"layer {name!r} ({type(mod).__name__}) is not supported by NullSpaceTeleport; "
                f"supported: {_SUPPORTED_TEXT}"
            )
        out.append((name, mod))
    if len({id(m) for _, m in out}) != len(out):
        raise ValueError("a layer was selected twice")
    _check_shared(model, out)
    return out


def _check_shared(model: nn.Module, layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse weight sharing the projection cannot keep exact.  Supported: an ``nn.Embedding`` whose weight is
    tied to a bias-free ``nn.Linear`` (a language model's input embedding and LM head), both selected -- the two
    kept-space projections act on different axes of the shared ``(V, d)`` weight (rows of the tokens seen, columns
    spanned by the head's inputs), so they commute and their product is the exact projection onto the intersection
    of the two null spaces.  Anything else sharing a selected layer's weight is a ``ValueError``."""
    sel = {id(m): n for n, m in layers}
    users: dict[int, list[tuple[str, nn.Module]]] = {}
    for n, m in model.named_modules(remove_duplicate=False):
        for pn, p in m.named_parameters(recurse=False):
            if pn == "weight":
                users.setdefault(id(p), [])
                if all(m is not u for _, u in users[id(p)]):
                    users[id(p)].append((n, m))
    for name, m in layers:
        w = getattr(m, "weight", None)
        if w is None or len(users.get(id(w), [])) < 2:
            continue
        us = users[id(w)]
        names = ", ".join(repr(n) for n, _ in us)
        kinds = sorted(type(u).__name__ for _, u in us)
        if kinds != ["Embedding", "Linear"] or any(isinstance(u, nn.Linear) and u.bias is not None for _, u in us):
            raise ValueError(f"layer {name!r} shares its weight with {names}; NullSpaceTeleport supports weight "
                             "sharing only between an nn.Embedding and a bias-free nn.Linear (tied LM head)")
        missing = [n for n, u in us if id(u) not in sel]
        if missing:
            raise ValueError(f"layer {name!r} shares its weight with {', '.join(map(repr, missing))} (tied "
                             "embeddings); select both (layers=[...]) or neither, so the move keeps both uses exact")


def _blocks_for(name: str, m: nn.Module) -> list[_Block]:
    if isinstance(m, nn.Embedding):
        # representation matrix = the one-hot input rows (issue 19): the kept space is the rows of the tokens seen
        blk = _Block(name, m.weight, None, None, (name, "ids"), None)
        blk.kind = "embedding"  # type: ignore[attr-defined]
        blk.padding_idx = m.padding_idx  # type: ignore[attr-defined]
        return [blk] if m.weight.requires_grad else []
    if isinstance(m, nn.MultiheadAttention):
        E = m.embed_dim
        blocks = []
        if m._qkv_same_embed_dim:
            for i, part in enumerate("qkv"):
                blocks.append(
                    _Block(f"{name}.{part}", m.in_proj_weight, m.in_proj_bias,
                           slice(i * E, (i + 1) * E), (name, part), None)
                )
        else:
            for i, (part, w) in enumerate(zip("qkv", (m.q_proj_weight, m.k_proj_weight, m.v_proj_weight))):
                rows = slice(i * E, (i + 1) * E) if m.in_proj_bias is not None else None
                # separate weights: rows only index the packed bias
                blk = _Block(f"{name}.{part}", w, m.in_proj_bias, None, (name, part), None)
                blk._bias_rows = rows  # type: ignore[attr-defined]
                blocks.append(blk)
        blocks.append(_Block(f"{name}.out", m.out_proj.weight, m.out_proj.bias, None, (name, "o"), None))
        return [b for b in blocks if b.weight.requires_grad]
    if isinstance(m, (nn.Conv1d, nn.Conv2d)):
        G = m.groups
        if G == 1:
            return [_Block(name, m.weight, m.bias, None, (name, "in"), None)]
        co, ci = m.out_channels // G, m.in_channels // G
        kk = int(torch.tensor(m.kernel_size).prod())
        return [
            _Block(f"{name}.g{g}", m.weight, m.bias, slice(g * co, (g + 1) * co), (name, "in"),
                   slice(g * ci * kk, (g + 1) * ci * kk))
            for g in range(G)
        ]
    return [_Block(name, m.weight, m.bias, None, (name, "in"), None)]


def _bias_rows(b: _Block) -> slice | None:
    return getattr(b, "_bias_rows", b.rows)


def _conv_patches(conv: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of a Conv1d/Conv2d, one row per output position (eq. 9)."""
    one_d = isinstance(conv, nn.Conv1d)
    if x.dim() == (2 if one_d else 3):  # unbatched input
        x = x.unsqueeze(0)
    pad = list(conv._reversed_padding_repeated_twice)
    if any(pad):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pad, mode=mode)
    if one_d:
        x = x.unsqueeze(-2)
        k, s, d = (1, conv.kernel_size[0]), (1, conv.stride[0]), (1, conv.dilation[0])
    else:
        k, s, d = conv.kernel_size, conv.stride, conv.dilation
    p = F.unfold(x, k, dilation=d, stride=s)  # (N, C*kh*kw, L)
    return p.transpose(1, 2).reshape(-1, p.shape[1])


class _Capture:
    """Forward hooks that record each selected layer's input rows."""

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.layers = layers
        self.feats: dict[tuple[str, str], list[torch.Tensor]] = {}
        self.handles = []
        self._inside = False

    def _add(self, key, t):
        self.feats.setdefault(key, []).append(t.detach())

    def __enter__(self):
        for name, m in self.layers:
            if isinstance(m, nn.MultiheadAttention):
                self.handles.append(m.register_forward_hook(self._mha_hook(name), with_kwargs=True))
            elif isinstance(m, nn.Embedding):
                self.handles.append(m.register_forward_hook(lambda mod, a, o, n=name: self._add((n, "ids"),
                                                                                             a[0].reshape(-1))))
            elif isinstance(m, (nn.Conv1d, nn.Conv2d)):
                self.handles.append(
                    m.register_forward_hook(lambda mod, a, o, n=name: self._add((n, "in"), _conv_patches(mod, a[0])))
                )
            else:
                self.handles.append(
                    m.register_forward_hook(
                        lambda mod, a, o, n=name: self._add((n, "in"), a[0].reshape(-1, mod.in_features))
                    )
                )
        return self

    def _mha_hook(self, name):
        def hook(mod, args, kwargs, out):
            if self._inside:
                return
            names = ("query", "key", "value")
            q, k, v = (args[i] if len(args) > i else kwargs[names[i]] for i in range(3))
            self._add((name, "q"), q.reshape(-1, mod.embed_dim))
            self._add((name, "k"), k.reshape(-1, mod.kdim))
            self._add((name, "v"), v.reshape(-1, mod.vdim))
            # input of the output projection: rerun with an identity output projection
            E = mod.embed_dim
            sub = {"out_proj.weight": torch.eye(E, dtype=q.dtype, device=q.device)}
            if mod.out_proj.bias is not None:
                sub["out_proj.bias"] = torch.zeros(E, dtype=q.dtype, device=q.device)
            self._inside = True
            try:
                with torch.no_grad():
                    o = functional_call(mod, sub, args, kwargs)[0]
            finally:
                self._inside = False
            self._add((name, "o"), o.reshape(-1, E))

        return hook

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []

    def matrix(self, key) -> torch.Tensor:
        return torch.cat(self.feats[key], 0)


def null_space_basis(features: torch.Tensor, tau: float = 1.0, bias: bool = False) -> tuple[torch.Tensor, int]:
    """Orthonormal basis B (D x k) of the kept input space of a representation (eq. 3).

    ``features`` holds one input row per column of R (shape N x D; R = features^T). With
    ``bias`` a constant-1 column is appended first (D+1). Returns ``(B, k)`` in the dtype of
    ``features``; the null space used for teleporting is the orthogonal complement of span(B),
    of dimension D - k.

    Numerics: the SVD is computed in float64 whatever the dtype of ``features`` (on the CPU for a
    device without float64, e.g. MPS), and B is rounded to that dtype afterwards (the teleport
    itself keeps B in float64, see :class:`NullSpaceTeleport`). Why: a float32 SVD's singular
    vectors for the smaller kept singular values are accurate only to about eps32 * s_max / s_k,
    so the features leak into the computed null space and every step of a long teleport moves the
    layer's output on its own batch. The numerical rank still uses the precision of ``features``
    (``s > s_max * max(N, D) * eps(features.dtype)``): rounding noise of a float32 input is not
    counted as a direction to keep. Cost: one float64 SVD of an N x D matrix, O(N D min(N, D)).
    """
    B, k = _kept_basis(features, tau, bias)
    return B.to(dtype=features.dtype), k


def _kept_basis(features: torch.Tensor, tau: float, bias: bool) -> tuple[torch.Tensor, int]:
    """:func:`null_space_basis` with B in float64 (on the device of ``features``; MPS: on the CPU)."""
    if bias:
        features = torch.cat([features, features.new_ones(features.shape[0], 1)], 1)
    D = features.shape[1]
    work = features.cpu() if features.device.type == "mps" else features  # MPS has no float64
    if features.shape[0] == 0:
        return work.new_zeros(D, 0, dtype=torch.float64), 0
    _, s, vh = torch.linalg.svd(work.to(torch.float64), full_matrices=False)
    if s.numel() == 0 or float(s[0]) == 0.0:
        return work.new_zeros(D, 0, dtype=torch.float64), 0
    tol = float(s[0]) * max(features.shape) * torch.finfo(features.dtype).eps
    r = int((s > tol).sum())
    if tau >= 1.0:
        k = r
    else:
        e = torch.cumsum(s ** 2, 0)
        k = int(torch.searchsorted(e, tau * e[-1]).item()) + 1
        k = min(k, r)
    return vh[:k].T.contiguous(), k


def project_out(G: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """pi(G) = G - G B B^T (eq. 11): the rows of ``G`` (out x D) with their components in span(B) (B: D x k,
    orthonormal columns) removed, computed in float64 and returned in the dtype and on the device of ``G``.

    Why float64: late in training most of a layer's teleport gradient lies in the kept space, and in float32 the
    cancellation in G - G B B^T leaves a kept-space component of ~eps32 * ||G|| -- a move that changes the layer's
    output on its own batch. It moved a float32 MLP's batch loss by up to 2.6e-4 (relative, Adam runs at loss ~0.05)
    over one teleport; ~1e-6 in float64. Cost: O(out * D * k) in float64."""
    Gd = G.to(device=B.device, dtype=torch.float64)
    Bd = B.to(torch.float64)
    return (Gd - (Gd @ Bd) @ Bd.T).to(device=G.device, dtype=G.dtype)


# --------------------------------------------------------------------------------------------
# the teleport
# --------------------------------------------------------------------------------------------


class NullSpaceTeleport:
    """Null-space gradient-projection teleport (seed 001, Algorithm 1, eqs. 3-5, 8-13).

    Parameters
    ----------
    loss : loss name or callable ``(output, target) -> scalar``; may be given per call instead.
    layers : None (every supported layer, see ``supported_layers``) or names/modules.
        Supported: nn.Linear (any leading dims: tokens are rows), nn.Conv1d/nn.Conv2d (any
        stride/padding/dilation/padding_mode, groups as separate blocks), nn.MultiheadAttention
        (q, k, v projections on their own inputs' tokens, output projection on the attention
        output's tokens), nn.Embedding (issue 19: its representation matrix is the one-hot input,
        so the kept space is the rows of the tokens seen in the batch -- the other rows move; the
        padding row never moves; ``max_norm`` embeddings are not supported). An embedding tied to
        a bias-free Linear head (a language model) moves only when both are selected, with both
        projections applied (exact for both uses). Anything else raises ``ValueError``.
    eta : teleport learning rate (eq. 5).
    tau : SVD energy threshold in [0, 1] (eq. 3); 1 = exact null space.
    steps : teleport steps per batch (the source's t, default 8).
    cap : stop a batch's steps once the primary gradient norm reaches this value (the source's
        CAP, Algorithm 1: an absolute "threshold maximum gradient norm value"); None = no cap.
        Because it is absolute, a teleport of b batches stays below it as a whole: once the
        weights have been moved up to the CAP, the later batches start near it and do few or no
        steps. This is the option to reproduce the source with.
    max_loss_change : (ours) error guard: if, after a step, the teleport-batch loss differs from
        its value before the batch by more than this relative amount, that step is undone
        (parameters copied back) and the batch stops; ``BatchRecord.reverted`` says so. None = off.
        With tau = 1 only a numerically huge step (runaway ascent) can trip it.
    output : for models returning a ``ModelOutput`` / dataclass / dict / tuple: which tensor the loss sees
        (default: the ``logits`` field, else the first tensor; :func:`gradcond.utils.select_output`).
    cap_ratio : (ours) stop a batch's steps once the gradient norm reaches ``cap_ratio`` times
        its value at the start of that batch; None = no such stop. The ascent on 1/2||g||^2 is
        super-linear, so without a cap a large ``eta`` overflows within a few steps. Caution: the
        ratio is per batch, so over b batches it compounds (each batch starts where the previous
        one left the weights): a no-op at b = 2-4, but at b = 32 an MLP on digits with
        ``cap_ratio = 3`` ran away and training diverged (loss NaN at step 47). For many batches
        use the absolute ``cap``.
    batch_loss_tol, held_out_tol, max_weight_growth : the guards checked after every teleport
        batch (defaults 1e-3, 0.05, 4.0; ``None`` disables one); see ``TeleportGuards``. With
        ``tau < 1`` the batch loss changes by design: raise ``batch_loss_tol`` accordingly.
    """

    method = "nullspace"

    def __init__(self, loss: str | Callable | None = None, *, layers=None, eta: float = 1e-2,
                 tau: float = 1.0, steps: int = 8, cap: float | None = None,
                 cap_ratio: float | None = None, max_loss_change: float | None = None,
                 batch_loss_tol: float | None = 1e-3, held_out_tol: float | None = 0.05,
                 max_weight_growth: float | None = 4.0, output=None):
        if not (0.0 <= float(tau) <= 1.0):
            raise ValueError(f"tau must be in [0, 1], got {tau}")
        check_ascent_options(steps, eta, cap, cap_ratio)
        self.loss = get_loss(loss) if loss is not None else None
        self.layers = layers
        self.eta, self.tau, self.steps, self.cap = float(eta), float(tau), int(steps), cap
        self.cap_ratio = cap_ratio
        if max_loss_change is not None and not float(max_loss_change) > 0:
            raise ValueError(f"max_loss_change must be > 0 or None, got {max_loss_change}")
        self.max_loss_change = max_loss_change
        self.guards = TeleportGuards(batch_loss_tol, held_out_tol, max_weight_growth)
        self.output = output

    def default_batch_size(self, model: nn.Module) -> int:
        """Teleport-batch size used by the callback when it is given ``batch_size=None``: 32 (the source's n)."""
        return 32

    # ---------------------------------------------------------------------------------------
    def teleport(self, model: nn.Module, batches, *, loss: str | Callable | None = None,
                 optimizer: torch.optim.Optimizer | None = None, optimizer_state: str = "keep",
                 held_out: Sequence[torch.Tensor] | None = None) -> TeleportResult:
        """Teleport ``model`` in place on one ``(x, y)`` batch or a list of them (b batches).

        Returns a ``TeleportResult`` with, per batch, loss and gradient norm before/after on
        that batch, steps done, rank kept and input dimension per layer block, skipped blocks;
        plus the loss on ``held_out`` before/after the whole teleport. On non-finite values the
        model and optimizer are restored exactly and ``TeleportError`` is raised; the guards
        (``TeleportGuards``) are checked after every batch, ``held_out`` is the batch the
        ``held_out_tol`` guard watches (it should not be one of ``batches``).
        """
        loss_fn = get_loss(loss) if loss is not None else self.loss
        if loss_fn is None:
            raise ValueError("no loss given: pass loss= to NullSpaceTeleport or to teleport()")
        user_loss, output = loss_fn, self.output
        # models returning a ModelOutput / dict / tuple: the loss sees the selected tensor (default: logits)
        loss_fn = lambda out, y: user_loss(select_output(out, output), y)  # noqa: E731
        batches = as_batches(batches)
        apply_optimizer_state(None, (), optimizer_state)  # validates the policy name
        layers = _resolve_layers(model, self.layers)
        blocks = [b for n, m in layers for b in _blocks_for(n, m)]
        all_params = [p for p in model.parameters() if p.requires_grad]
        moved = list({id(p): p for b in blocks for p in (b.weight, b.bias) if p is not None}.values())
        groups = {n: [p for p in m.parameters() if any(p is q for q in moved)] for n, m in layers}
        return run_teleport(self.method, model, loss_fn, batches, held_out, optimizer, optimizer_state, moved,
                            lambda x, y: self._one_batch(model, loss_fn, x, y, layers, blocks, all_params, moved),
                            self.guards, {n: ps for n, ps in groups.items() if ps})

    # ---------------------------------------------------------------------------------------
    def _primary(self, model, loss_fn, x, y, params, create_graph):
        L = loss_fn(model(x), y)
        if not finite(L):
            raise TeleportError(f"non-finite primary loss ({float(L)}) during a null-space teleport; "
                                "model and optimizer were restored to their pre-teleport state")
        g = torch.autograd.grad(L, params, create_graph=create_graph, allow_unused=True)
        g = [gi if gi is not None else torch.zeros_like(p) for gi, p in zip(g, params)]
        with torch.no_grad():  # its value only: the objective's gradient is a vector-Jacobian product of g (below)
            sq = sum(torch.dot(gi.reshape(-1), gi.reshape(-1)) for gi in g)  # no gradient-sized temporaries
        if not finite(sq):
            raise TeleportError("non-finite gradient during a null-space teleport; model and "
                                "optimizer were restored to their pre-teleport state")
        return L, g, sq

    def _one_batch(self, model, loss_fn, x, y, layers, blocks, all_params, moved) -> BatchRecord:
        with _Capture(layers) as cap:
            L, g, sq = self._primary(model, loss_fn, x, y, all_params, create_graph=self.steps > 0)
        missing = [n for n, _ in layers if not any(k[0] == n for k in cap.feats)]
        if missing:
            raise ValueError(f"selected layer(s) {missing} were not called in the model's forward pass")
        # one SVD per distinct layer input (eq. 3)
        bases: dict[tuple, tuple[torch.Tensor, int, int]] = {}
        for b in blocks:
            key = b.basis_key
            if key in bases:
                continue
            feats = cap.matrix(b.source)
            if getattr(b, "kind", None) == "embedding":
                # one-hot rows: the kept space is spanned by the coordinate vectors of the ids seen (and the
                # padding row, which must stay as it is); "basis" = those row indices
                seen = torch.unique(feats)
                if b.padding_idx is not None:
                    seen = torch.unique(torch.cat([seen, seen.new_tensor([b.padding_idx % b.weight.shape[0]])]))
                bases[key] = (seen, int(seen.numel()), int(b.weight.shape[0]))
                continue
            if b.cols is not None:
                feats = feats[:, b.cols]
            feats = feats.to(b.weight.dtype)
            B, k = _kept_basis(feats, self.tau, bias=b.bias is not None)  # float64 (see below)
            bases[key] = (B, k, B.shape[0])
        ranks = {b.name: bases[b.basis_key][1] for b in blocks}
        dims = {b.name: bases[b.basis_key][2] for b in blocks}
        skipped = [b.name for b in blocks if ranks[b.name] >= dims[b.name]]
        for name in skipped:
            warnings.warn(
                f"NullSpaceTeleport: layer block {name!r} has an empty input null space on this "
                f"teleport batch (rank {ranks[name]} = input dimension {dims[name]}); skipping it",
                UserWarning, stacklevel=3,
            )
        active = [b for b in blocks if b.name not in skipped]
        uses = Counter(id(b.weight) for b in blocks)
        loss0, gn0 = float(L.detach()), float(sq.detach().sqrt())
        steps, capped = 0, False
        ltrace, gtrace = [], []
        saved = None
        reverted = False

        def _violates(Lv) -> bool:
            return (self.max_loss_change is not None
                    and abs(float(Lv.detach()) - loss0) > self.max_loss_change * max(abs(loss0), 1e-30))

        for s in range(self.steps):
            if s > 0:
                L, g, sq = self._primary(model, loss_fn, x, y, all_params, create_graph=True)
                if _violates(L):
                    with torch.no_grad():
                        for p, v in zip(moved, saved):
                            p.copy_(v)
                    steps -= 1
                    reverted = True
                    break
                tol = self.guards.batch_loss_tol
                if tol is not None and abs(float(L.detach()) - loss0) > tol * max(abs(loss0), 1e-30):
                    # The batch guard will refuse this batch anyway: stop ascending now, before a runaway
                    # step overflows, so that the refusal names the guard rather than a non-finite value.
                    break
            gn = float(sq.detach().sqrt())
            ltrace.append(float(L.detach()))
            gtrace.append(gn)
            if (self.cap is not None and gn >= self.cap) or (
                    self.cap_ratio is not None and gn >= self.cap_ratio * gn0):
                capped = True
                break
            if not active:
                break
            # d/dW 1/2 ||g||^2 = J_g^T g = H g: the vector-Jacobian product of the gradient with itself (the same
            # vector as differentiating 1/2 ||g||^2, without that node's backward: two gradient-sized temporaries
            # fewer per parameter)
            obj = None
            gg = [gi for gi in g if gi.requires_grad]  # a parameter the loss does not reach has a constant 0 there
            hv = torch.autograd.grad(gg, moved, grad_outputs=[gi.detach() for gi in gg], allow_unused=True)
            hv = {id(p): (h if h is not None else torch.zeros_like(p)) for p, h in zip(moved, hv)}
            if not all(finite(h) for h in hv.values()):
                raise TeleportError("non-finite teleport-objective gradient during a null-space "
                                    "teleport; model and optimizer were restored to their "
                                    "pre-teleport state")
            updates = []
            # rows each embedding keeps (from all blocks: an embedding skipped because every row was seen keeps all
            # of them, so a Linear head tied to it cannot move either)
            emb_rows = {id(b.weight): bases[b.basis_key][0] for b in blocks if getattr(b, "kind", None) == "embedding"}
            for b in active:
                if getattr(b, "kind", None) == "embedding":
                    if any(o is not b and o.weight is b.weight for o in blocks):
                        continue  # tied: projected together with the Linear head below (or not at all when the
                        # head's null space is empty on this batch: moving the rows would change its logits)
                    P = hv[id(b.weight)].clone()
                    P[emb_rows[id(b.weight)]] = 0  # eq. 11 with one-hot inputs: the rows of the tokens seen stay
                    updates.append((b, P))
                    continue
                B = bases[b.basis_key][0]
                Gw = b.w_view(hv[id(b.weight)])
                if b.bias is not None:
                    gb = hv[id(b.bias)]
                    gb = gb if _bias_rows(b) is None else gb[_bias_rows(b)]
                    G = torch.cat([Gw, gb.unsqueeze(1)], 1)
                else:
                    G = Gw
                P = project_out(G, B)  # eq. 11 (eqs. 12-13 in the transposed layout)
                if id(b.weight) in emb_rows and b.rows is None and b.bias is None:
                    # tied embedding / LM head: the head's projection acts on columns, the embedding's on rows;
                    # they commute, so applying both is the projection onto the intersection (both uses unchanged)
                    P = P.clone()
                    P[emb_rows[id(b.weight)]] = 0
                updates.append((b, P))
            if self.max_loss_change is not None:
                saved = [p.detach().clone() for p in moved]
            with torch.no_grad():
                for b, P in updates:
                    dw = P[:, : P.shape[1] - (b.bias is not None)]
                    wv = b.weight if b.rows is None else b.weight[b.rows]
                    wv.add_(dw.reshape(wv.shape), alpha=self.eta)
                    if b.bias is not None:
                        bv = b.bias if _bias_rows(b) is None else b.bias[_bias_rows(b)]
                        bv.add_(P[:, -1], alpha=self.eta)
            steps += 1
            del L, g, sq, obj, hv
            # non-finite parameters show up as a non-finite loss/gradient at the next evaluation
        L1, _, sq1 = self._primary(model, loss_fn, x, y, all_params, create_graph=False)
        if not reverted and steps > 0 and _violates(L1):
            with torch.no_grad():
                for p, v in zip(moved, saved):
                    p.copy_(v)
            steps -= 1
            reverted = True
            L1, _, sq1 = self._primary(model, loss_fn, x, y, all_params, create_graph=False)
        ltrace.append(float(L1.detach()))
        gtrace.append(float(sq1.detach().sqrt()))
        return BatchRecord(loss0, ltrace[-1], gn0, gtrace[-1], steps, capped, ranks, dims, skipped,
                           ltrace, gtrace, reverted)


class NullSpaceTeleportCallback(LevelSetTeleportCallback):
    """Trainer callback running :class:`NullSpaceTeleport` on the source's schedule (Algorithm 1).

    ``NullSpaceTeleportCallback(eta=..., tau=..., steps=..., cap=..., layers=..., schedule=(0, 1, 2,
    3, 4), num_batches=32, batch_size=32, warmup_steps=0, optimizer_state="keep", ...)``; keywords
    not listed in :class:`LevelSetTeleportCallback` go to :class:`NullSpaceTeleport`. The loss is the
    trainer's unless ``loss=`` is given. See :class:`LevelSetTeleportCallback` for schedule and logging.
    """

    def __init__(self, teleporter: NullSpaceTeleport | None = None, **kwargs):
        own = {k: kwargs.pop(k) for k in list(kwargs) if k in LevelSetTeleportCallback.OPTIONS}
        super().__init__(teleporter if teleporter is not None else NullSpaceTeleport(**kwargs), **own)
        if teleporter is not None and kwargs:
            raise TypeError(f"pass either a teleporter or its options, not both: {sorted(kwargs)}")
