"""Closed-form MLP fitting with Platonic projections (seed 002, Øland, ch. 7; notes 002 §5).

For hidden layer ``i`` with input ``Z_{i-1}`` (``Zb = [Z_{i-1} | 1]``, the constant column is the bias):

    T_i = alpha [Zb | beta Y] P_i,      W_i = Zb^+ T_i,      Z_i = act(Zb W_i),

and the output layer is the least-squares read-out ``W_out = Zb^+ Y``. One pass over the data, no iterations, no
gradients. Departures from the source, each documented where it happens: the bias column is appended last (the
order is immaterial); Fig. 7.3's ``Z_0 = torch.cat([b, Z_0])`` is read as concatenating ``x`` (notes 002 §5);
Sorted PCA picks exactly ``width`` evenly spaced samples (the source's ``arange(0, n - 1, n / width)`` can give
``width + 1`` or miss the last one).

Pitfalls the fit guards against (ch. 7; issue 28):

* **ReLU layers that are linear or dead on the data.**  A ReLU unit is linear on the data where its pre-activation
  is positive on every sample, and constant where it is never positive.  Sorted PCA on non-negative inputs (pixels
  in [0, 1]) makes every first-layer pre-activation ``x . x_j >= 0`` -- the whole layer is linear and the network
  collapses to fewer nonlinear layers than it seems.  After each hidden layer with a piecewise-linear activation
  (``relu``, ``leaky_relu``) the fit measures the fraction of (sample, unit) pre-activations that are positive
  (``FitReport.active_fraction``) and the fraction of units that are positive on every sample or on none
  (``FitReport.fixed_units``), and warns (:class:`ReLUActivityWarning`) when the first is at least
  :data:`ALWAYS_ON` (the layer is (almost) linear) or at most :data:`DEAD` (it is (almost) dead), or when the
  second is at least :data:`ALWAYS_ON` (every unit is linear or constant, so the layer is linear on the data).
* **Input scale.**  ``standardize=True`` fits on inputs shifted to zero mean and unit variance per column (constant
  columns are only centred); the affine map is folded into the first ``nn.Linear``, so the returned model takes the
  raw inputs.  It also removes the non-negativity that makes Sorted PCA linear under ReLU.
* **Precision.**  The solves run in float64 unless ``dtype`` says otherwise (the source: "fp64 greatly improves
  stability", Table 7.1); the returned model is in the inputs' dtype unless ``model_dtype`` says otherwise.
* **Sign of Platonic PCA.**  Principal directions are defined up to sign, and the SVD's choice is arbitrary.  A
  direction ``p`` and ``-p`` give hidden targets ``T p`` and ``-T p``: through an odd activation (tanh) the next
  layer's least-squares solve absorbs the sign, but through ReLU the unit keeps the complementary half of the
  samples -- another network.  Our convention: each direction is signed so that its largest-magnitude entry is
  positive (ties: the first such entry).  The source does not state its convention.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ..presets import presettable
from ..utils import progress
from ._factor import SOLVERS, Factor, SingularSystemError

__all__ = ["fit_platonic", "FitReport", "FitDiverged", "SingularSystemError", "ReLUActivityWarning", "ACTIVATIONS",
           "PROJECTIONS", "FIRST_LAYERS", "REWEIGHT_DEFAULT", "ALWAYS_ON", "DEAD"]

ACTIVATIONS = {
    "tanh": nn.Tanh, "relu": nn.ReLU, "celu": nn.CELU, "sigmoid": nn.Sigmoid, "gelu": nn.GELU,
    "leaky_relu": nn.LeakyReLU, "elu": nn.ELU, "identity": nn.Identity,
}
PROJECTIONS = ("random", "platonic_pca", "sorted_pca")
FIRST_LAYERS = ("random", "platonic_pca", "sorted_pca", "sorted_pca_xy", "random_w")
# ReLU activity thresholds of the warning: fraction of positive (sample, unit) pre-activations of a hidden layer
ALWAYS_ON = 0.99
DEAD = 0.01
_PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU)
# lambda_EMA of the sample re-weighting: the source's text (sec. 7.9.3, the runs of Table 7.3) says 0.2, the caption
# of Table 7.3 says 0.02. We follow the text; pass reweight=0.02 for the caption's value.
REWEIGHT_DEFAULT = 0.2


class ReLUActivityWarning(UserWarning):
    """A hidden ReLU layer of a Platonic fit is (almost) always active on the data (then it is linear) or (almost)
    never active (then it is constant)."""


class FitDiverged(ValueError):
    """A fit produced non-finite activations in every try of a layer. ``report`` holds the :class:`FitReport` of
    the layers fitted before (per-layer LSD etc.; no model is returned)."""

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


@dataclass
class FitReport:
    """What a :func:`fit_platonic` run did. Per hidden layer (index 0 = first hidden layer):

    * ``lsd``: least-squares distance (1/m) ||Y - Z_i Z_i^+ Y||_F^2 of the chosen representation (with bias column);
    * ``condition``: condition number of the system solved for that layer (``nan`` where no system was solved:
      Sorted PCA or random-W first layers); ``output_condition`` for the read-out;
    * ``chosen_try``: index of the kept candidate among ``n_tries`` (0 for deterministic layers);
    * ``rank``: numerical rank the solver used for ``Z_{i-1}`` (-1 where no system was solved);
    * ``active_fraction``: for ReLU-type layers, the fraction of (sample, unit) pre-activations that are positive,
      and ``fixed_units`` the fraction of units that are positive on every sample or on none (each such unit is
      linear or constant on the data); ``nan`` for other activations; see :class:`ReLUActivityWarning`.

    ``mse``: mean over all entries of (prediction - Y)^2 on the fitted data; ``predictions``: the returned model's
    outputs on ``X`` (the fit checks them against its own); ``seconds``: wall time.  ``dtype``: the precision of
    the solves; ``model_dtype``: that of the returned model; ``cast_error``: the largest difference between the
    fit's own predictions and the returned model's, relative to the largest prediction (0 when the model is the
    fitted network itself; non-zero after standardisation folding or a cast to ``model_dtype``);
    ``standardized``: whether the inputs were standardised.
    """

    solver: str
    dtype: str
    widths: list[int]
    act: str
    alpha: float
    beta: float
    n_tries: int
    projection: str
    first_layer: str
    reweight: float | None
    lsd: list[float] = field(default_factory=list)
    condition: list[float] = field(default_factory=list)
    rank: list[int] = field(default_factory=list)
    chosen_try: list[int] = field(default_factory=list)
    active_fraction: list[float] = field(default_factory=list)
    fixed_units: list[float] = field(default_factory=list)
    output_condition: float = float("nan")
    mse: float = float("nan")
    seconds: float = 0.0
    predictions: torch.Tensor | None = None
    model_dtype: str = ""
    cast_error: float = 0.0
    standardized: bool = False

    def summary(self) -> str:
        """One line: solver, dtype, depth, final LSD and MSE, time."""
        last = f"{self.lsd[-1]:.3g}" if self.lsd else "n/a"
        return (f"platonic fit ({self.solver}, {self.dtype}, {len(self.widths)} hidden layers): last-layer LSD "
                f"{last}, MSE {self.mse:.3g}, {self.seconds:.3f} s")


def _targets(Y, m: int, dtype, device) -> torch.Tensor:
    """``Y`` as an (m, k) float matrix: integer class labels (1-D) become one-hot 0/1 columns, a 1-D float tensor
    one column, a 2-D tensor is used as given."""
    if not isinstance(Y, torch.Tensor):
        raise TypeError(f"Y must be a torch.Tensor, got {type(Y).__name__}.")
    if Y.dim() == 0 or Y.shape[0] != m:
        rows = Y.shape[0] if Y.dim() else 0
        raise ValueError(f"Y has {rows} rows but X has {m}; give one target row per sample of X.")
    if Y.dim() == 1 and not Y.is_floating_point():
        if Y.dtype == torch.bool or (Y < 0).any():
            raise ValueError("integer Y must hold non-negative class indices (0..K-1); pass float targets otherwise.")
        Y = torch.nn.functional.one_hot(Y.long(), int(Y.max()) + 1)
    elif Y.dim() == 1:
        Y = Y[:, None]
    elif Y.dim() != 2:
        raise ValueError(f"Y must be 1-D class labels or an (m, k) target matrix, got shape {tuple(Y.shape)}.")
    Y = Y.detach().to(device=device, dtype=dtype)
    if not torch.isfinite(Y).all():
        raise ValueError("Y has non-finite entries; give finite targets.")
    return Y


def _check_options(widths, act, alpha, beta, n_tries, projection, first_layer, reweight, solver, ridge, atol, dtype,
                   model_dtype=None, standardize=False):
    if not isinstance(widths, list) or not all(isinstance(w, int) and not isinstance(w, bool) for w in widths) \
            or any(w <= 0 for w in widths):
        raise ValueError(f"widths must be a sequence of positive integers (one per hidden layer), got {widths!r}.")
    if isinstance(act, str) and act not in ACTIVATIONS:
        raise ValueError(f"unknown act {act!r}; accepted: {', '.join(ACTIVATIONS)}, or an nn.Module.")
    if not isinstance(act, (str, nn.Module)):
        raise ValueError(f"act must be a name ({', '.join(ACTIVATIONS)}) or an nn.Module, got {type(act).__name__}.")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{name} must be a finite number > 0, got {v!r}.")
    if not isinstance(n_tries, int) or isinstance(n_tries, bool) or n_tries < 1:
        raise ValueError(f"n_tries must be an integer >= 1, got {n_tries!r}.")
    if projection not in PROJECTIONS:
        raise ValueError(f"unknown projection {projection!r}; accepted: {', '.join(PROJECTIONS)}.")
    if first_layer is not None and first_layer not in FIRST_LAYERS:
        raise ValueError(f"unknown first_layer {first_layer!r}; accepted: None, {', '.join(FIRST_LAYERS)}.")
    if reweight is not None:
        if not isinstance(reweight, (int, float)) or isinstance(reweight, bool) or not 0 <= reweight < 1:
            raise ValueError(f"reweight (lambda_EMA) must be None or a number in [0, 1), got {reweight!r}.")
        if projection == "random":
            raise ValueError("reweight applies to Platonic PCA projections only (sec. 7.9.3); use "
                             "projection='platonic_pca' or 'sorted_pca', or reweight=None.")
    if solver not in SOLVERS + ("solve",):
        raise ValueError(f"unknown solver {solver!r}; accepted: {', '.join(SOLVERS)} (or 'solve', an alias of ridge).")
    if not isinstance(ridge, (int, float)) or isinstance(ridge, bool) or not math.isfinite(ridge) or ridge < 0:
        raise ValueError(f"ridge must be a finite number >= 0, got {ridge!r}.")
    if ridge and solver not in ("ridge", "solve"):
        raise ValueError(f"ridge={ridge:g} needs solver='ridge' (pinv and lstsq solve the unregularised system).")
    if atol is not None:
        if not isinstance(atol, (int, float)) or isinstance(atol, bool) or not math.isfinite(atol) or atol < 0:
            raise ValueError(f"atol must be None or a finite number >= 0, got {atol!r}.")
        if solver in ("ridge", "solve"):
            raise ValueError("atol applies to solver='pinv' and 'lstsq' only; for ridge use the ridge argument.")
    if dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"dtype must be None, torch.float32 or torch.float64, got {dtype}.")
    if model_dtype not in (None, torch.float32, torch.float64):
        raise ValueError(f"model_dtype must be None, torch.float32 or torch.float64, got {model_dtype}.")
    if not isinstance(standardize, bool):
        raise ValueError(f"standardize must be True or False, got {standardize!r}.")


def _layer_methods(n_layers: int, projection: str, first_layer: str | None) -> list[str]:
    later = "platonic_pca" if projection in ("platonic_pca", "sorted_pca") else "random"
    first = first_layer if first_layer is not None else projection
    return [first] + [later] * (n_layers - 1) if n_layers else []


def _platonic_pca(A: torch.Tensor, width: int, max_dirs: int, layer: int) -> torch.Tensor:
    """The first ``width`` principal directions of ``A`` (columns of a (p + k, width) matrix), each signed so that
    its largest-magnitude entry is positive (SVD signs are arbitrary; this keeps the fit deterministic)."""
    if width > max_dirs:
        raise ValueError(f"hidden layer {layer}: projection 'platonic_pca' gives at most {max_dirs} directions here "
                         f"(input width + target columns), got width {width}; use a smaller width, "
                         "projection='random', or first_layer='sorted_pca' for a wide first layer.")
    Ac = A - A.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Ac, full_matrices=False)
    P = Vh[:width].T
    idx = P.abs().argmax(0)
    sign = torch.sign(P[idx, torch.arange(P.shape[1], device=P.device)])
    sign[sign == 0] = 1
    return P * sign


def _sorted_pca_rows(X: torch.Tensor, width: int, Y: torch.Tensor | None = None) -> torch.Tensor:
    """Sorted PCA (Fig. 7.14, §7.8.2): indices of ``width`` samples evenly spaced along the first principal
    component ``c`` of ``X`` -- or, with ``Y``, of ``A = [X | Y]`` (the source's other variant), the samples then
    sorted by ``A c`` (the source's step 2 writes ``v = X c``, which only type-checks for ``c`` of ``X``; for ``c``
    of ``[X | Y]`` we project the rows of ``A``)."""
    m = X.shape[0]
    name = "sorted_pca" if Y is None else "sorted_pca_xy"
    if width > m:
        raise ValueError(f"first_layer '{name}' picks {width} samples but X has only {m} rows; use width <= {m}.")
    A = X if Y is None else torch.cat([X, Y], 1)
    Ac = A - A.mean(0, keepdim=True)
    _, _, Vh = torch.linalg.svd(Ac, full_matrices=False)
    c = Vh[0]
    ix = torch.argsort(A @ c, stable=True)
    pos = (torch.arange(width, device=X.device, dtype=torch.float64) * (m / width)).round().long().clamp(max=m - 1)
    return ix[pos]


def _relu_activity(act: nn.Module, layer: int, Z: torch.Tensor) -> tuple[float, float]:
    """``(fraction of positive pre-activations, fraction of units that are always or never active)`` of a ReLU-type
    hidden layer (``nan`` for other activations); warns (:class:`ReLUActivityWarning`) when the layer is (almost)
    always on, (almost) dead, or made of units that are each always on or never on (linear on the data)."""
    if not isinstance(act, _PIECEWISE_LINEAR):
        return float("nan"), float("nan")
    import warnings

    on = Z > 0  # Z = act(A): for ReLU (and LeakyReLU with a positive slope) Z > 0 iff A > 0
    frac = float(on.double().mean())
    fixed = float((on.all(0) | ~on.any(0)).double().mean())
    what = None
    if frac >= ALWAYS_ON:
        what = f"is active on {100 * frac:.1f} % of the (sample, unit) pre-activations, so the layer is (almost) " \
               "linear on the data (e.g. Sorted PCA on non-negative inputs)"
    elif frac <= DEAD:
        what = f"is active on only {100 * frac:.1f} % of the (sample, unit) pre-activations, so the layer is " \
               "(almost) dead on the data"
    elif fixed >= ALWAYS_ON:
        what = f"has {100 * fixed:.1f} % of its units always on or never on, so the layer is (almost) linear on the data"
    if what:
        warnings.warn(f"hidden layer {layer}: the ReLU {what}; use standardize=True, other alpha/beta, or another "
                      "first_layer.", ReLUActivityWarning, stacklevel=3)
    return frac, fixed


def _randn(shape, generator, device, dtype):
    gdev = generator.device if generator is not None else device
    return torch.randn(*shape, generator=generator, device=gdev, dtype=dtype).to(device)


@presettable("fit_platonic")
def fit_platonic(X: torch.Tensor, Y: torch.Tensor, widths, *, act="tanh", alpha: float = 0.1, beta: float = 10.0,
                 n_tries: int = 1, projection: str = "random", first_layer: str | None = None,
                 reweight: float | None = None, solver: str = "pinv", ridge: float = 0.0, atol: float | None = None,
                 dtype: torch.dtype | None = None, model_dtype: torch.dtype | None = None, standardize: bool = False,
                 generator: torch.Generator | None = None, return_report: bool = False, preset: str | None = None):
    """Fit an MLP with hidden widths ``widths`` to ``(X, Y)`` in closed form with Platonic projections (no
    gradients, one pass over the data).

    Each hidden layer solves ``[Z_{i-1} | 1] W_i = T_i`` for the target ``T_i = alpha [Z_{i-1} | 1 | beta Y] P_i``
    and sets ``Z_i = act([Z_{i-1} | 1] W_i)``; the output layer is the least-squares read-out of ``Y``.

    Args:
        X: (m, n) inputs. Y: (m, k) float targets, a 1-D float tensor (one column), or 1-D integer class labels
            (one-hot 0/1 columns; predict with ``argmax``). For binary problems the source uses one column of
            +-1 labels (pass ``(2 * y - 1).unsqueeze(1).double()``).
        widths: hidden widths, e.g. ``[32, 32, 32, 32]``; empty = a linear least-squares model.
        act: activation name (``tanh``, ``relu``, ``celu``, ...) or an ``nn.Module`` (copied per layer).
        alpha, beta: target scales (sec. 7.5.2); higher beta weights ``Y`` more.
        n_tries: random candidates per layer; the one whose ``Z_i`` has the lowest LSD is kept. All tries of a
            layer are solved against one factorisation of ``[Z_{i-1} | 1]``; each candidate's factorisation is
            computed once, used for its LSD and, if kept, for the next layer.
        projection: ``random`` (P ~ N(0, 1)), ``platonic_pca`` (P = principal directions of
            ``A = alpha [Z | 1 | beta Y]``, at most n + k of them), or ``sorted_pca`` (the fully deterministic
            pipeline of sec. 7.8.3: Sorted PCA for layer 1, Platonic PCA afterwards).
        first_layer: override for layer 1: ``random``, ``platonic_pca``, ``sorted_pca`` (samples of X evenly spaced
            along its first principal component are the weight vectors, bias 0), ``sorted_pca_xy`` (the same along
            the first principal component of ``[X | Y]``, the source's other variant) or ``random_w`` (W ~ N(0, 1)
            including the bias: the extreme learning machine). ``None`` follows ``projection``.
        reweight: lambda_EMA of the sample re-weighting for Platonic PCA (sec. 7.9.3): after each hidden layer a
            read-out is fitted and ``d_j <- lambda d_j + (1 - lambda) ||y_j - yhat_j||^2`` (``d = 1`` at the start);
            the PCA then uses ``beta (d * Y)``. The source gives 0.2 in the text and 0.02 in a caption; we recommend
            the text's 0.2 (``REWEIGHT_DEFAULT``). ``None`` (default) = off.
        solver: ``pinv`` (SVD, default), ``lstsq`` (:func:`torch.linalg.lstsq`, faster for ``n_tries = 1``), or
            ``ridge`` (alias ``solve``; normal equations ``(Z^T Z + ridge I) W = Z^T T`` by LU). A ridge system
            that is singular in the working precision raises :class:`SingularSystemError`.
        ridge: L2 penalty for ``solver="ridge"``. atol: absolute singular-value cut-off for pinv and lstsq
            (``1e-5`` is the source's fix for float32).
        dtype: precision of the solves: float64 (the default, as the source recommends) or float32.
        model_dtype: dtype of the returned model; default ``X``'s dtype if floating, else the default dtype.  When
            it differs from ``dtype`` the fitted weights are cast (``FitReport.cast_error`` says how much the
            outputs moved).
        standardize: fit on standardised inputs (zero mean, unit variance per column; constant columns only
            centred) and fold the standardisation into the first layer, so the model takes raw inputs.  Use it
            for inputs of very different scales, or non-negative inputs with ReLU and Sorted PCA (see the module
            docstring).
        generator: ``torch.Generator`` for the random P / W (default: torch's global RNG).
        return_report: also return a :class:`FitReport`.
        preset: fill the arguments not given with a thesis setting (:mod:`gradcond.presets`): ``"thesis"`` (§7.6,
            two spirals: alpha 0.1, beta 10, pinv, float64, one try -- today's defaults), ``"thesis-mnist"``
            (Table 7.2: ReLU, alpha 1, beta 10, ridge 50,000 via solve), ``"thesis-deterministic"`` (Table 7.3:
            Sorted PCA + weighted Platonic PCA, alpha 1, beta 1e6, lambda_EMA 0.2, ridge).  ``ridge`` defaults to 0
            (the plain least-squares solution; the thesis's 50,000 regularises one-hot MNIST targets and is part of
            ``"thesis-mnist"``).

    Returns:
        An ``nn.Sequential`` of ``nn.Linear`` and activation modules, on ``X``'s device in ``model_dtype``; without
        standardisation and casting its forward pass on ``X`` is bit-identical to the fit's own predictions, with
        them it is checked against them (relative difference at most 1e-6 in float64 and 1e-3 in float32, else
        ``FitDiverged``); with ``return_report=True`` the pair ``(model, report)``. Usable as-is or as an
        initialiser for training.

    Warns:
        ReLUActivityWarning: a hidden ReLU / LeakyReLU layer whose pre-activations are positive on at least
            :data:`ALWAYS_ON` (the layer is linear on the data) or at most :data:`DEAD` of the (sample, unit) pairs.

    Precision: float64 is strongly recommended. Measured on the CPU (noise-free two spirals, 5,000 points,
    2-32-32-32-32-1 tanh, 50 seeds; the ``platonic-spirals`` reproduction): with alpha 0.1, beta 10, float64 pinv
    gives 99.92 +- 0.19 % train accuracy, float32 pinv 94.4 +- 4.9 % (``atol=1e-5``: 94.5 +- 2.8 %), float32 lstsq
    85.9 +- 6.1 % (``atol=1e-5``: 95.1 +- 3.1 %); with alpha 1, beta 2, float32 pinv 98.9 +- 1.0 % (``atol=1e-5``:
    99.6 +- 0.2 %) against 99.7 +- 0.2 % in float64. ``solver="ridge"`` with ``ridge=0`` is singular to working
    precision in float32 in every run (the source's "Failed"), and in float64 too with alpha 0.1, beta 10
    (condition number ~1e17).

    Cost: per hidden layer one factorisation of the (m, n + 1) input (SVD for pinv: O(m n^2)), one (m, n + 1) x
    (n + 1, width * n_tries) solve, and one factorisation per candidate; memory O(m (n + k + width * n_tries)).
    Runs on ``X``'s device. A progress bar (``gradcond.utils.progress``) appears for fits longer than a second.

    Raises:
        ValueError: bad shapes or options (one sentence saying what is accepted), non-finite activations.
        SingularSystemError: singular ridge system (suggests lstsq, pinv with atol, a larger ridge, or float64);
            with several tries, only when every candidate of a layer is singular. ``.report`` (when set) is the
            partial :class:`FitReport`.
        FitDiverged: every candidate of a layer has non-finite activations (a ``ValueError``; ``.report`` holds
            the layers fitted so far, e.g. for the LSD curve of a very deep fit).
    """
    t0 = time.perf_counter()
    if not isinstance(X, torch.Tensor) or X.dim() != 2:
        raise ValueError("X must be a 2-D tensor (m samples, n features).")
    if not isinstance(widths, (int, str)):
        try:
            widths = list(widths)
        except TypeError:
            pass  # reported by _check_options below
    _check_options(widths, act, alpha, beta, n_tries, projection, first_layer, reweight, solver, ridge, atol, dtype,
                   model_dtype, standardize)
    if solver == "solve":
        solver = "ridge"
    if model_dtype is None:
        model_dtype = X.dtype if X.dtype in (torch.float32, torch.float64) else torch.get_default_dtype()
    if dtype is None:
        dtype = torch.float64
    device = X.device
    m = X.shape[0]
    if m == 0:
        raise ValueError("X has no rows; give at least one sample.")
    X_raw = X.detach()
    X = X_raw.to(dtype)
    if not torch.isfinite(X).all():
        raise ValueError("X has non-finite entries; give finite inputs.")
    mu = sd = None
    if standardize:
        mu = X.mean(0, keepdim=True)
        sd = X.std(0, keepdim=True, unbiased=False)
        sd = torch.where(sd > 0, sd, torch.ones_like(sd))  # constant columns: centred only
        X = (X - mu) / sd
    Yt = _targets(Y, m, dtype, device)
    k = Yt.shape[1]
    methods = _layer_methods(len(widths), projection, first_layer)
    if n_tries > 1 and not any(mt in ("random", "random_w") for mt in methods):
        raise ValueError(f"n_tries={n_tries} needs random layers; projection={projection!r} with first_layer="
                         f"{first_layer!r} is deterministic: use n_tries=1.")

    def make_act():
        return copy.deepcopy(act) if isinstance(act, nn.Module) else ACTIVATIONS[act]()

    report = FitReport(solver=solver, dtype=str(dtype).replace("torch.", ""), widths=list(widths),
                       act=act if isinstance(act, str) else type(act).__name__, alpha=float(alpha), beta=float(beta),
                       n_tries=n_tries, projection=projection, first_layer=methods[0] if methods else "none",
                       reweight=reweight, model_dtype=str(model_dtype).replace("torch.", ""),
                       standardized=standardize)
    ones = torch.ones(m, 1, dtype=dtype, device=device)
    layers: list[nn.Module] = []
    weights = torch.ones(m, 1, dtype=dtype, device=device) if reweight is not None else None

    n_linear = len(widths) + 1

    def factor(Z, layer):  # the system whose solution is linear layer ``layer`` (1-based, as in the Sequential)
        return Factor(torch.cat([Z, ones], 1), solver, ridge=float(ridge), atol=atol,
                      where=f"linear layer {layer} of {n_linear}")

    def linear_from(W_full, n):  # W_full: (n + 1, d) with the bias row last
        lin = nn.Linear(n, W_full.shape[1], dtype=dtype, device=device)
        lin.weight.copy_(W_full[:n].T)
        lin.bias.copy_(W_full[n])
        return lin

    Z, F = X, None
    bar = progress(total=len(widths) + 1, desc="platonic fit")
    try:
        with torch.no_grad():
            for i, (width, method) in enumerate(zip(widths, methods)):
                n = Z.shape[1]
                cond, rank = float("nan"), -1
                if method in ("sorted_pca", "sorted_pca_xy"):
                    rows = _sorted_pca_rows(Z, width, Yt if method == "sorted_pca_xy" else None)
                    W = torch.cat([Z[rows].T, torch.zeros(1, width, dtype=dtype, device=device)])
                    candidates = [W]
                elif method == "random_w":
                    W_all = _randn((n + 1, width * n_tries), generator, device, dtype)
                    candidates = list(W_all.split(width, dim=1))
                else:
                    if F is None:
                        F = factor(Z, i + 1)
                    cond, rank = F.cond, F.rank
                    Yw = Yt if weights is None else weights * Yt
                    A = alpha * torch.cat([Z, ones, beta * Yw], 1)
                    if method == "platonic_pca":
                        P = _platonic_pca(A, width, n + k, i + 1)
                    else:
                        P = _randn((n + 1 + k, width * n_tries), generator, device, dtype)
                    candidates = list(F.solve(A @ P).split(width, dim=1))
                best, failure = None, None
                for j, W in enumerate(candidates):
                    lin, a = linear_from(W, n), make_act()
                    Zc = a(lin(Z))
                    if not torch.isfinite(Zc).all():  # a candidate that overflows is never kept
                        failure = FitDiverged(
                            f"hidden layer {i + 1}: the fit produced non-finite activations (all {len(candidates)} "
                            "tries); lower alpha or beta, use fewer layers, solver='pinv' with atol, or "
                            "dtype=torch.float64.", report)
                        continue
                    try:
                        Fc = factor(Zc, i + 2)
                    except SingularSystemError as exc:  # another try may give a solvable system
                        failure = exc
                        continue
                    lsd = Fc.lsd(Yt)
                    if best is None or lsd < best[0]:
                        best = (lsd, j, lin, a, Zc, Fc)
                if best is None:
                    failure.report = report
                    raise failure
                lsd, j, lin, a, Z, F = best
                layers += [lin, a]
                frac, fixed = _relu_activity(a, i + 1, Z)
                report.active_fraction.append(frac)
                report.fixed_units.append(fixed)
                report.lsd.append(lsd)
                report.chosen_try.append(j)
                report.condition.append(cond)
                report.rank.append(rank)
                if weights is not None:
                    E = Yt - torch.cat([Z, ones], 1) @ F.solve(Yt)
                    weights = reweight * weights + (1 - reweight) * (E * E).sum(1, keepdim=True)
                bar.update(1)
            if F is None:
                F = factor(Z, n_linear)
            report.output_condition = F.cond
            out = linear_from(F.solve(Yt), Z.shape[1])
            layers.append(out)
            pred = out(Z)
            bar.update(1)
    finally:
        bar.close()
    model = nn.Sequential(*layers)
    with torch.no_grad():
        check = model(X)
    if not torch.isfinite(pred).all():
        raise FitDiverged("the fitted read-out is non-finite; use dtype=torch.float64 or solver='pinv' with atol.",
                          report)
    if not torch.equal(check, pred):  # the same modules on the same tensor: any difference is a bug, not rounding
        raise RuntimeError("internal error: the assembled nn.Sequential does not reproduce the fit's predictions.")
    if standardize or model_dtype != dtype:
        with torch.no_grad():
            if standardize:  # W (x - mu) / sd + b = (W / sd) x + (b - W (mu / sd))
                first = layers[0]
                first.bias.sub_(first.weight @ (mu / sd)[0])
                first.weight.div_(sd)
            model = model.to(model_dtype)
            out = model(X_raw.to(model_dtype))
        scale = float(pred.abs().max()) or 1.0
        report.cast_error = float((out.to(dtype) - pred).abs().max()) / scale
        limit = 1e-6 if model_dtype == torch.float64 else 1e-3
        if not report.cast_error <= limit:
            raise FitDiverged(f"the returned model's outputs differ from the fit's by {report.cast_error:.2e} "
                              f"(relative; more than {limit:g}) after "
                              f"{'folding the standardisation into the first layer' if standardize else ''}"
                              f"{' and ' if standardize and model_dtype != dtype else ''}"
                              f"{'casting to ' + str(model_dtype) if model_dtype != dtype else ''}; pass "
                              "model_dtype=torch.float64 (the weights are too large or ill-conditioned for float32).",
                              report)
        pred = out
    report.mse = float(((pred.to(dtype) - Yt) ** 2).mean())
    report.predictions = pred
    report.seconds = time.perf_counter() - t0
    return (model, report) if return_report else model

