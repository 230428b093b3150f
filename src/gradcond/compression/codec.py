"""Entropy-coded quantisation of one tensor (seed 002, chapter 3, Algorithms 1 and 2).

Per tensor ``w`` with ``n`` values:

1. ``w_min, w_max`` = the smallest and largest value;
2. the entropy ``H`` (bits) of an ``M``-bit uniform quantisation of a random fraction ``F`` of the values;
3. the bit width ``N = min(ceil(H + c), ceil(c + M))``;
4. every value is quantised to one of ``2^N`` equal bins of ``[w_min, w_max]``;
5. the bin indices are entropy coded with their exact histogram as the model: rANS (the ``constriction`` package,
   the default) or a canonical Huffman code (``coder="huffman"``, the source's coder; :mod:`.huffman`).

The package holds the coded indices, ``w_min``, ``w_max``, ``N``, the histogram and the shape/dtype; decoding puts
every value at the centre of its bin, so ``|decode(encode(w)) - w| <= (w_max - w_min) / 2^(N+1)`` (half a bin) up to
the rounding of the tensor's dtype (see :func:`encode`).

Corrections to the printed pseudo-code (``../shared/notes/002_notes.md`` section 1):

* **direction** -- Quantize prints ``floor(2^N (w_max - w) / (w_max - w_min))`` while Decode adds the offset to
  ``w_min``; the two disagree (the decoded tensor would come out mirrored).  Both here measure from ``w_min``:
  ``i = floor(2^N (w - w_min) / (w_max - w_min))`` and ``w = w_min + (w_max - w_min)(i + 0.5) / 2^N``.
* **top bin** -- ``w = w_max`` gives ``i = 2^N``, one past the last bin; indices are clamped to ``2^N - 1``.
* **integer N** -- ``H + c`` is not an integer; ``N = ceil(H + c)`` (ceiling, so the floor ``c`` is never undercut),
  capped at ``ceil(c + M)``, the source's ceiling (``H <= M`` always, the cap only guards rounding).
* **log base** -- ``H = -sum p log2 p``: base 2, so ``H`` is in bits and ``H + c`` is a bit width.
* **K vs N** -- the printed signatures mix ``K`` and ``N`` for the bit width; here it is always ``N`` (``M`` for
  the preliminary estimate).

Coders: rANS (default) reaches the entropy of the histogram within a fraction of a percent; the source's Huffman
code (``coder="huffman"``: canonical, optimal under a 16-bit length limit, rebuilt by the decoder from the
histogram as in Algorithm 2) costs between the entropy and the entropy + 1 bit/value -- up to 1 bit/value more on
peaked histograms.  ``benchmarks/codec.py`` compares the two on the same weights, so the source's bit-rates can be
compared on its own coder.

**Bit rate.** :attr:`Package.bits_per_value` counts every byte :meth:`Package.to_bytes` emits (header, shape,
histogram, coded indices); :attr:`Package.payload_bits_per_value` the coded indices alone (the source's quantity:
it calls the codebook overhead insignificant, which holds for large tensors -- about 0.02 bit/value on a 300 k-value
layer).  For values whose distribution is smooth at the bin scale, refining the ``M``-bit histogram to ``N`` bits
adds ``N - M`` bits of entropy, so the coded indices cost about ``H + N - M ~ 2 H + c - M`` bits/value (tested).
At PyTorch's uniform initialisation ``H = M = 4`` and ``c = 6`` gives about 10 bits; at most 4 bits needs
``H <~ 1``: a range ``[w_min, w_max]`` stretched by a few large weights, with most values in one or two of the 2^M
bins -- what training does to weights over time (the source's fig. 3.3; measured by the ``compression-bits``
reproduction and ``benchmarks/codec.py``).  The codec does not change the definition to get there.

**Estimator.** ``H`` is computed from ``ceil(F n)`` values drawn *with* replacement where the source takes a subset
(without replacement): a permutation would cost O(n) per call; with F = 0.03 about 1.5 % of the draws repeat a value,
which moves the estimate of a 16-bin histogram far less than its sampling noise.

**Speed** (one core, float32, 300 k values, CPU time): encode about 300-400 MB/s, of which the rANS coder is about
55 %, the quantisation 15 %, the entropy sample 14 %, the histogram 10 %; decode about 150 MB/s, almost all of it
``constriction``'s rANS decoder.  ``benchmarks/codec.py`` prints the numbers of the machine it runs on.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch

from ..utils import UserError

__all__ = ["Package", "encode", "decode", "quantize_indices", "estimate_entropy", "bit_width", "MAX_BITS", "CODERS"]

CODERS = ("rans", "huffman")

# Upper bound on c + M (and so on N): the package carries a 2^N-entry histogram, and the source's ceiling is 10 bits.
MAX_BITS = 16

_MAGIC = b"GCQ1"
_VERSION = 1  # rANS packages (unchanged since version 1)
_VERSION_CODER = 2  # packages with a coder byte after the header: written for Huffman
_CODER_CODES = {"rans": 0, "huffman": 1}
_DTYPES = {1: torch.float16, 2: torch.bfloat16, 3: torch.float32, 4: torch.float64}
_DTYPE_CODES = {v: k for k, v in _DTYPES.items()}
# magic, version, dtype code, N, ndim, w_min, w_max, H, len(counts blob), number of payload words, CRC-32 of the rest
_HEADER = struct.Struct("<4sBBBBdddIII")
_MAX_NDIM = 32


@dataclass(frozen=True, eq=False)  # eq=False: comparing numpy arrays field-wise is ambiguous
class Package:
    """One encoded tensor: everything :func:`decode` needs, and nothing that executes on load.

    Attributes: ``shape`` and ``dtype`` of the original tensor; ``n_bits`` (N); ``w_min``/``w_max`` (float64, exact
    copies of the tensor's extreme values); ``entropy`` (the preliminary estimate H, bits, kept for reporting);
    ``counts`` (int64 histogram of the ``2^N`` bin indices -- the entropy model); ``payload`` (uint32 words of the
    coded stream); ``coder`` (``"rans"`` or ``"huffman"``).
    """

    shape: tuple[int, ...]
    dtype: torch.dtype
    n_bits: int
    w_min: float
    w_max: float
    entropy: float
    counts: np.ndarray
    payload: np.ndarray
    coder: str = "rans"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_value(self) -> float:
        """Size of :meth:`to_bytes` in bits divided by the number of values: everything that is transmitted,
        header and histogram included (0.0 for an empty tensor)."""
        return 8.0 * len(self.to_bytes()) / self.numel if self.numel else 0.0

    @property
    def payload_bits_per_value(self) -> float:
        """Bits of the entropy-coded indices alone per value -- the quantity the source's figures report (they call
        the codebook overhead insignificant)."""
        return 32.0 * len(self.payload) / self.numel if self.numel else 0.0

    @property
    def bin_width(self) -> float:
        """``(w_max - w_min) / 2^N``; every decoded value lies within half of it of the original."""
        return (self.w_max - self.w_min) / 2.0 ** self.n_bits

    def to_bytes(self) -> bytes:
        """Little-endian bytes: a fixed header, the shape, the zlib-compressed histogram, the rANS words.
        The layout is plain data (``struct``), read back by :meth:`from_bytes` without pickle.  The header carries
        a CRC-32 of all its other bytes: an rANS stream has no redundancy, so a corrupted one would otherwise decode to
        plausible but wrong values."""
        counts_blob = zlib.compress(np.ascontiguousarray(self.counts, dtype="<u4").tobytes(), 6)
        shape = struct.pack(f"<{len(self.shape)}Q", *self.shape)
        body = shape + counts_blob + np.ascontiguousarray(self.payload, dtype="<u4").tobytes()
        version = _VERSION if self.coder == "rans" else _VERSION_CODER
        if version == _VERSION_CODER:  # the coder byte leads the body (and is covered by the CRC)
            body = bytes([_CODER_CODES[self.coder]]) + body
        fields = (_MAGIC, version, _DTYPE_CODES[self.dtype], self.n_bits, len(self.shape), self.w_min, self.w_max,
                  self.entropy, len(counts_blob), len(self.payload))
        crc = zlib.crc32(body, zlib.crc32(_HEADER.pack(*fields, 0)[:-4]))  # every byte but the CRC field itself
        return _HEADER.pack(*fields, crc) + body

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Package":
        """Parse :meth:`to_bytes` output, checking every field; raises ``UserError`` on anything malformed."""
        data = bytes(data)
        if len(data) < _HEADER.size:
            raise UserError(f"not a gradcond compression package: {len(data)} bytes is shorter than the "
                            f"{_HEADER.size}-byte header.")
        magic, version, dcode, n_bits, ndim, w_min, w_max, entropy, n_blob, n_words, crc = _HEADER.unpack_from(data)
        if magic != _MAGIC:
            raise UserError(f"not a gradcond compression package: magic bytes {magic!r}, expected {_MAGIC!r}.")
        if version not in (_VERSION, _VERSION_CODER):
            raise UserError(f"compression package version {version} is not supported; this gradcond reads versions "
                            f"{_VERSION} and {_VERSION_CODER}.")
        if dcode not in _DTYPES:
            raise UserError(f"compression package has unknown dtype code {dcode}; accepted: {sorted(_DTYPES)}.")
        if n_bits > MAX_BITS or ndim > _MAX_NDIM:
            raise UserError(f"compression package is malformed: N = {n_bits} bits (at most {MAX_BITS}), "
                            f"{ndim} dimensions (at most {_MAX_NDIM}).")
        if not (math.isfinite(w_min) and math.isfinite(w_max) and w_min <= w_max):
            raise UserError(f"compression package is malformed: range [{w_min}, {w_max}] is not a finite interval.")
        pos = _HEADER.size
        coder = "rans"
        if version == _VERSION_CODER:
            if len(data) <= pos or data[pos] not in _CODER_CODES.values():
                raise UserError("compression package is malformed: unknown coder byte; accepted: 0 (rANS), "
                                "1 (Huffman).")
            coder = {v: k for k, v in _CODER_CODES.items()}[data[pos]]
            pos += 1
        expected = pos + 8 * ndim + n_blob + 4 * n_words
        if len(data) != expected:
            raise UserError(f"compression package is malformed: {len(data)} bytes, the header announces {expected}.")
        if zlib.crc32(data[_HEADER.size:], zlib.crc32(data[:_HEADER.size - 4])) != crc:
            raise UserError("compression package is corrupted: its CRC-32 does not match the contents.")
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        n_bins = 2 ** n_bits
        # Bounded decompression: a hostile blob cannot expand past the histogram's known size.
        dec = zlib.decompressobj()
        try:
            raw = dec.decompress(data[pos:pos + n_blob], 4 * n_bins + 1)
        except zlib.error as exc:
            raise UserError(f"compression package is malformed: histogram does not decompress ({exc}).") from None
        if len(raw) != 4 * n_bins or dec.unconsumed_tail or not dec.eof:
            raise UserError(f"compression package is malformed: histogram is not {n_bins} 32-bit counts.")
        counts = np.frombuffer(raw, dtype="<u4").astype(np.int64)
        pos += n_blob
        numel = math.prod(shape)
        if int(counts.sum()) != numel:
            raise UserError(f"compression package is malformed: histogram counts {int(counts.sum())} values, "
                            f"the shape {tuple(shape)} holds {numel}.")
        payload = np.frombuffer(data, dtype="<u4", count=n_words, offset=pos).astype(np.uint32)
        return cls(tuple(int(s) for s in shape), _DTYPES[dcode], int(n_bits), float(w_min), float(w_max),
                   float(entropy), counts, payload, coder)


_F32_SAFE = torch.finfo(torch.float32).max / 4


def _work_dtype(dtype: torch.dtype, w_min: float = 0.0, w_max: float = 0.0) -> torch.dtype:
    # float32 arithmetic for every dtype but float64: float64 for float32 input would cost 10x in time on the hot
    # path, for an index error that only ever moves a value sitting on a bin boundary (a few ulps, see encode()).
    # Exception: a range near float32's limit (w - w_min would overflow) is computed in float64.
    if dtype == torch.float64 or max(abs(w_min), abs(w_max), w_max - w_min) > _F32_SAFE:
        return torch.float64
    return torch.float32


def quantize_indices(w: torch.Tensor, w_min: float, w_max: float, n_bits: int) -> torch.Tensor:
    """Bin index ``floor(2^N (w - w_min) / (w_max - w_min))`` clamped to ``[0, 2^N - 1]`` (int32, same shape).

    Measured from ``w_min`` (the printed Quantize measured from ``w_max``; see the module docstring); the top value
    ``w_max`` lands in the last bin, not one past it.  A zero range gives all zeros.  Cost: O(n), vectorised.
    """
    if w_max == w_min:
        return torch.zeros(w.shape, dtype=torch.int32)
    # Divide by the range first and scale by 2^N (exact) second: w_max - w_min may be tiny, and 2^N / range could
    # overflow where (w - w_min) / range, which lies in [0, 1], cannot.
    t = (w - w_min).div_(w_max - w_min).mul_(2.0 ** n_bits).floor_()
    return t.clamp_(0, 2 ** n_bits - 1).to(torch.int32)


def estimate_entropy(w: torch.Tensor, w_min: float, w_max: float, M: int, F: float,
                     generator: torch.Generator | None = None) -> float:
    """Entropy in bits (log base 2) of the ``M``-bit histogram of ``ceil(F n)`` values of flat ``w`` drawn at random.

    The sample is drawn with replacement (``torch.randint``): O(F n) time instead of the O(n) of a permutation, and
    for F << 1 the same estimator up to a negligible bias.  ``generator`` makes the draw reproducible.
    """
    n = w.numel()
    k = max(1, math.ceil(F * n))
    idx = torch.randint(0, n, (k,), generator=generator)
    q = quantize_indices(w[idx], w_min, w_max, M)
    p = torch.bincount(q, minlength=2 ** M).to(torch.float64) / k
    p = p[p > 0]
    return float(-(p * torch.log2(p)).sum()) if len(p) else 0.0


def bit_width(H: float, c: float, M: int) -> int:
    """``N = min(ceil(H + c), ceil(c + M))``: the source's ``N = H + c`` made an integer, at most the ceiling."""
    return int(min(math.ceil(H + c - 1e-12), math.ceil(c + M)))  # 1e-12: H = 2.0000000000000004 must give c + 2


def _check_args(c, M, F) -> None:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise UserError(f"c must be a finite number >= 0 (the floor on the bit width, source: 5 or 6); got {c!r}.")
    if isinstance(M, bool) or not isinstance(M, int) or M < 1:
        raise UserError(f"M must be an integer >= 1 (bits of the preliminary quantisation, source: 4); got {M!r}.")
    if math.ceil(c + M) > MAX_BITS:
        raise UserError(f"c + M must be at most {MAX_BITS} bits (the source's ceiling is 10); got c={c}, M={M}.")
    if isinstance(F, bool) or not isinstance(F, (int, float)) or not (0 < F <= 1):
        raise UserError(f"F must be a fraction in (0, 1] (share of values sampled for the entropy estimate, "
                        f"source: 0.03); got {F!r}.")


def encode(tensor: torch.Tensor, c: float = 6, M: int = 4, F: float = 0.03,
           generator: torch.Generator | None = None, coder: str = "rans") -> Package:
    """Quantise ``tensor`` to ``N = ceil(H + c)`` bits (``H`` estimated on ``M`` bits from a fraction ``F``) and
    entropy-code the bin indices with ``coder`` (``"rans"``, default, or ``"huffman"``, the source's; both
    lossless on the indices, so :func:`decode` returns the same tensor either way).

    Guarantee: every decoded value is within half a bin, ``(w_max - w_min) / 2^(N+1)``, of the original, up to the
    rounding of the arithmetic in the tensor's dtype (float32 for float16/bfloat16/float32, float64 for float64):
    a value within a few ulps of a bin boundary may land in the neighbouring bin, and the decoded value is rounded
    to the dtype, so the bound holds with a slack of ``4 eps(dtype) max(|w_min|, |w_max|)``.

    Deterministic: the same tensor and a generator in the same state give the same bytes.  With
    ``generator=None`` the entropy sample uses torch's global RNG (the bytes then depend on its state).

    Cost: O(n) vectorised passes (min/max, quantisation, one histogram) plus the rANS coder, which runs in compiled
    code (``constriction``); no per-element Python.  The tensor is copied to the CPU first.

    Raises ``UserError`` for a non-floating-point tensor, NaN or infinite values, or out-of-range ``c``, ``M``, ``F``.
    """
    if not isinstance(tensor, torch.Tensor):
        raise UserError(f"encode needs a torch.Tensor; got {type(tensor).__name__}.")
    if tensor.dtype not in _DTYPE_CODES:
        raise UserError(f"encode needs a floating-point tensor (float16, bfloat16, float32 or float64); "
                        f"got {tensor.dtype}.")
    _check_args(c, M, F)
    if coder not in CODERS:
        raise UserError(f"unknown coder {coder!r}; accepted: {', '.join(CODERS)}.")
    if tensor.ndim > _MAX_NDIM:
        raise UserError(f"encode takes tensors of at most {_MAX_NDIM} dimensions; got {tensor.ndim}.")
    shape, dtype = tuple(tensor.shape), tensor.dtype
    w = tensor.detach().reshape(-1).to("cpu", _work_dtype(dtype))
    n = w.numel()
    if n == 0:
        return Package(shape, dtype, 0, 0.0, 0.0, 0.0, np.zeros(1, np.int64), np.zeros(0, np.uint32), coder)
    w_min_t, w_max_t = torch.aminmax(w)
    w_min, w_max = float(w_min_t), float(w_max_t)
    if not (math.isfinite(w_min) and math.isfinite(w_max)):
        bad = int((~torch.isfinite(w)).sum())
        raise UserError(f"encode got a tensor with {bad} non-finite value(s) (NaN or inf); the codec quantises the "
                        f"range [min, max], which needs finite values.")
    if not math.isfinite(w_max - w_min):
        raise UserError(f"encode cannot quantise the range [{w_min:g}, {w_max:g}]: its width overflows float64; "
                        f"accepted are tensors whose max - min is finite.")
    w = w.to(_work_dtype(dtype, w_min, w_max))
    H = estimate_entropy(w, w_min, w_max, M, F, generator)
    N = bit_width(H, c, M)
    q = quantize_indices(w, w_min, w_max, N)
    counts = torch.bincount(q, minlength=2 ** N).numpy().astype(np.int64)
    if coder == "huffman":
        from . import huffman

        payload = huffman.encode(q.numpy(), counts)
    else:
        payload = _ans_encode(q.numpy(), counts)
    return Package(shape, dtype, N, w_min, w_max, H, counts, payload, coder)


def _model(counts: np.ndarray):
    import constriction

    # The decoder rebuilds the same model from the same integer counts, so both ends agree bit for bit.
    return constriction.stream.model.Categorical(counts.astype(np.float64) / counts.sum(), perfect=False)


def _ans_encode(symbols: np.ndarray, counts: np.ndarray) -> np.ndarray:
    import constriction

    if np.count_nonzero(counts) <= 1:  # one symbol: its index is known from the histogram, nothing to transmit
        return np.zeros(0, np.uint32)
    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(symbols, _model(counts))
    return coder.get_compressed().astype(np.uint32)


def _ans_decode(payload: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    import constriction

    nonzero = np.flatnonzero(counts)
    if len(nonzero) <= 1:
        return np.full(n, nonzero[0] if len(nonzero) else 0, dtype=np.int32)
    try:
        return constriction.stream.stack.AnsCoder(payload).decode(_model(counts), n)
    except Exception as exc:  # a corrupted stream: constriction raises its own error types
        raise UserError(f"compression package is malformed: the entropy-coded stream does not decode "
                        f"({exc}).") from None


def decode(package: Package, device: torch.device | str | None = None) -> torch.Tensor:
    """The tensor of bin centres ``w_min + (w_max - w_min)(i + 0.5) / 2^N``, in the package's shape and dtype.

    Cost: the rANS decoder (compiled) plus one vectorised pass.  Returns a new CPU tensor (or on ``device``).
    """
    if not isinstance(package, Package):
        raise UserError(f"decode needs a Package (from encode or Package.from_bytes); got {type(package).__name__}.")
    n = package.numel
    work = _work_dtype(package.dtype, package.w_min, package.w_max)
    if n == 0:
        return torch.empty(package.shape, dtype=package.dtype, device=device)
    if package.coder == "huffman":
        from . import huffman

        try:
            sym = huffman.decode(package.payload, package.counts, n)
        except ValueError as exc:
            raise UserError(f"compression package is malformed: {exc}") from None
    else:
        sym = _ans_decode(package.payload, package.counts, n)
    idx = torch.from_numpy(np.asarray(sym, dtype=np.int32))
    if package.w_max == package.w_min:
        w = torch.full((n,), package.w_min, dtype=torch.float64)
    else:
        # ((i + 0.5) / 2^N) is exact in [0, 1]; multiplying by the range last avoids overflow of range / 2^N.
        w = idx.to(work).add_(0.5).div_(2.0 ** package.n_bits).mul_(package.w_max - package.w_min).add_(package.w_min)
        # Rounding can push a centre a hair outside [w_min, w_max]; the original values never were.
        w.clamp_(package.w_min, package.w_max)
    return w.to(package.dtype).reshape(package.shape).to(device) if device is not None else \
        w.to(package.dtype).reshape(package.shape)
