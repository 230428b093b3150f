"""Perturbation directions of the conditioning metrics (seed 004 §2.3 and §3.3).

:func:`weight_directions` draws the weight perturbations ω_k of step-consistency (Defs 2.6/2.7 and a random
baseline); :func:`input_directions` draws the input perturbations δ of batch-dissonance (Def 3.5, random,
interpolation). Both are deterministic given the ``torch.Generator`` they receive.
"""

from __future__ import annotations

import math

import torch

from gradcond.probes.conditioning.common import check_finite, check_nonzero, need_samples
from gradcond.probes.per_sample import Engine

__all__ = ["normalize", "weight_directions", "input_directions"]


def normalize(v: torch.Tensor, norm: str, eta: float, what: str) -> torch.Tensor:
    """Rescale ``v`` so that ‖v‖_norm = eta (norm "inf" or "2")."""
    s = v.abs().max() if norm == "inf" else v.norm()
    check_nonzero(s, what)
    return v * (eta / s)


def weight_directions(
    e: Engine, sampler: str, n: int, eta: float, norm: str | None, gen: torch.Generator, g0: torch.Tensor
) -> tuple[torch.Tensor, dict]:
    """Weight perturbations ω_k (rows of an (n, m) tensor), seed 004 §2.3.

    * ``limited_targeted`` (Def 2.7, eq. 2.26): ``±η ḡ/‖ḡ‖_norm`` (n ≤ 2; default norm "inf": largest entry η).
    * ``targeted`` (Def 2.6, eq. 2.25): ``η ζ h_W(w,x_i,t_i)/‖h_W(w,x_i,t_i)‖_norm`` for ``n ≤ b`` distinct samples i
      drawn at random, ζ uniform in {-1, +1}; default norm "2" (the source's ‖·‖_𝕎).
    * ``random``: per parameter tensor, entries ~ N(mean, std) of that tensor's current values, times η (the source's
      baseline, §2.3); unnormalized unless ``norm`` is given.
    """
    info: dict = {"sampler": sampler}
    if sampler == "limited_targeted":
        if n > 2:
            raise ValueError(f"the limited_targeted sampler gives at most 2 directions (±ḡ), got n={n}.")
        d = normalize(g0, norm or "inf", eta, "the batch gradient")
        omegas = torch.stack([d, -d][:n])
    elif sampler == "targeted":
        need_samples(e.b, n, f"the targeted sampler with n={n}")
        idx = torch.randperm(e.b, generator=gen)[:n]
        signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        G = e.per_sample_matrix(e.x[idx], e.y[idx])
        check_finite(G, "a per-sample weight gradient")
        omegas = torch.stack(
            [normalize(G[k], norm or "2", eta, f"the weight gradient of sample {int(idx[k])}") * int(signs[k]) for k in range(n)]
        )
        info.update(indices=idx.tolist(), signs=signs.tolist())
    elif sampler == "random":
        rows = []
        for _ in range(n):
            parts = []
            for name in e.names:
                w = e.w[name]
                mu = w.mean()
                sd = w.std(unbiased=False) if w.numel() > 1 else torch.zeros((), dtype=w.dtype, device=w.device)
                # drawn on the CPU (same numbers on any device), then moved to the weights' device
                parts.append((torch.randn(w.numel(), generator=gen, dtype=torch.float64).to(w.device, w.dtype) * sd + mu) * eta)
            v = torch.cat(parts)
            rows.append(normalize(v, norm, eta, "a random direction") if norm else v)
        omegas = torch.stack(rows)
    else:
        raise ValueError(f"sampler must be 'limited_targeted', 'targeted' or 'random', got {sampler!r}.")
    info["norm"] = norm or {"limited_targeted": "inf", "targeted": "2", "random": "none"}[sampler]
    return omegas, info


def input_directions(
    e: Engine, x: torch.Tensor, y: torch.Tensor, sampler: str, n: int, eta: float, norm: str | None,
    gen: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """Input perturbations δ for batch_dissonance (seed 004 §3.3), shape (m, n, *x.shape[1:]).

    * ``targeted`` (Def 3.5, eq. 3.17): a shared set Γ_n of ``η ζ h_X(w,x_j,t_j)/‖h_X‖_norm`` for n ≤ b distinct
      samples j of the batch (default norm "2").
    * ``random``: shared set with entries uniform with the batch's mean and std, times η (unnormalized unless
      ``norm`` is given).
    * ``interpolation``: per sample i and k, ``η (x_j − x_i)`` toward a random other element j ≠ i of the batch
      (decision: a step of fraction η along the segment; rescaled if ``norm`` is given).
    """
    m = x.shape[0]
    info: dict = {"sampler": sampler}
    shape = tuple(e.x.shape[1:])
    if sampler == "targeted":
        need_samples(e.b, n, f"the targeted input sampler with n={n}")
        idx = torch.randperm(e.b, generator=gen)[:n]
        signs = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
        H = e.per_sample_matrix(e.x[idx], e.y[idx], wrt="input")
        check_finite(H, "a per-sample input gradient")
        D = torch.stack(
            [normalize(H[k], norm or "2", eta, f"the input gradient of sample {int(idx[k])}") * int(signs[k]) for k in range(n)]
        ).reshape((n,) + shape)
        info.update(indices=idx.tolist(), signs=signs.tolist())
        deltas = D.unsqueeze(0).expand((m,) + D.shape)
    elif sampler == "random":
        xf = e.x.reshape(-1)
        mu, sd = xf.mean(), xf.std(unbiased=False)
        half = math.sqrt(3.0) * sd
        U = torch.rand((n,) + shape, generator=gen, dtype=torch.float64).to(e.x.device, e.dtype)
        D = (mu - half + 2 * half * U) * eta
        if norm:
            D = torch.stack([normalize(D[k], norm, eta, "a random input direction") for k in range(n)])
        deltas = D.unsqueeze(0).expand((m,) + D.shape)
    elif sampler == "interpolation":
        need_samples(e.b, 2, "the interpolation input sampler")
        j = torch.randint(0, e.b - 1, (m, n), generator=gen)
        j = j + (j >= torch.arange(m).unsqueeze(1)).long()  # skip i itself
        deltas = eta * (e.x[j] - x.unsqueeze(1))
        if norm:
            flat = deltas.reshape(m, n, -1)
            s = flat.abs().amax(-1) if norm == "inf" else flat.norm(dim=-1)
            if (s == 0).any():
                raise ValueError("an interpolation direction is zero (duplicate inputs); the ratio is undefined.")
            deltas = (flat * (eta / s).unsqueeze(-1)).reshape(deltas.shape)
        info["partners"] = j.tolist()
    else:
        raise ValueError(f"sampler must be 'targeted', 'random' or 'interpolation', got {sampler!r}.")
    info["norm"] = norm or {"targeted": "2", "random": "none", "interpolation": "none"}[sampler]
    return deltas, info
