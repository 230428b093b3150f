"""The Lightning callback runs the monitor inside a Lightning loop (skipped when lightning is not installed)."""

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

from gradcond import zoo  # noqa: E402
from gradcond.data import load_dataset  # noqa: E402
from gradcond.monitor.lightning import LightningMonitor  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = zoo.mlp(64, 10, depth=3, width=32)
        self.seen_grads = {}

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def on_before_optimizer_step(self, optimizer):
        # independent record of the gradient the optimizer uses at this step
        self.seen_grads[self.trainer.global_step + 1] = float(self.net[0].weight.grad.norm())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_monitor_logs_the_step_gradients(tmp_path):
    d = load_dataset("digits")
    loader = d.loaders(64, seed=0)[0]
    cb = LightningMonitor({"grad_norm": "every:3", "gsc": "epoch"}, budget=1.0, run_dir=tmp_path / "run")
    module = Module()
    trainer = pl.Trainer(max_epochs=2, callbacks=[cb], logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                         default_root_dir=tmp_path)
    trainer.fit(module, loader)
    gn = {r["step"]: r["value"] for r in cb.rows if r["probe"] == "grad_norm" and r["layer"] == "net.0"}
    n = 2 * len(loader)
    assert sorted(gn) == [s for s in range(1, n + 1) if s % 3 == 0]
    for step, value in gn.items():
        assert value == pytest.approx(module.seen_grads[step], rel=1e-6)
    assert {r["epoch"] for r in cb.rows if r["probe"] == "gsc"} == {0, 1}
    lines = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert sum(l.split(",")[2] == "grad_norm" for l in lines[1:]) == 3 * len(gn)  # 3 Linear layers
