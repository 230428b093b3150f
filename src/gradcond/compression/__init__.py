"""Entropy-coded compression of weights and gradients for data-parallel training (seed 002, chapter 3).

* :func:`encode` / :func:`decode` / :class:`Package` -- the codec: entropy-estimated bit width, uniform quantisation,
  rANS coding of the bin indices (``constriction``) or the source's canonical Huffman code (``coder="huffman"``,
  :mod:`gradcond.compression.huffman`);
* :func:`entropy_compress_hook` / :class:`EntropyHookState` -- a ``DistributedDataParallel`` communication hook that
  all-gathers compressed gradient packages and averages them after decoding;
* :func:`sync_weights_compressed` -- the source's weight-synchronisation mode (local steps, compressed weights
  averaged across ranks); :class:`CompressedWeightSync` runs it every k steps as a trainer callback, and in a
  single process it quantises the weights in place (the source's one-process simulation).
"""

from .callbacks import CompressedWeightSync, CompressionHookMetrics
from .codec import CODERS, MAX_BITS, Package, bit_width, decode, encode, estimate_entropy, quantize_indices
from .ddp import EntropyHookState, SyncReport, entropy_compress_hook, sync_weights_compressed

__all__ = [
    "Package", "encode", "decode", "quantize_indices", "estimate_entropy", "bit_width", "MAX_BITS", "CODERS",
    "EntropyHookState", "entropy_compress_hook", "sync_weights_compressed", "SyncReport",
    "CompressedWeightSync", "CompressionHookMetrics",
]
