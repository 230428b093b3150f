"""The monitor's cost model: what a training step and each probe cost, from counts instead of a clock.

The monitor plans its schedule (:func:`gradcond.monitor.plan_schedule`) from the cost of a training step and of one
measurement of each probe. Those costs come from this module, as a deterministic function of the model, the loss,
the batch shapes and the optimizer -- never from timing anything -- so two runs of one config plan the same schedule
however busy their machines are (issue 26).

How the counts are made (:func:`profile_model`)
-----------------------------------------------
One forward and one backward (to the trainable parameters, ``torch.autograd.grad``: no ``.grad`` is written) of a
**single sample** of the probe batch run under a counting ``TorchDispatchMode``, in eval mode (BatchNorm buffers are
not touched), with every module's training flag restored afterwards. For the forward and for forward+backward it
counts

* ``ops``: ATen operator calls (the per-call overhead that dominates small models: Python, dispatch, kernel launch),
* ``flops``: floating-point operations of the ops in ``torch.utils.flop_counter``'s registry (matmuls, convolutions,
  attention), for one sample,
* ``elements``: elements written by all ops (memory traffic), for one sample,

and, per parameter-owning Linear / Conv1d / Conv2d module, its shape (positions T, input features C, outputs O,
groups G) for the cost of a per-sample Gram matrix. Counts for a batch of n are ``ops`` + n · (``flops``,
``elements``), except the parameter gradients (P elements, written once per batch). A model that cannot run a single
sample is counted on the whole probe batch (divided by its size).

The cost of a pass is then ``OP_S · ops + FLOP_S · flops · n + ELEM_S · elements · n`` seconds with fixed constants
(:data:`OP_S`, :data:`FLOP_S`, :data:`ELEM_S`: one core of an x86-64 CPU, fitted once with
``benchmarks/monitor.py --cost-model``, which prints the model's estimates beside measured times). They are
constants of the code, not of the machine: the budget is a share of the *modelled* training time. On another machine
the real share differs by how its speed ratios differ from these constants -- typically by tens of percent, much less
than the factor of two between the thinning steps -- and it is measured and logged (``time_fraction`` in
``timings.csv``) but never used for a decision.

Probe costs (:data:`PROBE_COSTS`) are formulas in those passes, one per probe of :data:`gradcond.monitor.PROBES`: e.g.
``conditioning`` = three forward+backward passes of the probe batch (the shared per-sample capture and the two
perturbed gradients of step-consistency) + the per-sample Gram matrix (the cheaper of the ghost and the materialised
form per layer, as :mod:`gradcond.probes.per_sample.identities` chooses) + a b × b eigen-decomposition. A probe without a formula (a
probe added to ``PROBES`` later) is costed as two forward+backward passes of the probe batch, and its plan entry says
so (``cost_model``). Cost of profiling: one single-sample forward+backward at Python speed (a few ms for a small
model, tens of ms for an 11M-parameter ResNet), once per run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ELEM_S", "FLOP_S", "OP_S", "PROBE_COSTS", "Pass", "Profile", "estimate_costs", "profile_model"]

# seconds per ATen op call, per floating-point operation, per element written; one core, fitted with
# benchmarks/monitor.py --cost-model (see the module docstring). Constants of the code: never measured at run time.
OP_S = 6e-6
FLOP_S = 2.5e-11
ELEM_S = 6e-10
COST_MODEL_VERSION = 1


@dataclass(frozen=True)
class Pass:
    """Counts of one pass: ATen op calls (batch-independent), and flops and elements written split into a part that
    does not grow with the batch (e.g. parameter gradients) and a part per sample."""

    ops: int = 0
    flops: float = 0.0
    elements: float = 0.0
    flops_fixed: float = 0.0
    elements_fixed: float = 0.0

    def seconds(self, n: int) -> float:
        """Modelled seconds of this pass on a batch of ``n``."""
        return (OP_S * self.ops + FLOP_S * (self.flops_fixed + self.flops * n)
                + ELEM_S * (self.elements_fixed + self.elements * n))


@dataclass
class Profile:
    """What the cost model knows about a run: counts of a forward (``fwd``) and a forward+backward (``fwd_bwd``) of
    one sample, parameter counts, the per-layer shapes of the Linear/Conv layers ``(T, C, O, G)``, the sizes of the
    training and probe batches and the optimizer's kind."""

    fwd: Pass
    fwd_bwd: Pass
    params: int
    param_tensors: int
    weight_layers: int
    weight_params: int
    nonlinearities: int
    lin_layers: list = field(default_factory=list)  # [(T, C, O, G)] per Linear/Conv call
    out_features: list = field(default_factory=list)  # per weight layer: its output elements per sample
    weight_shapes: list = field(default_factory=list)  # per weight layer: (rows, cols) of the matrix
    train_batch: int = 1
    probe_batch: int = 1
    optimizer: str = "sgd"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["version"] = COST_MODEL_VERSION
        return d


_OP_INFO: dict = {}  # ATen op -> (which outputs it writes, its flop formula or None)


def _mm_flops(a, b, *rest, **kw):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _addmm_flops(bias, a, b, *rest, **kw):
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _bmm_flops(a, b, *rest, **kw):
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


def _baddbmm_flops(c, a, b, *rest, **kw):
    return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]


# the matrix products by direct shape arithmetic (the same counts as torch.utils.flop_counter, whose formulas walk
# their arguments with pytree: most of the counting time of a small model)
_FAST_FLOPS = {torch.ops.aten.mm: _mm_flops, torch.ops.aten.addmm: _addmm_flops, torch.ops.aten.bmm: _bmm_flops,
               torch.ops.aten.baddbmm: _baddbmm_flops}


class _Counter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops, self.flops, self.elements = 0, 0.0, 0.0
        from torch.utils.flop_counter import flop_registry

        self._registry = flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        info = _OP_INFO.get(func)
        if info is None:
            # per output: whether it is written (a view -- t, reshape, expand, detach -- writes nothing; an in-place
            # op writes its output); the flop formula of the op, if any
            packet = func._overloadpacket
            info = _OP_INFO[func] = (tuple(r.alias_info is None or r.alias_info.is_write for r in func._schema.returns),
                                     _FAST_FLOPS.get(packet), self._registry.get(packet))
        writes, fast, f = info
        if fast is not None:
            self.flops += fast(*args, **kwargs)
            f = None
        for i, t in enumerate(out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and (i >= len(writes) or writes[i]):
                self.elements += t.numel()
        if f is not None:
            try:
                self.flops += f(*args, **kwargs, out_val=out)
            except Exception:  # a formula that does not accept these arguments: the op counts without flops
                pass
        return out


_NONLIN = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.ReLU6,
           nn.Hardtanh, nn.Mish, nn.PReLU, nn.CELU, nn.Hardswish, nn.Hardsigmoid, nn.Softsign, nn.LogSigmoid)


def _optimizer_kind(optimizer) -> str:
    name = type(optimizer).__name__.lower() if optimizer is not None else "sgd"
    return "adam" if "adam" in name or "rms" in name or "ada" in name else "sgd"


def profile_model(model: nn.Module, loss_fn: Callable, batch, *, train_batch: int, optimizer=None,
                  output=None) -> Profile:
    """Count one sample's forward and forward+backward of ``model`` (module docstring). ``batch``: the probe batch
    ``(x, y)`` (its first sample is used; the whole batch, counts divided by its size, when a single sample fails);
    ``train_batch``: samples per training step; ``optimizer``: the training optimizer (its kind only). The model is
    left unchanged (parameters, buffers, ``.grad``, modes). Raises what the model's forward raises on the batch."""
    from ..utils import eval_mode, selecting_output

    x, y = batch[0], batch[1]
    b = int(x.shape[0])
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [(n, m) for n, m in model.named_modules()
               if isinstance(getattr(m, "weight", None), nn.Parameter) and m.weight.dim() >= 2]
    lin: list = []
    outs: dict = {}

    def lin_hook(mod, args, out):
        a = args[0] if args else None
        if not isinstance(a, torch.Tensor) or not isinstance(out, torch.Tensor):
            return
        if isinstance(mod, nn.Linear):
            T = max(1, a.numel() // max(1, a.shape[0] * a.shape[-1]))
            lin.append((T, mod.in_features, mod.out_features, 1))
        else:
            k = 1
            for s in mod.kernel_size:
                k *= s
            T = max(1, out[0].numel() // mod.out_channels)
            lin.append((T, mod.in_channels // mod.groups * k, mod.out_channels // mod.groups, mod.groups))

    def count(n):
        """One counted forward and backward of ``n`` samples: (forward counter, forward+backward counter)."""
        lin.clear()
        outs.clear()
        xs, ys = x[:n], y[:n]
        handles = [m.register_forward_hook(lin_hook) for m in model.modules()
                   if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]
        handles += [m.register_forward_hook(lambda mod, a, o, n_=name: outs.__setitem__(
            n_, o[0].numel() if isinstance(o, torch.Tensor) and o.dim() else 0)) for name, m in weights]
        try:
            with eval_mode(model), selecting_output(model, output), torch.enable_grad():
                c = _Counter()
                with c:
                    out = model(xs)
                    fwd = (c.ops, c.flops, c.elements)  # the forward alone: the counts so far
                    loss = loss_fn(out, ys)
                    if params and loss.requires_grad:
                        torch.autograd.grad(loss, params, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        return fwd, (c.ops, c.flops, c.elements)

    # one sample (the whole batch when the model cannot run one): flops and elements per sample, except the
    # parameter gradients, written once per batch (P elements)
    n = 1 if b >= 2 else b
    try:
        f, fb = count(n)
    except Exception:
        n = b
        f, fb = count(n)
    P = sum(p.numel() for p in params)
    f = Pass(f[0], f[1] / n, f[2] / n)
    fb = Pass(fb[0], fb[1] / n, max(fb[2] - P, 0) / n, 0.0, float(P))
    nonlin = sum(1 for m in model.modules() if isinstance(m, _NONLIN))
    return Profile(
        fwd=f, fwd_bwd=fb, params=P, param_tensors=len(params),
        weight_layers=len(weights), weight_params=sum(m.weight.numel() for _, m in weights), nonlinearities=nonlin,
        lin_layers=list(lin), out_features=[outs.get(name, 0) for name, _ in weights],
        weight_shapes=[(m.weight.shape[0], m.weight[0].numel()) for _, m in weights], train_batch=int(train_batch),
        probe_batch=b, optimizer=_optimizer_kind(optimizer))


# ---- formulas ------------------------------------------------------------------------------------------------
def step_cost(p: Profile) -> float:
    """Modelled seconds of one training step: forward+backward of the training batch, the optimizer update (a few ops
    per parameter tensor; SGD-like about 4, Adam-like about 12 elements written per parameter) and the trainer's own
    ops (zero_grad, the loss value, accuracy: about 12)."""
    per_tensor, per_param = (12, 12) if p.optimizer == "adam" else (4, 4)
    return (p.fwd_bwd.seconds(p.train_batch) + OP_S * (per_tensor * p.param_tensors + 12)
            + ELEM_S * per_param * p.params)


def _gram_flops(p: Profile) -> float:
    """Flops of the per-sample Gram matrix over the Linear/Conv layers (ghost or materialised, the cheaper; as
    the per-sample identities decide)."""
    c = p.probe_batch
    total = 0.0
    for T, C, O, G in p.lin_layers:
        if T == 1:
            total += 2 * G * c * c * (C + O)
        else:  # per sample pair block: ghost c·T²·(C+O), materialised T·O·C + c·O·C multiply-adds (times c)
            total += 2 * G * c * min(c * T * T * (C + O), T * O * C + c * O * C)
    return total


def _grad_norm(p: Profile) -> float:
    return OP_S * 3 * p.weight_layers + ELEM_S * p.weight_params


def _weight_norm(p: Profile) -> float:
    return OP_S * 6 * p.weight_layers + ELEM_S * 2 * p.weight_params


def _gsc(p: Profile) -> float:
    # hooked forward + backward to the activations, per-layer reductions (about 8 ops per measured call)
    return p.fwd_bwd.seconds(p.probe_batch) + OP_S * (8 * p.fwd.ops // 2 + 40) + ELEM_S * p.fwd.elements * p.probe_batch


def _domain(p: Profile) -> float:
    return p.fwd.seconds(p.probe_batch) + OP_S * (8 * p.nonlinearities + 10)


def _conditioning(p: Profile) -> float:
    b = p.probe_batch
    # the shared capture (forward + backward to layer outputs and parameters), two perturbed batch gradients, the Gram
    # (and its factors: about 6 ops per layer), an eigen-decomposition of b x b, bookkeeping
    return (3 * p.fwd_bwd.seconds(b) + FLOP_S * (_gram_flops(p) + 10 * b ** 3)
            + OP_S * (12 * len(p.lin_layers) + 6 * p.param_tensors + 120) + ELEM_S * 3 * p.params)


def _representation(p: Profile) -> float:
    b = p.probe_batch
    # per weight layer: singular values of the weight (LAPACK, about 6·r·c·min(r, c) flops at a fraction of GEMM speed)
    # and a float64 SVD-based least-squares solve b × (d + 1) (about 30·b·(d+1)·min(b, d+1)), about 60 ops around them
    svd = sum(6.0 * r * c * min(r, c) for r, c in p.weight_shapes)
    lstsq = sum(30.0 * b * (d + 1) * min(b, d + 1) for d in p.out_features if d)
    return p.fwd.seconds(b) + FLOP_S * (svd + lstsq) + OP_S * 60 * p.weight_layers


def _update_size(p: Profile) -> float:
    # a copy of the layer weights before the step, then per layer the difference and two norms
    return OP_S * 8 * p.weight_layers + ELEM_S * 4 * p.weight_params


def _noise_scale(p: Profile) -> float:
    # per-sample gradient norms of the probe batch (one capture pass, the per-layer norm identities), the batch
    # gradient's norm; under DDP/FSDP2 the recorder's read is cheaper than this (it is costed the same)
    b = p.probe_batch
    return (p.fwd_bwd.seconds(b) + FLOP_S * 0.5 * _gram_flops(p) / max(b, 1)
            + OP_S * (8 * len(p.lin_layers) + 3 * p.param_tensors + 40) + ELEM_S * p.params)


def _default(p: Profile) -> float:
    return 2 * p.fwd_bwd.seconds(p.probe_batch)


# probe name -> modelled seconds of one measurement; a probe missing here is costed by _default (2 passes)
PROBE_COSTS: dict[str, Callable[[Profile], float]] = {
    "grad_norm": _grad_norm,
    "weight_norm": _weight_norm,
    "gsc": _gsc,
    "domain": _domain,
    "conditioning": _conditioning,
    "representation": _representation,
    "update_size": _update_size,
    "noise_scale": _noise_scale,
}

DEFAULT_COST_TEXT = "two forward+backward passes of the probe batch (no cost formula for this probe)"


def estimate_costs(profile: Profile, probes) -> tuple[dict[str, float], float, dict[str, str]]:
    """``(costs, step, notes)``: modelled seconds per measurement of each probe in ``probes``, of a training step,
    and for probes costed by the default formula a note saying so."""
    costs, notes = {}, {}
    for name in probes:
        f = PROBE_COSTS.get(name)
        if f is None:
            f = _default
            notes[name] = DEFAULT_COST_TEXT
        costs[name] = float(f(profile))
    return costs, float(step_cost(profile)), notes
