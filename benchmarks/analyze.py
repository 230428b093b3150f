"""Graph-analysis speed: ``gradcond.graph.analyze`` on torchvision-shaped models (issue 18).

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/analyze.py [--repeats N] [--markdown]``.
Targets (issue 18): densenet121-shaped model, batch 2, ``analyze`` <= 0.5 s at 32 x 32 and <= 2 s at 224 x 224
(before: 1.0 s and 4.4 s on this machine class; the neural-teleportation reference code needs 4.5 s at 32 x 32
with its own layer classes).

How it measures (``torch.set_num_threads(1)``, float32 models from :mod:`_tvshaped`, plain ``torch.nn``):
* ``first_s``: the first ``analyze`` of the model in this process (includes one-time costs: fx and torch
  warm-up);
* ``best_s``: the fastest of ``--repeats`` further calls (wall time) -- the number the target is judged on: the
  least disturbed sample, as ``timeit`` recommends; ``median_s``: their median wall time;
* ``cpu_s``: median CPU time of the same calls (``time.process_time``): on a shared, loaded machine the wall time
  grows with the load, the CPU time much less, so it shows what the code costs when the machine is quiet;
* ``forward_s``: one plain forward pass of the model on the same input (median): the part of ``analyze`` that is
  the model's own compute (``analyze`` runs the traced graph once);
* ``num_free``: free taus found (the analysis result; unchanged by the speed work, see
  ``tests/test_graph_speed_equivalence.py``).

``markdown_table()`` returns the README table (see ``benchmarks/_readme.py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _tvshaped import densenet121, mobilenet_v2  # noqa: E402

from gradcond import zoo  # noqa: E402
from gradcond.graph import analyze  # noqa: E402

# (name, builder, input shape, target seconds or None)
CASES = [
    ("densenet121", densenet121, (2, 3, 32, 32), 0.5),
    ("densenet121", densenet121, (2, 3, 224, 224), 2.0),
    ("mobilenet_v2", mobilenet_v2, (2, 3, 32, 32), None),
    ("mobilenet_v2", mobilenet_v2, (2, 3, 224, 224), None),
    ("resnet18 w64 (zoo)", lambda: zoo.build("resnet", depth=18, width=64), (2, 1, 8, 8), None),
]


def measure(build, shape, repeats: int) -> dict:
    torch.manual_seed(0)
    model = build().to(torch.float32)
    x = torch.randn(*shape)
    t0 = time.perf_counter()
    s = analyze(model, x)
    first = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        analyze(model, x)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    fwd = []
    model.eval()
    with torch.no_grad():
        for _ in range(max(1, repeats // 2)):
            t0 = time.perf_counter()
            model(x)
            fwd.append(time.perf_counter() - t0)
    return dict(params=sum(p.numel() for p in model.parameters()), num_free=s.num_free, first_s=first,
                best_s=min(wall), median_s=statistics.median(wall), cpu_s=statistics.median(cpu),
                forward_s=statistics.median(fwd))


def run(repeats: int) -> list[dict]:
    torch.set_num_threads(1)
    rows = []
    for name, build, shape, target in CASES:
        r = measure(build, shape, repeats)
        r.update(name=name, input="x".join(map(str, shape[2:])) or str(shape[-1]), target=target,
                 ok=None if target is None else r["best_s"] <= target,
                 cpu_ok=None if target is None else r["cpu_s"] <= target)
        rows.append(r)
    return rows


def _fmt_target(r) -> str:
    if r["target"] is None:
        return "--"
    return f"<= {r['target']:g} s"


def markdown_table(repeats: int = 7) -> str:
    """The README table: one row per model and input size, with the target and whether it is met."""
    rows = run(repeats)
    out = ["`graph.analyze` (batch 2, float32, 1 thread): wall time of the first call, best and median of "
           f"{repeats} further calls, their median CPU time, and one plain forward pass of the model for scale. "
           "Target (issue 18), judged on the best wall time: densenet121-shaped model <= 0.5 s at 32 x 32, "
           "<= 2 s at 224 x 224 (before: 1.0 s / 4.4 s). \"CPU time only\": the best wall time missed the target "
           "but the CPU time met it, i.e. the machine was busy with other work (see the load average above).", "",
           "| model | input | params | free taus | first call s | best s | median s | CPU s | forward s | target "
           "| met |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        met = "--" if r["ok"] is None else ("yes" if r["ok"] else "CPU time only" if r["cpu_ok"] else "**no**")
        out.append(f"| {r['name']} | {r['input']} | {r['params']:,} | {r['num_free']:,} | {r['first_s']:.3f} | "
                   f"{r['best_s']:.3f} | {r['median_s']:.3f} | {r['cpu_s']:.3f} | {r['forward_s']:.3f} | "
                   f"{_fmt_target(r)} | {met} |")
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7, help="timed calls per model after the first one")
    ap.add_argument("--markdown", action="store_true", help="print the README table (markdown) instead")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown_table(args.repeats))
        return
    rows = run(args.repeats)
    print(f"torch {torch.__version__}, 1 thread, float32, batch 2; {args.repeats} calls after a first one")
    print(f"{'model':<20} {'input':>7} {'params':>9} {'num_free':>8} {'first_s':>8} {'best_s':>7} {'median_s':>8} "
          f"{'cpu_s':>7} {'fwd_s':>7} {'target':>8}")
    for r in rows:
        tgt = "" if r["ok"] is None else ("ok" if r["ok"] else "MISS")
        print(f"{r['name']:<20} {r['input']:>7} {r['params']:>9} {r['num_free']:>8} {r['first_s']:>8.3f} "
              f"{r['best_s']:>7.3f} {r['median_s']:>8.3f} {r['cpu_s']:>7.3f} {r['forward_s']:>7.3f} "
              f"{_fmt_target(r):>8} {tgt}")


if __name__ == "__main__":
    main()
