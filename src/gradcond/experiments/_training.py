"""Training for the reproductions: a fixed number of minibatch steps on in-memory tensors through the library's
trainer, :func:`gradcond.train.fit`, so that every reproduction exercises the code users train with.

A reproduction counts optimizer *steps* (the sources' protocols: "150 steps, then a teleport, then 200 steps"),
while ``fit`` counts epochs over a loader.  :class:`BatchStream` bridges the two: one "epoch" of it is exactly
``steps`` minibatches drawn from a generator whose state continues from one call to the next, and
:func:`train_steps` collects the per-step batch losses with a small :class:`~gradcond.train.Callback`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..train import Callback, fit
from ..utils import TrainingDiverged

SAMPLINGS = ("permutation", "replacement")


class BatchStream:
    """An iterable of ``(x, y)`` minibatches of ``X, y`` for :func:`gradcond.train.fit`; each pass yields ``steps``
    batches of ``batch_size`` rows (``len()`` is ``steps``).

    ``sampling="permutation"``: consecutive slices of a random permutation, a fresh permutation when fewer than
    ``batch_size`` rows are left (every row once per pass over the data, the tail of a permutation dropped);
    ``"replacement"``: each batch is ``batch_size`` indices drawn uniformly with replacement.  Randomness comes
    only from ``generator``, and the stream continues where the previous pass stopped, so two passes of ``k``
    steps give the same batches as one of ``2k``.  Indexing an in-memory tensor costs one gather per batch (no
    DataLoader workers, no collation).
    """

    def __init__(self, X: torch.Tensor, y: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator,
                 sampling: str = "permutation"):
        if sampling not in SAMPLINGS:
            raise ValueError(f"unknown sampling {sampling!r}; accepted: {', '.join(SAMPLINGS)}.")
        if len(X) != len(y):
            raise ValueError(f"inputs and targets must have the same number of rows, got {len(X)} and {len(y)}.")
        if not 1 <= batch_size <= len(X):
            raise ValueError(f"batch_size must be between 1 and the number of rows ({len(X)}), got {batch_size}.")
        if steps < 0:
            raise ValueError(f"steps must be >= 0, got {steps}.")
        self.X, self.y, self.batch_size, self.steps = X, y, int(batch_size), int(steps)
        self.sampling, self._gen = sampling, generator
        self._perm, self._pos = None, 0

    def __len__(self) -> int:
        return self.steps

    def _next_index(self) -> torch.Tensor:
        n, bs = len(self.X), self.batch_size
        if self.sampling == "replacement":
            return torch.randint(0, n, (bs,), generator=self._gen)
        if self._perm is None or self._pos + bs > n:
            self._perm, self._pos = torch.randperm(n, generator=self._gen), 0
        idx = self._perm[self._pos:self._pos + bs]
        self._pos += bs
        return idx

    def __iter__(self):
        for _ in range(self.steps):
            idx = self._next_index()
            yield self.X[idx], self.y[idx]


class _StepRecorder(Callback):
    """Collects each step's batch loss; calls ``record(step)`` after every ``every``-th optimizer step."""

    def __init__(self, record: Callable[[int], None] | None, every: int):
        self.losses: list[float] = []
        self.record, self.every = record, every

    def on_step_end(self, state) -> None:
        self.losses.append(state.loss)
        if self.record is not None and self.every and state.step % self.every == 0:
            self.record(state.step)


def train_steps(model: torch.nn.Module, X: torch.Tensor, y: torch.Tensor, optimizer, steps: int, batch_size: int,
                generator: torch.Generator, *, sampling: str = "permutation", lr: float = 0.01,
                momentum: float = 0.9, record: Callable[[int], None] | None = None, every: int = 0,
                seed: int = 0) -> list[float]:
    """Train ``model`` in place for ``steps`` optimizer steps on minibatches of ``X, y`` (cross-entropy) with
    :func:`gradcond.train.fit`; return the per-step batch losses.

    ``optimizer``: a ``torch.optim.Optimizer`` (used as is, state included, so training can continue across
    calls) or a name :func:`gradcond.train.make_optimizer` accepts (built with ``lr`` / ``momentum``).  Batches
    come from a :class:`BatchStream` (``sampling``, ``generator``).  ``record(step)`` runs after every ``every``-th
    step (e.g. to evaluate the model).  A non-finite batch loss stops the training: ``fit`` refuses that step
    (the model keeps its last finite weights) and the returned list ends with NaN, so callers see the divergence.
    ``fit`` seeds torch's global generator with ``seed`` (dropout masks come from it); the caller's global
    generator state is restored afterwards, so training does not shift the random draws that follow it.
    Cost: ``steps`` forward/backward passes.
    """
    if steps <= 0:
        return []
    rec = _StepRecorder(record, every)
    stream = BatchStream(X, y, batch_size, steps, generator, sampling)
    try:
        with torch.random.fork_rng(devices=[]):
            fit(model, stream, optimizer=optimizer, lr=lr, momentum=momentum, epochs=1, callbacks=[rec], seed=seed)
    except TrainingDiverged:
        rec.losses.append(math.nan)
    return rec.losses
