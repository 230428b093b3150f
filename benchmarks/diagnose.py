"""``gradcond.diagnose`` of the 11M-parameter ResNet / one forward+backward (issue 18), with a per-section breakdown.

Zoo ``resnet`` (depth 18, width 64, 11.2M parameters) on digits (1 × 8 × 8), 2 batches of 64, float32, one thread.
Prints the time of one plain forward+backward of one batch (median of 5), the wall time of ``diagnose`` and of each of
its sections (``result["section_seconds"]``) as multiples of it, and the peak memory: on CPU the growth of the
process's peak resident set (``resource.getrusage`` ru_maxrss) during ``diagnose``, on CUDA
``torch.cuda.max_memory_allocated``. Lazy imports are paid by a warm-up ``diagnose`` of a tiny ResNet first, so the
ratio is the analysis itself. Targets: <= 100x on the CPU (issue 18), <= 30x on CUDA (issue 26: ``cob_optimization``
runs its ascent without a host sync per step; checked by ``scripts/gpu_check.sh`` when a GPU is lent). All numbers are
measured in this run; ``markdown_table()`` gives the README section (``make bench``, ``benchmarks/_readme.py``).

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/diagnose.py [--device cpu|cuda] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch
import torch.nn.functional as F

from gradcond import zoo
from gradcond.data import load_dataset
from gradcond.diagnose import diagnose

TARGETS = {"cpu": 100.0, "cuda": 30.0}  # diagnose / one forward+backward, per device type


def measure(device: str = "cpu", threads: int = 1, b: int = 64) -> dict:
    """Time of one forward+backward, of ``diagnose`` and of each section, and the peak memory (module docstring)."""
    torch.set_num_threads(threads)
    dev = torch.device(device)
    d = load_dataset("digits", form="image")
    X, Y = d.train.tensors
    batches = [(X[i * b:(i + 1) * b].to(dev), Y[i * b:(i + 1) * b].to(dev)) for i in range(2)]

    torch.manual_seed(0)
    tiny = zoo.build("resnet", in_channels=1, num_classes=10, depth=10, width=4).to(dev)
    diagnose(tiny, F.cross_entropy, [(x[:8], y[:8]) for x, y in batches])  # warm-up: lazy imports, allocator

    torch.manual_seed(0)
    model = zoo.build("resnet", in_channels=1, num_classes=10, depth=18, width=64).to(dev)
    x, y = batches[0]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def plain():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        sync()

    plain()
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        plain()
        ts.append(time.perf_counter() - t0)
    model.zero_grad(set_to_none=True)
    base = statistics.median(ts)

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    result = diagnose(model, F.cross_entropy, batches)
    sync()
    total = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if dev.type == "cuda":
        mem = f"peak CUDA memory allocated {torch.cuda.max_memory_allocated(dev) / 2**20:.0f} MiB"
    else:
        mem = f"peak resident memory grew by {(rss1 - rss0) / 1024:.0f} MiB during diagnose (process peak " \
              f"{rss1 / 1024:.0f} MiB)"
    return {"params": sum(p.numel() for p in model.parameters()), "batches": len(batches), "b": b, "device": str(dev),
            "threads": threads, "base": base, "total": total, "sections": result["section_seconds"],
            "errors": result["errors"], "memory": mem}


def markdown_table(device: str = "cpu", threads: int = 1, batch: int = 64) -> str:
    """The README section: what is measured, the target of the device, the per-section breakdown."""
    r = measure(device, threads, batch)
    base, total = r["base"], r["total"]
    TARGET = TARGETS[torch.device(r["device"]).type]
    issue = "issue 18" if torch.device(r["device"]).type == "cpu" else "issue 26"
    out = [f"`gradcond.diagnose` of the zoo ResNet (depth 18, width 64: {r['params']:,} parameters) on "
           f"{r['batches']} digits batches of {r['b']} (float32, device {r['device']}, {r['threads']} thread(s)), "
           f"relative to one forward+backward of one batch ({base * 1e3:.1f} ms, median of 5), measured in the same "
           f"run after a warm-up diagnose of a tiny ResNet (lazy imports). Target on this device ({issue}): "
           f"<= {TARGET:g}x (the CUDA target, <= {TARGETS['cuda']:g}x, is checked by scripts/gpu_check.sh on a lent "
           f"GPU). Memory: {r['memory']}."
           + (f" Errors: {r['errors']}." if r["errors"] else ""), "",
           "| section | seconds | x fwd+bwd |", "|---|---:|---:|"]
    for name, s in r["sections"].items():
        out.append(f"| {name} | {s:.2f} | {s / base:.1f} |")
    ok = total / base <= TARGET
    out.append(f"| **diagnose total** (target <= {TARGET:g}x) | {total:.2f} | **{total / base:.1f}** "
               f"({'met' if ok else '**not met**'}) |")
    return "\n".join(out) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    print(markdown_table(args.device, args.threads, args.batch))


if __name__ == "__main__":
    main()
