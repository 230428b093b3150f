"""Overhead of ``GradcondCallback`` in a ``transformers.Trainer`` run: CPU time of the same Trainer run with the
callback (default schedule and budget) to without it, measured side by side (interleaved pairs,
after one warm-up run of each, on ``time.process_time``: other processes on a shared machine disturb CPU time much less than
wall time). Target (issue 24): <= 1.10x.

The run: a GPT-2 built from a config (2 layers, width 64, context 64, byte vocabulary) trained for ``STEPS`` (1000)
optimizer steps of 8 sequences on the standard library's source bytes (``examples/gpt2_trainer.py``'s corpus), CPU, one
thread. The callback's default schedule is the monitor's "default" preset plus the noise scale at epoch ends, under
the default 5% budget: at the first step the monitor plans from its cost model (operation counts of the model, no
clock), and the plan (printed below, the same sentences as in the run report) thins what would exceed the budget.
The overhead has a per-step part (the probes the plan keeps) and one-off parts -- the cost-model profile at the first
step and the report written when training ends (its figures); the second table row leaves the report out (its CPU
time is measured inside the callback), so a reader can scale the one-off parts to a run of another length.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

TARGET = 1.10
STEPS = 1000


def _setup():
    import transformers

    from gpt2_trainer import ByteChunks, stdlib_bytes

    transformers.logging.set_verbosity_error()
    data = ByteChunks(stdlib_bytes(400_000), 64)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=64, n_embd=64, n_layer=2, n_head=4, bos_token_id=None,
                                  eos_token_id=None)
    return transformers, data, cfg


def train_once(with_callback: bool, tmp: Path, steps: int = STEPS, last: dict | None = None) -> float:
    """CPU seconds of one Trainer run (model built anew from the same seed)."""
    transformers, data, cfg = _setup()
    from transformers import Trainer, TrainingArguments

    from gradcond.integrations import GradcondCallback

    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg)
    cbs = [GradcondCallback()] if with_callback else []
    args = TrainingArguments(output_dir=str(tmp / ("cb" if with_callback else "plain")), max_steps=steps,
                             per_device_train_batch_size=8, learning_rate=3e-3, logging_steps=50, report_to=[],
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=cbs)
    t = time.process_time()
    trainer.train()
    dt = time.process_time() - t
    if with_callback and last is not None:
        last["plan"] = cbs[0].monitor.plan
        last.setdefault("report", []).append(cbs[0].report_cpu_s)
    return dt


def _cpu_pairs(reps: int, steps: int):
    """Interleaved (callback, plain) CPU-time pairs after one warm-up of each."""
    import tempfile

    torch.set_num_threads(1)
    last: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train_once(True, tmp, 20), train_once(False, tmp, 20)  # warm-up: imports, first calls
        pairs = [(train_once(True, tmp, steps, last), train_once(False, tmp, steps)) for _ in range(reps)]
    return pairs, last


def run(reps: int = 3, steps: int = STEPS) -> dict:
    pairs, last = _cpu_pairs(reps, steps)
    ratios = sorted(a / b for a, b in pairs)
    rep = last.pop("report", [0.0] * len(pairs))[-len(pairs):]
    no_report = sorted((a - r) / b for (a, b), r in zip(pairs, rep))
    return {"reps": reps, "steps": steps, "ratios": ratios, "ratio": statistics.median(ratios),
            "no_report": no_report, "report_s": statistics.median(rep),
            "plain": statistics.median(b for _, b in pairs), "cb": statistics.median(a for a, _ in pairs), **last}


def _coverage(r) -> list[str]:
    from gradcond.monitor import coverage_sentences

    return coverage_sentences(r["plan"]) if r.get("plan") else []


def main(reps: int = 3) -> None:
    r = run(reps)
    print(f"Trainer run, {r['steps']} steps: {r['plain']:.1f} s CPU without the callback, {r['cb']:.1f} s with it "
          f"(medians of {reps} interleaved pairs)")
    print(f"GradcondCallback (default) / none = {r['ratio']:.3f}x CPU time [{r['ratios'][0]:.3f}-{r['ratios'][-1]:.3f}]"
          f"  (target <= {TARGET})")
    print(f"  of which the report written at the end: {r['report_s']:.2f} s CPU; without it "
          f"{statistics.median(r['no_report']):.3f}x")
    for s in _coverage(r):
        print(f"  - {s}")


def markdown_table(reps: int = 3) -> str:
    """README section (benchmarks/_readme.py convention): the callback's CPU-time overhead against its target."""
    r = run(reps)
    for s in _coverage(r):
        print(f"  - {s}", file=sys.stderr)
    return (f"CPU-time ratio of a `transformers.Trainer` run (GPT-2 from a config, 2 layers, width 64, context 64, "
            f"{r['steps']} steps of 8 sequences, {r['plain']:.1f} s CPU without the callback) with `GradcondCallback()` "
            f"(default schedule, 5% budget) to the same run without it, median of {reps} interleaved pairs (range in "
            f"brackets). Target (issue 24): <= {TARGET}x.\n\n"
            "| run | CPU time / without callback | target | met |\n|---|---|---|---|\n"
            f"| GradcondCallback() | {r['ratio']:.3f}x [{r['ratios'][0]:.3f}-{r['ratios'][-1]:.3f}] | <= {TARGET}x | "
            f"{'yes' if r['ratio'] <= TARGET else 'no'} |\n"
            f"| the same, less the report written at the end ({r['report_s']:.1f} s CPU) | "
            f"{statistics.median(r['no_report']):.3f}x [{r['no_report'][0]:.3f}-{r['no_report'][-1]:.3f}] | - | - |\n")


if __name__ == "__main__":
    main()
