"""PyTorch Lightning integration (optional extra ``gradcond[lightning]``).

``LightningMonitor(monitor, loss_fn)`` is a ``lightning.pytorch.Callback`` that runs a :class:`~gradcond.monitor.Monitor`
inside a Lightning training loop: its step probes after each training batch (after the optimizer step, with that
step's gradients), its epoch probes at each epoch end. Rows go to ``callback.rows`` (and to ``run_dir`` when given,
in the same long format as ``gradcond run``), and every value is also passed to the trainer's logger.
Assumes automatic optimisation with one optimizer; ``loss_fn(output, target)`` is the loss the probes use and
batches are ``(x, y)`` pairs.
"""

from __future__ import annotations

from ..train.run import RunLogger
from ..train.trainer import TrainState
from .monitor import Monitor

try:
    import lightning.pytorch as pl
except ImportError:  # pragma: no cover - the extra is optional
    try:
        import pytorch_lightning as pl
    except ImportError:
        pl = None


def _require():
    if pl is None:
        raise ImportError("LightningMonitor needs the optional 'lightning' package: pip install 'gradcond[lightning]'.")


_Base = pl.Callback if pl is not None else object


class LightningMonitor(_Base):
    def __init__(self, monitor: Monitor | str | dict = "default", loss_fn="cross_entropy", run_dir=None, budget: float = 0.05):
        _require()
        from ..train import get_loss

        super().__init__()
        self.monitor = monitor if isinstance(monitor, Monitor) else Monitor(monitor, budget=budget)
        self.loss_fn = get_loss(loss_fn)
        self.run = RunLogger(run_dir)
        self._state: TrainState | None = None

    def _sync(self, trainer, pl_module, batch=None) -> TrainState:
        if self._state is None:
            opt = trainer.optimizers[0] if trainer.optimizers else None
            self._state = TrainState(pl_module, opt, self.loss_fn, trainer.train_dataloader, run=self.run)
        st = self._state
        st.model, st.step, st.epoch = pl_module, int(trainer.global_step), int(trainer.current_epoch)
        if batch is not None:
            st.batch = tuple(batch)
        return st

    def _forward_to_logger(self, trainer, n0: int) -> None:
        logger = getattr(trainer, "logger", None)
        if logger is None:
            return
        for r in self.run.metrics[n0:]:
            key = "/".join(p for p in (r["probe"], r["name"], r["layer"]) if p)
            logger.log_metrics({f"gradcond/{key}": r["value"]}, step=r["step"])

    def on_train_start(self, trainer, pl_module) -> None:
        self.monitor.on_train_start(self._sync(trainer, pl_module))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # the weights before the step, for update_size (when it is due at the step about to complete)
        self.monitor.before_update(self._sync(trainer, pl_module), step=int(trainer.global_step) + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        n0 = len(self.run.metrics)
        self.monitor.on_step_end(self._sync(trainer, pl_module, batch))
        self._forward_to_logger(trainer, n0)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        n0 = len(self.run.metrics)
        self.monitor.on_epoch_end(self._sync(trainer, pl_module))
        self._forward_to_logger(trainer, n0)

    @property
    def rows(self) -> list[dict]:
        return self.run.metrics

    @property
    def events(self) -> list[dict]:
        return self.run.events
