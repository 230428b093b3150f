"""Trainer callbacks for the codec: the compressed weight sync every k steps, and bit-rate logging for the DDP hook.

Both subclass the neutral :class:`gradcond.callbacks.Callback` (compression sits below ``train``), so they work in
:func:`gradcond.train.fit` and anywhere else the protocol is followed.

Metrics written (probe ``compression``; see ``docs/run-directory.md``):

* ``bits_per_param`` -- transmitted bits per parameter value of one weight sync (headers included);
* ``payload_bits_per_param`` -- the entropy-coded indices alone (the source's figure 3.5 quantity);
* ``n_bits`` -- the bit width N of one package, with ``layer`` = the module (or parameter) name;
* ``grad_bits_per_param`` -- transmitted bits per gradient value of one DDP step (:class:`CompressionHookMetrics`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..callbacks import Callback
from ..utils import UserError
from .codec import _check_args
from .ddp import EntropyHookState, SyncReport, sync_weights_compressed

if TYPE_CHECKING:  # annotation only: the trainer sits above this package
    from gradcond.train.trainer import TrainState

__all__ = ["CompressedWeightSync", "CompressionHookMetrics"]


def _positive_or_none(name: str, v) -> None:
    if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise UserError(f"{name} must be a positive integer or None; got {v!r}.")


class CompressedWeightSync(Callback):
    """Every ``every_steps`` optimizer steps (or every ``every_epochs`` epochs) run
    :func:`~gradcond.compression.sync_weights_compressed` on the model: under ``torch.distributed`` the replicas
    train locally and average their compressed weights; in one process the weights are quantised in place (the
    source's simulation, which quantises after every epoch).

    Use it on a model that is *not* wrapped in ``DistributedDataParallel`` (local SGD: the sync replaces DDP's
    gradient all-reduce).  ``history`` keeps one :class:`~gradcond.compression.SyncReport` per sync; with a run
    logger the bit rates are logged as metrics (module docstring).  ``state_dict`` keeps the sampling generator's
    state and the sync count, so a resumed run draws the same samples.
    """

    def __init__(self, every_steps: int | None = None, every_epochs: int | None = None, c: float = 6, M: int = 4,
                 F: float = 0.03, seed: int = 0, group_by: str = "module", process_group=None, verify: bool = True):
        _positive_or_none("every_steps", every_steps)
        _positive_or_none("every_epochs", every_epochs)
        if (every_steps is None) == (every_epochs is None):
            raise UserError("CompressedWeightSync needs exactly one of every_steps and every_epochs.")
        _check_args(c, M, F)
        if group_by not in ("module", "parameter"):
            raise UserError(f"group_by must be 'module' or 'parameter'; got {group_by!r}.")
        self.every_steps, self.every_epochs = every_steps, every_epochs
        self.c, self.M, self.F = c, M, F
        self.group_by, self.process_group, self.verify = group_by, process_group, verify
        self.generator = torch.Generator().manual_seed(int(seed))
        self.history: list[SyncReport] = []

    def sync(self, state: "TrainState") -> SyncReport:
        """One sync now (also callable by hand); logs its metrics when the state has a run logger."""
        report = sync_weights_compressed(state.model, self.c, self.M, self.F, process_group=self.process_group,
                                         generator=self.generator, group_by=self.group_by, verify=self.verify)
        self.history.append(report)
        if getattr(state, "run", None) is not None:
            rows = [("compression", "", "bits_per_param", report.bits_per_param),
                    ("compression", "", "payload_bits_per_param", report.payload_bits_per_param)]
            rows += [("compression", name, "n_bits", n) for name, n in report.n_bits.items()]
            state.log_metrics(rows)
        return report

    def on_step_end(self, state: "TrainState") -> None:
        if self.every_steps is not None and state.step % self.every_steps == 0:
            self.sync(state)

    def on_epoch_end(self, state: "TrainState") -> None:
        if self.every_epochs is not None and (state.epoch + 1) % self.every_epochs == 0:
            self.sync(state)

    @property
    def mean_bits_per_param(self) -> float:
        """Average transmitted bits per parameter value over all syncs so far (NaN before the first)."""
        if not self.history:
            return float("nan")
        return sum(r.bits_per_param for r in self.history) / len(self.history)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state().tolist(), "n_syncs": len(self.history)}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class CompressionHookMetrics(Callback):
    """Log the DDP hook's transmitted bits per gradient value (``grad_bits_per_param``) after every step."""

    def __init__(self, hook_state: EntropyHookState):
        if not isinstance(hook_state, EntropyHookState):
            raise UserError(f"CompressionHookMetrics needs an EntropyHookState; got {type(hook_state).__name__}.")
        self.hook_state = hook_state

    def on_step_end(self, state: "TrainState") -> None:
        stats = self.hook_state.pop_step_stats()
        if stats and getattr(state, "run", None) is not None:
            state.log_metrics([("compression", "", "grad_bits_per_param", s["bits_per_value"]) for s in stats])
