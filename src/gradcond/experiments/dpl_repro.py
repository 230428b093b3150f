"""Seed 002, §6.8: deep partition-wise learning (DPL) on real ``torch.distributed`` ranks (``dpl-partitions``).

Two partitions of an MLP on ``digits`` are trained concurrently by two gloo ranks on the loopback interface
(:func:`gradcond.train.layerwise.dpl.fit_partitionwise`), against the same partitions trained bottom-up in one
process (``schedule="sequential"``: single-process DLL over the partitions) -- test accuracy and training
throughput -- plus a partition killed mid-run, after which its neighbours must exit with an error naming it.

:func:`run_dpl` is the launcher (``torch.multiprocessing`` spawn context, one process per rank, optionally
SIGKILL-ing one rank once it has made a given number of steps); :func:`dpl_worker` is the per-rank program;
:func:`build` makes the partitions and heads.  All three are reused by ``tests/test_layerwise_dpl.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import time
import traceback
from pathlib import Path

import torch
from torch import nn

from ..distributed import describe_exit
from . import judging as J
from ._launch import launch_ranks
from .registry import Row, register

SOURCE = "seed 002 (Øland 2024, CMU-CS-24-147), ch. 6, §6.8 (DPL), Table 6.6 and §6.8.4"

DPL_DEFAULTS = {"hidden": 128, "blocks": 4, "sizes": [2, 2], "seed": 0, "epochs": 20, "batch_size": 64,
                "lr": 2e-3, "lr_drops": [0.5, 0.75], "optimizer": "adam", "timeout_s": 30, "loss_filter": None,
                "threads": 1}


def _digits():
    from ..data import load_dataset

    return load_dataset("digits", form="flat", seed=0, dtype=torch.float32)


def build(cfg: dict):
    """``(partitions, heads)``: an MLP of ``cfg["blocks"]`` Linear+ReLU blocks of width ``cfg["hidden"]`` on the
    64 digits inputs, grouped by ``cfg["sizes"]``, one linear head (width -> 10) per partition; seeded by
    ``cfg["seed"]`` (the same modules on every rank), on ``cfg.get("device", "cpu")``."""
    from ..train.layerwise.dpl import make_partitions

    torch.manual_seed(cfg["seed"])
    w = cfg["hidden"]
    blocks = [nn.Sequential(nn.Linear(64 if i == 0 else w, w), nn.ReLU()) for i in range(cfg["blocks"])]
    parts = make_partitions(blocks, cfg["sizes"])
    heads = [nn.Linear(w, 10) for _ in parts]
    dev = torch.device(cfg.get("device", "cpu"))
    return [p.to(dev) for p in parts], [h.to(dev) for h in heads]


def loaders(cfg: dict):
    b = _digits()
    return b.loaders(cfg["batch_size"], seed=cfg["seed"])


def digest(modules) -> str:
    """SHA-256 of the bytes of every parameter and buffer of ``modules`` (for bit-identity checks)."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in m.state_dict().items():
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _loss_filter(cfg):
    from ..train import LossFilter

    f = cfg.get("loss_filter")
    return None if f is None else LossFilter(fraction=f["fraction"], from_epoch=f["from_epoch"])


def _options(cfg: dict) -> dict:
    """The optional DPL arguments a configuration may carry (k-filter, filter links, round robin, replicas)."""
    keys = ("k_filter", "filter_links", "epochs_per_round", "feature_checkpoint", "replicas")
    out = {k: cfg[k] for k in keys if cfg.get(k) is not None}
    if cfg.get("schedule"):
        out["schedule"] = cfg["schedule"]
    return out


def fit_local(cfg: dict, schedule: str):
    """The single-process run of the same configuration (``concurrent`` simulation or ``sequential`` DLL)."""
    from ..train.layerwise.dpl import fit_partitionwise

    parts, heads = build(cfg)
    train, test = loaders(cfg)
    opts = {**_options(cfg), "schedule": schedule}
    opts.pop("replicas", None)
    return fit_partitionwise(parts, heads, train, test, epochs=cfg["epochs"], optimizer=cfg["optimizer"],
                             lr=cfg["lr"], lr_drops=cfg["lr_drops"], loss_filter=_loss_filter(cfg), seed=cfg["seed"],
                             **opts)


def _one_seed(rank: int, cfg: dict, out_dir: str, hooks: bool) -> dict:
    """Build, train (:func:`fit_partitionwise`) and summarise one seed's run on this rank."""
    from ..train.layerwise.dpl import fit_partitionwise

    parts, heads = build(cfg)
    if hooks and cfg.get("progress_at") and rank < len(parts):
        calls = [0]

        def tick(mod, inp, out):
            calls[0] += 1
            if calls[0] == cfg["progress_at"]:
                Path(out_dir, f"progress{rank}").write_text(str(time.time()))
                if cfg.get("hang_rank") == rank:  # alive but silent: the neighbours must time out
                    time.sleep(cfg.get("hang_seconds", 120))

        parts[rank].register_forward_hook(tick)
    train, test = loaders(cfg)
    r = fit_partitionwise(parts, heads, train, test, epochs=cfg["epochs"], optimizer=cfg["optimizer"], lr=cfg["lr"],
                          lr_drops=cfg["lr_drops"], loss_filter=_loss_filter(cfg), seed=cfg["seed"],
                          timeout_s=cfg["timeout_s"], out=cfg.get("out"), **_options(cfg))
    return {"seed": cfg["seed"], "accuracy": r.accuracy, "seconds": r.seconds,
            "samples_per_second": r.samples_per_second, "history": r.history, "world_size": r.world_size,
            "has_model": r.model is not None, "extra": r.extra,
            "digest": digest([*parts, *heads]) if rank == 0 else None}


def dpl_worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One rank: join the gloo group on 127.0.0.1, run :func:`fit_partitionwise`, write ``rank{r}.json``.

    With ``cfg["progress_at"]`` the rank touches ``progress{r}`` after that many training forwards of its partition
    (the launcher's cue to kill it); with ``cfg["hang_rank"] == r`` it then sleeps ``cfg["hang_seconds"]`` (a hung
    peer).  ``cfg["seeds"]`` (a list) repeats the training for each seed in the same process group (results in
    ``per_seed``); otherwise ``cfg["seed"]``'s results are at the top level.  A failure is written as
    ``{"error": ...}`` and the process exits with code 1.
    """
    import torch.distributed as dist

    torch.set_num_threads(cfg.get("threads", 1))
    res: dict = {"rank": rank}
    code = 0
    try:
        from ..distributed import init_local_group

        init_local_group("gloo", port, rank, world, cfg["timeout_s"])  # torch._dynamo first: a clean teardown
        if cfg.get("seeds"):
            res["per_seed"] = [_one_seed(rank, dict(cfg, seed=s, out=cfg.get("out") and f"{cfg['out']}/seed{s}"),
                                         out_dir, hooks=False) for s in cfg["seeds"]]
        else:
            res.update(_one_seed(rank, cfg, out_dir, hooks=True))
    except Exception as exc:  # report, then exit non-zero
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
        code = 1
    finally:
        res["exit_time"] = time.time()
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    if code:
        os._exit(code)  # skip destroy_process_group: a peer may be gone
    dist.destroy_process_group()


def run_dpl(cfg: dict, out_dir, world: int = 2, join_timeout: float = 300.0, kill_rank: int | None = None) -> dict:
    """Start ``world`` ranks of :func:`dpl_worker` on a free loopback port and wait (at most ``join_timeout`` s).

    With ``kill_rank`` (and ``cfg["progress_at"]``), that rank is sent SIGKILL as soon as it reports progress.
    Returns ``{"exitcodes", "exit_after_kill" (seconds from the kill to each rank's exit, None if not measured),
    "killed_at", "ranks"}``; a rank still alive after ``join_timeout`` is terminated (exit code None).
    """
    out_dir = Path(out_dir)
    killed_at = None

    def kill_when_progressing(procs):
        nonlocal killed_at
        if kill_rank is not None and killed_at is None and (out_dir / f"progress{kill_rank}").exists():
            os.kill(procs[kill_rank].pid, signal.SIGKILL)
            killed_at = time.monotonic()

    codes, exited, ranks = launch_ranks(dpl_worker, world, cfg, out_dir, join_timeout, kill_when_progressing)
    after = [None if killed_at is None or e is None else e - killed_at for e in exited]
    return {"exitcodes": codes, "exit_after_kill": after, "killed_at": killed_at, "ranks": ranks}


DPL_PROTOCOL = (
    "Data: digits. Model: an MLP of 4 Linear+ReLU blocks of width 128 in 2 partitions of 2 blocks, one linear head "
    "per partition; Adam lr 2e-3, LR x0.1 at 50/75 %, batch 64, 20 epochs (full: 30), seeds 0-1 (full: 0-4). DPL: "
    "the partitions trained concurrently by 2 gloo ranks on the loopback interface, partition 2 on partition 1's "
    "current outputs (§6.8); reference: the same partitions trained bottom-up in one process (sequential DLL). "
    "Accuracy judged, precondition: the reference learns (test accuracy >= 30 %). Throughput (samples/s) is "
    "reported, never judged: it compares 2 processes with 1 on a shared machine and depends on wall-clock time, and "
    "the source's comparison is DPL vs DDP on GPUs (Table 6.6). Then partition 1 of 3 is killed (SIGKILL).")


def dpl_accuracy_row(dpl: list[float], seq: list[float], seeds: list[int]) -> Row:
    """|mean test accuracy (DPL) - (sequential DLL)| <= 1 pp, the reference learning."""
    mean = statistics.fmean
    diff = 100 * (mean(dpl) - mean(seq))
    return Row(
        claim="2-partition DPL (concurrent, 2 processes) vs the same partitions trained bottom-up in one process "
              "(DLL): final test accuracy of the full network, digits MLP (4 blocks of 128, 2 per partition)",
        source="seed 002 §6.8.1 (CINIC10+: 90.70 % bottom-up DPL vs 90.97 % backprop) and §6.8.4 (ImageNet: "
               "81.81 % two-partition DPL vs 81.78 % backprop)",
        paper="DPL within 0.3 pp of its reference",
        criterion=f"|mean test accuracy (DPL, 2 ranks) - (sequential DLL)| <= 1 pp over seeds {seeds}",
        tolerance="1 pp (issue 15's bar; about 3 test samples of 360 on digits); fixed before the run",
        ours=f"{100 * mean(dpl):.2f} % vs {100 * mean(seq):.2f} % ({diff:+.2f} pp); per seed DPL "
             f"{[round(100 * a, 2) for a in dpl]}, DLL {[round(100 * a, 2) for a in seq]}",
        holds=abs(diff) <= 1.0,
        preconditions=[J.baseline_learns(min(seq), 0.1, what="sequential DLL's worst final test accuracy")],
        data={"dpl": dpl, "sequential": seq})


def dpl_throughput_row(dpl_sps: list[float], seq_sps: list[float]) -> Row:
    """Reported, never judged: throughput of 2 processes vs 1 (wall-clock, machine-dependent)."""
    mean = statistics.fmean
    speed = mean(dpl_sps) / mean(seq_sps)
    return Row(
        claim="throughput: DPL (2 processes) vs bottom-up training of the same partitions (1 process), samples/s "
              "entering the network, one thread per process",
        source="seed 002 §6.8.1 (bottom-up DPL with feednet 8h50m vs DPL with filtering/round-robin 4h30m) and "
               "Table 6.6 (DPL vs DDP throughput, +4 % to +279 %)",
        paper="+4 % to +279 % (Table 6.6, vs DDP on 4-8 GPUs)",
        criterion="reported, not judged: wall-clock throughput of 2 processes against 1 on a shared machine is not "
                  "the source's comparison (DPL vs DDP) and depends on the machine's load",
        ours=f"{speed:.2f}x ({mean(dpl_sps):.0f} vs {mean(seq_sps):.0f} samples/s)",
        holds=None, data={"dpl": dpl_sps, "sequential": seq_sps})


@register(
    "dpl-partitions",
    claim="Deep partition-wise learning: 2 partitions trained concurrently on 2 processes (torch.distributed, gloo "
          "on localhost) reach the accuracy of the same partitions trained bottom-up in one process; a killed "
          "partition ends the job with an error naming it.",
    source=SOURCE,
    protocol=DPL_PROTOCOL,
)
def run_dpl_partitions(quick: bool, out_dir: Path) -> list[Row]:
    seeds = [0, 1] if quick else [0, 1, 2, 3, 4]
    epochs = 20 if quick else 30
    rows: list[Row] = []
    cfg = dict(DPL_DEFAULTS, seeds=seeds, epochs=epochs)
    res = run_dpl(cfg, out_dir / "ranks", world=2, join_timeout=600)
    if res["exitcodes"] != [0, 0]:
        errs = "; ".join(f"rank {i} {describe_exit(c)}" + (f" ({r['error']})" if r.get("error") else "")
                         for i, (c, r) in enumerate(zip(res["exitcodes"], res["ranks"])))
        return [Row("2 gloo ranks train their partitions", "library requirement (the DPL run must complete)",
                    f"failed: exit codes {res['exitcodes']}: {errs}", False,
                    criterion="both ranks exit with code 0", tolerance="exact")]
    dpl = [r["accuracy"][-1] for r in res["ranks"][0]["per_seed"]]
    dpl_sps = [r["samples_per_second"] for r in res["ranks"][0]["per_seed"]]
    seq, seq_sps = [], []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same per-process threading as each rank: throughput compares like with like
    try:
        for s in seeds:
            ref = fit_local(dict(cfg, seed=s), "sequential")
            seq.append(ref.accuracy[-1])
            seq_sps.append(ref.samples_per_second)
    finally:
        torch.set_num_threads(threads)
    rows.append(dpl_accuracy_row(dpl, seq, seeds))
    rows.append(dpl_throughput_row(dpl_sps, seq_sps))
    rows.append(Row(
        claim="Table 6.6's speed-ups against DDP on 4-8 GPUs", source=SOURCE,
        paper="+4 % to +279 %", ours="not measured: this machine has no GPUs and the comparison is DPL vs DLL",
        holds=None, criterion="reported, not judged", tolerance="-"))
    kcfg = dict(DPL_DEFAULTS, sizes=[1, 2, 1], epochs=10_000, progress_at=20, seed=0)
    kres = run_dpl(kcfg, out_dir / "kill", world=3, join_timeout=180, kill_rank=1)
    errs = [kres["ranks"][r].get("error", "") for r in (0, 2)]
    after = [kres["exit_after_kill"][r] for r in (0, 2)]
    ok = (all(kres["exitcodes"][r] == 1 for r in (0, 2)) and all(a is not None and a < 60 for a in after)
          and all("lost rank 1" in e for e in errs))
    rows.append(Row(
        claim="partition 1 of 3 killed (SIGKILL) mid-run: ranks 0 and 2 exit non-zero naming rank 1",
        source="library requirement (fault handling; not a claim of the source)",
        criterion="ranks 0 and 2 exit with code 1 within 60 s of the kill, each error saying 'lost rank 1'",
        tolerance="60 s (issue 15); fixed before the run",
        ours=f"exit codes {kres['exitcodes']}, {[None if a is None else round(a, 1) for a in after]} s after the "
             f"kill: {errs[0][:140]}", holds=ok, data={"after": after, "errors": errs}))
    return rows
