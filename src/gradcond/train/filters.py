"""Data filters (seed 002, Øland): drop training samples that carry little information about the decision boundary.

* :func:`k_filter` -- offline k-filtering (§5.4): keep the samples that are NOT k-redundant, i.e. at least one of
  their k nearest neighbours (input space or any layer's features) has another label.
* :class:`KFilter` -- the same online, as a trainer callback: from ``warmup_epochs`` on, at the start of every epoch
  the current model's features of the full training set are k-filtered in random blocks of ``filter_batch``
  samples (the source runs k-NN "on large mini-batches"), at most ``max_removed`` of the data is removed, and the
  epoch trains on the rest.  The source's CINIC-10 schedule (§6.8) is ``KFilter(k=10, warmup_epochs=30,
  filter_batch=6148, max_removed=0.6)``; as a run config::

      [[callbacks]]
      name = "k_filter"
      k = 10
      warmup_epochs = 30
      filter_batch = 6148
      max_removed = 0.6

* :class:`LossFilter` -- the source's cheaper replacement for high dimensions (§6.8): from epoch ``from_epoch`` on,
  drop the ``fraction`` of samples with the lowest per-sample loss under the current model.

How a callback removes samples: at ``on_epoch_start`` it sets ``state.train_loader`` to a ``DataLoader`` over a
``Subset`` of the original loader's dataset (same batch size, shuffling, data-order generator, collate function and
``drop_last``); :func:`gradcond.train.fit` iterates ``state.train_loader`` each epoch.  The filter is recomputed from
the FULL training set every epoch (a removed sample comes back when it becomes informative again) and depends only
on the model's state at the epoch start and the seed, so ``--resume`` reproduces it.  Each filtering logs a
``data_filter`` event (kept / removed counts, removed per class) and a metric row ``data_filter/kept_fraction``
(every epoch, 1.0 while the filter is off).  The loader must be a ``torch.utils.data.DataLoader`` over a map-style
dataset whose items are ``(x, y)`` pairs.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.utils.data import DataLoader, RandomSampler, Subset

from ..callbacks import Callback
from ..probes.representation import DEFAULT_CHUNK, check_knn_input, knn_indices, redundant_mask

__all__ = ["k_filter", "KFilter", "LossFilter"]


def k_filter(features: torch.Tensor, labels: torch.Tensor, k: int, *, chunk_size: int = DEFAULT_CHUNK,
             backend: str = "torch") -> torch.Tensor:
    """Keep mask of k-filtering (seed 002, §5.4): True for the samples to keep, i.e. those with at least one of
    their k nearest neighbours in another class; False for the k-redundant ones.

    ``features``: ``(n, ...)`` inputs or a layer's features (flattened after the first dimension); ``labels``:
    ``(n,)`` integer class indices.  Exact k-NN with ties ranked by sample index
    (:func:`gradcond.probes.knn_indices`).  Refuses k >= n, a class with fewer than k + 1 samples, one-hot or soft
    labels, a single class.  ``keep.float().mean()`` is 1 - k-redundancy.  Cost O(n^2 d), memory O(chunk_size n).
    """
    return ~redundant_mask(features, labels, k, chunk_size=chunk_size, backend=backend, what="k_filter")


def _block_redundant(X: torch.Tensor, y: torch.Tensor, k: int) -> torch.Tensor:
    """Redundant mask inside one filter block, without refusing what a random block may contain: a block of at
    most k samples keeps everything; a block of a single class is all redundant (every neighbour shares the
    label); a class with fewer than k + 1 samples in the block is never redundant."""
    n = len(y)
    if n <= k:
        return torch.zeros(n, dtype=torch.bool)
    if bool((y == y[0]).all()):
        return torch.ones(n, dtype=torch.bool)
    nn_idx = knn_indices(X, k)
    return (y[nn_idx] == y[:, None]).all(1)


def _check_int(name: str, v, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}.")
    return int(v)


def _check_fraction(name: str, v, *, open_right: bool) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v
    ok = ok and (v < 1 if open_right else v <= 1)
    if not ok:
        raise ValueError(f"{name} must be a number in [0, {'1)' if open_right else '1]'}, got {v!r}.")
    return float(v)


class _SubsetFilter(Callback):
    """Shared machinery: keep the original loader, swap in a loader over the kept subset, log what was removed."""

    kind = ""

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._base: DataLoader | None = None
        self.history: list[dict] = []  # one record per epoch: epoch, kept, total (in memory, for plots/tests)

    def on_train_start(self, state) -> None:
        self._base = None
        self._ensure_base(state)

    def _ensure_base(self, state) -> None:
        # also reached first in on_epoch_start: a resumed fit() does not call on_train_start
        if self._base is not None:
            return
        loader = state.train_loader
        if not isinstance(loader, DataLoader) or not hasattr(loader.dataset, "__getitem__"):
            raise ValueError(f"{type(self).__name__} needs the train loader to be a torch DataLoader over a map-style "
                             f"dataset of (x, y) pairs, got {type(loader).__name__}.")
        self._base = loader

    def _full_tensors(self, state) -> tuple[torch.Tensor, torch.Tensor]:
        """All training inputs and labels, in dataset order (batched through the base loader's collate)."""
        self._ensure_base(state)
        ds = self._base.dataset
        if isinstance(ds, torch.utils.data.TensorDataset) and len(ds.tensors) >= 2:
            return ds.tensors[0], ds.tensors[1]
        xs, ys = [], []
        plain = DataLoader(ds, batch_size=1024, shuffle=False, collate_fn=self._base.collate_fn)
        for x, y in plain:
            xs.append(x)
            ys.append(y)
        return torch.cat(xs), torch.cat(ys)

    def _swap(self, state, keep: torch.Tensor | None) -> None:
        base = self._base
        if keep is None or bool(keep.all()):
            state.train_loader = base
            return
        idx = keep.nonzero().flatten().tolist()
        shuffle = isinstance(base.sampler, RandomSampler)
        state.train_loader = DataLoader(
            Subset(base.dataset, idx), batch_size=base.batch_size, shuffle=shuffle, generator=base.generator,
            collate_fn=base.collate_fn, drop_last=base.drop_last, num_workers=base.num_workers,
        )

    def _log(self, state, keep: torch.Tensor | None, labels: torch.Tensor, **fields) -> None:
        n = len(labels)
        kept = n if keep is None else int(keep.sum())
        self.history.append({"epoch": state.epoch, "kept": kept, "total": n})
        state.log_metric("data_filter", "kept_fraction", kept / max(n, 1))
        if keep is None:
            return
        removed = labels[~keep]
        per_class = {str(int(c)): int((removed == c).sum()) for c in torch.unique(labels)}
        state.log_event("data_filter", filter=self.kind, kept=kept, removed=n - kept, total=n,
                        kept_fraction=kept / max(n, 1), removed_per_class=per_class, **fields)

    def on_train_end(self, state) -> None:
        if self._base is not None:
            state.train_loader = self._base  # leave the state as fit() was given it


class KFilter(_SubsetFilter):
    """Online k-filtering (seed 002, §5.4 and §6.8): from epoch ``warmup_epochs`` (0-based) on, each epoch trains
    only on the samples that are not k-redundant in the current model's features.

    ``k``: neighbours; ``warmup_epochs``: epochs trained on the full data first; ``filter_batch``: k-NN runs inside
    random blocks of this many samples (``None``: the whole training set at once -- exact global k-filtering);
    ``max_removed``: at most this fraction of the training set is removed per epoch (when more are redundant, a
    random subset of them, drawn from ``seed`` and the epoch, is kept); ``layer``: the module name whose output is
    the feature space (``None``: the input space).  Features are computed in eval mode under ``no_grad`` (the model's
    mode is restored; eval mode leaves BatchNorm statistics untouched).  Cost per filtered epoch: one forward pass
    over the training set plus O(n * filter_batch * d) for the k-NN.
    """

    kind = "k_filter"

    def __init__(self, k: int = 10, warmup_epochs: int = 0, filter_batch: int | None = None,
                 max_removed: float = 1.0, layer: str | None = None, seed: int = 0):
        super().__init__(seed)
        self.k = _check_int("KFilter k", k, 1)
        self.warmup_epochs = _check_int("KFilter warmup_epochs", warmup_epochs, 0)
        if filter_batch is not None:
            filter_batch = _check_int("KFilter filter_batch", filter_batch, k + 1)
        self.filter_batch = filter_batch
        self.max_removed = _check_fraction("KFilter max_removed", max_removed, open_right=False)
        self.layer = layer

    def _features(self, state, X: torch.Tensor) -> torch.Tensor:
        if self.layer is None:
            return X.flatten(1)
        model = state.model
        mods = dict(model.named_modules())
        if self.layer not in mods:
            raise ValueError(f"KFilter layer {self.layer!r} is not a module of the model; accepted: module names of "
                             "model.named_modules().")
        dtype = next(model.parameters()).dtype
        feats: list[torch.Tensor] = []
        h = mods[self.layer].register_forward_hook(lambda m, i, o: feats.append(o.detach().flatten(1)))
        was = model.training
        model.eval()
        try:
            with torch.no_grad():
                for s in range(0, len(X), 1024):
                    xb = X[s:s + 1024]
                    model(xb.to(dtype) if xb.is_floating_point() else xb)
        finally:
            h.remove()
            model.train(was)
        return torch.cat(feats)

    def on_epoch_start(self, state) -> None:
        X, y = self._full_tensors(state)
        if state.epoch < self.warmup_epochs:
            self._swap(state, None)
            self._log(state, None, y)
            return
        if y.dim() != 1 or y.is_floating_point():
            raise ValueError("KFilter needs hard labels (a 1-D integer tensor of class indices) in the training set.")
        F = self._features(state, X)
        n = len(y)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + state.epoch)
        if self.filter_batch is None or self.filter_batch >= n:
            check_knn_input(F, y, self.k, what="KFilter", check_classes=False)
            red = _block_redundant(F, y.long(), self.k)
        else:
            red = torch.zeros(n, dtype=torch.bool)
            perm = torch.randperm(n, generator=gen)
            for s in range(0, n, self.filter_batch):
                ids = perm[s:s + self.filter_batch]
                red[ids] = _block_redundant(F[ids], y[ids].long(), self.k)
        cap = int(math.floor(self.max_removed * n))
        capped = int(red.sum()) > cap
        if capped:  # keep a random subset of the redundant samples so that exactly `cap` are removed
            cand = red.nonzero().flatten()
            drop = cand[torch.randperm(len(cand), generator=gen)[:cap]]
            red = torch.zeros(n, dtype=torch.bool)
            red[drop] = True
        keep = ~red
        self._swap(state, keep)
        self._log(state, keep, y, k=self.k, filter_batch=self.filter_batch, layer=self.layer, capped=capped)


def per_sample_losses(model, loss_fn, X: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """``loss_fn`` of each sample alone (``loss_fn(out[i:i+1], y[i:i+1])``), evaluated with ``torch.vmap`` (a plain
    loop when the loss does not support vmap), in eval mode under ``no_grad``; the model's mode is restored."""
    dtype = next(model.parameters()).dtype
    was = model.training
    model.eval()
    out_l = []
    try:
        with torch.no_grad():
            for s in range(0, len(X), batch_size):
                xb, yb = X[s:s + batch_size], y[s:s + batch_size]
                xb = xb.to(dtype) if xb.is_floating_point() else xb
                yb = yb.to(dtype) if yb.is_floating_point() else yb
                out = model(xb)
                try:
                    li = torch.vmap(lambda o, t: loss_fn(o[None], t[None]))(out, yb)
                except Exception:  # a loss with data-dependent control flow: one call per sample
                    li = torch.stack([loss_fn(out[i:i + 1], yb[i:i + 1]) for i in range(len(out))])
                out_l.append(li.detach().reshape(-1))
    finally:
        model.train(was)
    return torch.cat(out_l)


class LossFilter(_SubsetFilter):
    """Loss filtering (seed 002, §6.8): from epoch ``from_epoch`` (0-based) on, each epoch drops the ``fraction`` of
    training samples with the LOWEST per-sample loss under the model at the epoch start (the source: 25 % from
    epoch 31, as a cheap replacement for k-NN in high dimensions).  Ties in loss are broken by sample index (lower
    index dropped first).  Cost per filtered epoch: one forward pass over the training set.
    """

    kind = "loss_filter"

    def __init__(self, fraction: float = 0.25, from_epoch: int = 0, seed: int = 0):
        super().__init__(seed)
        self.fraction = _check_fraction("LossFilter fraction", fraction, open_right=True)
        self.from_epoch = _check_int("LossFilter from_epoch", from_epoch, 0)

    def on_epoch_start(self, state) -> None:
        X, y = self._full_tensors(state)
        if state.epoch < self.from_epoch:
            self._swap(state, None)
            self._log(state, None, y)
            return
        losses = per_sample_losses(state.model, state.loss_fn, X, y).double()
        n = len(y)
        m = int(math.floor(self.fraction * n))
        order = torch.sort(losses, stable=True).indices  # ascending loss; equal losses keep index order
        keep = torch.ones(n, dtype=torch.bool)
        keep[order[:m]] = False
        self._swap(state, keep)
        labels = y if (y.dim() == 1 and not y.is_floating_point()) else torch.zeros(n, dtype=torch.long)
        self._log(state, keep, labels, fraction=self.fraction,
                  loss_threshold=float(losses[order[m - 1]]) if m else None)
