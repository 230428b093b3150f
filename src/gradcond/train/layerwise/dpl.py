"""Deep partition-wise learning (DPL; seed 002, §6.8): a few large partitions of a network, each trained with its own
decision head and loss, concurrently, one process per partition, features passed forward with ``send``/``recv``.

How it runs (one partition per rank, ``torch.distributed``; gloo on the CPU, NCCL when the partitions are on GPUs):

* Every rank calls :func:`fit_partitionwise` with the **same** arguments (the SPMD pattern of ``torchrun``): all the
  partitions and heads, built identically (same seed).  Rank ``r`` trains ``partitions[r]`` with ``heads[r]``; the
  other modules are templates into which rank 0 loads the trained weights at the end.
* Rank 0 reads the training loader.  For every batch it makes one training step of partition 0 and its head, then
  sends the partition's output of that forward pass (detached: **no gradient ever crosses a partition boundary**)
  and the labels to rank 1, which trains partition 1 on them and forwards its own output, and so on.  A rank sends a
  batch while the next rank still trains on the previous one, so the partitions work concurrently (pipelined). A
  rank posts its next message only when the previous one's sends have completed (with gloo, once the receiver has
  posted its receive), so it runs about one batch ahead of its neighbour, never more.
* After each epoch rank 0 pushes the test loader through the pipeline in eval mode; rank ``r`` reports the test
  accuracy of ``heads[r]`` on top of partitions ``0..r``.
* Optional :class:`~gradcond.train.LossFilter` between partitions (the source's ImageNet variant, §6.8.4): from epoch
  ``loss_filter.from_epoch`` on, each rank drops the ``loss_filter.fraction`` of every batch with the LOWEST
  per-sample loss under its own head (the loss of the training forward pass, so no extra pass) before sending the
  batch on.  Unlike the ``LossFilter`` callback (which filters the whole training set at each epoch start), this
  is the source's online form: the filter sees one mini-batch at a time.
* At the end every rank sends its partition's and head's weights and its per-epoch records to rank 0
  (``gather_object``); rank 0 loads them into its templates and returns the trained network; **only rank 0
  writes** (``out``).

Failure handling (never a hang): every wait on a send or a receive is bounded by ``timeout_s`` (``Work.wait`` with a
timeout); a peer that exits is usually noticed at once (its sockets close).  Either way the rank raises
:class:`PartitionPeerLost` naming the lost rank, the partition and the step.  Collectives (the start-up check and the
final gather) are bounded by the process group's timeout; when :func:`fit_partitionwise` starts the group itself
(``torchrun`` environment, group not yet initialised) that timeout is ``timeout_s``.

Without a process group, the same algorithm runs in one process: ``schedule="concurrent"`` interleaves the stages
exactly as the ranks would (every stage sees the same messages in the same order and draws from its own RNG
stream; on the CPU with one thread the results are bit-identical to the distributed run), and
``schedule="sequential"`` is single-process bottom-up training of the same partitions (DLL over partitions: partition
``i`` trains for all its epochs on the outputs of the frozen partitions ``0..i-1``, computed in eval mode under
``no_grad``, before partition ``i+1`` starts).

Per-partition schedules: partition ``i`` uses ``lr * lr_scale**i`` and ``weight_decay * wd_scale**i`` (the source
multiplies both by 0.5^i on CINIC10+, §6.8.1; the defaults here are 1.0: pass 0.5 for the source's setting).

The thesis's own recipe (§6.8.2, ``preset="thesis"``): the online k-filter on every link (``k_filter``, windows of
``filter_batch`` samples, capped), round robin over the partitions (``schedule="round_robin"``/``"random_robin"``,
``epochs_per_round`` per turn) with feature checkpoints held in device memory (``feature_checkpoint``), and, under
torch.distributed, round robin pipelined by turns and data-parallel replicas per partition (``replicas``: DDP in
the partition's own process group, ``Join`` for uneven batch counts).  :func:`partition_model` cuts a classifier
into partitions with decision heads (``gradcond run`` with ``distributed.strategy = "dpl"`` uses it).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

from ...presets import presettable
from ...utils import TrainingDiverged, UserError, atomic_write_text, eval_mode, module_device
from ..filters import KFilter, LossFilter, _block_redundant
from ..losses import get_loss
from ..trainer import make_optimizer

__all__ = ["fit_partitionwise", "PartitionwiseResult", "PartitionPeerLost", "make_partitions", "partition_model"]

SCHEDULES = ("concurrent", "sequential", "round_robin", "random_robin")
FILTER_LINKS = ("every", "first")
CHECKPOINTS = ("auto", "device", "cpu")

# message kinds on a link between consecutive partitions
_TRAIN, _EVAL, _EPOCH_END, _DONE, _ROUND_END = 1, 2, 3, 4, 5
_KIND_NAMES = {_TRAIN: "a training batch", _EVAL: "a test batch", _EPOCH_END: "the end of an epoch",
               _DONE: "the end of training", _ROUND_END: "the end of a round"}
# header: kind, epoch, seq, feature dtype, feature ndim, 6 feature dims, label dtype, label ndim, 3 label dims
_HEADER = 16
_MAX_FEAT_DIMS, _MAX_LABEL_DIMS = 6, 3
_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8,
           torch.bool]
_DTYPE_CODE = {d: i for i, d in enumerate(_DTYPES)}


class PartitionPeerLost(RuntimeError):
    """A neighbouring partition's process exited or stopped answering within the timeout."""


@dataclass
class PartitionwiseResult:
    """What :func:`fit_partitionwise` returns.

    ``history``: one record per (partition, epoch): ``partition``, ``epoch``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (NaN without a test loader / for regression), ``samples`` (training samples the
    partition trained on), ``kept_fraction`` (of those, the fraction forwarded to the next partition: < 1 only with a
    loss filter), ``seconds`` (wall time of the epoch on that partition's process, waits included).
    ``accuracy``: the last epoch's test accuracy of each partition's head (the accuracy at each depth).  On ranks
    other than 0, ``history`` and ``accuracy`` hold only that rank's own partition (NaN for the others).
    ``model``: ``nn.Sequential(*partitions, heads[-1])`` with the trained weights -- on rank 0 and in one process;
    None on the other ranks.  ``best_partition``: the index whose head had the highest final test accuracy
    (:meth:`model_at` builds the network truncated there).  ``seconds``: wall time of training on this process;
    ``samples_per_second``: training samples that entered the pipeline per second of it (``epochs * len(train)``
    / ``seconds``).  ``world_size``: ranks used (1 in one process); ``schedule``: ``concurrent`` or ``sequential``.
    """

    history: list[dict]
    accuracy: list[float]
    model: nn.Module | None
    partitions: list[nn.Module]
    heads: list[nn.Module]
    seconds: float
    samples_per_second: float
    world_size: int
    schedule: str
    best_partition: int = 0
    rank: int = 0
    extra: dict = field(default_factory=dict)

    def model_at(self, depth: int) -> nn.Module:
        """``nn.Sequential(partitions[0..depth], heads[depth])`` (shares the trained modules; rank 0 / one process)."""
        if self.model is None:
            raise UserError("model_at is available on rank 0 only (the other ranks do not hold every partition).")
        if not (isinstance(depth, numbers.Integral) and 0 <= depth < len(self.partitions)):
            raise UserError(f"depth must be an integer in 0..{len(self.partitions) - 1}, got {depth!r}.")
        return nn.Sequential(*self.partitions[:depth + 1], self.heads[depth])


def make_partitions(model_or_blocks, sizes) -> list[nn.Module]:
    """Group consecutive blocks into partitions: ``sizes`` is a list of block counts (summing to the number of
    blocks) or an int (that many partitions of nearly equal block counts, the lower ones one larger).

    ``model_or_blocks``: a list of modules (the blocks), an ``nn.Sequential`` (its children are the blocks), or any
    model that ``gradcond.train.layerwise.split_blocks`` can split.  Returns ``nn.Sequential`` partitions that
    share the given block modules (no copy).  Cost: none beyond building the containers."""
    if isinstance(model_or_blocks, (list, tuple)):
        blocks = list(model_or_blocks)
    elif isinstance(model_or_blocks, nn.Sequential):
        blocks = list(model_or_blocks.children())
    elif isinstance(model_or_blocks, nn.Module):
        try:
            from . import split_blocks  # the layer-wise package's splitter, when present
        except ImportError:
            raise UserError(f"cannot split a {type(model_or_blocks).__name__} into blocks here; pass a list of "
                            "modules or an nn.Sequential.") from None
        blocks = list(split_blocks(model_or_blocks))
    else:
        raise UserError(f"make_partitions needs a list of modules, an nn.Sequential or an nn.Module; got "
                        f"{type(model_or_blocks).__name__}.")
    if not blocks or not all(isinstance(b, nn.Module) for b in blocks):
        raise UserError("make_partitions needs at least one block, and every block must be an nn.Module.")
    if isinstance(sizes, numbers.Integral) and not isinstance(sizes, bool):
        n = int(sizes)
        if not 1 <= n <= len(blocks):
            raise UserError(f"cannot make {n} partitions of {len(blocks)} blocks; pass a number in 1..{len(blocks)}.")
        q, rest = divmod(len(blocks), n)
        sizes = [q + (i < rest) for i in range(n)]
    if (not isinstance(sizes, (list, tuple)) or not sizes
            or not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) and s >= 1 for s in sizes)
            or sum(sizes) != len(blocks)):
        raise UserError(f"sizes must be a positive int or a list of positive block counts summing to {len(blocks)} "
                        f"(the number of blocks); got {sizes!r}.")
    out, pos = [], 0
    for s in sizes:
        out.append(nn.Sequential(*blocks[pos:pos + s]))
        pos += s
    return out


def partition_model(model: nn.Module, sizes, example: torch.Tensor, num_classes: int, *,
                    max_decision_convs: int = 2, seed: int = 0) -> tuple[list[nn.Module], list[nn.Module]]:
    """``(partitions, heads)`` of a classifier for :func:`fit_partitionwise`: the model's blocks
    (:func:`~gradcond.train.layerwise.split_blocks`) grouped by ``sizes`` (:func:`make_partitions`), and a decision
    head per partition (:func:`~gradcond.train.layerwise.build_head` on that partition's output shape, up to
    ``max_decision_convs`` down-convs) -- except when the last block is the model's own classifier (a Linear with
    ``num_classes`` outputs): the last partition then ends with it and its head is ``nn.Identity``, so the trained
    network is the model itself.  ``example``: a batch of inputs (for the shapes; run in eval mode without
    gradients, the model's modes and buffers untouched).  The heads are drawn from ``seed`` (the global RNG is
    restored), so every rank builds the same ones.  The partitions share the model's modules."""
    from .blocks import is_classifier_block, split_blocks
    from .heads import build_head

    blocks = list(split_blocks(model))
    parts = make_partitions(blocks, sizes)
    params = [q for q in model.parameters() if q.is_floating_point()]
    dtype = params[0].dtype if params else torch.get_default_dtype()
    device = module_device(model)
    own = is_classifier_block(blocks[-1], num_classes)
    heads = []
    with torch.no_grad(), eval_mode(model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        h = example.to(device, dtype) if example.is_floating_point() else example.to(device)
        for i, p in enumerate(parts):
            h = p(h)
            if i == len(parts) - 1 and own:
                heads.append(nn.Identity())
            else:
                heads.append(build_head(tuple(h.shape[1:]), num_classes, max_decision_convs=max_decision_convs,
                                        dtype=dtype, device=device))
    return parts, heads


# --------------------------------------------------------------------------------------------------- one stage

class _Pair(nn.Module):
    """Partition and head as one module (what DistributedDataParallel wraps): returns ``(features, output)``."""

    def __init__(self, partition: nn.Module, head: nn.Module):
        super().__init__()
        self.partition, self.head = partition, head

    def forward(self, x):
        z = self.partition(x)
        return z, self.head(z)


class _Stage:
    """Partition ``index`` with its head and optimizer: training steps, eval steps, per-epoch records."""

    def __init__(self, index: int, n: int, partition: nn.Module, head: nn.Module, loss_fn, task: str, optimizer,
                 lr: float, weight_decay: float, momentum: float, loss_filter: LossFilter | None, seed: int,
                 swap_rng: bool, drops=(), k_filter: KFilter | None = None, filter_on: bool = True):
        self.index, self.n, self.last = index, n, index == n - 1
        self.k_filter, self.filter_on, self.seed = k_filter, filter_on and index < n - 1, seed
        self._bufs: dict[str, list] = {}
        self.out_batch: int | None = None
        self.windows = 0
        self.partition, self.head, self.loss_fn, self.task = partition, head, loss_fn, task
        params = [p for p in [*partition.parameters(), *head.parameters()] if p.requires_grad]
        self.opt = make_optimizer(optimizer, params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        self.loss_filter = loss_filter
        self.base_lrs = [g["lr"] for g in self.opt.param_groups]
        self.drops = list(drops)
        self.device = module_device(partition)
        self.dtype = next(partition.parameters()).dtype
        self.swap_rng = swap_rng
        g = torch.Generator().manual_seed(seed * 1_000_003 + index)  # this stage's own RNG stream (dropout etc.)
        self.rng_state = g.get_state()
        self.cuda_rng_state = None
        self.records: list[dict] = []
        self.step = 0
        self.ddp = None  # a DistributedDataParallel(_Pair) when the partition has data-parallel replicas
        self.train_open: int | None = None  # epoch whose training batches are still arriving (k-filter buffers)
        self.feed_open: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.t0 = time.perf_counter()
        self.tr_loss = self.tr_correct = 0.0
        self.tr_n = self.sent = 0
        self.te_loss = self.te_correct = 0.0
        self.te_n = 0

    @contextmanager
    def rng(self):
        """Run with this stage's RNG state (in one process several stages share the global generator)."""
        if not self.swap_rng:
            yield
            return
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        cuda = self.device.type == "cuda"
        if cuda:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            if self.cuda_rng_state is not None:
                torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
        try:
            yield
        finally:
            self.rng_state = torch.get_rng_state()
            torch.set_rng_state(outer)
            if cuda:
                self.cuda_rng_state = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)

    def _in(self, x, y):
        x = x.to(self.device, self.dtype) if x.is_floating_point() else x.to(self.device)
        y = y.to(self.device, self.dtype) if y.is_floating_point() else y.to(self.device)
        return x, y

    def _per_sample(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample losses of a detached output (vmap over the loss; a loop for losses vmap cannot handle)."""
        try:
            return torch.vmap(lambda o, t: self.loss_fn(o[None], t[None]))(out, y).reshape(-1)
        except Exception:  # a loss with data-dependent control flow
            return torch.stack([self.loss_fn(out[i:i + 1], y[i:i + 1]) for i in range(len(out))]).reshape(-1)

    def _filter(self, epoch: int, z, y, out):
        """Loss filter: keep all but the ``fraction`` of the batch with the lowest loss (ties: lower index dropped
        first); only on the links this stage filters (``filter_on``)."""
        f = self.loss_filter
        if f is None or not self.filter_on or epoch < f.from_epoch:
            return z, y
        m = int(math.floor(f.fraction * len(y)))
        if m == 0:
            return z, y
        losses = self._per_sample(out.detach(), y).double()
        order = torch.sort(losses, stable=True).indices
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        keep[order[:m]] = False
        return z[keep], y[keep]

    def _k_active(self, epoch: int) -> bool:
        f = self.k_filter
        return f is not None and self.filter_on and epoch >= f.warmup_epochs

    def emit(self, epoch: int, z, y, channel: str = "train") -> list:
        """The batches to send on for this stage's output ``(z, y)``: ``[(z, y)]`` without the online k-filter; with
        it, the samples are buffered until a window of ``k_filter.filter_batch`` samples is full (``None``: each
        batch is its own window), the window is k-filtered in this output space (the next partition's input space;
        at most ``max_removed`` of it removed, a random subset of the redundant samples when more are redundant,
        drawn from the stage's seed, the epoch and the window's number) and its kept samples are sent in batches of
        the incoming batch size.  ``channel`` keeps the buffers of training and feednet passes apart."""
        if self.out_batch is None:
            self.out_batch = max(1, len(y))
        if not self._k_active(epoch):
            return [(z, y)]
        buf = self._bufs.setdefault(channel, [])
        buf.append((z, y))
        window = self.k_filter.filter_batch
        if window is None:
            return self.flush(channel, epoch)
        if sum(len(b[1]) for b in buf) < window:
            return []
        return self.flush(channel, epoch)

    def flush(self, channel: str, epoch: int) -> list:
        """k-filter what is buffered on ``channel`` (end of a window or of the epoch) and return its batches."""
        buf = self._bufs.pop(channel, [])
        if not buf:
            return []
        Z = torch.cat([b[0] for b in buf])
        Y = torch.cat([b[1] for b in buf])
        f = self.k_filter
        red = _block_redundant(Z.detach().flatten(1).cpu(), Y.detach().cpu().long(), f.k)
        cap = int(math.floor(f.max_removed * len(Y)))
        if int(red.sum()) > cap:
            g = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.index) * 1_000_003 + epoch) * 1_000_003
                                             + self.windows)
            cand = red.nonzero().flatten()
            drop = cand[torch.randperm(len(cand), generator=g)[:cap]]
            red = torch.zeros_like(red)
            red[drop] = True
        self.windows += 1
        keep = (~red).to(Z.device)
        Z, Y = Z[keep], Y[keep]
        b = self.out_batch or max(1, len(Y))
        return [(Z[i:i + b], Y[i:i + b]) for i in range(0, len(Y), b)]

    def _set_lr(self, epoch: int) -> None:
        factor = 0.1 ** sum(epoch >= d for d in self.drops)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def train_step(self, epoch: int, x, y):
        """One optimizer step of partition + head on ``(x, y)``; returns the list of (filtered) feature and label
        batches to send on -- the partition's output of this forward pass, detached -- (empty for the last
        partition, or while the k-filter fills a window)."""
        self._set_lr(epoch)
        x, y = self._in(x, y)
        with self.rng():
            self.partition.train()
            self.head.train()
            if self.ddp is not None:  # data-parallel replicas of this partition: DDP syncs the gradients
                z, out = self.ddp(x)
            else:
                z = self.partition(x)
                out = self.head(z)
            loss = self.loss_fn(out, y)
            if not torch.isfinite(loss):
                raise TrainingDiverged(f"partition {self.index}: training loss became {float(loss.detach())} at step "
                                       f"{self.step} (epoch {epoch}); lower the learning rate or check the data.")
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        self.step += 1
        n = len(y)
        self.tr_loss += float(loss.detach()) * n
        if self.task == "classification":
            self.tr_correct += int((out.detach().argmax(1) == y).sum())
        self.tr_n += n
        if self.last:
            return []
        z, y = self._filter(epoch, z.detach(), y, out)
        out_batches = self.emit(epoch, z, y)
        self.sent += sum(len(b[1]) for b in out_batches)
        return out_batches

    def end_train(self, epoch: int) -> list:
        """The training batches still buffered by the k-filter at the end of an epoch's training data."""
        if self.last:
            return []
        out_batches = self.flush("train", epoch) if self._k_active(epoch) else []
        self.sent += sum(len(b[1]) for b in out_batches)
        return out_batches

    @torch.no_grad()
    def eval_step(self, x, y):
        """Eval-mode forward of partition + head (modes restored); returns the features and labels to send on."""
        x, y = self._in(x, y)
        with eval_mode(self.partition), eval_mode(self.head):
            z = self.partition(x)
            out = self.head(z)
        self.te_loss += float(self.loss_fn(out, y)) * len(y)
        if self.task == "classification":
            self.te_correct += int((out.argmax(1) == y).sum())
        self.te_n += len(y)
        return None if self.last else (z, y)

    @torch.no_grad()
    def feed(self, epoch: int, x, y, train: bool = True) -> list:
        """Frozen forward (eval mode, no autograd state) as a feednet; on training batches (``train``) applies the
        loss filter with the frozen head's per-sample losses and the online k-filter (its own buffers); returns
        the list of batches to pass on."""
        x, y = self._in(x, y)
        with eval_mode(self.partition), eval_mode(self.head):
            z = self.partition(x)
            if not train:
                return [(z, y)]
            f = self.loss_filter
            if f is not None and self.filter_on and epoch >= f.from_epoch and int(math.floor(f.fraction * len(y))):
                z, y = self._filter(epoch, z, y, self.head(z))
            return self.emit(epoch, z, y, channel="feed")

    def end_feed(self, epoch: int) -> list:
        """The feednet batches still buffered by the k-filter at the end of an epoch's training data."""
        return self.flush("feed", epoch) if self._k_active(epoch) else []

    def end_epoch(self, epoch: int) -> dict:
        nan = float("nan")
        rec = {"partition": self.index, "epoch": epoch,
               "train_loss": self.tr_loss / self.tr_n if self.tr_n else nan,
               "train_acc": self.tr_correct / self.tr_n if self.tr_n and self.task == "classification" else nan,
               "test_loss": self.te_loss / self.te_n if self.te_n else nan,
               "test_acc": self.te_correct / self.te_n if self.te_n and self.task == "classification" else nan,
               "samples": self.tr_n, "kept_fraction": (self.sent / self.tr_n if self.tr_n else nan) if not self.last
               else 1.0,
               "seconds": time.perf_counter() - self.t0,
               # raw sums: records of data-parallel replicas of one partition are merged from these
               "_sums": [self.tr_loss, self.tr_correct, self.tr_n, self.te_loss, self.te_correct, self.te_n,
                         self.sent]}
        self.records.append(rec)
        self._reset()
        return rec


# ---------------------------------------------------------------------------------------------------- the link

def _encode_header(kind: int, epoch: int, seq: int, z=None, y=None) -> torch.Tensor:
    h = torch.zeros(_HEADER, dtype=torch.int64)
    h[0], h[1], h[2] = kind, epoch, seq
    if z is not None:
        h[3], h[4] = _DTYPE_CODE[z.dtype], z.dim()
        h[5:5 + z.dim()] = torch.tensor(z.shape)
        h[11], h[12] = _DTYPE_CODE[y.dtype], y.dim()
        h[13:13 + y.dim()] = torch.tensor(y.shape)
    return h


class _Link:
    """Point-to-point messages between this rank and its neighbours, every wait bounded by ``timeout_s``.

    A message is a 16-integer header (kind, epoch, sequence number per peer, dtypes and shapes) and, for batches,
    the features and the labels (tags 0, 1, 2).  ``send`` waits for the previous message's sends to complete before
    posting the next, so at most one message is in flight from this rank (the sender runs one batch ahead).
    ``part`` maps a rank to its partition (for the error messages)."""

    def __init__(self, rank: int, world: int, timeout_s: float, comm_device: torch.device, part=None):
        self.rank, self.world, self.timeout = rank, world, timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.comm_device = comm_device
        self.part = part or list(range(world))
        self.pending: list = []
        self.pending_peer: int | None = None
        self.sent_seq: dict[int, int] = {}
        self.recv_seq: dict[int, int] = {}
        self.where = ""  # e.g. "epoch 3, step 120": for the error message

    def _lost(self, peer: int, doing: str, exc: BaseException | None) -> PartitionPeerLost:
        why = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc is not None else ""
        return PartitionPeerLost(
            f"partition-wise training: rank {self.rank} (partition {self.part[self.rank]}) lost rank {peer} "
            f"(partition {self.part[peer]}) while {doing} at {self.where or 'start-up'}: that process exited or did "
            f"not answer within {self.timeout_s:g} s{why}.")

    def _wait(self, work, peer: int, doing: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as exc:  # gloo/NCCL raise on a closed connection or on the timeout
            raise self._lost(peer, doing, exc) from exc
        if ok is False:
            raise self._lost(peer, doing, None)

    def flush(self) -> None:
        """Wait (bounded) until the receiver has taken every message sent so far."""
        for w in self.pending:
            self._wait(w, self.pending_peer, "sending to it")
        self.pending = []

    def send(self, kind: int, epoch: int, z=None, y=None, dst: int | None = None) -> None:
        import torch.distributed as dist

        self.flush()
        dst = self.rank + 1 if dst is None else dst
        if z is not None:
            z = z.detach().to(self.comm_device).contiguous()
            y = y.detach().to(self.comm_device).contiguous()
        seq = self.sent_seq.get(dst, 0)
        h = _encode_header(kind, epoch, seq, z, y).to(self.comm_device)
        self.sent_seq[dst] = seq + 1
        try:
            works = [dist.isend(h, dst, tag=0)]
            if z is not None:
                works += [dist.isend(z, dst, tag=1), dist.isend(y, dst, tag=2)]
        except Exception as exc:
            raise self._lost(dst, "sending to it", exc) from exc
        self._keep = (h, z, y)  # the tensors must live until the sends complete
        self.pending, self.pending_peer = works, dst

    def recv(self, src: int | None = None):
        import torch.distributed as dist

        src = self.rank - 1 if src is None else src
        h = torch.zeros(_HEADER, dtype=torch.int64, device=self.comm_device)
        try:
            w = dist.irecv(h, src, tag=0)
        except Exception as exc:
            raise self._lost(src, "receiving from it", exc) from exc
        self._wait(w, src, "receiving from it")
        h = h.cpu().tolist()
        kind, epoch, seq = h[0], h[1], h[2]
        want = self.recv_seq.get(src, 0)
        if seq != want or kind not in _KIND_NAMES:
            raise RuntimeError(f"partition-wise training: rank {self.rank} received a malformed message from rank "
                               f"{src} (sequence {seq}, expected {want}; kind {kind}): the ranks are not "
                               "running the same fit_partitionwise call.")
        self.recv_seq[src] = want + 1
        if kind not in (_TRAIN, _EVAL):
            return kind, epoch, None, None
        z = torch.empty(h[5:5 + h[4]], dtype=_DTYPES[h[3]], device=self.comm_device)
        y = torch.empty(h[13:13 + h[12]], dtype=_DTYPES[h[11]], device=self.comm_device)
        try:
            wz, wy = dist.irecv(z, src, tag=1), dist.irecv(y, src, tag=2)
        except Exception as exc:
            raise self._lost(src, "receiving from it", exc) from exc
        self._wait(wz, src, f"receiving {_KIND_NAMES[kind]} from it")
        self._wait(wy, src, f"receiving {_KIND_NAMES[kind]} from it")
        return kind, epoch, z, y


# ------------------------------------------------------------------------------------------------- the driver

def _source(train_loader, test_loader, epochs: int):
    """The message stream rank 0 produces: per epoch the training batches, the test batches, an epoch end."""
    for epoch in range(epochs):
        for x, y in train_loader:
            yield _TRAIN, epoch, x, y
        if test_loader is not None:
            for x, y in test_loader:
                yield _EVAL, epoch, x, y
        yield _EPOCH_END, epoch, None, None
    yield _DONE, epochs, None, None


def _handle(stage: _Stage, kind: int, epoch: int, x, y) -> list:
    """What ``stage`` does with one message; returns the messages to pass on, in order.  The first message after an
    epoch's training batches first releases what the k-filter still buffers."""
    out = []
    if kind != _TRAIN and stage.train_open is not None:
        out += [(_TRAIN, stage.train_open, z, t) for z, t in stage.end_train(stage.train_open)]
        stage.train_open = None
    if kind == _TRAIN:
        stage.train_open = epoch
        out += [(_TRAIN, epoch, z, t) for z, t in stage.train_step(epoch, x, y)]
    elif kind == _EVAL:
        res = stage.eval_step(x, y)
        if res is not None:
            out.append((_EVAL, epoch, *res))
    else:
        if kind == _EPOCH_END:
            stage.end_epoch(epoch)
        out.append((kind, epoch, None, None))
    return out


def _handle_feed(stage: _Stage, kind: int, epoch: int, x, y) -> list:
    """The same message through ``stage`` as a frozen feednet (training batches filtered as on its link)."""
    out = []
    if kind != _TRAIN and stage.feed_open is not None:
        out += [(_TRAIN, stage.feed_open, z, t) for z, t in stage.end_feed(stage.feed_open)]
        stage.feed_open = None
    if kind in (_TRAIN, _EVAL):
        if kind == _TRAIN:
            stage.feed_open = epoch
        out += [(kind, epoch, z, t) for z, t in stage.feed(epoch, x, y, train=kind == _TRAIN)]
    else:
        out.append((kind, epoch, None, None))
    return out


def _check_number(name: str, v, *, positive: bool = False, lo=None) -> float:
    ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
    if ok and positive:
        ok = v > 0
    if ok and lo is not None:
        ok = v >= lo
    if not ok:
        what = "a positive finite number" if positive else f"a finite number >= {lo}"
        raise UserError(f"{name} must be {what}; got {v!r}.")
    return float(v)


def _check_args(partitions, heads, epochs, lr, weight_decay, lr_scale, wd_scale, loss_filter, schedule, timeout_s):
    if not isinstance(partitions, (list, tuple)) or not partitions:
        raise UserError("partitions must be a non-empty list of nn.Module (one per process); make_partitions builds "
                        "one from a list of blocks.")
    if not isinstance(heads, (list, tuple)) or len(heads) != len(partitions):
        raise UserError(f"heads must be a list of nn.Module with one head per partition ({len(partitions)}); got "
                        f"{len(heads) if isinstance(heads, (list, tuple)) else type(heads).__name__}.")
    for kind, mods in (("partition", partitions), ("head", heads)):
        for i, m in enumerate(mods):
            if not isinstance(m, nn.Module):
                raise UserError(f"{kind} {i} must be an nn.Module; got {type(m).__name__}.")
    dtypes = set()
    for i, p in enumerate(partitions):
        ps = [q for q in p.parameters() if q.requires_grad]
        if not ps:
            raise UserError(f"partition {i} has no trainable parameters; fold parameter-free layers into a "
                            "neighbouring partition.")
        dtypes |= {q.dtype for q in [*p.parameters(), *heads[i].parameters()] if q.is_floating_point()}
    if not dtypes <= {torch.float32, torch.float64} or len(dtypes) != 1:
        raise UserError(f"every partition and head must hold float32 or float64 parameters of one dtype; got "
                        f"{sorted(str(d) for d in dtypes)}.")
    if isinstance(epochs, bool) or not isinstance(epochs, numbers.Integral) or epochs < 1:
        raise UserError(f"epochs must be an integer >= 1; got {epochs!r}.")
    _check_number("lr", lr, positive=True)
    _check_number("weight_decay", weight_decay, lo=0)
    _check_number("lr_scale", lr_scale, positive=True)
    _check_number("wd_scale", wd_scale, positive=True)
    _check_number("timeout_s", timeout_s, positive=True)
    if loss_filter is not None and not isinstance(loss_filter, LossFilter):
        raise UserError(f"loss_filter must be a gradcond.train.LossFilter (fraction, from_epoch) or None; got "
                        f"{type(loss_filter).__name__}.")
    if schedule not in SCHEDULES:
        raise UserError(f"unknown schedule {schedule!r}; accepted: {', '.join(SCHEDULES)}.")


def _init_from_env(device_type: str, timeout_s: float) -> bool:
    """Start the process group from torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR/PORT) when it is not
    started yet and WORLD_SIZE > 1; returns whether it did (then the caller destroys it)."""
    import torch.distributed as dist

    if not dist.is_available() or dist.is_initialized():
        return False
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return False
    if world <= 1:
        return False
    backend = "nccl" if device_type == "cuda" and dist.is_nccl_available() else "gloo"
    import torch._dynamo  # noqa: F401  (before the group exists: see gradcond.distributed.init_local_group)

    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return True


def _structure_digest(partitions, heads, epochs, schedule, loss_filter, extra="") -> torch.Tensor:
    import hashlib

    h = hashlib.sha256(f"{len(partitions)}|{epochs}|{schedule}|"
                       f"{None if loss_filter is None else (loss_filter.fraction, loss_filter.from_epoch)}|{extra}"
                       .encode())
    for m in [*partitions, *heads]:
        for k, v in m.state_dict().items():
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    return torch.tensor(list(h.digest()[:16]), dtype=torch.int64)


def _spec(cls, d: dict, name: str):
    try:
        return cls(**d)
    except (TypeError, ValueError) as exc:
        raise UserError(f"{name} {d!r} is not a valid {cls.__name__} ({exc}).") from None


@presettable("fit_partitionwise")
def fit_partitionwise(partitions, heads, train_loader, test_loader=None, *, epochs: int = 1,
                      loss="cross_entropy", optimizer: str = "adam", lr: float = 1e-3, momentum: float = 0.9,
                      weight_decay: float = 0.0, lr_scale: float = 1.0, wd_scale: float = 1.0,
                      lr_drops=(), loss_filter: LossFilter | None = None, k_filter: KFilter | None = None,
                      filter_links: str = "every", schedule: str = "concurrent", epochs_per_round: int = 1,
                      feature_checkpoint: str | None = None, replicas=None, task: str | None = None,
                      seed: int = 0, timeout_s: float = 30.0, out=None, preset: str | None = None
                      ) -> PartitionwiseResult:
    """Train ``partitions[i]`` with ``heads[i]`` (DPL, seed 002 §6.8): one process per partition under
    ``torch.distributed`` (rank ``i`` trains partition ``i``), or all of them in this process without a group.

    ``partitions``/``heads``: ``nn.Module`` lists of equal length, built identically on every rank; ``heads[i]`` maps
    partition ``i``'s output to the loss's input (e.g. flatten + linear; the source's heads are small decision
    blocks).  ``train_loader``/``test_loader`` yield ``(x, y)``; only rank 0 reads them (the other ranks may pass
    the same loaders: they are not iterated there).  ``loss``: a name or callable ``(output, target) -> mean loss``;
    ``optimizer``: ``sgd``, ``momentum``, ``adagrad``, ``adam``, ``adamw`` (one per partition, over its own and its
    head's parameters), learning rate ``lr * lr_scale**i`` and weight decay ``weight_decay * wd_scale**i``; the
    learning rate is multiplied by 0.1 at each fraction of ``epochs`` in ``lr_drops`` (the source's main DLL setting
    is ``(0.5, 0.75)``, §6.2.2; default: constant) -- in the sequential schedule, within each partition's epochs.

    Filters between partitions (the source's §6.8.2 and §6.8.4), one or the other:

    * ``loss_filter``: a :class:`~gradcond.train.LossFilter` whose ``fraction``/``from_epoch`` drop the lowest-loss
      samples of every batch before they reach the next partition (online, per batch).
    * ``k_filter``: a :class:`~gradcond.train.KFilter` spec -- ``k``, ``warmup_epochs`` (no filtering before),
      ``filter_batch`` (the window: k-NN runs on this many samples at a time, the source's 6,148; ``None``: each
      batch), ``max_removed`` (cap per window, the source's 0.6) -- applied online to the features each partition
      sends on, i.e. to the next partition's input batches (k-NN in that partition's input space).
    * ``filter_links``: ``"every"`` (default) filters every link, so the drop compounds: with a loss filter of
      fraction ``f`` partition ``i`` sees ``(1 - f)**i`` of the data, and with the k-filter each partition's input is
      filtered again in its own space; ``"first"`` filters only the link out of partition 0, so every later
      partition sees the same ``1 - f``.  The source only ever used two partitions (one link), where the two agree.

    Schedules: ``concurrent`` (DPL: the partitions train at the same time, batch by batch; one process per
    partition under torch.distributed), ``sequential`` (single-process bottom-up training of the same partitions,
    the DLL reference), ``round_robin`` / ``random_robin`` (Algorithm 4 over the partitions, §6.8.2: each partition
    trains ``epochs_per_round`` epochs per turn, in order or in a random order per round (one process only); with
    ``feature_checkpoint`` the features a partition sends on during the last epoch of its turn are kept --
    ``"device"``: on the partition's device (the source's "feature-checkpointing in device memory"), ``"cpu"``:
    in host RAM, ``"auto"``: on the device when they fit in half its free memory -- and replayed as the next
    partition's input instead of running a feednet).  Under torch.distributed, ``round_robin`` pipelines whole
    turns: rank ``i`` trains ``epochs_per_round`` epochs on the checkpoint rank ``i - 1`` sent during its last turn
    (kept in this rank's memory), while rank ``i - 1`` trains its next turn.

    ``loss_filter`` and ``k_filter`` may also be given as dicts of their arguments (as in a run config).

    ``replicas`` (``concurrent`` under torch.distributed): processes per partition, e.g. ``[2, 1]`` -- partition
    ``i`` is trained by ``replicas[i]`` consecutive ranks as ``DistributedDataParallel`` replicas in their own
    process group (the source: "DDP ... was used when a DPL partition was allocated more than a single GPU");
    partition 0's replicas take turns over the training batches, and each sender's batches go to the next
    partition's replicas in turn.  The world size must be ``sum(replicas)``.

    ``timeout_s`` bounds every wait on a neighbour (and the group's start-up when this function starts it from a
    ``torchrun`` environment).  ``out``: a directory where rank 0 (only) writes ``partitionwise.json`` (the
    history) and ``model.pt`` (the trained network's ``state_dict``).  ``preset="thesis"`` fills every argument
    not given with the source's CINIC10+ recipe (:mod:`gradcond.presets`: round robin with 10 epochs per turn,
    feature checkpoints in device memory, the k-filter k = 10 on windows of 6,148 from epoch 30 capped at 60 %,
    LR and weight decay x 0.5^i, 300 epochs, LR drop at 50 %); ``preset="thesis-imagenet"`` the ImageNet variant
    (concurrent, loss filter 25 % from epoch 31).  Where the defaults differ, and why: ``lr_scale``/``wd_scale``
    1 (the 0.5^i schedule was tuned for deep EfficientNet partitions), ``schedule`` concurrent (the multi-process
    form), no filter (filtering only pays once the data are redundant in the upper partitions), 1 epoch.

    Under torch.distributed the number of ranks must equal the number of partitions, or ``sum(replicas)`` (else
    :class:`UserError`, on every rank, before any communication).  The partitions' devices decide the backend when
    this function starts the group (NCCL for CUDA, else gloo); with gloo, features travel through CPU tensors.  A
    lost neighbour raises :class:`PartitionPeerLost` naming its rank.  Cost per batch: one forward and backward of
    each partition and its head (on its own process), plus one copy of the features per link, plus the k-filter's
    O(window^2 d) k-NN per window; without a group the partitions' costs add up, and ``sequential`` (or round robin
    without checkpoints) also pays a frozen forward of partitions ``0..i-1`` for every epoch of partition ``i``.

    Returns a :class:`PartitionwiseResult`.  Assumes every partition's parameters share one dtype (float32/float64)
    and device, and that floating inputs should be cast to it.
    """
    import torch.distributed as dist

    if isinstance(loss_filter, dict):  # plain data (configs, presets): {"fraction": ..., "from_epoch": ...}
        loss_filter = _spec(LossFilter, loss_filter, "loss_filter")
    if isinstance(k_filter, dict):  # {"k": ..., "warmup_epochs": ..., "filter_batch": ..., "max_removed": ...}
        k_filter = _spec(KFilter, k_filter, "k_filter")
    _check_args(partitions, heads, epochs, lr, weight_decay, lr_scale, wd_scale, loss_filter, schedule, timeout_s)
    if k_filter is not None and not isinstance(k_filter, KFilter):
        raise UserError(f"k_filter must be a gradcond.train.KFilter (k, warmup_epochs, filter_batch, max_removed) or "
                        f"None; got {type(k_filter).__name__}.")
    if k_filter is not None and loss_filter is not None:
        raise UserError("pass loss_filter or k_filter, not both (the source uses loss filtering instead of "
                        "k-filtering where k-NN is too costly).")
    if filter_links not in FILTER_LINKS:
        raise UserError(f"unknown filter_links {filter_links!r}; accepted: {', '.join(FILTER_LINKS)}.")
    if isinstance(epochs_per_round, bool) or not isinstance(epochs_per_round, numbers.Integral) \
            or epochs_per_round < 1:
        raise UserError(f"epochs_per_round must be an integer >= 1; got {epochs_per_round!r}.")
    if feature_checkpoint is not None and feature_checkpoint not in CHECKPOINTS:
        raise UserError(f"unknown feature_checkpoint {feature_checkpoint!r}; accepted: None, "
                        f"{', '.join(CHECKPOINTS)}.")
    if feature_checkpoint is not None and schedule not in ("round_robin", "random_robin"):
        raise UserError(f"feature_checkpoint applies to the round-robin schedules; schedule {schedule!r} passes "
                        "features on batch by batch (concurrent) or through a feednet (sequential).")
    if replicas is not None:
        if (not isinstance(replicas, (list, tuple)) or len(replicas) != len(partitions)
                or not all(isinstance(r, numbers.Integral) and not isinstance(r, bool) and r >= 1 for r in replicas)):
            raise UserError(f"replicas must list one positive process count per partition ({len(partitions)}); got "
                            f"{replicas!r}.")
        if schedule != "concurrent":
            raise UserError(f"replicas (data-parallel processes per partition) need schedule 'concurrent'; got "
                            f"{schedule!r}.")
        replicas = [int(r) for r in replicas]
    if (not isinstance(lr_drops, (list, tuple))
            or not all(isinstance(f, numbers.Real) and not isinstance(f, bool) and 0 < f < 1 for f in lr_drops)):
        raise UserError(f"lr_drops must be a list of fractions of the epochs in (0, 1), e.g. (0.5, 0.75); got "
                        f"{lr_drops!r}.")
    drops = sorted({max(1, math.ceil(f * epochs)) for f in lr_drops})  # epochs (0-based) that start at 0.1x
    loss_fn = get_loss(loss)
    if task is None:
        task = ("classification" if loss == "cross_entropy" or loss_fn is get_loss("cross_entropy")
                or getattr(loss_fn, "task", None) == "classification" else "regression")
    n = len(partitions)
    started = _init_from_env(module_device(partitions[0]).type, timeout_s)
    try:
        distributed = dist.is_available() and dist.is_initialized()
        world = dist.get_world_size() if distributed else 1
        want = n if replicas is None else sum(replicas)
        if distributed and world != want:
            if replicas is None:
                raise UserError(f"fit_partitionwise got {n} partition(s) but torch.distributed has {world} rank(s); "
                                f"DPL trains one partition per process: start {n} process(es) (torchrun "
                                f"--nproc-per-node {n}) or pass {world} partition(s).")
            raise UserError(f"fit_partitionwise got replicas {replicas} ({want} processes) but torch.distributed has "
                            f"{world} rank(s); start {want} process(es) or change replicas to sum to {world}.")
        if distributed and world > 1 and schedule not in ("concurrent", "round_robin"):
            raise UserError(f"schedule {schedule!r} runs in one process; under torch.distributed 'concurrent' and "
                            "'round_robin' are accepted.")
        if distributed and world > 1:
            if schedule == "round_robin":
                result = _fit_distributed_robin(partitions, heads, train_loader, test_loader, loss_fn, task, epochs,
                                                optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                                                loss_filter, seed, timeout_s, drops, k_filter, filter_links,
                                                epochs_per_round)
            else:
                result = _fit_distributed(partitions, heads, train_loader, test_loader, loss_fn, task, epochs,
                                          optimizer, lr, momentum, weight_decay, lr_scale, wd_scale, loss_filter,
                                          seed, timeout_s, drops, k_filter, filter_links, replicas)
        else:
            if replicas is not None and any(r > 1 for r in replicas):
                raise UserError(f"replicas {replicas} need {want} processes under torch.distributed; in one process "
                                "pass replicas=None.")
            result = _fit_local(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr,
                                momentum, weight_decay, lr_scale, wd_scale, loss_filter, seed, schedule, drops,
                                k_filter, filter_links, epochs_per_round, feature_checkpoint)
        result.extra.setdefault("filter_links", filter_links)
    finally:
        if started:
            dist.destroy_process_group()
    if out is not None and result.model is not None:
        _write_outputs(Path(out), result)
    return result


def _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale, loss_filter,
            seed, swap_rng, only=None, drops=(), k_filter=None, filter_links="every"):
    n = len(partitions)
    try:
        return [_Stage(i, n, partitions[i], heads[i], loss_fn, task, optimizer, lr * lr_scale ** i, momentum=momentum,
                       weight_decay=weight_decay * wd_scale ** i, loss_filter=loss_filter, seed=seed,
                       swap_rng=swap_rng, drops=drops, k_filter=k_filter,
                       filter_on=filter_links == "every" or i == 0) if only is None or i == only else None
                for i in range(n)]
    except ValueError as exc:  # make_optimizer's messages
        raise UserError(str(exc)) from None


def _finish(partitions, heads, records, seconds, samples, world, schedule, rank=0, with_model=True,
            task="classification"):
    records = _merge_records(records, task)
    n = len(partitions)
    acc = []
    for i in range(n):
        mine = [r for r in records if r["partition"] == i]
        acc.append(mine[-1]["test_acc"] if mine else float("nan"))
    finite = [(a, i) for i, a in enumerate(acc) if a == a]
    best = max(finite, key=lambda t: (t[0], -t[1]))[1] if finite else n - 1
    model = nn.Sequential(*partitions, heads[-1]) if with_model else None
    return PartitionwiseResult(records, acc, model, list(partitions), list(heads), seconds,
                               samples / seconds if seconds > 0 else float("nan"), world, schedule, best, rank)


def _n_samples(loader, epochs: int) -> int:
    try:
        return len(loader.dataset) * epochs
    except (AttributeError, TypeError):
        return 0


def _fit_local(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr, momentum,
               weight_decay, lr_scale, wd_scale, loss_filter, seed, schedule, drops, k_filter=None,
               filter_links="every", epochs_per_round=1, checkpoint=None):
    stages = _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                     loss_filter, seed, swap_rng=True, drops=drops, k_filter=k_filter, filter_links=filter_links)
    extra: dict = {}
    t0 = time.perf_counter()
    if schedule == "concurrent":
        for msg in _source(train_loader, test_loader, epochs):
            queue = [msg]
            for st in stages:  # each stage handles the messages exactly as its rank would, in the same order
                queue = [out for m in queue for out in _handle(st, *m)]
                if not queue:
                    break
    elif schedule == "sequential":
        for i, st in enumerate(stages):
            st.t0 = time.perf_counter()  # the epoch timer starts when this partition's training starts
            for msg in _source(train_loader, test_loader, epochs):
                if msg[0] == _DONE:
                    break
                queue = [msg]
                for low in stages[:i]:  # the frozen feednet
                    queue = [out for m in queue for out in _handle_feed(low, *m)]
                for m in queue:
                    _handle(st, *m)
    else:
        extra.update(_fit_robin_local(stages, train_loader, test_loader, epochs, epochs_per_round, schedule, seed,
                                      checkpoint))
    seconds = time.perf_counter() - t0
    records = [r for st in stages for r in st.records]
    res = _finish(partitions, heads, records, seconds, _n_samples(train_loader, epochs), 1, schedule, task=task)
    res.extra.update(extra)
    return res


def _place(batches: list, device: torch.device, where: str) -> tuple[list, str]:
    """Feature checkpoint placement: ``device`` (the partition's device), ``cpu`` (host RAM), or ``auto`` -- the
    device when the batches fit in half of its free memory (always, on the CPU), else host RAM."""
    if where == "auto":
        where = "device"
        if device.type == "cuda":
            need = sum(z.numel() * z.element_size() + t.numel() * t.element_size() for z, t in batches)
            free, _ = torch.cuda.mem_get_info(device)
            where = "device" if need <= free // 2 else "cpu"
    target = device if where == "device" else torch.device("cpu")
    return [(z.to(target), t.to(target)) for z, t in batches], where


def _robin_order(n: int, schedule: str, gen: torch.Generator) -> list[int]:
    return torch.randperm(n, generator=gen).tolist() if schedule == "random_robin" else list(range(n))


def _fit_robin_local(stages, train_loader, test_loader, epochs, per_round, schedule, seed, checkpoint) -> dict:
    """Round robin over the partitions in one process (Algorithm 4 over partitions: ``IsRandom`` False for
    ``round_robin``, True for ``random_robin``), ``per_round`` epochs per partition per turn.

    Partition ``i``'s input in its turn: the training data for partition 0; else, with ``checkpoint``, the
    batches partition ``i - 1`` sent on (after its filters) during the last epoch of its latest turn, replayed in
    the recorded order (§6.2.2 feature checkpointing, "in device memory" with ``checkpoint="device"``); without
    checkpoints -- or before ``i - 1`` has recorded any (a random order can visit ``i`` first) -- the frozen
    partitions ``0..i-1`` as a feednet.  Test batches likewise (recorded after that epoch's evaluation)."""
    n = len(stages)
    gen = torch.Generator().manual_seed(seed)
    done = [0] * n
    ck: list[dict | None] = [None] * n
    placed = []
    rounds = math.ceil(epochs / per_round)

    def source(i: int, epoch: int):
        if i == 0 or ck[i - 1] is None:
            for msg in _source(train_loader, test_loader, 1):
                if msg[0] in (_EPOCH_END, _DONE):
                    continue
                queue = [(msg[0], epoch, msg[2], msg[3])]
                for low in stages[:i]:  # feednet
                    queue = [out for m in queue for out in _handle_feed(low, *m)]
                yield from queue
            for low in stages[:i]:  # release what the feednet's k-filters still hold (no test batch followed)
                if low.feed_open is not None:
                    queue = [(_TRAIN, epoch, z, t) for z, t in low.end_feed(low.feed_open)]
                    low.feed_open = None
                    for lower in stages[low.index + 1:i]:
                        queue = [out for m in queue for out in _handle_feed(lower, *m)]
                    yield from queue
        else:
            for z, t in ck[i - 1]["train"]:
                yield _TRAIN, epoch, z, t
            for z, t in ck[i - 1]["test"]:
                yield _EVAL, epoch, z, t

    for r in range(rounds):
        for i in _robin_order(n, schedule, gen):
            st = stages[i]
            turn = min(per_round, epochs - done[i])
            for e in range(turn):
                epoch = done[i] + e
                record = checkpoint is not None and not st.last and e == turn - 1
                rec = {"train": [], "test": []}
                st.t0 = time.perf_counter()
                for kind, ep, x, y in source(i, epoch):
                    for out in _handle(st, kind, ep, x, y):
                        if record and out[0] in (_TRAIN, _EVAL):
                            rec["train" if out[0] == _TRAIN else "test"].append((out[2], out[3]))
                for out in _handle(st, _EPOCH_END, epoch, None, None):
                    if record and out[0] == _TRAIN:
                        rec["train"].append((out[2], out[3]))
                if record:
                    train, where = _place(rec["train"], st.device, checkpoint)
                    test, _ = _place(rec["test"], st.device, checkpoint)
                    ck[i] = {"train": train, "test": test}
                    placed.append(where)
            done[i] += turn
    return {"epochs_per_round": per_round, "rounds": rounds,
            "checkpoints": sorted(set(placed)) if placed else None}


def _merge_records(records: list[dict], task: str) -> list[dict]:
    """One record per (partition, epoch), without the raw sums: a partition's replicas' records merged from them
    (means recomputed, samples added, the slowest replica's seconds); a single record is kept as it is."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["partition"], r["epoch"]), []).append(r)
    out = []
    nan = float("nan")
    cls = task == "classification"
    for (p, e), rs in sorted(groups.items()):
        if len(rs) == 1:
            out.append({k: v for k, v in rs[0].items() if k != "_sums"})
            continue
        tr_loss, tr_c, tr_n, te_loss, te_c, te_n, sent = (sum(r["_sums"][i] for r in rs) for i in range(7))
        last = all(r["kept_fraction"] == 1.0 for r in rs) and sent == 0  # the last partition sends nothing
        out.append({"partition": p, "epoch": e,
                    "train_loss": tr_loss / tr_n if tr_n else nan,
                    "train_acc": tr_c / tr_n if tr_n and cls else nan,
                    "test_loss": te_loss / te_n if te_n else nan,
                    "test_acc": te_c / te_n if te_n and cls else nan,
                    "samples": tr_n, "kept_fraction": 1.0 if last else (sent / tr_n if tr_n else nan),
                    "seconds": max(r["seconds"] for r in rs)})
    return out


def _layout(n: int, replicas) -> tuple[list[list[int]], list[int]]:
    """``(ranks of each partition, partition of each rank)``: consecutive ranks per partition."""
    reps = [1] * n if replicas is None else list(replicas)
    ranks, part, r = [], [], 0
    for p, k in enumerate(reps):
        ranks.append(list(range(r, r + k)))
        part += [p] * k
        r += k
    return ranks, part


def _peers(ranks: list[list[int]], p: int, j: int) -> tuple[list[int], list[int]]:
    """``(sources, destinations)`` of replica ``j`` of partition ``p``: a partition's replicas share the next
    partition's replicas by index modulo (several senders to one receiver, or one sender dealing its batches to
    several receivers in turn)."""
    srcs: list[int] = []
    dsts: list[int] = []
    if p > 0:
        a, b = len(ranks[p - 1]), len(ranks[p])
        srcs = [ranks[p - 1][i] for i in range(a) if i % b == j] if a >= b else [ranks[p - 1][j % a]]
    if p + 1 < len(ranks):
        a, b = len(ranks[p]), len(ranks[p + 1])
        dsts = [ranks[p + 1][j % b]] if a >= b else [ranks[p + 1][i] for i in range(b) if i % a == j]
    return srcs, dsts


def _check_start(rank, world, partitions, heads, epochs, schedule, loss_filter, comm_device, extra):
    """Start-up check (collective): every rank runs the same call on the same structures."""
    import torch.distributed as dist

    digest = _structure_digest(partitions, heads, epochs, schedule, loss_filter, extra).to(comm_device)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    try:
        dist.all_gather(digests, digest)
    except Exception as exc:
        raise PartitionPeerLost(f"partition-wise training: rank {rank} could not reach every rank at start-up "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    bad = [r for r, d in enumerate(digests) if not torch.equal(d, digests[0])]
    if bad:
        raise UserError(f"rank(s) {bad} called fit_partitionwise with other partitions, heads, epochs or filters "
                        "than rank 0; every rank must build the same partitions and pass the same arguments.")


def _gather_results(rank, world, part, ranks, partitions, heads, stage, seconds, train_loader, epochs, schedule,
                    task):
    """Every rank's weights and records to rank 0 (``gather_object``); rank 0 loads them (a partition's first
    replica's weights) and merges the replicas' records."""
    import torch.distributed as dist

    p = part[rank]
    payload = {"rank": rank, "partition_index": p, "records": stage.records, "seconds": time.perf_counter() - seconds,
               "partition": {k: v.detach().cpu() for k, v in partitions[p].state_dict().items()},
               "head": {k: v.detach().cpu() for k, v in heads[p].state_dict().items()}}
    elapsed = payload["seconds"]
    gathered = [None] * world if rank == 0 else None
    try:
        dist.gather_object(payload, gathered, dst=0)
    except Exception as exc:
        raise PartitionPeerLost(f"partition-wise training: rank {rank} could not deliver or collect the trained "
                                f"partitions at the end ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    if rank != 0:
        return _finish(partitions, heads, stage.records, elapsed, _n_samples(train_loader, epochs), world, schedule,
                       rank, with_model=False, task=task)
    records = []
    with torch.no_grad():
        for g in gathered:
            q = g["partition_index"]
            if g["rank"] == ranks[q][0] and g["rank"] != 0:
                partitions[q].load_state_dict(g["partition"])
                heads[q].load_state_dict(g["head"])
            records += g["records"]
    res = _finish(partitions, heads, records, elapsed, _n_samples(train_loader, epochs), world, schedule, 0,
                  task=task)
    res.extra["seconds_per_rank"] = [g["seconds"] for g in sorted(gathered, key=lambda g: g["rank"])]
    return res


class _Inbox:
    """The messages of one epoch phase from the sources of this rank: cycles over the sources, parking each
    source's first message of another phase; ``control`` returns the epoch's control message once every source
    has sent it."""

    def __init__(self, link: "_Link", srcs: list[int]):
        self.link, self.srcs, self.parked = link, srcs, {}

    def phase(self, kinds):
        active = list(self.srcs)
        i = 0
        while active:
            src = active[i % len(active)]
            msg = self.parked.pop(src) if src in self.parked else self.link.recv(src)
            if msg[0] in kinds:
                yield msg
                i += 1
            else:
                self.parked[src] = msg
                active.remove(src)
                i = i % len(active) if active else 0

    def control(self):
        msgs = [self.parked.pop(s) if s in self.parked else self.link.recv(s) for s in self.srcs]
        return msgs[0]


class _OwnSource:
    """The same interface over partition 0's own message stream (the loaders)."""

    def __init__(self, it):
        self.it, self.head = it, None

    def _peek(self):
        if self.head is None:
            self.head = next(self.it)
        return self.head

    def phase(self, kinds):
        while self._peek()[0] in kinds:
            msg, self.head = self.head, None
            yield msg

    def control(self):
        msg, self.head = self._peek(), None
        return msg


def _fit_distributed(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr, momentum,
                     weight_decay, lr_scale, wd_scale, loss_filter, seed, timeout_s, drops, k_filter=None,
                     filter_links="every", replicas=None):
    import contextlib

    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    ranks, part = _layout(len(partitions), replicas)
    p = part[rank]
    j = ranks[p].index(rank)
    stage = _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                    loss_filter, seed, swap_rng=True, only=p, drops=drops, k_filter=k_filter,
                    filter_links=filter_links)[p]
    nccl = dist.get_backend() == "nccl"
    comm_device = stage.device if nccl else torch.device("cpu")
    kf = None if k_filter is None else (k_filter.k, k_filter.warmup_epochs, k_filter.filter_batch,
                                       k_filter.max_removed)
    _check_start(rank, world, partitions, heads, epochs, "concurrent", loss_filter, comm_device,
                 f"{kf}|{filter_links}|{replicas}")
    # one process group per partition with replicas (every rank creates every group, in the same order)
    group = None
    for q, rs in enumerate(ranks):
        if len(rs) > 1:
            g = dist.new_group(rs)
            if q == p:
                group = g
    join = contextlib.nullcontext
    if group is not None:
        from torch.distributed.algorithms.join import Join
        from torch.nn.parallel import DistributedDataParallel

        stage.ddp = DistributedDataParallel(_Pair(stage.partition, stage.head), process_group=group,
                                            device_ids=[stage.device.index] if stage.device.type == "cuda" else None)
        join = lambda: Join([stage.ddp])  # noqa: E731 - uneven batch counts across the replicas of one epoch
    link = _Link(rank, world, timeout_s, comm_device, part)
    srcs, dsts = _peers(ranks, p, j)
    t0 = time.perf_counter()

    if p == 0:  # partition 0's replicas take turns over the loaders' batches
        def own():
            turn = 0
            for kind, epoch, x, y in _source(train_loader, test_loader, epochs):
                if kind in (_TRAIN, _EVAL):
                    turn += 1
                    if (turn - 1) % len(ranks[0]) != j:
                        continue
                else:
                    turn = 0
                yield kind, epoch, x, y

        inbox = _OwnSource(own())
    else:
        inbox = _Inbox(link, srcs)
    turn_out = 0

    def route(out):
        nonlocal turn_out
        if not dsts:
            return
        if out[0] in (_TRAIN, _EVAL):
            link.send(*out, dst=dsts[turn_out % len(dsts)])
            turn_out += 1
        else:
            for d in dsts:
                link.send(*out, dst=d)
            turn_out = 0

    def process(msg):
        kind, epoch, x, y = msg
        link.where = f"epoch {epoch}, step {stage.step}"
        for out in _handle(stage, kind, epoch, x, y):
            route(out)

    while True:  # per epoch: the training batches (inside Join: replicas may get uneven counts), the test batches
        with join():
            for msg in inbox.phase((_TRAIN,)):
                process(msg)
        for msg in inbox.phase((_EVAL,)):
            process(msg)
        ctrl = inbox.control()
        process(ctrl)
        if ctrl[0] == _DONE:
            break
    if dsts:
        link.where = "the end of training"
        link.flush()
    return _gather_results(rank, world, part, ranks, partitions, heads, stage, t0, train_loader, epochs,
                           "concurrent", task)


def _fit_distributed_robin(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr,
                           momentum, weight_decay, lr_scale, wd_scale, loss_filter, seed, timeout_s, drops, k_filter,
                           filter_links, per_round):
    """Round robin across ranks: rank ``i`` trains ``per_round`` epochs per turn on the checkpoint (training and
    test features) rank ``i - 1`` sent during the last epoch of its previous turn -- kept in this rank's memory --
    and streams its own last epoch's outputs to rank ``i + 1``; rank 0 reads the loaders.  Turn ``r`` of rank
    ``i`` overlaps turn ``r + 1`` of rank ``i - 1``."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    stage = _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                    loss_filter, seed, swap_rng=True, only=rank, drops=drops, k_filter=k_filter,
                    filter_links=filter_links)[rank]
    nccl = dist.get_backend() == "nccl"
    comm_device = stage.device if nccl else torch.device("cpu")
    kf = None if k_filter is None else (k_filter.k, k_filter.warmup_epochs, k_filter.filter_batch,
                                       k_filter.max_removed)
    _check_start(rank, world, partitions, heads, epochs, f"round_robin/{per_round}", loss_filter, comm_device,
                 f"{kf}|{filter_links}")
    ranks, part = _layout(len(partitions), None)
    link = _Link(rank, world, timeout_s, comm_device, part)
    last = rank == world - 1
    rounds = math.ceil(epochs / per_round)
    done = 0
    t0 = time.perf_counter()
    for r in range(rounds):
        turn = min(per_round, epochs - done)
        if rank == 0:
            train_in = None
            test_in = None
        else:  # this turn's input: what rank - 1 sent during the last epoch of its turn r
            train_in, test_in = [], []
            while True:
                kind, _, z, y = link.recv(rank - 1)
                if kind == _ROUND_END:
                    break
                (train_in if kind == _TRAIN else test_in).append((z.to(stage.device), y.to(stage.device)))
        for e in range(turn):
            epoch = done + e
            send = not last and e == turn - 1
            link.where = f"round {r}, epoch {epoch}, step {stage.step}"
            stage.t0 = time.perf_counter()
            if train_in is None:
                msgs = _source(train_loader, test_loader, 1)
                msgs = ((k, epoch, x, y) for k, _, x, y in msgs if k in (_TRAIN, _EVAL))
            else:
                msgs = [(_TRAIN, epoch, z, y) for z, y in train_in] + [(_EVAL, epoch, z, y) for z, y in test_in]
            for kind, ep, x, y in msgs:
                for out in _handle(stage, kind, ep, x, y):
                    if send:
                        link.send(*out, dst=rank + 1)
            for out in _handle(stage, _EPOCH_END, epoch, None, None):
                if send and out[0] == _TRAIN:
                    link.send(*out, dst=rank + 1)
            if send:
                link.send(_ROUND_END, epoch, dst=rank + 1)
        done += turn
    if not last:
        link.where = "the end of training"
        link.flush()
    res = _gather_results(rank, world, part, ranks, partitions, heads, stage, t0, train_loader, epochs,
                          "round_robin", task)
    # every rank but 0 keeps its input checkpoint in its own (device) memory
    res.extra.update({"epochs_per_round": per_round, "rounds": rounds, "checkpoints": ["device"]})
    return res


def _write_outputs(out: Path, result: PartitionwiseResult) -> None:
    """Rank 0's files: ``partitionwise.json`` (history, accuracies, timing) and ``model.pt`` (state_dict)."""
    from ...utils import atomic_write_bytes

    out.mkdir(parents=True, exist_ok=True)
    summary = {"schedule": result.schedule, "world_size": result.world_size, "accuracy": result.accuracy,
               "best_partition": result.best_partition, "seconds": result.seconds,
               "samples_per_second": result.samples_per_second, "history": result.history, **result.extra}
    atomic_write_text(out / "partitionwise.json", json.dumps(summary, indent=1, allow_nan=True))
    import io

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in result.model.state_dict().items()}, buf)
    atomic_write_bytes(out / "model.pt", buf.getvalue())
