"""Changes of basis (seed 000, Sec. 3 and 4.1): the :class:`CoB` type and what it does to the parameters.

A CoB assigns a non-zero tau to every free neuron / channel of a :class:`~gradcond.graph.CoBStructure`
(:func:`gradcond.graph.analyze`); teleporting by it maps every weight ``w_ab`` (neuron a -> b) to
``v_ab = tau_b / tau_a * w_ab`` (eq. 1; biases ``* tau_b``; norm gamma/beta ``* tau_out``).  Here:

* :class:`CoB`: ``CoB(structure, tau)``, ``CoB.identity``, ``CoB.from_vector(structure, log_abs, signs)``
  (differentiable in ``log_abs``), ``tau`` / ``log_abs`` / ``signs``, ``inverse()``, ``compose(other)``;
* :func:`random_cob`: the random CoBs of Sec. 4.1 (``intra`` / ``inter``);
* :func:`weight_scale_factors`: ``V = factor * W`` for every parameter (differentiable w.r.t. the CoB); gradients
  transform as ``dV = dW / factor`` (Theorem 5.1);
* the checks shared by every teleport: a CoB belongs to the structure (:func:`_check_same`), a model matches the
  structure (:func:`_params_checked`).

Applying a CoB to a model is :func:`gradcond.teleport.teleport` (:mod:`gradcond.teleport.apply`).
"""

from __future__ import annotations

import torch
from torch import nn

from gradcond.graph import CoBStructure

__all__ = ["CoB", "random_cob", "weight_scale_factors"]

_FMAX: dict = {}  # dtype -> largest finite value


class CoB:
    """A change of basis for one :class:`CoBStructure`: ``tau`` of shape ``(structure.num_free,)``.

    Construct from taus (``CoB(structure, tau)``), or from log-magnitudes and signs
    (``CoB.from_vector(structure, log_abs, signs)``, differentiable in ``log_abs`` -- the parametrisation used for
    gradient ascent on log|tau|).  Validation (finite, non-zero, right length, sign constraints) happens at
    construction and raises ``ValueError``.  Default dtype float64.
    """

    def __init__(self, structure: CoBStructure, tau: torch.Tensor | None = None, *, _log=None):
        if not isinstance(structure, CoBStructure):
            raise TypeError(f"CoB needs a CoBStructure from gradcond.graph.analyze, got {type(structure).__name__}.")
        self.structure = structure
        n = structure.num_free
        if _log is not None:
            log_abs, signs = _log
            self._log_abs, self._signs = log_abs, signs
            self._tau = None
            chk = log_abs.detach()
            if not bool(torch.isfinite(chk).all()):
                raise ValueError("CoB log-magnitudes must be finite (tau must be finite and non-zero).")
        else:
            tau = torch.as_tensor(tau)
            if not tau.is_floating_point():
                tau = tau.to(torch.float64)
            if tau.shape != (n,):
                raise ValueError(f"CoB tau must have shape ({n},) for this structure (num_free={n}), got "
                                 f"{tuple(tau.shape)}.")
            chk = tau.detach()
            if not bool(torch.isfinite(chk).all()) or bool((chk == 0).any()):
                raise ValueError("CoB tau must be finite and non-zero everywhere (found 0, NaN or inf).")
            self._tau = tau
            self._log_abs = None
            self._signs = None
            if n:
                lo, hi = chk.abs().aminmax()
                # (version, min|tau|, max|tau|) when validated: lets a teleport skip its finiteness re-check when the
                # tau tensor has not been written since (the version counter, shared with views and detach())
                self._valid = (chk._version, float(lo), float(hi))
        self._any_negative = bool((self.signs < 0).any()) if n else False
        if n and bool(structure.positive.any()):
            s = self.signs
            bad = structure.positive & (s < 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0])
                raise ValueError(f"CoB violates a sign constraint: tau[{i}] < 0 but the structure requires tau > 0 "
                                 f"there (max-reduction over features); {int(bad.sum())} entries affected.")

    _valid = None

    def _trusted(self, dtype: torch.dtype) -> bool:
        """Whether tau is unchanged since it was validated and every tau and 1/tau is finite in ``dtype``
        (then :func:`gradcond.teleport.teleport` skips its re-check).  Python arithmetic on the recorded bounds."""
        v = self._valid
        if v is None or self._tau._version != v[0]:
            return False
        lim = _FMAX.get(dtype)
        if lim is None:
            lim = _FMAX[dtype] = float(torch.finfo(dtype).max) if dtype.is_floating_point else 0.0
        return v[2] <= lim and v[1] > 0 and 1.0 / v[1] <= lim

    # ---- constructors --------------------------------------------------------------------------------
    @classmethod
    def identity(cls, structure: CoBStructure, dtype=torch.float64) -> "CoB":
        """The identity CoB (every tau = 1): teleporting by it leaves the weights unchanged."""
        return cls(structure, torch.ones(structure.num_free, dtype=dtype))

    @classmethod
    def from_vector(cls, structure: CoBStructure, log_abs: torch.Tensor, signs: torch.Tensor | None = None) -> "CoB":
        """tau = signs * exp(log_abs); ``signs`` (+-1, default +1) are fixed, ``log_abs`` may require grad."""
        n = structure.num_free
        log_abs = torch.as_tensor(log_abs)
        if log_abs.shape != (n,):
            raise ValueError(f"log_abs must have shape ({n},) for this structure, got {tuple(log_abs.shape)}.")
        if not log_abs.is_floating_point():
            log_abs = log_abs.to(torch.float64)
        if signs is None:
            signs = torch.ones(n, dtype=log_abs.dtype, device=log_abs.device)
        signs = torch.as_tensor(signs).to(log_abs.dtype)
        if signs.shape != (n,) or not bool(((signs == 1) | (signs == -1)).all()):
            raise ValueError(f"signs must be a ({n},) tensor of +1/-1 entries.")
        return cls(structure, _log=(log_abs, signs))

    # ---- views ---------------------------------------------------------------------------------------
    @property
    def tau(self) -> torch.Tensor:
        if self._tau is not None:
            return self._tau
        return self._signs * torch.exp(self._log_abs)

    @property
    def log_abs(self) -> torch.Tensor:
        return self._log_abs if self._log_abs is not None else torch.log(self._tau.abs())

    @property
    def signs(self) -> torch.Tensor:
        if self._signs is not None:
            return self._signs
        return torch.sign(self._tau.detach())

    def ext(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Lookup table ``[1, tau, 1, 1/tau]`` used by every factor (cached per dtype unless it needs grad)."""
        src = self._log_abs if self._log_abs is not None else self._tau
        cache = self.__dict__.setdefault("_ext_cache", {})
        key = dtype or src.dtype
        if not src.requires_grad and key in cache:
            return cache[key]
        if dtype is not None and dtype != src.dtype:
            e = self.ext().to(dtype)
        elif self._log_abs is not None:
            e = self.structure.ext_table_log(self._log_abs, self._signs)
        else:
            e = self.structure.ext_table(self._tau)
        if not src.requires_grad:
            cache[key] = e
        return e

    # ---- group operations ----------------------------------------------------------------------------
    def inverse(self) -> "CoB":
        """The CoB that undoes this one: ``teleport(teleport(m, c), c.inverse())`` equals ``m`` up to rounding."""
        if self._log_abs is not None:
            return CoB.from_vector(self.structure, -self._log_abs, self._signs)
        return CoB(self.structure, 1.0 / self._tau)

    def compose(self, other: "CoB") -> "CoB":
        """Teleporting by ``self`` then by ``other`` equals teleporting by ``self.compose(other)`` (taus multiply)."""
        _check_same(self.structure, other)
        if self._log_abs is not None and other._log_abs is not None:
            return CoB.from_vector(self.structure, self._log_abs + other._log_abs, self._signs * other._signs)
        return CoB(self.structure, self.tau * other.tau)

    def __repr__(self) -> str:
        t = self.tau.detach()
        if t.numel():
            return (f"CoB(num_free={t.numel()}, |tau| in [{t.abs().min():.3g}, {t.abs().max():.3g}], "
                    f"{int((t < 0).sum())} negative)")
        return "CoB(num_free=0)"


def _check_same(structure: CoBStructure, cob) -> None:
    """``TypeError`` unless ``cob`` is a CoB; ``ValueError`` unless it belongs to ``structure`` (same fingerprint)."""
    if not isinstance(cob, CoB):
        raise TypeError(f"expected a CoB, got {type(cob).__name__}.")
    if cob.structure is not structure and cob.structure.fingerprint != structure.fingerprint:
        raise ValueError(
            f"the CoB belongs to a different structure ({cob.structure.model_class}, num_free="
            f"{cob.structure.num_free}) than the one given ({structure.model_class}, num_free={structure.num_free})."
        )

def _params_checked(model: nn.Module, structure: CoBStructure) -> dict:
    """``dict(model.named_parameters())`` after checking names and shapes against the structure."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected an nn.Module, got {type(model).__name__}.")
    params = dict(model.named_parameters())
    ref = structure.param_shapes
    if len(params) != len(ref) or any(params[n].shape != s if n in params else True for n, s in ref.items()):
        for name, shape in ref.items():
            got = tuple(params[name].shape) if name in params else None
            if got != tuple(shape):
                raise ValueError(
                    f"the CoB structure does not match this model: parameter {name!r} has shape {got} in the model "
                    f"but {tuple(shape)} in the structure (analyze the model you teleport)."
                )
        extra = sorted(set(params) - set(ref))
        raise ValueError(f"the CoB structure does not match this model: parameters {extra[:3]} are not in the "
                         "structure (analyze the model you teleport).")
    return params


def _factor(ext: torch.Tensor, rule) -> torch.Tensor:
    """The factor of one parameter rule: the product of its terms gathered from ``ext`` (unbatched form)."""
    f = ext[rule.gidx[0]]
    for g in rule.gidx[1:]:
        f = f * ext[g]
    return f


def _term_views(structure: CoBStructure, ext: torch.Tensor):
    """All factor terms (gathered from ``ext``): returns (slots, views); slot = (param name, indices into views)."""
    plan = structure._flat(ext.device)
    # one torch.take per term (cheaper than one gather + split + views for small models)
    return plan["slots"], [torch.take(ext, g) for g in plan["terms"]]


def weight_scale_factors(structure: CoBStructure, cob: CoB) -> dict[str, torch.Tensor]:
    """``{name: factor}`` with ``V = factor * W`` (broadcastable) for every parameter of the analysed model.

    Untouched parameters get a scalar 1.  Gradients transform as ``dV = dW / factor`` and squared-gradient
    statistics as ``/ factor**2`` (Theorem 5.1).  Differentiable w.r.t. the CoB (dtype of ``cob.tau``).
    """
    _check_same(structure, cob)
    ext = cob.ext()
    one = torch.ones((), dtype=ext.dtype, device=ext.device)
    out = {name: one for name in structure.param_shapes}
    slots, views = _term_views(structure, ext)
    for name, ks in slots:
        f = views[ks[0]]
        for k in ks[1:]:
            f = f * views[k]
        out[name] = f
    return out


def ext_device(cob: CoB):
    """Device of the CoB's taus (or log-magnitudes)."""
    src = cob._log_abs if cob._log_abs is not None else cob._tau
    return src.device


def random_cob(structure: CoBStructure, sigma: float = 0.5, mode: str = "intra",
               generator: torch.Generator | None = None) -> CoB:
    """Random CoB of seed 000 Sec. 4.1: ``tau ~ U[1 - sigma, 1 + sigma]`` (``intra``) or an equal mixture of
    ``U[1 - sigma, 1 + sigma]`` and ``U[-1 - sigma, -1 + sigma]`` (``inter``); sign-constrained taus stay positive.
    ``0 <= sigma < 1`` (the source's CoB-range).  float64."""
    if not isinstance(structure, CoBStructure):
        raise TypeError(f"random_cob needs a CoBStructure, got {type(structure).__name__}.")
    if not (isinstance(sigma, (int, float)) and 0 <= sigma < 1):
        raise ValueError(f"sigma must be a number in [0, 1) (the CoB-range of seed 000), got {sigma!r}.")
    if mode not in ("intra", "inter"):
        raise ValueError(f"mode must be 'intra' or 'inter', got {mode!r}.")
    n = structure.num_free
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    tau = 1.0 + sigma * (2.0 * u - 1.0)
    if mode == "inter":
        flip = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
        flip &= ~structure.positive
        tau = torch.where(flip, -tau, tau)
    return CoB(structure, tau)
