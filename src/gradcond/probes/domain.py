"""Collapsing-domain / pseudo-linearity statistics of seed 003 (protocol I.2; notes/003 §1.5).

Measured on **pre-activations**: the input of every nonlinearity layer (the normalisation output when a
normalisation precedes it), over a dataset:

* pre-activation standard deviation: per neuron the population std over the dataset,
  ``sqrt(E_D f(i)^2 - (E_D f(i))^2)`` (the extracted text omits the square root -- erratum), summarised by the
  **quadratic mean** over neurons;
* sign diversity: per neuron ``min(pos, 1 - pos)`` with ``pos`` the fraction of strictly positive values,
  summarised by the **mean** over neurons (max 0.5; ~0 means a ReLU acts linearly);
* optional mean pairwise activation correlation (mean-field style, not in the paper's tables): the mean over
  distinct sample pairs (i, j) of the cosine similarity of their pre-activation vectors, on the first
  ``corr_samples`` samples.

"Neuron" = one entry of the per-sample (flattened) tensor, so a conv channel at each position is a neuron.
Table 1 does not say at which layer its std / sign diversity are taken; :attr:`DomainStats.top` returns the
highest nonlinearity (the reading the repro uses, as in Figs. 4-6 "of the highest nonlinearity layer").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..utils import as_batches
from . import _hooks as H

__all__ = ["DomainStats", "domain_stats"]


@dataclass
class DomainStats:
    """Per nonlinearity layer (forward order): ``std`` (QM over neurons of per-neuron std), ``sign_diversity``
    (mean over neurons of min(pos, 1-pos)), ``correlation`` (mean pairwise cosine or None), ``dims``."""

    layers: list
    std: list
    sign_diversity: list
    correlation: list | None
    dims: list
    n_samples: int

    @property
    def top(self) -> dict:
        """Statistics at the highest (last in forward order) nonlinearity layer."""
        i = len(self.layers) - 1
        return {"layer": self.layers[i], "std": self.std[i], "sign_diversity": self.sign_diversity[i],
                "correlation": None if self.correlation is None else self.correlation[i]}

    def to_dict(self) -> dict:
        d = asdict(self)
        d["top"] = self.top
        return d

    def to_frame(self) -> list[dict]:
        """One dict per layer (pandas-free)."""
        return [{"layer": n, "std": s, "sign_diversity": sd, "correlation": None if self.correlation is None
                 else self.correlation[i], "dim": d}
                for i, (n, s, sd, d) in enumerate(zip(self.layers, self.std, self.sign_diversity, self.dims))]

    def plot(self):
        """Std and sign diversity against layer position; returns a matplotlib Figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8, 3))
        a, b = fig.subplots(1, 2)
        a.plot(self.std, "o-", ms=2)
        a.set_ylabel("pre-activation std (QM)")
        b.plot(self.sign_diversity, "o-", ms=2)
        b.set_ylabel("sign diversity")
        b.set_ylim(0, 0.55)
        for ax in (a, b):
            ax.set_xlabel("nonlinearity layer (forward order)")
        fig.tight_layout()
        return fig


def domain_stats(model: nn.Module, data, layers=None, *, correlation: bool = False,
                 corr_samples: int = 512, reduce=None) -> DomainStats:
    """Pre-activation std, sign diversity (and optionally mean pairwise correlation) per nonlinearity layer.

    ``layers``: None (inputs of every activation module) or module names whose *inputs* are measured.
    ``data``: x, (x, y), a TensorDataset or an iterable of batches; statistics are over all samples.
    Cost: forward passes only (no graph), O(N * sum d) memory-free accumulation; the correlation adds one
    ``corr_samples`` x ``corr_samples`` Gram matrix per layer. BatchNorm buffers are left unchanged.

    ``reduce`` (distributed measurement, issue 24): a function summing a float64 tensor over the ranks (e.g.
    :func:`gradcond.distributed.all_reduce_sum`); each rank passes its slice of the data and the per-neuron sums
    (Σf, Σf², count of f > 0, samples) are reduced in one call, so every rank returns the statistics of the union of
    the slices. Not with ``correlation=True`` (pairs across ranks would be missing): ValueError.
    """
    if reduce is not None and correlation:
        raise ValueError("domain_stats(correlation=True) cannot be reduced over ranks (the sample pairs across ranks "
                         "are not formed); measure the correlation in one process.")
    if layers is None:
        mods = H.default_layers(model, kinds=("act",))
        if not mods:
            raise ValueError("the model has no activation modules; pass layers=[module names] to measure their inputs.")
        wanted = None
    else:
        mods, wanted = H.select_layers(model, layers)
    acc: dict = {}
    order: list = []
    counts: dict = {}
    handles = []
    bsize = [0]

    def make(name):
        def pre(module, inputs):
            idx = counts.get(name, 0)
            counts[name] = idx + 1
            lname = name if idx == 0 else f"{name}[{idx}]"
            if wanted is not None and lname not in wanted:
                return
            t = inputs[0] if inputs and torch.is_tensor(inputs[0]) else None
            if t is None or not t.is_floating_point() or t.dim() == 0 or t.shape[0] != bsize[0]:
                return
            f = t.detach().reshape(t.shape[0], -1).double()
            a = acc.get(lname)
            if a is None:
                z = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)  # on the model's device
                a = acc[lname] = {"s": z, "s2": z.clone(), "pos": z.clone(), "n": 0, "corr": []}
                order.append(lname)
            a["s"] += f.sum(0)
            a["s2"] += (f * f).sum(0)
            a["pos"] += (f > 0).double().sum(0)
            a["n"] += f.shape[0]
            if correlation:
                have = sum(c.shape[0] for c in a["corr"])
                if have < corr_samples:
                    a["corr"].append(f[: corr_samples - have].clone())
        return pre

    with H.measurement(model), torch.no_grad():
        for name, m in mods.items():
            handles.append(m.register_forward_pre_hook(make(name)))
        try:
            for batch in as_batches(data, targets=False):
                counts.clear()
                bsize[0] = int(batch[0].shape[0])
                model(batch[0])
        finally:
            for h in handles:
                h.remove()
    if wanted is not None:
        missing = sorted(wanted - set(order))
        if missing:
            raise ValueError(f"layer(s) {', '.join(map(repr, missing))} received no floating-point input.")
    if reduce is not None and order:
        parts = [t for name in order for t in (acc[name]["s"], acc[name]["s2"], acc[name]["pos"],
                                                 torch.tensor([float(acc[name]["n"])], dtype=torch.float64,
                                                              device=acc[name]["s"].device))]
        sizes = [t.numel() for t in parts]
        flat = reduce(torch.cat(parts).double())
        chunks = list(torch.split(flat, sizes))
        for i, name in enumerate(order):
            a = acc[name]
            a["s"], a["s2"], a["pos"], cnt = chunks[4 * i: 4 * i + 4]
            a["n"] = int(round(float(cnt)))
    stds, sds, corrs, dims = [], [], [], []
    n = None
    for name in order:
        a = acc[name]
        n = a["n"]
        mean = a["s"] / n
        var = (a["s2"] / n - mean * mean).clamp_min(0.0)
        stds.append(float(torch.sqrt(var.mean())))  # QM over neurons of sqrt(var) = sqrt(mean var)
        pos = a["pos"] / n
        sds.append(float(torch.minimum(pos, 1 - pos).mean()))
        dims.append(int(mean.numel()))
        if correlation:
            f = torch.cat(a["corr"])
            if f.shape[0] < 2:
                corrs.append(float("nan"))
            else:
                nrm = f.norm(dim=1, keepdim=True)
                u = f / nrm.clamp_min(1e-300)
                g = u @ u.T
                m = f.shape[0]
                corrs.append(float((g.sum() - g.diagonal().sum()) / (m * (m - 1))))
    return DomainStats(order, stds, sds, corrs if correlation else None, dims, int(n or 0))

