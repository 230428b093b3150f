"""One factorisation of a layer's input ``Zb = [Z | 1]``, shared by every solve that layer needs.

A fit solves ``Zb W = T`` for the targets of all ``n_tries`` candidates at once, then the output read-out
``Zb W = Y`` and the least-squares distance of the representation; each of these reuses the factorisation built
here once (the source's "the pseudoinverse only needs to be computed once per layer", ch. 7.5.1).
"""

from __future__ import annotations

import torch

from ..utils import UserError

SOLVERS = ("pinv", "lstsq", "ridge")


class SingularSystemError(UserError):
    """A linear system of a closed-form fit is singular in the working precision (the source's "Failed" cells of
    Table 7.1): raised by ``solver="ridge"`` (alias ``"solve"``) when ``Z^T Z + ridge I`` cannot be solved."""


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def lsd_from_basis(U: torch.Tensor, Y: torch.Tensor) -> float:
    """LSD = (1/m) ||Y - U U^T Y||_F^2 for an orthonormal basis ``U`` (m, r) of the column space of ``Z``.

    With ``U`` the left singular vectors of ``Z`` whose singular values exceed ``eps * max(m, n) * s_max``, this is
    :func:`gradcond.probes.representation.least_squares_distance` (same cut-off), computed from a factorisation that
    the fit has already paid for. Cost: O(m r k) for ``k`` target columns.
    """
    R = Y - U @ (U.T @ Y)
    return float((R * R).sum() / Y.shape[0])


class Factor:
    """Factorisation of ``Zb`` (m, p) for repeated least-squares solves ``W = argmin ||Zb W - T||``.

    * ``pinv``: thin SVD ``Zb = U S V^T``; singular values at or below ``max(atol, eps * max(m, p) * s_max)`` count
      as zero (``atol`` given: ``max(atol, 0)``), exactly :func:`torch.linalg.pinv`'s rule; ``W = V S^-1 U^T T``.
      Cost O(m p^2) once, then O(m p k) per solve.
    * ``lstsq``: :func:`torch.linalg.lstsq` per solve (driver ``gelsy`` on the CPU; ``gels`` -- full rank assumed --
      on CUDA); ``atol`` becomes the relative cut ``rcond = atol / s_max`` so that it means what it means for pinv.
    * ``ridge``: ``(Zb^T Zb + ridge I) W = Zb^T T`` through one LU factorisation (:func:`torch.linalg.lu_factor_ex`).
      Raises :class:`SingularSystemError` when LU finds an exact zero pivot or the condition number of the
      ``p x p`` system is at least ``1 / eps`` of the dtype (singular to working precision), instead of returning
      a meaningless solution.

    ``cond`` is the 2-norm condition number of the system actually solved (``Zb`` for pinv/lstsq, the Gram matrix
    for ridge); ``inf`` when a singular value is zero.
    """

    def __init__(self, Zb: torch.Tensor, solver: str, *, ridge: float = 0.0, atol: float | None = None,
                 where: str = "this layer"):
        self.Zb, self.solver = Zb, solver
        m, p = Zb.shape
        self.m = m
        if solver == "pinv":
            U, S, Vh = torch.linalg.svd(Zb, full_matrices=False)
            smax = S[0] if S.numel() else Zb.new_zeros(())
            cut = max(float(atol), 0.0) if atol is not None else _eps(Zb.dtype) * max(m, p) * float(smax)
            keep = S > cut
            self.U, self.Sinv, self.V = U[:, keep], 1.0 / S[keep], Vh[keep].T
            self.cond = float(S[0] / S[-1]) if S.numel() and float(S[-1]) > 0 else float("inf")
            self.rank = int(keep.sum())
        elif solver == "lstsq":
            S = torch.linalg.svdvals(Zb)
            self.cond = float(S[0] / S[-1]) if S.numel() and float(S[-1]) > 0 else float("inf")
            self.rcond = None if atol is None or float(S[0]) == 0 else float(atol) / float(S[0])
            self.rank = int((S > (atol if atol is not None else _eps(Zb.dtype) * max(m, p) * float(S[0]))).sum())
        elif solver == "ridge":
            G = Zb.T @ Zb
            if ridge:
                G = G + ridge * torch.eye(p, dtype=Zb.dtype, device=Zb.device)
            S = torch.linalg.svdvals(G)
            self.cond = float(S[0] / S[-1]) if S.numel() and float(S[-1]) > 0 else float("inf")
            self.LU, self.piv, info = torch.linalg.lu_factor_ex(G)
            singular = int(info.item()) != 0 or not (self.cond * _eps(Zb.dtype) < 1.0)
            if singular or not torch.isfinite(self.LU).all():
                dt = str(Zb.dtype).replace("torch.", "")
                raise SingularSystemError(
                    f"{where}: the ridge system Z^T Z + ridge*I (ridge={ridge:g}) is singular in {dt} "
                    f"(condition number {self.cond:.3g}, at least 1/eps = {1 / _eps(Zb.dtype):.3g}); use "
                    "solver='lstsq', solver='pinv' with atol (e.g. 1e-5), a larger ridge, or dtype=torch.float64.")
            self.rank = p
        else:  # validated by the caller; kept for direct use
            raise ValueError(f"unknown solver {solver!r}; accepted: {', '.join(SOLVERS)} (or 'solve').")

    def solve(self, T: torch.Tensor) -> torch.Tensor:
        """``W`` (p, k) minimising ``||Zb W - T||_F`` (plus ``ridge ||W||_F^2`` for ridge), all columns at once."""
        if self.solver == "pinv":
            return self.V @ (self.Sinv[:, None] * (self.U.T @ T))
        if self.solver == "lstsq":
            return torch.linalg.lstsq(self.Zb, T, rcond=self.rcond).solution
        return torch.linalg.lu_solve(self.LU, self.piv, self.Zb.T @ T)

    def lsd(self, Y: torch.Tensor) -> float:
        """(1/m) ||Y - Zb W*||_F^2 for the solver's least-squares ``W*`` (the LSD of eq. 5.3 for pinv/lstsq and for
        ridge 0; a ridge-regularised read-out error otherwise)."""
        if self.solver == "pinv":
            return lsd_from_basis(self.U, Y)
        R = Y - self.Zb @ self.solve(Y)
        return float((R * R).sum() / self.m)
