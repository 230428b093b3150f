"""The gradient noise scale (McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training").

The *simple noise scale* ``B_simple = tr(Σ) / |G|²`` (their eq. 2.9) -- ``G`` the true gradient, ``Σ`` the
per-example gradient covariance -- predicts the critical batch size: batches much smaller than it are
noise-dominated (larger batches help almost linearly), much larger ones waste samples.

Both estimators here follow their Appendix A.1: from the squared norms of the mean gradient at two batch sizes
``B_small < B_big``,

* ``|G|²  ≈ (B_big |G_big|² - B_small |G_small|²) / (B_big - B_small)``  (unbiased),
* ``tr Σ ≈ (|G_small|² - |G_big|²) / (1/B_small - 1/B_big)``  (unbiased),

and ``B_simple`` is their ratio (a ratio of unbiased estimates, not itself unbiased; average numerator and
denominator over many measurements before dividing, as the source does, when single estimates are noisy).

* :func:`gradient_noise_scale` -- **per-sample**: ``B_small = 1`` (the mean of the per-sample squared norms
  ``|g_i|²``, computed without the b × P matrix by :func:`gradcond.probes.per_sample_stats`) and ``B_big = b`` (the
  batch's mean gradient, one backward). Exactly the unbiased per-example estimates ``tr Σ = Σ|g_i - ḡ|²/(b-1)`` and
  ``|G|² = |ḡ|² - tr Σ / b``.
* :func:`noise_scale_from_norms` -- the two-batch formula itself: the **distributed** estimator, where
  ``|G_small|²`` is the mean over ranks of each rank's local gradient norm² (batch ``B_small`` per rank) and
  ``|G_big|²`` the norm² of the all-reduced gradient (``B_big = world · B_small``). No per-sample work: the
  norms come from the gradients training computes anyway (:class:`NoiseScaleRecorder` reads them inside DDP's
  all-reduce or FSDP2's reduce-scatter). The ratio is unchanged when both gradients carry a common factor (loss
  scaling, gradient accumulation's 1/k, a GradScaler's scale), so the recorder need not know it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

__all__ = ["NoiseScale", "gradient_noise_scale", "noise_scale_from_norms", "NoiseScaleRecorder"]


@dataclass
class NoiseScale:
    """``b_simple`` = tr Σ / |G|² (NaN when the |G|² estimate is not positive: the gradient is lost in the noise
    at these batch sizes); ``trace_sigma`` and ``grad_sq`` the two unbiased estimates; ``small_sq``/``big_sq``
    the squared gradient norms at batch sizes ``b_small``/``b_big``; ``method`` ``"per_sample"`` or
    ``"distributed"``."""

    b_simple: float
    trace_sigma: float
    grad_sq: float
    small_sq: float
    big_sq: float
    b_small: float
    b_big: float
    method: str

    def to_dict(self) -> dict:
        return asdict(self)


def noise_scale_from_norms(small_sq: float, big_sq: float, b_small: float, b_big: float,
                           method: str = "distributed") -> NoiseScale:
    """McCandlish et al. (2018) App. A.1 from ``|G_small|²`` at batch size ``b_small`` and ``|G_big|²`` at
    ``b_big > b_small`` (see the module docstring). Pure arithmetic; ValueError unless ``0 < b_small < b_big``."""
    if not (0 < b_small < b_big):
        raise ValueError(f"the noise-scale estimator needs batch sizes 0 < b_small < b_big, got b_small={b_small!r}, "
                         f"b_big={b_big!r}.")
    small_sq, big_sq = float(small_sq), float(big_sq)
    grad_sq = (b_big * big_sq - b_small * small_sq) / (b_big - b_small)
    trace = (small_sq - big_sq) / (1.0 / b_small - 1.0 / b_big)
    b = trace / grad_sq if grad_sq > 0 else float("nan")
    return NoiseScale(b, trace, grad_sq, small_sq, big_sq, float(b_small), float(b_big), method)


def _per_sample_losses(loss_fn, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``ℓ_i = loss_fn(out[i:i+1], y[i:i+1])`` for every sample (the per-sample convention of the Engine), by vmap."""
    return torch.func.vmap(lambda o, t: loss_fn(o.unsqueeze(0), t.unsqueeze(0)))(out, y)


def gradient_noise_scale(model: nn.Module, loss_fn, batch) -> NoiseScale:
    """B_simple of ``model`` on one batch ``(x, y)`` from per-sample gradient norms (no b × P matrix).

    ``loss_fn(output, target)`` follows the per-sample convention ``ℓ_i = loss_fn(f(x_i)[None], t_i[None])``; the
    gradient is taken over every parameter that requires one. The model is evaluated in eval mode (per-sample
    gradients need independent samples: dropout off, BatchNorm on its running statistics) and left unchanged
    (parameters, buffers, ``.grad``, modes). Cost: :func:`gradcond.probes.per_sample_stats` with norms only, plus
    one forward and one backward of the batch. ValueError for fewer than 2 samples."""
    from ..losses import get_loss
    from ..utils import as_batch, eval_mode, selecting_output
    from .per_sample import per_sample_stats

    loss = get_loss(loss_fn)
    x, y = as_batch(batch)
    b = int(x.shape[0])
    if b < 2:
        raise ValueError(f"the gradient noise scale needs a batch of at least 2 samples, got {b}.")
    st = per_sample_stats(model, loss, (x, y), gram=False, norms=True, bn="eval")
    small = float(st.sq_norms.double().mean())
    params = [p for p in model.parameters() if p.requires_grad]
    with eval_mode(model), selecting_output(model):
        ell = _per_sample_losses(loss, model(x), y)
        grads = torch.autograd.grad(ell.sum() / b, params, allow_unused=True)
    big = float(sum(g.detach().double().pow(2).sum() for g in grads if g is not None))
    return noise_scale_from_norms(small, big, 1, b, method="per_sample")


class NoiseScaleRecorder:
    """Reads the distributed noise-scale estimator's two norms from the gradient communication of training.

    ``NoiseScaleRecorder.attach(model)`` installs it on a ``DistributedDataParallel`` model (a communication hook
    that wraps the default all-reduce: it adds up each bucket's squared norm before averaging -- this rank's
    gradient -- and after -- the global one) or on an FSDP2 model (a custom reduce-scatter on every
    ``FSDPModule``: the squared norm of the input -- this rank's unsharded gradient -- and of the output shard);
    it must be attached before the first backward. :meth:`read` returns the estimate over everything recorded
    since the last read and starts over. Collective (one all-reduce of 3 floats).

    ``b_small`` is the number of samples one rank's gradient comes from at one communication round; pass the
    samples this rank processed since the last read, and the recorder divides by the rounds it counted (DDP
    communicates once per optimizer step, after gradient accumulation; FSDP2 may reduce-scatter every micro-batch).
    """

    def __init__(self):
        self.small = torch.zeros((), dtype=torch.float64)
        self.big = torch.zeros((), dtype=torch.float64)
        self.counts: dict[int, int] = {}  # communication calls per bucket (DDP) / per FSDP module since the last read
        self.kind = None
        self.problem: str | None = None

    # ---- installing ------------------------------------------------------------------------------------------
    @classmethod
    def attach(cls, model: nn.Module) -> "NoiseScaleRecorder":
        """A recorder installed on ``model`` (DDP or FSDP2); ValueError (one sentence) for anything else."""
        from torch.nn.parallel import DistributedDataParallel

        from .. import distributed as D

        rec = cls()
        if isinstance(model, DistributedDataParallel):
            model.register_comm_hook(None, rec._ddp_hook)
            rec.kind = "ddp"
            return rec
        if D.strategy(model) == "fsdp2":
            from torch.distributed.fsdp import FSDPModule

            for i, m in enumerate(mm for mm in model.modules() if isinstance(mm, FSDPModule)):
                m.set_custom_reduce_scatter(_recording_reduce_scatter(rec, i))
            rec.kind = "fsdp2"
            return rec
        raise ValueError("the distributed noise-scale estimator needs a DistributedDataParallel or FSDP2 "
                         f"(fully_shard) model, got {type(model).__name__} without sharded parameters.")

    def _ddp_hook(self, state, bucket):
        import torch.distributed as dist

        buf = bucket.buffer()
        self.small += buf.detach().double().pow(2).sum().cpu()
        self.counts[bucket.index()] = self.counts.get(bucket.index(), 0) + 1
        buf.div_(dist.get_world_size())
        fut = dist.all_reduce(buf, async_op=True).get_future()

        def done(f):
            t = f.value()[0]
            self.big += t.detach().double().pow(2).sum().cpu()
            return t

        return fut.then(done)

    # ---- reading ---------------------------------------------------------------------------------------------
    def read(self, samples: float) -> NoiseScale:
        """The estimate over what was recorded since the last read (then reset). ``samples``: the samples this rank
        processed since the last read (all ranks process as many). ValueError when nothing was recorded or the
        reduction could not be read (e.g. an FSDP2 reduce-scatter with a pre-multiplied sum)."""
        from .. import distributed as D

        if self.problem is not None:
            raise ValueError(self.problem)
        world = D.world_size()
        rounds = max(self.counts.values(), default=0)  # one round = every bucket / module communicated once
        packed = torch.stack([self.small, self.big, torch.tensor(float(rounds), dtype=torch.float64)])
        self.small, self.big, self.counts = torch.zeros_like(self.small), torch.zeros_like(self.big), {}
        D.all_reduce_sum(packed)
        small, big, rounds = float(packed[0]) / world, float(packed[1]), float(packed[2]) / world
        if self.kind == "ddp":
            big /= world  # every rank added the same (replicated) all-reduced gradient
        if rounds <= 0:
            raise ValueError("no gradient communication was recorded since the last read (attach the recorder "
                             "before the first backward).")
        b_small = samples / rounds
        return noise_scale_from_norms(small / rounds, big / rounds, b_small, b_small * world)


def _recording_reduce_scatter(rec: NoiseScaleRecorder, key: int):
    """An FSDP2 custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) doing what the default one does
    (``reduce_scatter_single`` into a fresh buffer) and adding to ``rec`` the squared norms of the input (this rank's
    unsharded gradient, after any pre-division, which applies to every rank alike) and of the output shard brought
    back to the mean of the inputs."""
    import torch.distributed as dist

    class RecordingReduceScatter:  # the ReduceScatter interface of FSDP2's _fsdp_api (allocate, __call__)
        def allocate(self, size, *, dtype, device):
            return torch.empty(*size, dtype=dtype, device=device)

        def __call__(self, output_tensor, input_tensor, group, op, async_op=False):
            rec.small += input_tensor.detach().double().pow(2).sum().cpu()
            rec.counts[key] = rec.counts.get(key, 0) + 1
            work = dist.reduce_scatter_single(output=output_tensor, input=input_tensor, group=group, op=op,
                                              async_op=async_op)
            if work is not None and async_op:
                work.wait()
            if op == dist.ReduceOp.AVG:
                div = 1.0
            elif op == dist.ReduceOp.SUM:
                div = float(group.size())
            else:
                rec.problem = (f"the distributed noise scale cannot read FSDP2's reduce-scatter with op {op} (only "
                               "SUM and AVG are understood); use the per-sample noise scale instead.")
                div = math.nan
            rec.big += (output_tensor.detach().double() / div).pow(2).sum().cpu()
            return None

    return RecordingReduceScatter()
