"""Peak training memory of one training step: what full backprop needs vs what one layer-wise block needs.

On CUDA the activations come from ``torch.cuda.max_memory_allocated``; on the CPU, where PyTorch keeps no
allocator statistics, from an accounting of the tensors autograd saves for the backward pass
(``torch.autograd.graph.saved_tensors_hooks``). Parameters, gradients and optimizer state are counted from the
parameter sizes on both. The ratio of two such reports (a DLL block vs full backprop) is what the thesis's
"relative memory use" (Tables 6.2/6.3) compares.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ...losses import get_loss
from ...utils import as_batch, module_device
from ..trainer import OPTIMIZERS, to_model

# Tensors of optimizer state kept per parameter tensor, each the parameter's size (step counters, a few bytes per
# tensor, are not counted): plain SGD none, SGD with momentum one buffer, Adagrad one sum, Adam/AdamW two moments.
OPTIMIZER_STATE_FACTOR = {"sgd": 0, "momentum": 1, "adagrad": 1, "adam": 2, "adamw": 2}


@dataclass(frozen=True)
class MemoryReport:
    """Bytes one training step holds at its peak, by kind.

    ``parameters``: every parameter resident for the step (a frozen feednet's too); ``gradients`` and
    ``optimizer_state``: of the trainable parameters only; ``activations``: on the CPU the tensors autograd saved
    for backward (each storage once, parameters excluded) at the end of the forward pass, the peak of what the
    graph holds; on CUDA the allocator's peak during forward + backward minus what was allocated before, less the
    gradients (so it also holds transient buffers), measured on a second step after an unmeasured warm-up step
    (which lets cuBLAS/cuDNN allocate their per-process workspaces outside the measurement). ``method`` is
    ``"saved-tensors"`` or ``"cuda"``.
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    method: str = "saved-tensors"

    @property
    def total(self) -> int:
        """Sum of the four kinds, in bytes."""
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def ratio_to(self, other: "MemoryReport") -> float:
        """``self.total / other.total`` (e.g. a block's memory relative to full backprop)."""
        return self.total / other.total

    def plus(self, parameters: int = 0, gradients: int = 0, optimizer_state: int = 0) -> "MemoryReport":
        """A copy with extra resident bytes added (e.g. the other blocks' optimizer states kept by random robin)."""
        return MemoryReport(self.parameters + parameters, self.gradients + gradients,
                            self.optimizer_state + optimizer_state, self.activations, self.method)

    def to_dict(self) -> dict:
        return {**asdict(self), "total": self.total}


def _param_bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def optimizer_state_bytes(params, optimizer: str) -> int:
    """Bytes of optimizer state for ``params`` under optimizer ``optimizer`` (see ``OPTIMIZER_STATE_FACTOR``)."""
    if optimizer not in OPTIMIZER_STATE_FACTOR:
        raise ValueError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(OPTIMIZERS)}.")
    return OPTIMIZER_STATE_FACTOR[optimizer] * _param_bytes(params)


def memory_accounting(trainable: nn.Module, batch, *, frozen: nn.Module | None = None, loss="cross_entropy",
                      optimizer: str = "adamw") -> MemoryReport:
    """Peak memory of one training step of ``trainable`` on ``batch``, with ``frozen`` (a feednet) run before it
    under ``torch.no_grad()``.

    ``batch``: ``(x, y)``; ``x`` goes into ``frozen`` (or straight into ``trainable``), the loss compares
    ``trainable``'s output with ``y``. The step runs on deep copies of both modules (train mode for ``trainable``,
    eval mode for ``frozen``) and takes gradients with ``torch.autograd.grad``, so the caller's modules, their
    ``.grad`` fields and their BatchNorm buffers are untouched.

    Counted: parameters of both modules; gradients and ``optimizer`` state (:data:`OPTIMIZER_STATE_FACTOR`) of the
    trainable parameters; activations (see :class:`MemoryReport`: on the CPU the saved tensors of the trainable
    forward and the loss, each storage once and parameters excluded; on CUDA the allocator's peak). Not counted on
    the CPU: transient buffers inside an op, the feednet's short-lived intermediate outputs (inference frees each
    one after the next layer has read it) and the gradients of activations during backward, which are freed as the
    backward pass goes down. Cost: one forward of ``frozen`` and one forward + backward of ``trainable`` (two on
    CUDA: a warm-up step, then the measured one), plus the copies.
    """
    if not isinstance(trainable, nn.Module):
        raise ValueError(f"trainable must be an nn.Module, got {type(trainable).__name__}.")
    x, y = as_batch(batch)
    loss_fn = get_loss(loss)
    net = copy.deepcopy(trainable).train()
    feed = copy.deepcopy(frozen).eval() if frozen is not None else None
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the trainable module has no parameter that requires a gradient; nothing to measure.")
    device, dtype = module_device(net), params[0].dtype
    x, y = to_model(x, dtype, device), to_model(y, dtype, device)
    resident = list(net.parameters()) + (list(feed.parameters()) if feed is not None else [])
    parameters = _param_bytes(resident)
    gradients = _param_bytes(params)
    opt_state = optimizer_state_bytes(params, optimizer)
    with torch.no_grad():
        z = feed(x) if feed is not None else x
    if device.type == "cuda":
        del x
        # one unmeasured step first: cuBLAS/cuDNN allocate their workspaces lazily on the first call (tens of MB,
        # once per process), which is not memory of this step and would make the first measurement order-dependent
        torch.autograd.grad(loss_fn(net(z), y), params)
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        out = net(z)
        grads = torch.autograd.grad(loss_fn(out, y), params)
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        del out, grads
        return MemoryReport(parameters, gradients, opt_state, max(0, peak - gradients), "cuda")
    own = {p.untyped_storage().data_ptr() for p in resident}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in own and ptr not in saved:
            saved[ptr] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(z)
        value = loss_fn(out, y)
    torch.autograd.grad(value, params)
    return MemoryReport(parameters, gradients, opt_state, sum(saved.values()), "saved-tensors")
