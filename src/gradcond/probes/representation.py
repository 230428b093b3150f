"""Diagnostics of hidden representations (seed 002, Øland, ch. 5; notes 002 §3).

* :func:`least_squares_distance` -- LSD = (1/m) ||Y - Z Z^+ Y||_F^2 (eq. 5.3): how far the best linear read-out of a
  representation ``Z`` is from the targets ``Y``.  Also the selection criterion of the closed-form fits of ch. 7
  (:mod:`gradcond.closedform`).
* :func:`k_redundancy` (Def. 8) -- the fraction of samples whose k nearest neighbours all share their label, by
  exact chunked k-NN (:func:`knn_indices`, :func:`redundant_mask`; ``gradcond.train.k_filter`` keeps the rest).
* :func:`selection_entropy` (§5.5.4) -- H(Y | S+(z)) per feature and its layer mean, in bits.
* :func:`stable_rank`, :func:`weight_entropy` (ch. 3's weight-histogram entropy) and :func:`error_gradient_rms`
  (the per-layer RMS of back-propagated error gradients of Fig. 4.3).

All functions are pure: they read tensors and return numbers; nothing here touches a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["least_squares_distance", "as_target_matrix", "k_redundancy", "redundant_mask", "knn_indices", "hard_labels",
           "selection_entropy", "SelectionEntropy", "stable_rank", "weight_entropy", "error_gradient_rms"]


def as_target_matrix(Y: torch.Tensor, num_rows: int, *, dtype: torch.dtype | None = None,
                     num_classes: int | None = None) -> torch.Tensor:
    """``Y`` as an ``(m, c)`` float matrix: hard labels (1-D integer tensor) become one-hot, a 1-D float tensor a
    column, a 2-D tensor is used as given.  Raises ``ValueError`` when the number of rows is not ``num_rows``."""
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"targets must be a torch.Tensor, got {type(Y).__name__}.")
    if Y.shape[0] != num_rows:
        raise ValueError(f"targets have {Y.shape[0]} rows but the features have {num_rows}; "
                         "give one target row per sample.")
    if Y.dim() == 1 and not Y.is_floating_point():
        if (Y < 0).any():
            raise ValueError("hard labels must be non-negative class indices.")
        n = int(Y.max()) + 1 if num_classes is None else num_classes
        Y = torch.nn.functional.one_hot(Y.long(), n)
    elif Y.dim() == 1:
        Y = Y[:, None]
    elif Y.dim() != 2:
        raise ValueError(f"targets must be 1-D labels or an (m, c) matrix, got shape {tuple(Y.shape)}.")
    return Y.to(dtype or torch.get_default_dtype())


def least_squares_distance(Z: torch.Tensor, Y: torch.Tensor, *, bias: bool = False,
                           rcond: float | None = None) -> float:
    """Least-squares distance LSD = (1/m) ||Y - Z Z^+ Y||_F^2 (seed 002, eq. 5.3).

    ``Z``: ``(m, n)`` features (more dimensions are flattened after the first); ``Y``: ``(m, c)`` targets, or hard
    labels ``(m,)`` (one-hot encoded).  ``bias=True`` appends a constant-1 column to ``Z`` (the affine read-out that
    ch. 7 uses).  ``Z Z^+ Y`` is the orthogonal projection of ``Y`` onto the column space of ``Z``; it is computed as
    ``Z @ lstsq(Z, Y)`` -- never with an explicit pseudoinverse -- with the SVD-based driver ``gelsd`` on the CPU,
    which is exact for rank-deficient ``Z`` (singular values below ``rcond * s_max`` count as zero; default
    ``rcond`` = machine epsilon of the dtype times max(m, n)).  On other devices, where torch's ``lstsq`` only
    offers the full-rank QR driver, the same projection is taken from the thin SVD of ``Z`` with that cut-off.

    Cost: one least-squares solve, O(m n min(m, n)).  Computed in the features' dtype (float64 recommended for
    ill-conditioned representations).  Returns a Python float (0 when ``Y`` lies in the span of ``Z``).
    """
    if not isinstance(Z, torch.Tensor) or Z.dim() < 2:
        raise ValueError("features Z must be a tensor with one row per sample (at least 2-D).")
    Z = Z.detach().flatten(1)
    if not Z.is_floating_point():
        Z = Z.to(torch.get_default_dtype())
    m = Z.shape[0]
    Yt = as_target_matrix(Y.detach(), m, dtype=Z.dtype).to(Z.device)
    if m == 0:
        raise ValueError("least_squares_distance needs at least one sample.")
    if not (torch.isfinite(Z).all() and torch.isfinite(Yt).all()):
        raise ValueError("least_squares_distance got non-finite features or targets.")
    if bias:
        Z = torch.cat([Z, torch.ones(m, 1, dtype=Z.dtype, device=Z.device)], dim=1)
    if rcond is None:
        rcond = torch.finfo(Z.dtype).eps * max(Z.shape)
    if Z.device.type == "cpu":
        sol = torch.linalg.lstsq(Z, Yt, rcond=rcond, driver="gelsd").solution
        fitted = Z @ sol
    else:
        U, S, _ = torch.linalg.svd(Z, full_matrices=False)
        U = U[:, S > rcond * S.max()] if S.numel() else U[:, :0]
        fitted = U @ (U.T @ Yt)
    return float(((Yt - fitted) ** 2).sum() / m)


# ----------------------------------------------------------------------------------------------- k-NN, k-redundancy
# Seed 002 §5.4, Def. 8: a sample is *redundant* when all of its k nearest neighbours (itself excluded) share its
# label; the k-redundancy of a data set (or of a layer's features) is the fraction of redundant samples.

DEFAULT_CHUNK = 1024  # query rows per distance block: the block is chunk x n floats (n = 50,000 -> 200 MB in fp32)


def hard_labels(labels, num_rows: int, *, what: str = "k_redundancy") -> torch.Tensor:
    """``labels`` as a 1-D int64 tensor of class indices; soft or one-hot labels (any floating or 2-D tensor) are
    refused, since the k-NN criterion compares class identities."""
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{what} needs labels as a torch.Tensor of class indices, got {type(labels).__name__}.")
    if labels.dim() != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(f"{what} needs hard labels (a 1-D integer tensor of class indices), got a "
                         f"{'x'.join(map(str, labels.shape)) or 'scalar'} {str(labels.dtype).replace('torch.', '')} "
                         "tensor; convert one-hot or soft labels with labels.argmax(1).")
    if labels.shape[0] != num_rows:
        raise ValueError(f"labels have {labels.shape[0]} entries but the features have {num_rows} rows; "
                         "give one label per sample.")
    if num_rows and int(labels.min()) < 0:
        raise ValueError(f"{what} needs non-negative class indices, got {int(labels.min())}.")
    return labels.long()


def check_knn_input(features, labels, k, *, what: str, check_classes: bool = True):
    """Validated ``(features (n, d) float, labels (n,) int64, k)``; every refusal is one sentence."""
    if not isinstance(features, torch.Tensor) or features.dim() < 2:
        raise ValueError(f"{what} needs features as a tensor with one row per sample (at least 2-D).")
    X = features.detach().flatten(1)
    if not X.is_floating_point():
        X = X.to(torch.get_default_dtype())
    n = X.shape[0]
    y = hard_labels(labels.detach() if isinstance(labels, torch.Tensor) else labels, n, what=what)
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{what} needs k a positive integer, got {k!r}.")
    if k >= n:
        raise ValueError(f"{what} needs k smaller than the number of samples: k = {k} but there are {n} samples "
                         f"(each sample has at most {n - 1} neighbours).")
    if not torch.isfinite(X).all():
        raise ValueError(f"{what} got non-finite features (NaN or inf); k-NN distances would be meaningless.")
    counts = torch.bincount(y)
    present = counts.nonzero().flatten()
    if present.numel() < 2:
        raise ValueError(f"{what} needs at least two classes, but all {n} samples have label {int(y[0])}: every "
                         "sample would be trivially redundant.")
    if check_classes:
        small = [int(c) for c in present if int(counts[c]) < k + 1]
        if small:
            c = small[0]
            raise ValueError(f"{what}: class {c} has {int(counts[c])} samples, fewer than k + 1 = {k + 1}, so none "
                             f"of them can have k same-class neighbours ({len(small)} such class(es)); lower k "
                             "(or drop those classes).")
    return X, y


def knn_indices(features: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
    """The ``(n, k)`` indices of each row's k nearest other rows (Euclidean), exact, nearest first.

    Order and ties: neighbours are ranked by (squared distance, index) -- of two rows at the same distance the one
    with the smaller index comes first -- and a row is never its own neighbour (an exact duplicate of it is, at
    distance 0).  Distances are squared Euclidean ``|a|^2 + |b|^2 - 2 a.b`` in the features' dtype (clamped at 0):
    for integer-valued features (exactly representable) every tie is an exact tie; for general float data two
    distances equal in exact arithmetic may differ by round-off and are then ranked by their computed values.

    Cost: O(n^2 d) flops in blocks of ``chunk_size`` query rows; peak extra memory about
    ``chunk_size * n * (itemsize + 1)`` bytes (plus ``chunk_size * n * 8`` only for the rows of a block with a tie
    at the k-th place).  ``features`` (n, d) must have n > k.
    """
    X = features.detach().flatten(1)
    if not X.is_floating_point():
        X = X.to(torch.get_default_dtype())
    n = X.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < n:
        raise ValueError(f"knn_indices needs an integer k with 1 <= k < number of rows ({n}), got {k!r}.")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    sq = (X * X).sum(1)
    out = torch.empty(n, k, dtype=torch.long, device=X.device)
    cols = torch.arange(n, device=X.device)
    for s in range(0, n, chunk_size):
        e = min(s + chunk_size, n)
        # |b|^2 - 2 a.b in one GEMM (the row vector broadcasts), then + |a|^2 in place: one chunk x n block alive
        D = torch.addmm(sq[None, :], X[s:e], X.T, alpha=-2.0).add_(sq[s:e, None]).clamp_min_(0)
        D[torch.arange(e - s, device=X.device), cols[s:e]] = float("inf")  # never one's own neighbour
        kk = min(k + 1, n)  # one more than needed: a tie across the k-th place shows as vals[k] == vals[k - 1]
        vals, idx = torch.topk(D, kk, dim=1, largest=False, sorted=True)
        # topk's choice among equal values is unspecified: where the k-th distance is tied with a row left out,
        # redo those rows by (distance, index) so the result is the documented one.
        kth = vals[:, k - 1:k]
        amb = (vals[:, k] == vals[:, k - 1]).nonzero().flatten() if kk > k else idx.new_empty(0)
        idx = idx[:, :k]
        if amb.numel():
            Da = D[amb]
            ka = kth[amb]
            less = Da < ka
            need = k - less.sum(1, keepdim=True)
            sel = less | ((Da == ka) & (torch.cumsum(Da == ka, dim=1) <= need))
            # stable sort of the selected columns by distance keeps the index order within ties
            key = torch.where(sel, Da, torch.full_like(Da, float("inf")))
            order = torch.sort(key, dim=1, stable=True).indices[:, :k]
            idx[amb] = order
        # the same within the first k: order equal distances by index (stable sort by value of index-sorted ids)
        idx_sorted = torch.sort(idx, dim=1).values
        v = torch.gather(D, 1, idx_sorted)
        idx = torch.gather(idx_sorted, 1, torch.sort(v, dim=1, stable=True).indices)
        out[s:e] = idx
        del D
    return out


def _faiss_knn(X: torch.Tensor, k: int):
    """k+1 nearest rows by faiss's exact flat L2 index (None when faiss is not installed)."""
    try:
        import faiss  # optional: never a dependency
    except ImportError:
        return None
    import numpy as np

    A = np.ascontiguousarray(X.detach().cpu().numpy().astype("float32"))
    index = faiss.IndexFlatL2(A.shape[1])
    index.add(A)
    _, I = index.search(A, k + 1)
    return torch.as_tensor(I)


def redundant_mask(features: torch.Tensor, labels: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK,
                   backend: str = "torch", check_classes: bool = True, what: str = "k_redundancy") -> torch.Tensor:
    """Boolean ``(n,)`` mask: True where all k nearest neighbours of a sample (itself excluded, ties by index, see
    :func:`knn_indices`) have the sample's label (seed 002, §5.4).

    ``backend="faiss"`` uses faiss's exact flat index when it is installed (float32; ties in faiss's own order,
    self-matches removed by index) and falls back to the torch path otherwise.  ``check_classes=False`` allows
    classes with fewer than k + 1 samples (their samples are then never redundant).  Cost: see
    :func:`knn_indices`.
    """
    X, y = check_knn_input(features, labels, k, what=what, check_classes=check_classes)
    if backend not in ("torch", "faiss"):
        raise ValueError(f"unknown k-NN backend {backend!r}; accepted: torch, faiss.")
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}.")
    nn_idx = None
    if backend == "faiss":
        I = _faiss_knn(X, k)
        if I is not None:
            rows = torch.arange(len(X))[:, None]
            keep = I != rows
            # drop the self-match (or the last column when faiss ranked a duplicate first)
            nn_idx = torch.stack([r[m][:k] for r, m in zip(I, keep)]).to(X.device)
    if nn_idx is None:
        nn_idx = knn_indices(X, k, chunk_size=chunk_size)
    return (y[nn_idx] == y[:, None]).all(1)


def k_redundancy(features: torch.Tensor, labels: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK,
                 backend: str = "torch") -> float:
    """k-redundancy (seed 002, Def. 8): the fraction of samples whose k nearest neighbours all share their label.

    ``features``: ``(n, ...)`` (flattened after the first dimension) -- input space or any layer's features;
    ``labels``: ``(n,)`` integer class indices (one-hot or soft labels are refused); ``1 <= k < n``.  Exact k-NN by
    squared Euclidean distance in blocks of ``chunk_size`` rows (memory O(chunk_size * n)); ties at equal distance
    are ranked by sample index (see :func:`knn_indices`).  Refuses: k >= n, a class with fewer than k + 1 samples,
    a single class, non-finite features.  Cost O(n^2 d).  Returns a float in [0, 1].
    """
    return float(redundant_mask(features, labels, k, chunk_size=chunk_size, backend=backend).double().mean())


# ----------------------------------------------------------------------------------------------- selection entropy
SELECTION_ACTS = {"relu": 0.0, "tanh": 2.0, "sigmoid": 4.0}


@dataclass
class SelectionEntropy:
    """Feature-wise H(Y | S+(z)) in bits (NaN where a feature selects no sample), their mean over the features that
    select something (the layer-wise H(Y|Z)), and each feature's selected fraction."""

    per_feature: torch.Tensor
    mean: float
    selected_fraction: torch.Tensor


def selection_entropy(pre_activations: torch.Tensor, labels: torch.Tensor, act: str = "relu", *,
                      flat: float | None = None) -> SelectionEntropy:
    """H(Y | S+(z)) per feature and its layer mean, in bits (seed 002, §5.5.4).

    The selection S+(z) of feature z = act(a) is the set of samples whose pre-activation ``a`` lies outside the
    activation's flat region: ``a > flat`` for ``relu`` (``flat`` default 0); ``|a| < flat`` for ``tanh``
    (default 2, where tanh' = 0.07) and ``sigmoid`` (default 4, where sigmoid' = 0.018) -- the saturation
    thresholds are our convention, the source gives none.  H(Y | S+(z)) is the entropy of the class histogram of
    the selected samples (log base 2; its maximum is log2 of the number of classes).

    ``pre_activations``: ``(n, features)`` (more dimensions are flattened: each channel x position is a feature);
    ``labels``: ``(n,)`` class indices.  Cost O(n * features * classes) memory for the per-class counts.
    """
    if act not in SELECTION_ACTS:
        raise ValueError(f"unknown activation {act!r} for selection_entropy; accepted: {', '.join(SELECTION_ACTS)}.")
    if not isinstance(pre_activations, torch.Tensor) or pre_activations.dim() < 2:
        raise ValueError("selection_entropy needs pre-activations as a tensor with one row per sample (at least 2-D).")
    A = pre_activations.detach().flatten(1)
    y = hard_labels(labels.detach() if isinstance(labels, torch.Tensor) else labels, A.shape[0],
                    what="selection_entropy")
    if A.shape[0] == 0:
        raise ValueError("selection_entropy needs at least one sample.")
    if not torch.isfinite(A).all():
        raise ValueError("selection_entropy got non-finite pre-activations.")
    t = SELECTION_ACTS[act] if flat is None else float(flat)
    sel = (A > t) if act == "relu" else (A.abs() < t)
    onehot = torch.nn.functional.one_hot(y, int(y.max()) + 1).to(torch.float64)
    counts = onehot.T @ sel.to(torch.float64)  # (classes, features): selected samples of each class
    tot = counts.sum(0)
    p = counts / tot.clamp_min(1)
    h = -(torch.where(p > 0, p * torch.log2(p), torch.zeros_like(p))).sum(0)
    h = torch.where(tot > 0, h, torch.full_like(h, float("nan")))
    valid = ~torch.isnan(h)
    mean = float(h[valid].mean()) if valid.any() else float("nan")
    return SelectionEntropy(h, mean, tot / A.shape[0])


# ----------------------------------------------------------------------------------------------- weights
def stable_rank(W: torch.Tensor) -> float:
    """Stable rank ||W||_F^2 / ||W||_2^2 (the standard definition; seed 002 uses it without defining it, §6.6).

    ``W``: a weight tensor; more than 2 dimensions (conv kernels) are reshaped to ``(out, -1)``.  Lies in
    [1, rank(W)].  Cost: one SVD (O(out * in * min(out, in))).  A zero matrix is refused (0/0).
    """
    if not isinstance(W, torch.Tensor) or W.dim() < 2:
        raise ValueError("stable_rank needs a weight matrix (a tensor with at least 2 dimensions).")
    M = W.detach().flatten(1)
    if not M.is_floating_point():
        M = M.to(torch.get_default_dtype())
    if not torch.isfinite(M).all():
        raise ValueError("stable_rank got non-finite weights.")
    s = torch.linalg.svdvals(M)
    if float(s.max()) == 0.0:
        raise ValueError("stable_rank of a zero matrix is undefined (0/0).")
    return float((s ** 2).sum() / s.max() ** 2)


def weight_entropy(W: torch.Tensor, bits: int = 4) -> float:
    """Shannon entropy (bits) of the histogram of ``W``'s values over ``2**bits`` equal bins spanning [min, max]
    (seed 002, ch. 3: the quantity whose fall during training drives the compression; M = 4 bits by default).

    The maximum value falls into the last bin (the source's index formula would put it one past the end).  A
    constant tensor has entropy 0.  Cost O(numel).
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 24:
        raise ValueError(f"bits must be an integer in [1, 24], got {bits!r}.")
    w = W.detach().flatten().to(torch.float64)
    if w.numel() == 0:
        raise ValueError("weight_entropy needs at least one weight.")
    if not torch.isfinite(w).all():
        raise ValueError("weight_entropy got non-finite weights.")
    lo, hi = float(w.min()), float(w.max())
    if hi == lo:
        return 0.0
    nb = 2 ** bits
    idx = ((w - lo) / (hi - lo) * nb).floor().long().clamp_(0, nb - 1)
    p = torch.bincount(idx, minlength=nb).double() / w.numel()
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum())


# ----------------------------------------------------------------------------------------------- error-gradient RMS
def error_gradient_rms(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, loss_fn,
                       layers=None) -> dict[str, float]:
    """Per-layer RMS of the back-propagated error gradients ("deltas") dL/d(output of each layer) on one batch --
    the quantity of seed 002's Fig. 4.3 (output layer and hidden layers, GA vs softmax).

    ``layers``: module names to measure (default: every ``nn.Linear`` / ``nn.Conv*`` module).  The loss is taken
    as ``loss_fn(model(inputs), targets)`` -- a batch-mean loss gives deltas scaled by 1/batch size, the same for
    every loss compared.  The model is run in its current mode; its parameters' ``.grad`` are not touched
    (``torch.autograd.grad`` w.r.t. the layer outputs only) and every buffer (BatchNorm running statistics) is
    restored bit-identically afterwards.  Cost: one forward and one backward pass.
    """
    mods = dict(model.named_modules())
    if layers is None:
        layers = [n for n, m in mods.items()
                  if isinstance(m, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d))]
    else:
        missing = [n for n in layers if n not in mods]
        if missing:
            raise ValueError(f"error_gradient_rms: no module named {missing[0]!r}; accepted: module names of the "
                             "model (model.named_modules()).")
    if not layers:
        raise ValueError("error_gradient_rms found no layer to measure (no Linear/Conv module); pass layers=.")
    outs: dict[str, torch.Tensor] = {}
    handles = [mods[n].register_forward_hook(lambda m, i, o, n=n: outs.__setitem__(n, o)) for n in layers]
    saved = {n: b.detach().clone() for n, b in model.named_buffers()}
    try:
        with torch.enable_grad():
            loss = loss_fn(model(inputs), targets)
            names = [n for n in layers if n in outs and outs[n].requires_grad]
            grads = torch.autograd.grad(loss, [outs[n] for n in names], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
        with torch.no_grad():
            for n, b in model.named_buffers():
                b.copy_(saved[n])
    return {n: (float(g.detach().double().pow(2).mean().sqrt()) if g is not None else 0.0)
            for n, g in zip(names, grads)}
