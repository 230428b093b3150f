"""The canonical Huffman coder beside rANS (issue 28 item 6; seed 002 ch. 3, Algorithms 1-2).

References computed here independently: a plain heap-built Huffman code (the textbook algorithm) for the optimal
total length, and the histogram's entropy for the bounds H <= L < H + 1.
"""

from __future__ import annotations

import heapq
import math

import numpy as np
import pytest
import torch

from gradcond.compression import Package, decode, encode
from gradcond.compression import huffman as hf
from gradcond.utils import UserError


def heap_huffman_lengths(counts) -> dict[int, int]:
    used = [i for i, c in enumerate(counts) if c > 0]
    if len(used) == 1:
        return {used[0]: 1}
    heap = [(int(counts[i]), k, [i]) for k, i in enumerate(used)]
    heapq.heapify(heap)
    depth = dict.fromkeys(used, 0)
    k = len(heap)
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        for s in a[2] + b[2]:
            depth[s] += 1
        k += 1
        heapq.heappush(heap, (a[0] + b[0], k, a[2] + b[2]))
    return depth


def entropy_bits(counts) -> float:
    p = np.asarray(counts, dtype=np.float64)
    p = p[p > 0] / p.sum()
    return float(-(p * np.log2(p)).sum())


@pytest.mark.parametrize("seed", range(60))
def test_code_lengths_are_optimal_and_the_round_trip_is_exact(seed):
    rng = np.random.default_rng(seed)
    K = int(rng.integers(2, 80))
    counts = rng.integers(0, 1000, K) * (rng.random(K) < 0.8)
    if seed % 3 == 0:
        counts = (rng.pareto(1.0, K) * 10).astype(np.int64)  # heavy tails: long codewords
    if np.count_nonzero(counts) < 2:
        counts[:2] = [3, 5]
    L = hf.code_lengths(counts)
    ref = heap_huffman_lengths(counts)
    used = np.flatnonzero(counts)
    assert L.max() <= hf.MAX_CODE_BITS and (L[counts == 0] == 0).all()
    assert sum(2.0 ** -L[i] for i in used) == pytest.approx(1.0, abs=1e-12)  # a complete prefix code
    cost, ref_cost = int((counts * L).sum()), sum(int(counts[i]) * d for i, d in ref.items())
    if max(ref.values()) <= hf.MAX_CODE_BITS:
        assert cost == ref_cost  # the Huffman optimum
    else:
        assert cost >= ref_cost  # the limit costs a little
    H = entropy_bits(counts)
    assert H - 1e-12 <= hf.expected_length(counts) < H + 1 + (cost - ref_cost) / counts.sum()
    # canonical: a prefix code (no codeword is a prefix of another) in (length, symbol) order
    codes = hf.canonical_codes(L)
    words = {(int(L[i]), int(codes[i])) for i in used}
    for la, ca in words:
        for lb, cb in words:
            if (la, ca) != (lb, cb) and la <= lb:
                assert (cb >> (lb - la)) != ca
    sym = rng.choice(used, size=int(rng.integers(1, 700)), p=counts[used] / counts.sum())
    c2 = np.bincount(sym, minlength=K)
    w = hf.encode(sym, c2)
    assert w.dtype == np.uint32
    bits = int((c2 * hf.code_lengths(c2)).sum()) if np.count_nonzero(c2) > 1 else 0  # one symbol: nothing sent
    assert len(w) == math.ceil(bits / 32)  # codewords + padding to a whole word
    assert np.array_equal(hf.decode(w, c2, len(sym)), sym)


def test_length_limit_on_fibonacci_counts():
    fib = [1, 1]
    while len(fib) < 26:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)
    assert max(heap_huffman_lengths(counts).values()) == 25  # unlimited Huffman: a 25-bit codeword
    L = hf.code_lengths(counts)
    assert L.max() == 16 and sum(2.0 ** -int(v) for v in L) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="do not fit a prefix code of at most 2-bit codewords"):
        hf.code_lengths(np.ones(5, dtype=np.int64), max_len=2)


def test_codec_huffman_round_trip_equals_rans_and_costs_between_h_and_h_plus_1():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(20_000, generator=g) * 0.05
    a = encode(w, generator=torch.Generator().manual_seed(1), coder="rans")
    b = encode(w, generator=torch.Generator().manual_seed(1), coder="huffman")
    assert b.coder == "huffman" and a.coder == "rans" and a.n_bits == b.n_bits
    assert np.array_equal(a.counts, b.counts)
    assert torch.equal(decode(a), decode(b))  # both lossless on the same indices
    back = Package.from_bytes(b.to_bytes())
    assert back.coder == "huffman" and torch.equal(decode(back), decode(b))
    H = entropy_bits(b.counts)  # entropy of the coded indices' histogram, bits per value
    assert H <= b.payload_bits_per_value < H + 1
    assert a.payload_bits_per_value < b.payload_bits_per_value  # rANS within a fraction of a percent of H
    assert a.payload_bits_per_value == pytest.approx(H, rel=0.01)


def test_peaked_histogram_huffman_pays_almost_a_bit_more():
    """One dominant bin (a peaked histogram): the entropy is far below 1 bit, but every Huffman codeword has at
    least 1 bit, while rANS follows the entropy."""
    w = torch.zeros(50_000)
    w[:200] = torch.linspace(1, 2, 200)  # 0.4 % of the values spread out, the rest in the bottom bin
    a = encode(w, c=1, M=4, generator=torch.Generator().manual_seed(0), coder="rans")
    b = encode(w, c=1, M=4, generator=torch.Generator().manual_seed(0), coder="huffman")
    H = entropy_bits(a.counts)
    assert H < 0.1
    assert b.payload_bits_per_value >= 1.0
    assert a.payload_bits_per_value < H + 0.05
    assert torch.equal(decode(a), decode(b))


def test_v1_rans_bytes_are_unchanged_and_huffman_corruption_is_refused():
    w = torch.randn(300, generator=torch.Generator().manual_seed(0))
    data = encode(w, generator=torch.Generator().manual_seed(0)).to_bytes()
    assert data[4] == 1  # rANS packages keep format version 1
    hb = bytearray(encode(w, generator=torch.Generator().manual_seed(0), coder="huffman").to_bytes())
    assert hb[4] == 2
    hb[-2] ^= 0x04
    with pytest.raises(UserError, match="^compression package is corrupted: its CRC-32 does not match"):
        Package.from_bytes(bytes(hb))
    with pytest.raises(UserError, match=r"^unknown coder 'lzw'; accepted: rans, huffman\.$"):
        encode(w, coder="lzw")


def test_asking_for_more_symbols_than_the_stream_holds_is_a_clear_error():
    counts = np.array([1, 1, 2])  # canonical codewords: symbol 2 -> 0, symbol 0 -> 10, symbol 1 -> 11
    words = hf.encode(np.array([2, 0, 1, 2]), counts)  # 6 bits + 26 zero bits of padding (26 more "2"s)
    assert hf.decode(words, counts, 30).tolist() == [2, 0, 1, 2] + [2] * 26
    with pytest.raises(ValueError, match=r"^the Huffman stream is malformed: symbol 30 of 41 is past its end\.$"):
        hf.decode(words, counts, 41)
