"""Entropy codec speed and size (issue 16): encode/decode throughput and bits/value vs fp16, 8-bit uniform, zlib, zstd.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/codec.py [--epochs E] [--repeats N] [--lr LR]``.
Target (issue 16): encode >= 100 MB/s on one core at <= 4 bits/value on trained weights.

How it measures (``torch.set_num_threads(1)``, float32), all in one run:

* data -- the source's network and protocol (seed 002 §3.1, §3.7): the 784-392-50-10 tanh MLP trained with MSE on
  MNIST-shaped inputs (``digits`` upsampled and padded to 28x28,
  :func:`gradcond.experiments.compression_repro.digits28`), SGD with momentum 0.9, batch 4, learning rate ``--lr`` (0.05), float32 throughout (nothing quantised during
  training).  ``trained weights``: after ``--epochs`` (100, the source's count; about 30-60 s); ``early weights``:
  after 5 epochs; ``init weights``: at initialisation; ``gradients``: of the MSE on one batch of 256 at the trained
  point.  One package per layer, weight and bias concatenated (the source folds the bias in);
* MB/s = float32 input bytes (4 per value) / seconds, median over ``--repeats`` runs over all layers; encode =
  ``encode(...).to_bytes()``, decode = ``decode(Package.from_bytes(...))``;
* bits/value = compressed bytes x 8 / values: for the codec everything :meth:`Package.to_bytes` emits (headers and
  histograms included);
* ``huffman``: the same codec with the source's canonical Huffman coder (``coder="huffman"``) instead of rANS, on
  the same tensors -- the source's bit-rates compare with this row;
* baselines: ``fp16`` (a cast), ``uint8`` (8-bit uniform quantisation over [min, max], 1 byte/value + 8 bytes of
  range), ``zlib`` (level 6, lossless on the float32 bytes), ``zstd`` (level 3, lossless; ``zstandard`` package).
  The ratio column is fp32 bits / bits per value.

Why the bit rate depends on training: the coded indices cost about ``H_4 + (N - 4)`` bits/value with
``N = ceil(H_4 + c)``, where ``H_4`` is the entropy of the 16-bin histogram over [min, max] (printed per layer).
Uniform initialisation has ``H_4 = 4`` (~10 bits at c = 6); training grows a few large weights, the range widens,
most weights fall into one or two bins and ``H_4`` falls (the source's fig. 3.3), and with it the rate.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np
import torch

from gradcond.compression import Package, decode, encode, quantize_indices
from gradcond.experiments.compression_repro import SIM_DEFAULTS, digits28, layer_entropy, train_source_mlp

TARGET_MBPS, TARGET_BITS = 100.0, 4.0


def _flat(layer, grad: bool = False):
    w, b = (layer.weight.grad, layer.bias.grad) if grad else (layer.weight, layer.bias)
    return torch.cat([w.detach().reshape(-1), b.detach()]).clone()


def source_protocol_data(epochs: int, lr: float, seed: int = 0):
    """Weights at init, after 5 epochs and after ``epochs`` of the source's protocol, and one batch's gradients."""
    data = digits28()
    xtr, ytr, xte, yte = data
    snaps = {}

    def snap(epoch, model):
        if epoch + 1 == 5:
            snaps["early weights"] = [_flat(m) for m in model if isinstance(m, torch.nn.Linear)]

    init = train_source_mlp(0, seed, lr=lr, data=data)
    model = train_source_mlp(epochs, seed, lr=lr, after_epoch=snap, data=data)
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    idx = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(seed))[:256]
    target = torch.nn.functional.one_hot(ytr[idx], 10).to(xtr.dtype)
    model.zero_grad()
    torch.nn.functional.mse_loss(torch.tanh(model(xtr[idx])), target).backward()
    with torch.no_grad():
        acc = float((model(xte).argmax(1) == yte).double().mean())
    out = {"trained weights": [_flat(m) for m in layers]}
    if "early weights" in snaps:
        out["early weights"] = snaps["early weights"]
    out["init weights"] = [_flat(m) for m in init if isinstance(m, torch.nn.Linear)]
    out["gradients"] = [_flat(m, grad=True) for m in layers]
    return out, acc


def _uint8_enc(t):
    lo, hi = float(t.min()), float(t.max())
    return (lo, hi, quantize_indices(t, lo, hi, 8).to(torch.uint8).numpy().tobytes())


def _uint8_dec(p):
    lo, hi, raw = p
    q = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.float32)
    return lo + (q + 0.5) / 256 * (hi - lo)


def methods(c: float):
    import zstandard

    zc, zd = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    gens = {}

    def enc_entropy(t):
        g = gens.setdefault("g", torch.Generator().manual_seed(0))
        return encode(t, c=c, M=4, generator=g).to_bytes()

    def enc_huffman(t):
        g = gens.setdefault("h", torch.Generator().manual_seed(0))
        return encode(t, c=c, M=4, generator=g, coder="huffman").to_bytes()

    return {
        f"entropy c={c:g}": (enc_entropy, lambda b: decode(Package.from_bytes(b)), len),
        f"huffman c={c:g}": (enc_huffman, lambda b: decode(Package.from_bytes(b)), len),
        "fp16": (lambda t: t.half(), lambda h: h.float(), lambda h: 2 * h.numel()),
        "uint8": (_uint8_enc, _uint8_dec, lambda p: len(p[2]) + 8),
        "zlib-6": (lambda t: zlib.compress(t.numpy().tobytes(), 6),
                   lambda b: np.frombuffer(zlib.decompress(b), np.float32), len),
        "zstd-3": (lambda t: zc.compress(t.numpy().tobytes()),
                   lambda b: np.frombuffer(zd.decompress(b), np.float32), len),
    }


def measure(tensors, enc, dec, size, repeats: int):
    """(encode MB/s, decode MB/s) by CPU time of this thread and by wall time, and bits/value."""
    n = sum(t.numel() for t in tensors)
    times = {k: [] for k in ("enc_cpu", "dec_cpu", "enc_wall", "dec_wall")}
    for _ in range(repeats):
        c0, w0 = time.thread_time(), time.perf_counter()
        out = [enc(t) for t in tensors]
        c1, w1 = time.thread_time(), time.perf_counter()
        [dec(o) for o in out]
        c2, w2 = time.thread_time(), time.perf_counter()
        times["enc_cpu"].append(c1 - c0)
        times["dec_cpu"].append(c2 - c1)
        times["enc_wall"].append(w1 - w0)
        times["dec_wall"].append(w2 - w1)
    nbytes = 4 * n
    bits = 8 * sum(size(o) for o in out) / n
    return {k: nbytes / max(statistics.median(v), 1e-9) / 1e6 for k, v in times.items()}, bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=SIM_DEFAULTS["epochs"])
    ap.add_argument("--lr", type=float, default=SIM_DEFAULTS["lr"])
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data, acc = source_protocol_data(args.epochs, args.lr)
    n = sum(t.numel() for t in data["trained weights"])
    print(f"seed 002 protocol: MLP 784-392-50-10, tanh, MSE, SGD(momentum 0.9, batch {SIM_DEFAULTS['batch_size']}, "
          f"lr {args.lr:g}) on digits28 for {args.epochs} epochs, float32: test accuracy {100 * acc:.1f} %, "
          f"{n} parameters ({4 * n / 1e6:.2f} MB float32); one core; median of {args.repeats}\n")
    g = torch.Generator().manual_seed(0)
    print("per layer (weight+bias): values, H_4 = entropy of the 16-bin histogram over [min, max], max|w|/std, "
          "N and coded bits/value at c = 6")
    for name in [k for k in data if k.endswith("weights")]:
        cells = []
        for t in data[name]:
            p = encode(t, c=6, M=4, generator=g)
            cells.append(f"{t.numel()}: H_4 {layer_entropy(t):.2f}, max/std {float(t.abs().max() / t.std()):.1f}, "
                         f"N {p.n_bits}, {p.payload_bits_per_value:.2f} b")
        print(f"  {name:<16} " + " | ".join(cells))
    print(f"\nMB/s by CPU time of this thread (one core's work; on a shared machine wall time is slower) and by wall "
          f"time:")
    print(f"{'data':<16} {'method':<14} {'enc cpu':>8} {'enc wall':>8} {'dec cpu':>8} {'dec wall':>8} "
          f"{'bits/value':>10} {'ratio':>6}")
    verdict = None
    for name, tensors in data.items():
        for c in (6, 5):
            ms = methods(c)
            if c == 5:
                ms = {k: v for k, v in ms.items() if k.startswith(("entropy", "huffman"))}
            for mname, (enc, dec, size) in ms.items():
                r, bits = measure(tensors, enc, dec, size, args.repeats)
                print(f"{name:<16} {mname:<14} {r['enc_cpu']:>8.1f} {r['enc_wall']:>8.1f} {r['dec_cpu']:>8.1f} "
                      f"{r['dec_wall']:>8.1f} {bits:>10.2f} {32 / bits:>6.2f}")
                if name == "trained weights" and mname == "entropy c=6":
                    verdict = (r["enc_cpu"], r["enc_wall"], bits)
    e, ew, bits = verdict
    print(f"\ntarget (trained weights, c=6): encode >= {TARGET_MBPS:g} MB/s at <= {TARGET_BITS:g} bits/value: "
          f"measured {e:.0f} MB/s of CPU time ({ew:.0f} wall) at {bits:.2f} bits/value -> speed "
          f"{'met' if e >= TARGET_MBPS else 'NOT met'}, size {'met' if bits <= TARGET_BITS else 'NOT met'} "
          f"(the size depends on how far training went: compare 'early weights'; see the docstring)")

if __name__ == "__main__":
    main()
