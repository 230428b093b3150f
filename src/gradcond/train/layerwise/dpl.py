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

from ...utils import TrainingDiverged, UserError, atomic_write_text, eval_mode, module_device
from ..filters import LossFilter
from ..losses import get_loss
from ..trainer import make_optimizer

__all__ = ["fit_partitionwise", "PartitionwiseResult", "PartitionPeerLost", "make_partitions"]

SCHEDULES = ("concurrent", "sequential")

# message kinds on a link between consecutive partitions
_TRAIN, _EVAL, _EPOCH_END, _DONE = 1, 2, 3, 4
_KIND_NAMES = {_TRAIN: "a training batch", _EVAL: "a test batch", _EPOCH_END: "the end of an epoch",
               _DONE: "the end of training"}
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


# --------------------------------------------------------------------------------------------------- one stage

class _Stage:
    """Partition ``index`` with its head and optimizer: training steps, eval steps, per-epoch records."""

    def __init__(self, index: int, n: int, partition: nn.Module, head: nn.Module, loss_fn, task: str, optimizer,
                 lr: float, weight_decay: float, momentum: float, loss_filter: LossFilter | None, seed: int,
                 swap_rng: bool, drops=()):
        self.index, self.n, self.last = index, n, index == n - 1
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
        """Keep all but the ``fraction`` of the batch with the lowest loss (ties: lower index dropped first)."""
        f = self.loss_filter
        if f is None or self.last or epoch < f.from_epoch:
            return z, y
        m = int(math.floor(f.fraction * len(y)))
        if m == 0:
            return z, y
        losses = self._per_sample(out.detach(), y).double()
        order = torch.sort(losses, stable=True).indices
        keep = torch.ones(len(y), dtype=torch.bool, device=y.device)
        keep[order[:m]] = False
        return z[keep], y[keep]

    def _set_lr(self, epoch: int) -> None:
        factor = 0.1 ** sum(epoch >= d for d in self.drops)
        for g, base in zip(self.opt.param_groups, self.base_lrs):
            g["lr"] = base * factor

    def train_step(self, epoch: int, x, y):
        """One optimizer step of partition + head on ``(x, y)``; returns the (filtered) features and labels to send
        on -- the partition's output of this forward pass, detached -- or None for the last partition."""
        self._set_lr(epoch)
        x, y = self._in(x, y)
        with self.rng():
            self.partition.train()
            self.head.train()
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
            return None
        z, y = self._filter(epoch, z.detach(), y, out)
        self.sent += len(y)
        return z, y

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
    def feed(self, epoch: int, x, y, train: bool = True):
        """Frozen forward (eval mode, no autograd state) for the sequential schedule; on training batches
        (``train``) applies the loss filter with the frozen head's per-sample losses."""
        x, y = self._in(x, y)
        with eval_mode(self.partition), eval_mode(self.head):
            z = self.partition(x)
            f = self.loss_filter
            if train and f is not None and epoch >= f.from_epoch and int(math.floor(f.fraction * len(y))) > 0:
                return self._filter(epoch, z, y, self.head(z))
            return z, y

    def end_epoch(self, epoch: int) -> dict:
        nan = float("nan")
        rec = {"partition": self.index, "epoch": epoch,
               "train_loss": self.tr_loss / self.tr_n if self.tr_n else nan,
               "train_acc": self.tr_correct / self.tr_n if self.tr_n and self.task == "classification" else nan,
               "test_loss": self.te_loss / self.te_n if self.te_n else nan,
               "test_acc": self.te_correct / self.te_n if self.te_n and self.task == "classification" else nan,
               "samples": self.tr_n, "kept_fraction": (self.sent / self.tr_n if self.tr_n else nan) if not self.last
               else 1.0,
               "seconds": time.perf_counter() - self.t0}
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
    """Point-to-point messages between consecutive ranks, every wait bounded by ``timeout_s``.

    A message is a 16-integer header (kind, epoch, sequence number, dtypes and shapes) and, for batches, the
    features and the labels (tags 0, 1, 2).  ``send`` waits for the previous message's sends to complete before
    posting the next, so at most one message is in flight per link (the sender runs one batch ahead)."""

    def __init__(self, rank: int, world: int, timeout_s: float, comm_device: torch.device):
        self.rank, self.world, self.timeout = rank, world, timedelta(seconds=timeout_s)
        self.timeout_s = timeout_s
        self.comm_device = comm_device
        self.pending: list = []
        self.sent_seq = self.recv_seq = 0
        self.where = ""  # e.g. "epoch 3, step 120": for the error message

    def _lost(self, peer: int, doing: str, exc: BaseException | None) -> PartitionPeerLost:
        why = f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})" if exc is not None else ""
        return PartitionPeerLost(
            f"partition-wise training: rank {self.rank} (partition {self.rank}) lost rank {peer} (partition {peer}) "
            f"while {doing} at {self.where or 'start-up'}: that process exited or did not answer within "
            f"{self.timeout_s:g} s{why}.")

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
            self._wait(w, self.rank + 1, "sending to it")
        self.pending = []

    def send(self, kind: int, epoch: int, z=None, y=None) -> None:
        import torch.distributed as dist

        self.flush()
        dst = self.rank + 1
        if z is not None:
            z = z.detach().to(self.comm_device).contiguous()
            y = y.detach().to(self.comm_device).contiguous()
        h = _encode_header(kind, epoch, self.sent_seq, z, y).to(self.comm_device)
        self.sent_seq += 1
        try:
            works = [dist.isend(h, dst, tag=0)]
            if z is not None:
                works += [dist.isend(z, dst, tag=1), dist.isend(y, dst, tag=2)]
        except Exception as exc:
            raise self._lost(dst, "sending to it", exc) from exc
        self._keep = (h, z, y)  # the tensors must live until the sends complete
        self.pending = works

    def recv(self):
        import torch.distributed as dist

        src = self.rank - 1
        h = torch.zeros(_HEADER, dtype=torch.int64, device=self.comm_device)
        try:
            w = dist.irecv(h, src, tag=0)
        except Exception as exc:
            raise self._lost(src, "receiving from it", exc) from exc
        self._wait(w, src, "receiving from it")
        h = h.cpu().tolist()
        kind, epoch, seq = h[0], h[1], h[2]
        if seq != self.recv_seq or kind not in _KIND_NAMES:
            raise RuntimeError(f"partition-wise training: rank {self.rank} received a malformed message from rank "
                               f"{src} (sequence {seq}, expected {self.recv_seq}; kind {kind}): the ranks are not "
                               "running the same fit_partitionwise call.")
        self.recv_seq += 1
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


def _handle(stage: _Stage, kind: int, epoch: int, x, y):
    """What ``stage`` does with one message; returns the message to pass on (None: nothing to pass on)."""
    if kind == _TRAIN:
        out = stage.train_step(epoch, x, y)
        return None if out is None else (kind, epoch, *out)
    if kind == _EVAL:
        out = stage.eval_step(x, y)
        return None if out is None else (kind, epoch, *out)
    if kind == _EPOCH_END:
        stage.end_epoch(epoch)
    return kind, epoch, None, None


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


def _structure_digest(partitions, heads, epochs, schedule, loss_filter) -> torch.Tensor:
    import hashlib

    h = hashlib.sha256(f"{len(partitions)}|{epochs}|{schedule}|"
                       f"{None if loss_filter is None else (loss_filter.fraction, loss_filter.from_epoch)}".encode())
    for m in [*partitions, *heads]:
        for k, v in m.state_dict().items():
            h.update(f"{k}:{tuple(v.shape)}:{v.dtype};".encode())
    return torch.tensor(list(h.digest()[:16]), dtype=torch.int64)


def fit_partitionwise(partitions, heads, train_loader, test_loader=None, *, epochs: int = 1,
                      loss="cross_entropy", optimizer: str = "adam", lr: float = 1e-3, momentum: float = 0.9,
                      weight_decay: float = 0.0, lr_scale: float = 1.0, wd_scale: float = 1.0,
                      lr_drops=(), loss_filter: LossFilter | None = None, schedule: str = "concurrent",
                      task: str | None = None,
                      seed: int = 0, timeout_s: float = 30.0, out=None) -> PartitionwiseResult:
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
    ``loss_filter``: a :class:`~gradcond.train.LossFilter` whose ``fraction``/``from_epoch`` drop the lowest-loss
    samples of every batch before they reach the next partition (online, per batch).  ``schedule``: ``concurrent``
    (DPL; the only one under torch.distributed) or ``sequential`` (single-process bottom-up training of the same
    partitions, the DLL reference).  ``timeout_s`` bounds every wait on a neighbour (and the group's start-up when
    this function starts it from a ``torchrun`` environment).  ``out``: a directory where rank 0 (only) writes
    ``partitionwise.json`` (the history) and ``model.pt`` (the trained network's ``state_dict``).

    Under torch.distributed the number of ranks must equal the number of partitions (else :class:`UserError`, on
    every rank, before any communication).  The partitions' devices decide the backend when this function starts the
    group (NCCL for CUDA, else gloo); with gloo, features travel through CPU tensors.  A lost neighbour raises
    :class:`PartitionPeerLost` naming its rank.  Cost per batch: one forward and backward of each partition and its
    head (on its own process), plus one copy of the features per link; without a group the partitions' costs add up,
    and ``sequential`` also pays a frozen forward of partitions ``0..i-1`` for every epoch of partition ``i``.

    Returns a :class:`PartitionwiseResult`.  Assumes every partition's parameters share one dtype (float32/float64)
    and device, and that floating inputs should be cast to it.
    """
    import torch.distributed as dist

    _check_args(partitions, heads, epochs, lr, weight_decay, lr_scale, wd_scale, loss_filter, schedule, timeout_s)
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
        if distributed and world != n:
            raise UserError(f"fit_partitionwise got {n} partition(s) but torch.distributed has {world} rank(s); DPL "
                            f"trains one partition per process: start {n} process(es) (torchrun --nproc-per-node {n}) "
                            f"or pass {world} partition(s).")
        if distributed and world > 1 and schedule != "concurrent":
            raise UserError(f"schedule {schedule!r} runs in one process; under torch.distributed only 'concurrent' "
                            "is accepted.")
        if distributed and world > 1:
            result = _fit_distributed(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer,
                                      lr, momentum, weight_decay, lr_scale, wd_scale, loss_filter, seed, timeout_s,
                                      drops)
        else:
            result = _fit_local(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr,
                                momentum, weight_decay, lr_scale, wd_scale, loss_filter, seed, schedule, drops)
    finally:
        if started:
            dist.destroy_process_group()
    if out is not None and result.model is not None:
        _write_outputs(Path(out), result)
    return result


def _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale, loss_filter,
            seed, swap_rng, only=None, drops=()):
    n = len(partitions)
    try:
        return [_Stage(i, n, partitions[i], heads[i], loss_fn, task, optimizer, lr * lr_scale ** i, momentum=momentum,
                       weight_decay=weight_decay * wd_scale ** i, loss_filter=loss_filter, seed=seed,
                       swap_rng=swap_rng, drops=drops) if only is None or i == only else None for i in range(n)]
    except ValueError as exc:  # make_optimizer's messages
        raise UserError(str(exc)) from None


def _finish(partitions, heads, records, seconds, samples, world, schedule, rank=0, with_model=True):
    records = sorted(records, key=lambda r: (r["partition"], r["epoch"]))
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
               weight_decay, lr_scale, wd_scale, loss_filter, seed, schedule, drops):
    stages = _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                     loss_filter, seed, swap_rng=True, drops=drops)
    t0 = time.perf_counter()
    if schedule == "concurrent":
        for msg in _source(train_loader, test_loader, epochs):
            for st in stages:  # each stage handles the message exactly as its rank would, in the same order
                msg = _handle(st, *msg)
                if msg is None:
                    break
    else:
        for i, st in enumerate(stages):
            st.t0 = time.perf_counter()  # the epoch timer starts when this partition's training starts
            for kind, epoch, x, y in _source(train_loader, test_loader, epochs):
                if kind == _DONE:
                    break
                if kind == _EPOCH_END:
                    st.end_epoch(epoch)
                    continue
                for low in stages[:i]:  # the frozen feednet
                    x, y = low.feed(epoch, x, y, train=kind == _TRAIN)
                if kind == _TRAIN:
                    st.train_step(epoch, x, y)
                else:
                    st.eval_step(x, y)
    seconds = time.perf_counter() - t0
    records = [r for st in stages for r in st.records]
    return _finish(partitions, heads, records, seconds, _n_samples(train_loader, epochs), 1, schedule)


def _fit_distributed(partitions, heads, train_loader, test_loader, loss_fn, task, epochs, optimizer, lr, momentum,
                     weight_decay, lr_scale, wd_scale, loss_filter, seed, timeout_s, drops):
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    stage = _stages(partitions, heads, loss_fn, task, optimizer, lr, momentum, weight_decay, lr_scale, wd_scale,
                    loss_filter, seed, swap_rng=True, only=rank, drops=drops)[rank]
    nccl = dist.get_backend() == "nccl"
    comm_device = stage.device if nccl else torch.device("cpu")
    # start-up check (collective): every rank runs the same call on the same structures
    digest = _structure_digest(partitions, heads, epochs, "concurrent", loss_filter).to(comm_device)
    digests = [torch.zeros_like(digest) for _ in range(world)]
    try:
        dist.all_gather(digests, digest)
    except Exception as exc:
        raise PartitionPeerLost(f"partition-wise training: rank {rank} could not reach every rank at start-up "
                                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    bad = [r for r, d in enumerate(digests) if not torch.equal(d, digests[0])]
    if bad:
        raise UserError(f"rank(s) {bad} called fit_partitionwise with other partitions, heads, epochs or loss filter "
                        "than rank 0; every rank must build the same partitions and pass the same arguments.")
    link = _Link(rank, world, timeout_s, comm_device)
    t0 = time.perf_counter()
    if rank == 0:
        messages = _source(train_loader, test_loader, epochs)
    else:
        def messages():
            while True:
                msg = link.recv()
                yield msg
                if msg[0] == _DONE:
                    return
        messages = messages()
    for kind, epoch, x, y in messages:
        link.where = f"epoch {epoch}, step {stage.step}"
        out = _handle(stage, kind, epoch, x, y)
        if out is not None and rank < world - 1:
            link.send(*out)
    if rank < world - 1:
        link.where = "the end of training"
        link.flush()
    seconds = time.perf_counter() - t0
    # results to rank 0: this rank's weights and records
    payload = {"rank": rank, "records": stage.records, "seconds": seconds,
               "partition": {k: v.detach().cpu() for k, v in partitions[rank].state_dict().items()},
               "head": {k: v.detach().cpu() for k, v in heads[rank].state_dict().items()}}
    gathered = [None] * world if rank == 0 else None
    try:
        dist.gather_object(payload, gathered, dst=0)
    except Exception as exc:
        raise PartitionPeerLost(f"partition-wise training: rank {rank} could not deliver or collect the trained "
                                f"partitions at the end ({type(exc).__name__}: "
                                f"{str(exc).splitlines()[0] if str(exc) else ''}).") from exc
    if rank != 0:
        return _finish(partitions, heads, stage.records, seconds, _n_samples(train_loader, epochs), world,
                       "concurrent", rank, with_model=False)
    records = []
    with torch.no_grad():
        for p in gathered:
            r = p["rank"]
            if r != 0:
                partitions[r].load_state_dict(p["partition"])
                heads[r].load_state_dict(p["head"])
            records += p["records"]
    res = _finish(partitions, heads, records, seconds, _n_samples(train_loader, epochs), world, "concurrent", 0)
    res.extra["seconds_per_rank"] = [p["seconds"] for p in sorted(gathered, key=lambda p: p["rank"])]
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
