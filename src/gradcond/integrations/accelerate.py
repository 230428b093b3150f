"""Hugging Face Accelerate (optional extra ``gradcond[hf]``): the Monitor and ``diagnose`` take the objects
``accelerator.prepare`` returns as they are.

The five-line recipe (any loop written for Accelerate)::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    monitor = Monitor("default")
    for x, y in loader:
        optimizer.zero_grad(); loss = F.cross_entropy(model(x), y); accelerator.backward(loss); optimizer.step()
        monitor.step(model, "cross_entropy", (x, y), optimizer)

What happens underneath: a ``DistributedDataParallel`` wrapper (several processes) is looked through
(``model.module``; the monitor then measures the whole model across the ranks, :mod:`gradcond.monitor.monitor`);
accelerate's mixed-precision wrapper of the forward (autocast, outputs in float32) is set aside while a probe runs
(:func:`gradcond.utils.plain_forward`), so forward-pass probes measure in the parameters' dtype -- the float32
reference -- while training keeps its autocast; gradients are read as ``accelerator.backward`` left them (unscaled
by the optimizer step when a gradient scaler is used); a step the ``AcceleratedOptimizer`` reports as skipped
(``step_was_skipped``) is logged as skipped, not measured. ``diagnose(model, ...)`` accepts the prepared model
the same way (call it on one rank).
"""

from __future__ import annotations

import contextlib

from torch import nn

from ..distributed import unwrap
from ..utils import plain_forward

__all__ = ["unwrap_prepared"]


@contextlib.contextmanager
def unwrap_prepared(model: nn.Module):
    """Context giving the module to measure inside an ``accelerator.prepare``-d model: ``model.module`` of a DDP
    wrapper, with accelerate's autocast wrapper of the forward set aside until the context closes. For calling any
    :mod:`gradcond.probes` function on a prepared model; the Monitor and ``diagnose`` do this themselves."""
    inner = unwrap(model)
    with plain_forward(inner):
        yield inner
