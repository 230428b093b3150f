"""Layer-wise (DLL), segment-wise (DSL) and random-robin training (seed 002 ch. 6, Algorithms 3 and 4).

One entry point, :func:`fit_layerwise`. Every method trains a *subnet* made of a window of blocks and a decision
head on the features of a frozen *feednet* (the blocks below, run under ``torch.no_grad()`` in eval mode), with
input dropout on the subnet's input and gradient dropout on the gradient from the head into the blocks (§6.6.3),
and a per-block schedule ``lr * lr_decay**i``, ``weight_decay * wd_growth**i`` (Table 6.3).
"""

from __future__ import annotations

import io

import copy
import math
import numbers
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ...losses import get_loss
from ...presets import presettable
from ...utils import TrainingDiverged, as_batch, module_device, progress, resolve_device
from ..trainer import OPTIMIZERS, make_optimizer, to_model
from .blocks import is_classifier_block, split_blocks
from .heads import NoHeadFits, choose_head, describe_head, gradient_dropout, input_dropout_p, make_head, search_head
from .memory import MemoryReport, memory_accounting, optimizer_state_bytes

METHODS = ("dll", "dsl", "random_robin", "round_robin")
CHECKPOINTS = ("ram", "disk")


class Subnet(nn.Module):
    """What one layer-wise step trains: ``head(gradient_dropout(blocks(input_dropout(z))))``.

    ``p_in`` (input dropout, standard ``F.dropout``: kept inputs scaled by ``1/(1-p)``) and ``grad_p`` (gradient
    dropout between the blocks and the head, :class:`GradientDropout`) act in train mode only; in eval mode the
    subnet is ``head(blocks(z))``.
    """

    def __init__(self, blocks: Sequence[nn.Module], head: nn.Module, p_in: float = 0.0, grad_p: float = 0.0,
                 rescale: bool = True):
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = head
        self.p_in, self.grad_p, self.rescale = float(p_in), float(grad_p), bool(rescale)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        if self.training and self.p_in > 0:
            z = F.dropout(z, self.p_in, training=True)
        h = self.blocks(z)
        if self.training and self.grad_p > 0:
            h = gradient_dropout(h, self.grad_p, self.rescale)
        return self.head(h)


@dataclass
class LayerwiseResult:
    """What :func:`fit_layerwise` returns.

    ``test_accuracy[d-1]`` / ``val_accuracy[d-1]``: accuracy of the network truncated after ``d`` blocks with the
    head trained for block ``d`` (for DLL and DSL measured right after that block or window was trained; for random
    robin after the last round). ``accuracy`` is the list the best depth was chosen on (validation when a
    ``val_loader`` was given, else test, as in the thesis). ``best_depth`` counts blocks (1-based) and ``model`` is
    a plain ``nn.Sequential`` of those blocks and their head, in eval mode (a copy: ``blocks`` and ``heads`` hold the
    final, trained modules of every depth).
    ``memory[i]``: the peak training memory of step ``i`` (feednet + trained window + head), ``backprop_memory``:
    that of the whole model trained by backprop on the same batch; ``memory_ratio``: the largest of the former over
    the latter. ``history``: one dict per epoch (block, round, epoch, lr, weight_decay, input_dropout, train_loss,
    train_acc, val_acc, test_acc).  ``head_search[i]``: with ``memory_target``, the decision-block search's log
    for step ``i`` (every configuration measured with its bytes and memory ratio, then the choice and its reason;
    :func:`~gradcond.train.layerwise.heads.search_head`); empty otherwise.
    """

    method: str
    model: nn.Module
    best_depth: int
    test_accuracy: list[float]
    val_accuracy: list[float] | None
    memory: list[MemoryReport]
    backprop_memory: MemoryReport
    blocks: list[nn.Module]
    heads: list[nn.Module]
    head_configs: list[dict]
    epochs_run: list[int]
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    head_search: list[list[dict]] = field(default_factory=list)

    @property
    def accuracy(self) -> list[float]:
        """Accuracy per depth on the selection set (validation if given, else test)."""
        return self.val_accuracy if self.val_accuracy is not None else self.test_accuracy

    @property
    def memory_ratios(self) -> list[float]:
        """Each step's peak training memory relative to full backprop."""
        return [m.ratio_to(self.backprop_memory) for m in self.memory]

    @property
    def memory_ratio(self) -> float:
        """The largest step's peak training memory relative to full backprop (the thesis's "relative memory use")."""
        return max(self.memory_ratios)

    @property
    def best_test_accuracy(self) -> float:
        return self.test_accuracy[self.best_depth - 1]

    def summary(self) -> str:
        """A plain-text table: depth, head, test (and validation) accuracy, memory vs backprop; then the best depth."""
        lines = [f"{self.method}: depth | head | test acc | val acc | memory (vs backprop)"]
        for d, (acc, mem) in enumerate(zip(self.test_accuracy, self.memory), start=1):
            val = "-" if self.val_accuracy is None else f"{self.val_accuracy[d - 1]:.4f}"
            lines.append(f"{d:5d} | {describe_head(self.head_configs[d - 1])} | {acc:.4f} | {val} | "
                         f"{mem.total} B ({mem.ratio_to(self.backprop_memory):.1%})")
        lines.append(f"best depth {self.best_depth}: test accuracy {self.best_test_accuracy:.4f}; peak memory "
                     f"{self.memory_ratio:.1%} of backprop ({self.backprop_memory.total} B, "
                     f"{self.backprop_memory.method})")
        for d, log in enumerate(self.head_search, start=1):
            if log:
                choice = log[-1]
                lines.append(f"head search, depth {d}: {len(log) - 1} configurations measured; chose "
                             f"{describe_head(choice['chosen'])} at {choice['ratio']:.1%} ({choice['reason']})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain values (no modules): for JSON."""
        return {"method": self.method, "best_depth": self.best_depth, "test_accuracy": self.test_accuracy,
                "val_accuracy": self.val_accuracy, "memory": [m.to_dict() for m in self.memory],
                "backprop_memory": self.backprop_memory.to_dict(), "memory_ratio": self.memory_ratio,
                "memory_ratios": self.memory_ratios, "head_configs": self.head_configs,
                "epochs_run": self.epochs_run, "seconds": self.seconds, "head_search": self.head_search}


# ----------------------------------------------------------------------------------------------- helpers


def _int_at_least(name: str, v, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {v!r}.")
    return int(v)


def _prob(name: str, v) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and 0.0 <= v < 1.0
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1), got {v!r}.")
    return float(v)


def _positive(name: str, v) -> float:
    if not (isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v!r}.")
    return float(v)


def _per_block(name: str, v, n: int) -> list[int]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{name} lists {len(v)} values but there are {n} blocks to train; give one per block or "
                             "a single integer.")
        return [_int_at_least(name, e, 1) for e in v]
    return [_int_at_least(name, v, 1)] * n


@torch.no_grad()
def _feed(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


@torch.no_grad()
def _accuracy(modules: Sequence[nn.Module], loader, dtype, device) -> float:
    """Accuracy of ``modules`` chained, in eval mode (each module's mode is restored afterwards)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    correct = total = 0
    try:
        for x, y in loader:
            x, y = to_model(x, dtype, device), to_model(y, dtype, device)
            correct += int((_feed(modules, x).argmax(1) == y).sum())
            total += len(x)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return correct / max(total, 1)


class _FeatureCache:
    """Feature checkpoint (§6.2.2): every training mini-batch of one block's output, in RAM or on disk, replayed
    in the order it was recorded. Disk files hold tensors only and are read with ``torch.load(weights_only=True)``."""

    def __init__(self, level: int, where: str, directory: Path | None):
        self.level, self.where, self.items, self.directory = level, where, [], directory
        if where == "disk":
            self.directory = directory / f"block{level}"
            self.directory.mkdir(parents=True, exist_ok=True)

    def add(self, z: torch.Tensor, y: torch.Tensor) -> None:
        if self.where == "ram":
            self.items.append((z, y))
        else:
            path = self.directory / f"batch{len(self.items):06d}.pt"
            buf = io.BytesIO()  # into memory first: a full disk is then OSError(ENOSPC), not torch's RuntimeError
            torch.save({"z": z.cpu(), "y": y.cpu()}, buf)
            path.write_bytes(buf.getbuffer())
            self.items.append(path)

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self):
        for item in self.items:
            if self.where == "ram":
                yield item
            else:
                d = torch.load(item, weights_only=True, map_location="cpu")
                yield d["z"], d["y"]

    def close(self) -> None:
        self.items = []
        if self.where == "disk" and self.directory is not None:
            shutil.rmtree(self.directory, ignore_errors=True)


def _infer_num_classes(blocks, train_loader) -> int:
    last = blocks[-1]
    if is_classifier_block(last, None) and len(blocks) > 1:
        from .blocks import weight_layers

        return int(weight_layers(last)[0].out_features)
    top = 0
    for _, y in train_loader:
        if y.is_floating_point() or y.dim() != 1:
            raise ValueError("fit_layerwise trains classifiers: targets must be 1-D integer class labels.")
        top = max(top, int(y.max()) + 1)
    return top


# ----------------------------------------------------------------------------------------------- fit_layerwise


@presettable("fit_layerwise")
def fit_layerwise(model_or_blocks, train_loader, test_loader=None, *, method: str = "dll", val_loader=None,
                  num_classes: int | None = None, classifier: str = "auto", epochs=10, lr: float = 3e-3,
                  weight_decay: float = 1e-6, lr_decay: float = 0.8, wd_growth: float = 1.15,
                  optimizer: str = "adamw", lr_drops: Sequence[float] = (), input_dropout: float = 0.8,
                  input_dropout_decay: float = 0.95, grad_dropout: float = 0.0, grad_dropout_rescale: bool = True,
                  patience: int | None = None, max_decision_convs: int = 2, memory_budget: float | None = None,
                  memory_target: float | None = None, memory_tolerance: float = 0.005,
                  window: int = 2, rounds: int | None = None, epochs_per_round: int = 1,
                  feature_checkpoint: str | None = None, checkpoint_at: Sequence[int] | None = None,
                  checkpoint_dir=None, loss="cross_entropy", seed: int = 0, device=None,
                  progress_bar: bool = True, preset: str | None = None) -> LayerwiseResult:
    """Train a classifier block by block (seed 002 ch. 6) and keep the best depth.

    ``model_or_blocks``: an ``nn.Sequential`` (split by :func:`split_blocks`) or a list of blocks. Training works on
    a deep copy: the model passed in is never modified (also when training fails). ``train_loader``: a re-iterable
    of ``(x, y)`` batches (a ``DataLoader``), ``y`` integer class labels; ``test_loader`` (and optional
    ``val_loader``) are evaluated after every epoch. Floating inputs are cast to the model's dtype (float32 or
    float64); training runs on ``device`` (default: where the model is).

    Blocks: with ``classifier="auto"`` the last block is Alg. 3's decision layer psi_k when it is a single
    ``nn.Linear`` with ``num_classes`` outputs; it is then not trained as a block (the top block's head takes its
    place) but it is part of the full-backprop model the memory is compared with. ``classifier="keep"`` trains
    every block. ``num_classes`` defaults to that classifier's outputs, else to the largest label + 1.

    Methods:

    - ``"dll"`` (Algorithm 3): blocks bottom-up; block ``i`` with a fresh decision head on its output and the
      frozen blocks ``0..i-1`` as feednet.
    - ``"dsl"`` (§6.5): a sliding window of ``window`` consecutive blocks (overlap ``window - 1``) ending at block
      ``i`` trains together with a head on block ``i``; ``window=1`` is DLL.
    - ``"random_robin"`` (Algorithm 4): one head and one optimizer state per block kept across ``rounds`` rounds;
      each round visits the blocks in a fresh random order (``torch.Generator`` seeded by ``seed``) and trains each
      for ``epochs_per_round`` epochs on the current blocks below it. ``rounds`` defaults to
      ``ceil(max(epochs) / epochs_per_round)``. Accuracies are measured after the last round; ``patience`` and
      feature checkpoints do not apply.
    - ``"round_robin"``: the same with Algorithm 4's ``IsRandom`` False -- every round visits the blocks bottom-up.

    Schedules: block (or window top) ``i`` (0-based) trains ``epochs`` (an int or one per block) epochs with
    ``optimizer`` (:func:`~gradcond.train.make_optimizer` names), learning rate ``lr * lr_decay**i`` and weight decay
    ``weight_decay * wd_growth**i`` (Table 6.3: 0.8 and 1.15), multiplied by 0.1 at each fraction of the block's
    epochs in ``lr_drops`` (the thesis's main runs: ``(0.5, 0.75)``). Input dropout at the block's 0-based epoch
    ``e`` is ``input_dropout * input_dropout_decay**e`` (p0 = 0.8 as in the source); ``grad_dropout`` is the
    gradient-dropout probability from the head into the blocks, rescaled by ``1/(1-p)`` unless
    ``grad_dropout_rescale=False`` (the source does not say). ``patience``: early stopping per block -- stop after
    ``patience`` epochs without a better selection accuracy and restore the best epoch's block and head.

    Decision heads (:func:`build_head` configurations, richest first, up to ``max_decision_convs`` down-convs): with
    ``memory_budget`` (a fraction in (0, 1] of full backprop's peak memory) the richest head whose whole step
    (feednet + window + head, :func:`memory_accounting`) fits is used; when none fits a ``ValueError`` says what the
    cheapest needs. Without a budget the richest head is used. With ``memory_target`` (a fraction, the thesis's
    0.30) the head is *searched* instead (:func:`~gradcond.train.layerwise.heads.search_head`: depth up to
    ``max_decision_convs``, width, down-pooling) so that the step lands in ``memory_target +- memory_tolerance``
    (Table 6.3: 30 +- 0.5 %); the search's log is ``LayerwiseResult.head_search`` and no head under the band's
    top is a ``ValueError`` (:class:`NoHeadFits`). ``memory_budget`` and ``memory_target`` exclude each other.

    Feature checkpoints (``feature_checkpoint="ram"|"disk"``, DLL and DSL): once block ``j`` is frozen for good and
    ``j`` is in ``checkpoint_at`` (default: every block), its outputs for one pass over ``train_loader`` are stored
    (on disk under ``checkpoint_dir``, default a temporary directory removed afterwards) and every later step
    replays them in the recorded order through the blocks between ``j`` and the trained window, instead of running
    the whole feednet. Replaying fixes the batch order (and any augmentation) of that pass.

    ``preset="thesis"``: every argument not passed takes the thesis's Table 6.3 / §6.7 value
    (:mod:`gradcond.presets`: 300 epochs per block, AdamW, lr 3e-3 x 0.8^i, weight decay 1e-6 x 1.15^i, LR x 0.1 at
    50 % and 75 %, input dropout 0.8 decaying by 0.95, gradient dropout 0.6, up to 4 decision convs, memory target
    30 +- 0.5 %).  Where the defaults differ, and why: ``epochs`` 10 (a block of a small network converges in a few
    epochs; 300 is the thesis's CIFAR/SVHN budget), ``lr_drops`` none (with 10 epochs the drops would cut the few
    epochs there are), ``grad_dropout`` 0 (at small scale the gradient noise only slows a block down; the thesis
    uses it against overfitting on large data), ``max_decision_convs`` 2 (small feature maps cannot be halved
    more often), no memory target (the search costs a forward/backward per configuration; opt in).

    Returns a :class:`LayerwiseResult`. Cost: sum over steps of (epochs x one pass of feednet forward + window
    forward/backward) plus an evaluation pass per epoch; one extra forward/backward per step and head configuration
    for the memory accounting. Raises ``ValueError`` for bad arguments and ``TrainingDiverged`` when a loss becomes
    NaN or infinite.
    """
    t0 = time.perf_counter()
    if method not in METHODS:
        raise ValueError(f"unknown layer-wise method {method!r}; accepted: {', '.join(METHODS)}.")
    if classifier not in ("auto", "keep"):
        raise ValueError(f"classifier must be 'auto' or 'keep', got {classifier!r}.")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; accepted: {', '.join(OPTIMIZERS)}.")
    if test_loader is None and val_loader is None:
        raise ValueError("fit_layerwise needs a test_loader (or a val_loader) to measure the accuracy per depth.")
    lr = _positive("lr", lr)
    if not (isinstance(weight_decay, numbers.Real) and not isinstance(weight_decay, bool)
            and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}.")
    lr_decay, wd_growth = _positive("lr_decay", lr_decay), _positive("wd_growth", wd_growth)
    input_dropout, grad_dropout = _prob("input_dropout", input_dropout), _prob("grad_dropout", grad_dropout)
    input_dropout_decay = _positive("input_dropout_decay", input_dropout_decay)
    if any(not (isinstance(f, numbers.Real) and 0 < f < 1) for f in lr_drops):
        raise ValueError(f"lr_drops must be fractions in (0, 1) of a block's epochs, got {tuple(lr_drops)!r}.")
    if patience is not None:
        patience = _int_at_least("patience", patience, 1)
    max_decision_convs = _int_at_least("max_decision_convs", max_decision_convs, 0)
    window = _int_at_least("window", window, 1)
    epochs_per_round = _int_at_least("epochs_per_round", epochs_per_round, 1)
    if memory_budget is not None and not (isinstance(memory_budget, numbers.Real)
                                          and not isinstance(memory_budget, bool) and 0 < memory_budget <= 1):
        raise ValueError(f"memory_budget must be a fraction of full-backprop peak memory in (0, 1], got "
                         f"{memory_budget!r}.")
    if memory_target is not None:
        if memory_budget is not None:
            raise ValueError("pass memory_budget (a cap) or memory_target (a target to land on), not both.")
        if not (isinstance(memory_target, numbers.Real) and not isinstance(memory_target, bool)
                and 0 < memory_target <= 1):
            raise ValueError(f"memory_target must be a fraction of full-backprop peak memory in (0, 1], got "
                             f"{memory_target!r}.")
        if not (isinstance(memory_tolerance, numbers.Real) and not isinstance(memory_tolerance, bool)
                and 0 <= memory_tolerance < memory_target):
            raise ValueError(f"memory_tolerance must be a number in [0, memory_target), got {memory_tolerance!r}.")
    if feature_checkpoint is not None and feature_checkpoint not in CHECKPOINTS:
        raise ValueError(f"feature_checkpoint must be None, 'ram' or 'disk', got {feature_checkpoint!r}.")
    if feature_checkpoint is not None and method in ("random_robin", "round_robin"):
        raise ValueError("feature checkpoints need frozen lower blocks, but random robin keeps training every block; "
                         f"use feature_checkpoint=None with method={method!r}.")

    original = split_blocks(model_or_blocks)
    # the caller's model is never touched; one deepcopy of the list keeps modules shared between blocks shared
    blocks = copy.deepcopy(list(original))
    if device is not None:
        dev = resolve_device(device, flag="device")
        blocks = [b.to(dev) for b in blocks]
    probe = nn.Sequential(*blocks)
    params = [p for p in probe.parameters() if p.is_floating_point()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    dev = module_device(probe)
    loss_fn = get_loss(loss)
    x0, y0 = as_batch(train_loader)
    if num_classes is None:
        num_classes = _infer_num_classes(blocks, train_loader)
    num_classes = _int_at_least("num_classes", num_classes, 2)

    has_classifier = classifier == "auto" and len(blocks) > 1 and is_classifier_block(blocks[-1], num_classes)
    trained = blocks[:-1] if has_classifier else blocks
    n = len(trained)
    epochs_list = _per_block("epochs", epochs, n)
    xb, yb = to_model(x0, dtype, dev), to_model(y0, dtype, dev)

    # shapes of every block's output on the first batch (eval mode: no BatchNorm buffer moves)
    with torch.no_grad():
        feats, h = [], xb
        for b in trained:
            was = b.training
            b.eval()
            h = b(h)
            b.train(was)
            feats.append(tuple(h.shape[1:]))

    if has_classifier:
        bp_model = nn.Sequential(*blocks)
    else:  # no classifier of its own: full backprop is measured with the cheapest flat head on top
        bp_model = nn.Sequential(*trained, make_head(feats[-1], num_classes, {"convs": 0, "pool": False}, dtype, dev))
    bp_mem = memory_accounting(bp_model, (xb, yb), loss=loss_fn, optimizer=optimizer)
    budget = None if memory_budget is None else float(memory_budget) * bp_mem.total

    def pick_head(i_top: int, start: int) -> tuple[nn.Module, dict, MemoryReport]:
        feed = nn.Sequential(*trained[:start]) if start else None

        def measure(head):
            sub = Subnet(trained[start:i_top + 1], head, input_dropout, grad_dropout, grad_dropout_rescale)
            return memory_accounting(sub, (xb, yb), frozen=feed, loss=loss_fn, optimizer=optimizer)

        def describe(need: int) -> str:
            return (f"needs {need} bytes = {need / bp_mem.total:.1%} of full backprop's peak ({bp_mem.total} bytes) "
                    f"to train block {i_top}, but memory_budget={memory_budget} allows {int(budget)} bytes; raise "
                    "memory_budget (a fraction of full-backprop peak memory in (0, 1]) or lower the batch size.")

        if memory_target is not None:
            try:
                head, config, report, log = search_head(feats[i_top], num_classes, measure, bp_mem.total,
                                                        float(memory_target), float(memory_tolerance),
                                                        max_decision_convs=max_decision_convs, dtype=dtype,
                                                        device=dev)
            except NoHeadFits as exc:
                raise NoHeadFits(f"block {i_top}: {exc}") from None
            search_logs[i_top] = log
            return head, config, report
        head, config, report = choose_head(feats[i_top], num_classes, measure, budget,
                                           max_decision_convs=max_decision_convs, dtype=dtype, device=dev,
                                           describe_budget=describe)
        if report is None:
            report = measure(head)
        return head, config, report

    search_logs: dict[int, list[dict]] = {}
    total_epochs = sum(epochs_list)
    if method in ("random_robin", "round_robin"):
        n_rounds = rounds if rounds is not None else math.ceil(max(epochs_list) / epochs_per_round)
        n_rounds = _int_at_least("rounds", n_rounds, 1)
        total_epochs = n_rounds * epochs_per_round * n
    bar = progress(total=total_epochs, desc=f"layerwise {method}", unit="epoch") if progress_bar else None
    history: list[dict] = []
    torch.manual_seed(seed)

    def lr_at(i: int, e: int, n_epochs: int) -> tuple[float, float]:
        drops = sum(e >= round(f * n_epochs) for f in lr_drops)
        return lr * lr_decay ** i * 0.1 ** drops, weight_decay * wd_growth ** i

    def run_epoch(source, feed_mods, sub, opt, label: str) -> tuple[float, float]:
        sub.train()
        for m in feed_mods:
            m.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for x, y in source:
            x, y = to_model(x, dtype, dev), to_model(y, dtype, dev)
            z = _feed(feed_mods, x)
            opt.zero_grad(set_to_none=True)
            out = sub(z)
            value = loss_fn(out, y)
            if not torch.isfinite(value):
                raise TrainingDiverged(f"the training loss became {float(value)} while training {label}; lower lr "
                                       "or check the inputs.")
            value.backward()
            opt.step()
            loss_sum += float(value.detach()) * len(x)
            correct += int((out.argmax(1) == y).sum())
            seen += len(x)
        return loss_sum / max(seen, 1), correct / max(seen, 1)

    def evaluate_depth(mods) -> tuple[float | None, float | None]:
        val = _accuracy(mods, val_loader, dtype, dev) if val_loader is not None else None
        test = _accuracy(mods, test_loader, dtype, dev) if test_loader is not None else None
        return val, test

    heads: list[nn.Module | None] = [None] * n
    configs: list[dict | None] = [None] * n
    memory: list[MemoryReport | None] = [None] * n
    test_acc: list[float] = [float("nan")] * n
    val_acc: list[float] = [float("nan")] * n
    epochs_run = [0] * n
    best = {"acc": -1.0, "depth": 0, "model": None}

    def select(v, t):
        return v if val_loader is not None else t

    def snapshot(d: int, acc: float) -> None:
        if acc > best["acc"]:
            best.update(acc=acc, depth=d, model=copy.deepcopy(nn.Sequential(*trained[:d], heads[d - 1])).eval())

    tmp_dir = None
    cache: _FeatureCache | None = None
    try:
        if method in ("dll", "dsl"):
            k = 1 if method == "dll" else window
            wanted = None if checkpoint_at is None else {int(j) for j in checkpoint_at}
            if feature_checkpoint == "disk":
                tmp_dir = Path(checkpoint_dir) if checkpoint_dir is not None else Path(tempfile.mkdtemp(prefix="dll-"))
            for i in range(n):
                start = max(0, i - k + 1)
                # cache the output of the highest block frozen for good (below the window), if asked to
                top_frozen = start - 1
                if (feature_checkpoint and top_frozen >= 0 and (wanted is None or top_frozen in wanted)
                        and (cache is None or cache.level < top_frozen)):
                    new = _FeatureCache(top_frozen, feature_checkpoint, tmp_dir)
                    lo = cache.level + 1 if cache is not None else 0
                    source = cache if cache is not None else train_loader
                    for xc, yc in source:
                        xc = to_model(xc, dtype, dev)
                        new.add(_feed([m.eval() for m in trained[lo:top_frozen + 1]], xc), yc)
                    if cache is not None:
                        cache.close()
                    cache = new
                head, config, report = pick_head(i, start)
                heads[i], configs[i], memory[i] = head, config, report
                sub = Subnet(trained[start:i + 1], head, input_dropout, grad_dropout, grad_dropout_rescale)
                if cache is not None:
                    feed_mods, source = trained[cache.level + 1:start], cache
                else:
                    feed_mods, source = trained[:start], train_loader
                lr_i, wd_i = lr_at(i, 0, epochs_list[i])
                opt = make_optimizer(optimizer, sub.parameters(), lr=lr_i, weight_decay=wd_i)
                best_block = (-1.0, None, None, None)
                stale = 0
                for e in range(epochs_list[i]):
                    lr_e, wd_e = lr_at(i, e, epochs_list[i])
                    for g in opt.param_groups:
                        g["lr"] = lr_e
                    sub.p_in = input_dropout_p(e, input_dropout, input_dropout_decay)
                    tr_loss, tr_acc = run_epoch(source, feed_mods, sub, opt, f"block {i}")
                    v, t = evaluate_depth(list(trained[:start]) + [sub])
                    epochs_run[i] = e + 1
                    history.append({"block": i, "round": 0, "epoch": e, "lr": lr_e, "weight_decay": wd_e,
                                    "input_dropout": sub.p_in, "train_loss": tr_loss, "train_acc": tr_acc,
                                    "val_acc": v, "test_acc": t})
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix_str(f"block {i} acc {select(v, t):.3f}")
                    if patience is not None:
                        if select(v, t) > best_block[0]:
                            best_block, stale = (select(v, t), copy.deepcopy(sub.state_dict()), v, t), 0
                        else:
                            stale += 1
                            if stale >= patience:
                                break
                if patience is not None and best_block[1] is not None:
                    sub.load_state_dict(best_block[1])
                    v, t = best_block[2], best_block[3]
                val_acc[i] = v if v is not None else float("nan")
                test_acc[i] = t if t is not None else float("nan")
                snapshot(i + 1, select(v, t))
        else:  # random robin, Algorithm 4
            opts = []
            for i in range(n):
                head, config, report = pick_head(i, i)
                heads[i], configs[i], memory[i] = head, config, report
            subs = [Subnet([trained[i]], heads[i], input_dropout, grad_dropout, grad_dropout_rescale) for i in range(n)]
            for i in range(n):
                lr_i, wd_i = lr_at(i, 0, n_rounds * epochs_per_round)
                opts.append(make_optimizer(optimizer, subs[i].parameters(), lr=lr_i, weight_decay=wd_i))
            # every block, head and optimizer state stays resident: add the others' to each step's memory
            for i in range(n):
                others_params = sum(p.numel() * p.element_size() for j in range(n) if j != i
                                    for p in list(heads[j].parameters())
                                    + (list(trained[j].parameters()) if j > i else []))
                others_state = sum(optimizer_state_bytes(list(subs[j].parameters()), optimizer)
                                   for j in range(n) if j != i)
                memory[i] = memory[i].plus(parameters=others_params, optimizer_state=others_state)
            gen = torch.Generator().manual_seed(seed)
            for r in range(n_rounds):
                order = torch.randperm(n, generator=gen).tolist() if method == "random_robin" else list(range(n))
                for i in order:
                    for _ in range(epochs_per_round):
                        e = epochs_run[i]
                        lr_e, wd_e = lr_at(i, e, n_rounds * epochs_per_round)
                        for g in opts[i].param_groups:
                            g["lr"] = lr_e
                        subs[i].p_in = input_dropout_p(e, input_dropout, input_dropout_decay)
                        tr_loss, tr_acc = run_epoch(train_loader, trained[:i], subs[i], opts[i], f"block {i}")
                        epochs_run[i] = e + 1
                        history.append({"block": i, "round": r, "epoch": e, "lr": lr_e, "weight_decay": wd_e,
                                        "input_dropout": subs[i].p_in, "train_loss": tr_loss, "train_acc": tr_acc,
                                        "val_acc": None, "test_acc": None})
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix_str(f"round {r} block {i}")
            for i in range(n):
                v, t = evaluate_depth(list(trained[:i]) + [subs[i]])
                val_acc[i] = v if v is not None else float("nan")
                test_acc[i] = t if t is not None else float("nan")
                snapshot(i + 1, select(v, t))
    finally:
        if bar is not None:
            bar.close()
        if cache is not None:
            cache.close()
        if tmp_dir is not None and checkpoint_dir is None:
            shutil.rmtree(tmp_dir, ignore_errors=True)

    for m in trained:
        m.train()
    return LayerwiseResult(
        method=method, model=best["model"], best_depth=best["depth"], test_accuracy=test_acc,
        val_accuracy=val_acc if val_loader is not None else None, memory=memory, backprop_memory=bp_mem,
        blocks=trained, heads=heads, head_configs=configs, epochs_run=epochs_run, history=history,
        seconds=time.perf_counter() - t0, head_search=[search_logs.get(i, []) for i in range(n)],
    )
