"""Entropy codec speed and size (issue 16): encode/decode throughput and bits/value vs fp16, 8-bit uniform, zlib, zstd.

Run: ``OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/codec.py [--epochs E] [--repeats N] [--width W]``.
Target (issue 16): encode >= 100 MB/s on one core at <= 4 bits/value on trained weights.

How it measures (``torch.set_num_threads(1)``, float32):
* data: a tanh MLP 64-W-W-10 trained with SGD on ``digits`` for ``--epochs`` epochs (``trained weights``: each
  layer's weight+bias concatenated, one package per layer, as the source folds the bias in), its weights at
  initialisation (``init weights``) and the gradients of one batch of 256 at the trained point (``gradients``);
* MB/s = float32 input bytes (4 per value) / seconds, median over ``--repeats`` runs of all layers;
* bits/value = compressed bytes x 8 / values (entropy codec: everything :meth:`Package.to_bytes` emits, headers and
  histograms included);
* baselines: ``fp16`` (a cast), ``uint8`` (8-bit uniform quantisation over [min, max], 1 byte/value + 8 bytes of
  range), ``zlib`` (level 6, lossless on the float32 bytes), ``zstd`` (level 3, lossless; ``zstandard`` package).
The ratio column is fp32 bits / bits per value.
"""

from __future__ import annotations

import argparse
import statistics
import time
import zlib

import numpy as np
import torch

from gradcond.compression import Package, decode, encode, quantize_indices
from gradcond.data import load_dataset

TARGET_MBPS, TARGET_BITS = 100.0, 4.0


def trained_mlp(width: int, epochs: int, seed: int = 0):
    torch.manual_seed(seed)
    b = load_dataset("digits", form="flat", seed=0)
    x, y = b.train.tensors
    model = torch.nn.Sequential(torch.nn.Linear(64, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 10))
    init = [torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]).clone() for m in model if hasattr(m, "weight")]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    layers = [m for m in model if hasattr(m, "weight")]
    weights = [torch.cat([m.weight.detach().reshape(-1), m.bias.detach()]).clone() for m in layers]
    opt.zero_grad()
    idx = torch.randperm(len(x), generator=g)[:256]
    torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
    grads = [torch.cat([m.weight.grad.reshape(-1), m.bias.grad]).clone() for m in layers]
    acc = float((model(b.test.tensors[0]).argmax(1) == b.test.tensors[1]).double().mean())
    return {"trained weights": weights, "init weights": init, "gradients": grads}, acc


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

    return {
        f"entropy c={c:g}": (enc_entropy, lambda b: decode(Package.from_bytes(b)), len),
        "fp16": (lambda t: t.half(), lambda h: h.float(), lambda h: 2 * h.numel()),
        "uint8": (_uint8_enc, _uint8_dec, lambda p: len(p[2]) + 8),
        "zlib-6": (lambda t: zlib.compress(t.numpy().tobytes(), 6),
                   lambda b: np.frombuffer(zlib.decompress(b), np.float32), len),
        "zstd-3": (lambda t: zc.compress(t.numpy().tobytes()),
                   lambda b: np.frombuffer(zd.decompress(b), np.float32), len),
    }


def measure(tensors, enc, dec, size, repeats: int):
    n = sum(t.numel() for t in tensors)
    enc_t, dec_t = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [enc(t) for t in tensors]
        t1 = time.perf_counter()
        [dec(o) for o in out]
        t2 = time.perf_counter()
        enc_t.append(t1 - t0)
        dec_t.append(t2 - t1)
    nbytes = 4 * n
    bits = 8 * sum(size(o) for o in out) / n
    return nbytes / statistics.median(enc_t) / 1e6, nbytes / statistics.median(dec_t) / 1e6, bits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--width", type=int, default=1024)
    args = ap.parse_args()
    torch.set_num_threads(1)
    data, acc = trained_mlp(args.width, args.epochs)
    n = sum(t.numel() for t in data["trained weights"])
    print(f"MLP 64-{args.width}-{args.width}-10 on digits, {args.epochs} epochs, test accuracy {100 * acc:.1f} %, "
          f"{n} parameters ({4 * n / 1e6:.1f} MB float32); one core; median of {args.repeats}\n")
    print(f"{'data':<16} {'method':<14} {'enc MB/s':>9} {'dec MB/s':>9} {'bits/value':>10} {'ratio':>6}")
    verdict = None
    for name, tensors in data.items():
        for c in (6, 5):
            ms = methods(c)
            if c == 5:
                ms = {k: v for k, v in ms.items() if k.startswith("entropy")}
            for mname, (enc, dec, size) in ms.items():
                e, d, bits = measure(tensors, enc, dec, size, args.repeats)
                print(f"{name:<16} {mname:<14} {e:>9.1f} {d:>9.1f} {bits:>10.2f} {32 / bits:>6.2f}")
                if name == "trained weights" and mname == "entropy c=6":
                    verdict = (e, bits)
    e, bits = verdict
    print(f"\ntarget (trained weights, c=6): encode >= {TARGET_MBPS:g} MB/s at <= {TARGET_BITS:g} bits/value: "
          f"measured {e:.0f} MB/s at {bits:.2f} bits/value -> speed {'met' if e >= TARGET_MBPS else 'NOT met'}, "
          f"size {'met' if bits <= TARGET_BITS else 'NOT met'}")


if __name__ == "__main__":
    main()
