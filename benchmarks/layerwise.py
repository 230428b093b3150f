"""Layer-wise training cost (issue 15): peak training memory and wall time of DLL, DSL and DPL relative to backprop.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/layerwise.py [--epochs E] [--blocks B] [--width W]
[--batch-size N] [--device cpu|cuda|auto]``.  One run prints one table (and, with CUDA present and ``--device auto``
or ``cuda``, the same table measured on the GPU).

What it measures, all on the same network: an MLP of ``--blocks`` Linear+ReLU blocks of ``--width`` on the 64
``digits`` inputs with a linear classifier (10 classes), AdamW, ``--epochs`` epochs (per block for DLL/DSL), batch
``--batch-size``, one thread per process.

* **peak memory** of one training step, from :func:`gradcond.train.layerwise.memory_accounting`: parameters,
  gradients, optimizer state and activations.  On the CPU the activations are the tensors autograd saves
  (saved-tensor hooks); on CUDA they are the allocator's peak (``torch.cuda.max_memory_allocated``).
  - backprop: the whole network.
  - DLL / DSL: the largest step of :func:`~gradcond.train.layerwise.fit_layerwise` (frozen feednet + trained block
    or window + decision head; ``LayerwiseResult.memory_ratio``).
  - DPL: the largest partition's step (partition + its head on the previous partition's features).  Each DPL
    process holds only its own partition, so this is the peak of the busiest process.
* **time**: wall seconds of the whole training, evaluation after each epoch included.
  - backprop: :func:`gradcond.train.fit`.
  - DLL / DSL: ``LayerwiseResult.seconds`` (each block trains ``--epochs`` epochs, so DLL does ``blocks`` times
    the block-epochs of backprop).
  - DPL: rank 0's training seconds with 2 processes on this machine (gloo; on CUDA both ranks share the GPU and
    features travel through the CPU), process start-up excluded.
* **test accuracy** of what each method returns (DLL/DSL: the best depth; DPL: the full network).

Ratios are method / backprop: below 1 means less memory or less time.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch
from torch import nn


def _accuracy(model, loader, device) -> float:
    model.eval()
    right = n = 0
    with torch.no_grad():
        for x, y in loader:
            right += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
            n += len(y)
    return right / n


def bench(args, device: torch.device) -> list[tuple]:
    from gradcond.data import load_dataset
    from gradcond.experiments.dpl_repro import DPL_DEFAULTS, build, run_dpl
    from gradcond.train import fit
    from gradcond.train.layerwise import fit_layerwise, memory_accounting

    cfg = dict(DPL_DEFAULTS, hidden=args.width, blocks=args.blocks, sizes=[args.blocks - args.blocks // 2,
               args.blocks // 2], epochs=args.epochs, batch_size=args.batch_size, optimizer="adamw", lr=2e-3,
               lr_drops=[], device=str(device))
    parts, heads = build(cfg)
    blocks = [b for p in parts for b in p]
    torch.manual_seed(1)
    classifier = nn.Linear(args.width, 10).to(device)
    full = nn.Sequential(*copy.deepcopy(blocks), copy.deepcopy(classifier))
    train, test = load_dataset("digits", form="flat").loaders(args.batch_size, seed=0)
    batch = next(iter(train))
    rows = []

    bp_mem = memory_accounting(full, batch, optimizer="adamw")
    # warm-up (first-call costs: lazy imports, allocator) on a throw-away copy, so backprop's time is its own
    fit(copy.deepcopy(full), [batch], optimizer="adamw", lr=2e-3, epochs=1, progress=False)
    t0 = time.perf_counter()
    fit(full, train, test, optimizer="adamw", lr=2e-3, epochs=args.epochs, progress=False)
    bp_time = time.perf_counter() - t0
    rows.append(("backprop", bp_mem.total, 1.0, bp_time, 1.0, _accuracy(full, test, device), bp_mem.method))

    for method, extra in (("dll", {}), ("dsl", {"window": 2})):
        r = fit_layerwise(nn.Sequential(*copy.deepcopy(blocks), copy.deepcopy(classifier)), train, test,
                          method=method, epochs=args.epochs, optimizer="adamw", lr=2e-3, lr_decay=1.0, wd_growth=1.0,
                          input_dropout=0.0, device=device, progress_bar=False, **extra)
        peak = max(m.total for m in r.memory)
        # fit_layerwise compares with its own backprop accounting of the same network: report that ratio
        rows.append((f"{method}" + (" (window 2)" if method == "dsl" else ""), peak, r.memory_ratio, r.seconds,
                     r.seconds / bp_time, r.best_test_accuracy, r.memory[0].method))

    # DPL: each process holds one partition and its head; its input is the previous partition's features
    peaks = []
    z = batch[0].to(device)
    for p, h in zip(parts, heads):
        peaks.append(memory_accounting(nn.Sequential(p, h), (z, batch[1]), optimizer="adamw"))
        with torch.no_grad():
            z = p(z)
    dpl_peak = max(peaks, key=lambda m: m.total)
    with tempfile.TemporaryDirectory() as tmp:
        res = run_dpl(cfg, tmp, world=2, join_timeout=1800)
    if res["exitcodes"] != [0, 0]:
        raise RuntimeError(f"the DPL ranks failed: {[r.get('error') for r in res['ranks']]}")
    r0 = res["ranks"][0]
    rows.append(("dpl (2 processes)", dpl_peak.total, dpl_peak.total / bp_mem.total, r0["seconds"],
                 r0["seconds"] / bp_time, r0["accuracy"][-1], dpl_peak.method))
    return rows


def markdown_table() -> str:
    """The README section (``make bench``): the default settings on the CPU, measured in this run."""
    args = argparse.Namespace(epochs=5, blocks=6, width=256, batch_size=128)
    torch.set_num_threads(1)
    rows = bench(args, torch.device("cpu"))
    lines = [f"Layer-wise training (issue 15) of an MLP {args.blocks} x {args.width} on digits, AdamW, {args.epochs} "
             "epochs (per block for DLL/DSL), batch 128, one CPU thread. Target (issue 15): peak training memory "
             "≤ 50 % of backprop's (saved-tensor accounting on the CPU, the allocator's peak on CUDA).", "",
             "| method | peak memory | vs backprop | time (s) | vs backprop | test acc | target | met |",
             "|---|---:|---:|---:|---:|---:|---|---|"]
    for name, mem, mr, t, tr, acc, how in rows:
        # the memory target is DLL's (one block and its head at a time); DSL and DPL are reported
        met = "≤ 0.50 | " + ("yes" if mr <= 0.5 else "**no**") if name == "dll" else "— | —"
        lines.append(f"| {name} | {mem / 2**20:.2f} MiB | {mr:.2f} | {t:.2f} | {tr:.2f}× | {100 * acc:.2f} % | {met} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--blocks", type=int, default=6)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="auto", help="cpu, cuda or auto (default: the CPU, then CUDA when present)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    devices = [torch.device("cpu")]
    if args.device in ("auto", "cuda") and torch.cuda.is_available():
        devices = [torch.device("cpu"), torch.device("cuda")] if args.device == "auto" else [torch.device("cuda")]
    print(f"MLP {args.blocks} x {args.width} on digits, AdamW, {args.epochs} epochs (per block for DLL/DSL), batch "
          f"{args.batch_size}")
    for dev in devices:
        rows = bench(args, dev)
        print(f"\n[{dev.type}] {'method':<18} {'peak memory':>12} {'vs backprop':>12} {'time (s)':>9} "
              f"{'vs backprop':>12} {'test acc':>9}  accounting")
        for name, mem, mr, t, tr, acc, how in rows:
            print(f"[{dev.type}] {name:<18} {mem / 2**20:>9.2f} MiB {mr:>12.2f} {t:>9.2f} {tr:>12.2f} "
                  f"{100 * acc:>8.2f}%  {how}")


if __name__ == "__main__":
    main()
