"""Launching local ranks for the distributed reproductions (DDP, DPL): spawned processes on a loopback
rendezvous, polled with a deadline, each leaving its result in ``out_dir/rank{r}.json``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from ..distributed import free_port


def launch_ranks(worker, world: int, cfg: dict, out_dir: str | Path, join_timeout: float, on_tick=None,
                 start_method: str = "spawn"):
    """:func:`_launch_once`, retried once on a fresh port when a rank reports that its port was taken (the free
    port is probed, released, then bound by the ranks: another process can take it in between)."""
    codes, exited, ranks = _launch_once(worker, world, cfg, out_dir, join_timeout, on_tick, start_method)
    if any("address already in use" in str(r.get("error", "")).lower() for r in ranks):
        codes, exited, ranks = _launch_once(worker, world, cfg, out_dir, join_timeout, on_tick, start_method)
    return codes, exited, ranks


def _launch_once(worker, world: int, cfg: dict, out_dir: str | Path, join_timeout: float, on_tick=None,
                 start_method: str = "spawn"):
    """Start ``world`` processes ``worker(rank, world, port, cfg, out_dir)`` (``start_method``: ``spawn``, or
    ``forkserver`` for many short launches from a server with its modules already imported) on a free loopback port
    and poll (every 20 ms, at most ``join_timeout`` s) until all have exited; ``on_tick(procs)`` runs at each poll
    (e.g. to kill a rank). A rank still alive at the deadline is terminated and gets exit code None.

    Returns ``(exit codes, monotonic exit times (None if never seen exiting), per-rank results)``, the results read
    from ``out_dir/rank{r}.json`` (``{}`` where a rank wrote none; stale files are removed first). An exit code
    in words (``killed by SIGABRT``): :func:`gradcond.distributed.describe_exit`."""
    import torch.multiprocessing as mp

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in out_dir.glob("rank*.json"):
        f.unlink()
    ctx = mp.get_context(start_method)
    port = free_port()
    procs = [ctx.Process(target=worker, args=(r, world, port, cfg, str(out_dir)), daemon=True) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + join_timeout
    exited: list[float | None] = [None] * world
    while time.monotonic() < deadline and any(e is None for e in exited):
        if on_tick is not None:
            on_tick(procs)
        for r, p in enumerate(procs):
            if exited[r] is None and not p.is_alive():
                exited[r] = time.monotonic()
        time.sleep(0.02)
    codes = []
    for p in procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
            codes.append(None)
        else:
            p.join()
            codes.append(p.exitcode)
    ranks = []
    for r in range(world):
        f = out_dir / f"rank{r}.json"
        ranks.append(json.loads(f.read_text()) if f.exists() else {})
    return codes, exited, ranks
