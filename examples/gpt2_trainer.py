"""Train a small GPT-2 with ``transformers.Trainer`` and watch its gradients with ``GradcondCallback``.

Everything is local: the model is built from a ``GPT2Config`` (random weights, nothing downloaded) and the corpus is
the Python standard library's own source files, read as bytes (a byte-level vocabulary of 256 tokens), so every
machine with Python has it. A few hundred steps take some minutes on a laptop CPU; the report opens at the end.

    pip install 'gradcond[hf]'
    python examples/gpt2_trainer.py                  # 300 steps, then opens <out>/gradcond/report.html
    python examples/gpt2_trainer.py --steps 1000 --layers 4 --bf16
    python examples/gpt2_trainer.py --ci             # a handful of steps (what the test suite runs)

What you get in ``<out>/gradcond/``: ``metrics.csv`` (per-layer gradient and weight norms, relative update sizes,
GSC, domain statistics, the gradient noise scale), ``events.jsonl``, ``monitor_schedule.json`` and ``report.html``;
the Trainer's log lines also carry the ``gradcond/...`` scalars.
"""

from __future__ import annotations

import argparse
import sysconfig
import webbrowser
from pathlib import Path

import torch


def stdlib_bytes(limit: int) -> bytes:
    """The first ``limit`` bytes of the standard library's ``*.py`` files (sorted paths, so every run reads the same
    text on one Python version)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, n = [], 0
    for f in sorted(root.glob("*.py")):
        try:
            b = f.read_bytes()
        except OSError:
            continue
        out.append(b)
        n += len(b)
        if n >= limit:
            break
    data = b"\n".join(out)[:limit]
    if len(data) < 1024:
        raise SystemExit(f"found only {len(data)} bytes of Python source under {root}; is the standard library there?")
    return data


class ByteChunks(torch.utils.data.Dataset):
    """Non-overlapping windows of ``seq`` bytes; the labels are the inputs (the model shifts them)."""

    def __init__(self, data: bytes, seq: int):
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8).long()
        n = len(t) // seq
        self.x = t[: n * seq].view(n, seq)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i].clone()}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/gpt2-stdlib", help="Trainer output_dir (the gradcond run goes inside)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--bytes", type=int, default=2_000_000, help="corpus size read from the standard library")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (CPU)")
    p.add_argument("--no-open", action="store_true", help="do not open the report in a browser")
    p.add_argument("--ci", action="store_true", help="a handful of steps on a tiny model (for the test suite)")
    a = p.parse_args(argv)
    if a.ci:
        a.steps, a.layers, a.width, a.seq, a.batch, a.bytes, a.no_open = 6, 1, 32, 32, 8, 60_000, True

    import transformers
    from transformers import Trainer, TrainingArguments

    from gradcond.integrations import GradcondCallback

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=256, n_positions=a.seq, n_embd=a.width, n_layer=a.layers, n_head=4,
                                  bos_token_id=None, eos_token_id=None)
    model = transformers.GPT2LMHeadModel(cfg)
    data = ByteChunks(stdlib_bytes(a.bytes), a.seq)
    every = max(1, a.steps // 10)
    probes = {"grad_norm": f"every:{every}", "weight_norm": f"every:{every}", "update_size": f"every:{every}",
              "gsc": f"every:{max(1, a.steps // 5)}", "domain": f"every:{max(1, a.steps // 5)}",
              "noise_scale": f"every:{max(1, a.steps // 6)}"}
    callback = GradcondCallback(probes, budget=1.0 if a.ci else 0.1, probe_batch_size=min(16, len(data)))
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=3e-3, lr_scheduler_type="cosine", warmup_steps=min(20, a.steps // 10),
                             logging_steps=max(1, a.steps // 20), report_to=[], save_strategy="no", use_cpu=True,
                             bf16=a.bf16, disable_tqdm=a.ci, seed=0)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    report = callback.run_path / "report.html"
    print(f"gradcond report: {report}")
    if not a.no_open:
        webbrowser.open(report.resolve().as_uri())
    return report


if __name__ == "__main__":
    main()
