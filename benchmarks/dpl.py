"""DPL vs DDP training throughput on 2 and 4 CPU processes (issue 28 item 2; seed 002 §6.8.4, Table 6.6).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/dpl.py [--epochs E] [--rounds R]``.

The thesis compares DPL with DDP on 4-8 GPUs (Table 6.6: +4 % to +279 % images/s).  Here the same comparison on CPU
processes (gloo on the loopback interface, one thread each), on the same model and data:

* model: an MLP of ``--blocks`` (8) Linear(``--width`` = 512) + ReLU blocks on the 64 ``digits`` inputs and a linear
  classifier; Adam, lr 1e-3; ``--batch`` (128) samples per step and process;
* **DDP**: every process holds the whole model and trains on its shard of the training set
  (``DistributedDataParallel``, gradients all-reduced each step); throughput = samples trained by all processes /
  the slowest process's training time;
* **DPL**: :func:`gradcond.train.fit_partitionwise`, ``concurrent``: 2 processes = 2 partitions (4 blocks each),
  4 processes = 4 partitions (2 blocks each) and, as a second layout, 2 partitions x 2 DDP replicas
  (``replicas=[2, 2]``, the thesis's "2-2" allocation); each partition has a linear head; throughput = training
  samples entering the pipeline / rank 0's training time (evaluation excluded: no test loader).

The configurations run interleaved: one launch of 2 processes runs DDP and DPL alternately ``--rounds`` times,
then one launch of 4 processes runs DDP, DPL 1-1-1-1 and DPL 2-2 alternately; the table shows the median per
configuration, so a change of the machine's load hits all of them alike; the load average is printed before and
after.  On a machine with fewer cores than processes the processes share cores:
the 4-process numbers then measure a mostly serialised run, as the load column shows.  Process start-up is not
timed.  The two methods do not compute the same thing (DPL trains partitions with their own heads, no gradient
between partitions): the comparison is of training throughput, as in the thesis.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
from torch import nn

CONFIG = {"blocks": 8, "width": 512, "batch": 128, "epochs": 1, "lr": 1e-3, "seed": 0, "timeout_s": 300}


def _model(cfg):
    torch.manual_seed(cfg["seed"])
    w = cfg["width"]
    blocks = [nn.Sequential(nn.Linear(64 if i == 0 else w, w), nn.ReLU()) for i in range(cfg["blocks"])]
    return blocks, nn.Linear(w, 10)


def _data():
    from gradcond.data import load_dataset

    return load_dataset("digits", form="flat", seed=0, dtype=torch.float32).train


def _ddp(cfg, rank, world, train):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from torch.utils.data import DataLoader, Subset

    blocks, clf = _model(cfg)
    model = DistributedDataParallel(nn.Sequential(*blocks, clf))
    idx = list(range(rank, len(train), world))[:len(train) // world]
    loader = DataLoader(Subset(train, idx), batch_size=cfg["batch"], shuffle=True,
                        generator=torch.Generator().manual_seed(cfg["seed"] + rank))
    opt = torch.optim.Adam(model.parameters(), lr=cfg["lr"])
    dist.barrier()
    t0 = time.perf_counter()
    n = 0
    for _ in range(cfg["epochs"]):
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            n += len(y)
    dist.barrier()
    return {"samples": n, "seconds": time.perf_counter() - t0}


def _dpl(cfg, world, train, replicas):
    import torch.distributed as dist
    from torch.utils.data import DataLoader

    from gradcond.train.layerwise.dpl import fit_partitionwise, make_partitions

    blocks, clf = _model(cfg)
    parts = make_partitions(blocks, len(replicas) if replicas else world)
    parts[-1] = nn.Sequential(*parts[-1], clf)  # the last partition ends with the classifier
    torch.manual_seed(cfg["seed"] + 1)
    heads = [nn.Linear(cfg["width"], 10) for _ in parts[:-1]] + [nn.Identity()]
    loader = DataLoader(train, batch_size=cfg["batch"], shuffle=True, generator=torch.Generator().manual_seed(cfg["seed"]))
    dist.barrier()
    r = fit_partitionwise(parts, heads, loader, epochs=cfg["epochs"], lr=cfg["lr"], replicas=replicas,
                          timeout_s=cfg["timeout_s"], seed=cfg["seed"])
    return {"samples": len(train) * cfg["epochs"], "seconds": r.seconds}


def worker(rank: int, world: int, port: int, cfg: dict, out_dir: str) -> None:
    """One process: runs every item of ``cfg["plan"]`` (``[mode, replicas]``, DDP or DPL, in the given interleaved
    order) in one process group, then writes ``rank{r}.json`` (samples and seconds per item)."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    res: dict = {"rank": rank, "items": []}
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=cfg["timeout_s"]))
        train = _data()
        for mode, replicas in cfg["plan"]:
            res["items"].append(_ddp(cfg, rank, world, train) if mode == "ddp" else _dpl(cfg, world, train, replicas))
    except Exception as exc:  # reported to the parent
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["traceback"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    if "error" in res:
        os._exit(1)
    dist.destroy_process_group()


LAYOUTS = [("DDP", "ddp", 2, None), ("DPL 2 partitions (1-1)", "dpl", 2, None), ("DDP", "ddp", 4, None),
           ("DPL 4 partitions (1-1-1-1)", "dpl", 4, None), ("DPL 2 partitions x 2 replicas (2-2)", "dpl", 4, [2, 2])]


def measure(cfg: dict, rounds: int) -> tuple[dict, tuple, tuple]:
    """Median samples/s per layout: one launch per process count, whose processes run DDP and DPL alternately
    ``rounds`` times (so both see the same load)."""
    from gradcond.experiments._launch import launch_ranks

    load0 = os.getloadavg()
    sps: dict[tuple, list[float]] = {}
    for world in (2, 4):
        layouts = [lay for lay in LAYOUTS if lay[2] == world]
        plan = [[mode, reps] for _ in range(rounds) for _, mode, _, reps in layouts]
        with tempfile.TemporaryDirectory() as tmp:
            codes, _, ranks = launch_ranks(worker, world, dict(cfg, plan=plan), tmp, 1800)
        if codes != [0] * world:
            raise RuntimeError(f"{world} processes failed: " + "; ".join(r.get("error", "no result") for r in ranks))
        for i, (mode, reps) in enumerate(plan):
            name = next(n for n, m, w, r in layouts if m == mode and r == reps)
            items = [r["items"][i] for r in ranks]
            v = (sum(it["samples"] for it in items) / max(it["seconds"] for it in items) if mode == "ddp"
                 else items[0]["samples"] / items[0]["seconds"])
            sps.setdefault((name, world), []).append(v)
            print(f"{name} on {world}: {v:.0f} samples/s", flush=True)
    return {k: statistics.median(v) for k, v in sps.items()}, load0, os.getloadavg()


def markdown_table(epochs: int | None = None, rounds: int = 3) -> str:
    cfg = dict(CONFIG, epochs=epochs or CONFIG["epochs"])
    med, load0, load1 = measure(cfg, rounds)
    lines = [f"DPL vs DDP training throughput on CPU processes (issue 28; the thesis's Table 6.6 compares them on "
             f"GPUs: DPL +4 % to +279 %). MLP of {cfg['blocks']} x Linear({cfg['width']}) blocks on digits, batch "
             f"{cfg['batch']} per step and process, {cfg['epochs']} epoch(s) per run, gloo on the loopback, one "
             f"thread per process; DDP and DPL alternate in the same processes, median of {rounds} runs each; load "
             f"average {load0[0]:.1f} before, {load1[0]:.1f} after, on {os.cpu_count()} cores. Target: measure it "
             f"(reported, not judged).", "",
             "| processes | method | samples/s | vs DDP on as many processes |", "|---|---|---|---|"]
    for name, mode, world, reps in LAYOUTS:
        v = med[(name, world)]
        base = med[("DDP", world)]
        lines.append(f"| {world} | {name} | {v:.0f} | {'-' if mode == 'ddp' else f'{v / base:.2f}x'} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=CONFIG["epochs"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    print(markdown_table(args.epochs, args.rounds))


if __name__ == "__main__":
    main()
