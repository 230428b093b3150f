"""Small helpers that make the trainer, the monitor and the teleports behave under ``torch.distributed`` (DDP).

Contract (docs: methods/compression.md, "Monitor and teleports under DDP"):

* **One writer.** Only rank 0 (:func:`is_main`) writes the run directory; :func:`gradcond.train.fit` gives the
  other ranks an in-memory :class:`~gradcond.train.RunLogger` whatever ``run`` they pass.
* **One measurement for the whole model.** Every rank runs :class:`~gradcond.monitor.Monitor`; the probes that
  can reduce rank-local partial sums (below), those that need the full model run on rank 0 only, on the inner
  module (``model.module``, so that no probe triggers a DDP collective), and rank 0 alone logs the rows.
* **Teleports computed on rank 0, broadcast.** A teleport callback computes its change of basis / level-set update
  on rank 0 only (on the inner module), then :func:`sync_after_teleport` broadcasts the parameters, buffers and the
  optimizer state from rank 0 and checks with :func:`assert_replicas_identical` that every rank holds the same
  bytes.

Distributed measurement (issue 24): the probes that can, compute **per-rank partial sums** (sums of squares,
counts, per-neuron sums) from rank-local values -- the local shard of a ``DTensor`` parameter under FSDP2
(:func:`local_tensor`), this rank's slice of the probe batch (:func:`rank_slice`) -- and add them over the ranks with
one :func:`all_reduce_sum` per measurement; every rank then finishes the same numbers and rank 0 writes them. No
probe gathers a parameter. DDP and FSDP2 share this layer: a replicated tensor (a plain parameter under DDP, a
``Replicate`` placement) is counted once, a ``Shard`` placement is summed over the ranks (:func:`is_sharded`).

When ``torch.distributed`` is not initialised (or the world has one rank) every helper here is a no-op or returns
the single-process answer, at the cost of one ``is_initialized()`` call.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["active", "rank", "world_size", "is_main", "free_port", "init_local_group", "gloo_threads", "describe_exit", "unwrap", "broadcast_module_", "broadcast_optimizer_state_",
           "replica_digests", "assert_replicas_identical", "sync_after_teleport", "run_on_main",
           "ReplicaMismatchError", "strategy", "is_sharded", "local_tensor", "all_reduce_sum", "all_agree",
           "broadcast_object", "rank_slice", "refuse_sharded"]


class ReplicaMismatchError(RuntimeError):
    """Replicas of a model (or of its optimizer state) differ across ranks where they must be bit-identical."""


def free_port() -> int:
    """A free TCP port on the loopback interface, for a local process group's rendezvous (bound and released: another
    process can take it before the ranks bind it; launchers retry on "address already in use")."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_group(backend: str, port: int, rank: int, world: int, timeout_s: float) -> None:
    """``init_process_group`` on ``tcp://127.0.0.1:<port>`` for a rank of a local job, with ``torch._dynamo``
    imported first.

    Why: ``DistributedDataParallel``'s constructor imports ``torch._dynamo``; imported *after* the process group
    exists, it keeps a reference to the group that ``destroy_process_group`` does not release, so the gloo worker
    and transport threads survive it and are torn down during interpreter shutdown. A gloo thread that then needs
    the GIL (to release a tensor or callback of the last collective, e.g. the compression hook's ``then`` callback)
    is terminated by the finalising interpreter inside a ``noexcept`` destructor: ``terminate called without an
    active exception``, SIGABRT, at random (more often on a busy machine). Imported before, the group is freed by
    ``destroy_process_group`` and its threads are joined there (:func:`gloo_threads` is then empty)."""
    from datetime import timedelta

    import torch._dynamo  # noqa: F401  (see above: before the group exists)

    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                         world_size=world, timeout=timedelta(seconds=timeout_s))


def gloo_threads() -> list[str]:
    """Names of this process's threads that belong to gloo (``pt_gloo_*``, ``gloo_*``), read from ``/proc`` (Linux;
    empty elsewhere). After ``destroy_process_group`` there should be none."""
    import os

    names = []
    try:
        for t in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{t}/comm") as fh:
                names.append(fh.read().strip())
    except OSError:
        return []
    return [n for n in names if "gloo" in n]


def describe_exit(code: int | None) -> str:
    """A rank's exit code in words: ``exited normally``, ``exited with code 1``, ``killed by SIGABRT``, or (None)
    ``still running at the deadline (terminated)``."""
    import signal

    if code is None:
        return "still running at the deadline (terminated)"
    if code == 0:
        return "exited normally"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def active() -> bool:
    """True when ``torch.distributed`` is available, initialised and has more than one rank."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 when torch.distributed is not initialised)."""
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of ranks (1 when torch.distributed is not initialised)."""
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process."""
    return rank() == 0


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a ``DistributedDataParallel`` / ``DataParallel`` wrapper (``model.module``), else ``model``.

    Measurements and teleports run on the inner module: calling the DDP wrapper with gradients would register a
    backward all-reduce that only one rank takes part in (a hang)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    return model.module if isinstance(model, (DistributedDataParallel, DataParallel)) else model


def _state_tensors(model: torch.nn.Module):
    """``(name, tensor)`` of every parameter and buffer, in the module's order (the same on every replica)."""
    yield from unwrap(model).named_parameters()
    yield from unwrap(model).named_buffers()


@torch.no_grad()
def broadcast_module_(model: torch.nn.Module, src: int = 0) -> None:
    """Overwrite every parameter and buffer of ``model`` in place with rank ``src``'s values (one ``broadcast`` per
    tensor; cost: the model's size sent once). Assumes every rank's module has the same structure (names, shapes,
    dtypes) -- teleports that rewrite modules are refused under DDP for that reason. No-op without a group."""
    if not active():
        return
    for _, t in _state_tensors(model):
        torch.distributed.broadcast(t.data, src=src)


def broadcast_optimizer_state_(optimizer, src: int = 0) -> None:
    """Replace ``optimizer``'s state (momentum buffers, Adam moments, steps, hyper-parameters) on every rank by rank
    ``src``'s, exactly (``state_dict`` sent with ``broadcast_object_list`` between the job's own processes, then
    ``load_state_dict``). Handles a state that rank ``src`` reset or created. No-op without a group or optimizer."""
    if optimizer is None or not active():
        return
    box = [optimizer.state_dict() if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    if rank() != src:
        optimizer.load_state_dict(box[0])


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def replica_digests(model: torch.nn.Module, optimizer=None) -> dict[str, str]:
    """SHA-256 of the bytes of each parameter and buffer (and, with ``optimizer``, of each tensor of its state,
    keyed ``optimizer:<param name>.<key>``) of this rank's replica. Cost: one pass over the model's bytes."""
    out = {name: _digest([(name, t)]) for name, t in _state_tensors(model)}
    if optimizer is not None:
        names = {id(p): n for n, p in unwrap(model).named_parameters()}
        for p, st in optimizer.state.items():
            for k, v in sorted(st.items()):
                key = f"optimizer:{names.get(id(p), '?')}.{k}"
                out[key] = _digest([(key, v)]) if torch.is_tensor(v) else repr(v)
    return out


def assert_replicas_identical(model: torch.nn.Module, optimizer=None, what: str = "model") -> int:
    """Check that every rank holds bit-identical parameters and buffers (and optimizer state with ``optimizer``).

    Each rank hashes its tensors (:func:`replica_digests`); the digests are ``all_gather_object``-ed and compared
    with rank 0's. Raises :class:`ReplicaMismatchError` naming the first differing tensor and the ranks, on every
    rank. Returns the number of tensors compared (0 without a process group: nothing to check). Collective: every
    rank must call it."""
    if not active():
        return 0
    mine = replica_digests(model, optimizer)
    everyone: list = [None] * world_size()
    torch.distributed.all_gather_object(everyone, mine)
    ref = everyone[0]
    for r, d in enumerate(everyone[1:], start=1):
        for name in [*ref, *(n for n in d if n not in ref)]:  # rank 0's order: the first differing tensor
            if ref.get(name) != d.get(name):
                how = (f"missing on rank {0 if name not in ref else r}" if name not in ref or name not in d
                       else "different bytes")
                raise ReplicaMismatchError(
                    f"{what} replicas differ across ranks: {name!r} on rank {r} is not bit-identical to rank 0 "
                    f"({how}); replicas must stay identical under DDP.")
    return len(ref)


def run_on_main(fn, *args, **kwargs):
    """Call ``fn`` on rank 0 only and tell every rank whether it succeeded (one small broadcast).

    Returns ``fn``'s result on rank 0 and None elsewhere. When ``fn`` raises on rank 0, the exception is re-raised
    there and the other ranks raise :class:`RuntimeError` naming it -- no rank is left waiting in a later
    collective. Without a process group it just calls ``fn``."""
    if not active():
        return fn(*args, **kwargs)
    err, result = None, None
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 -- told to the other ranks, then re-raised
            err = exc
    box = [None if err is None else f"{type(err).__name__}: {err}"]
    torch.distributed.broadcast_object_list(box, src=0)
    if err is not None:
        raise err
    if box[0] is not None:
        raise RuntimeError(f"rank 0 failed in {getattr(fn, '__qualname__', fn)!s}: {box[0]}")
    return result


def sync_after_teleport(model: torch.nn.Module, optimizer=None) -> int:
    """After rank 0 changed ``model`` (and ``optimizer``'s state) in place: broadcast both from rank 0 and check
    that every replica is now bit-identical (:func:`assert_replicas_identical`, optimizer state included).
    Returns the number of tensors checked (0 without a process group). Collective."""
    if not active():
        return 0
    broadcast_module_(model, src=0)
    broadcast_optimizer_state_(optimizer, src=0)
    return assert_replicas_identical(model, optimizer, what="teleported model")


# ------------------------------------------------------------------------------ distributed measurement (issue 24)
def _dtensor_cls():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without the distributed tensor package
        return None
    return DTensor


def is_dtensor(t) -> bool:
    """True for a ``torch.distributed.tensor.DTensor`` (an FSDP2 parameter or gradient)."""
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of ``t``: ``t.to_local()`` of a ``DTensor`` (its shard, without FSDP2's padding), else
    ``t`` itself. Never communicates."""
    return t.to_local() if is_dtensor(t) else t


def is_sharded(t) -> bool:
    """True when ``t`` is a ``DTensor`` with a ``Shard`` placement: its rank-local sums must be added over the ranks
    (a plain tensor or a ``Replicate`` placement holds the same values on every rank and is counted once)."""
    if not is_dtensor(t):
        return False
    from torch.distributed.tensor import Shard

    return any(isinstance(p, Shard) for p in t.placements)


def strategy(model: torch.nn.Module) -> str:
    """How ``model`` is distributed: ``"fsdp2"`` (some parameter is a ``DTensor``, e.g. after
    ``torch.distributed.fsdp.fully_shard``), ``"ddp"`` (a ``DistributedDataParallel`` wrapper, or plain replicas while
    a process group with more than one rank is active) or ``"single"``."""
    from torch.nn.parallel import DistributedDataParallel

    if any(is_dtensor(p) for p in unwrap(model).parameters()):
        return "fsdp2"
    if isinstance(model, DistributedDataParallel) or active():
        return "ddp"
    return "single"


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks (in place, float64 advised; returns ``t``). Identity without a process group.
    Collective: every rank must call it with a tensor of the same shape."""
    if active():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


def all_agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on some rank (a logical OR over the ranks; one tiny all-reduce).
    Collective. Without a process group: ``flag``."""
    if not active():
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], dtype=torch.float64)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0):
    """Rank ``src``'s ``obj`` on every rank (``broadcast_object_list`` between the job's own processes). Collective;
    without a process group: ``obj``."""
    if not active():
        return obj
    box = [obj if rank() == src else None]
    torch.distributed.broadcast_object_list(box, src=src)
    return box[0]


def rank_slice(n: int, r: int | None = None, world: int | None = None) -> slice:
    """The contiguous part of ``range(n)`` that rank ``r`` of ``world`` takes: ``n // world`` items, one more for the
    first ``n % world`` ranks (so the slices of all ranks, in rank order, are ``range(n)``)."""
    r = rank() if r is None else r
    world = world_size() if world is None else world
    base, rem = divmod(n, world)
    start = r * base + min(r, rem)
    return slice(start, start + base + (1 if r < rem else 0))


def refuse_sharded(model: torch.nn.Module, what: str) -> None:
    """ValueError (one sentence) when ``model`` is FSDP2-sharded: ``what`` needs every parameter in one process and
    gradcond does not gather parameters."""
    if strategy(model) == "fsdp2":
        raise ValueError(f"{what} cannot run on an FSDP2 (fully_shard) model: it needs every parameter in one process, "
                         "and each rank holds only a shard; teleport before sharding, or train with DDP.")
