"""GPU checks of this release's new paths (marked ``gpu``; skipped without CUDA): per-sample identities, the
codec, layer-wise memory accounting and a Hugging Face teleport on the model's device, each against the CPU."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond import zoo

HAS_CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA (torch.cuda.is_available() is False)")]


def test_per_sample_identities_on_cuda_match_cpu():
    from gradcond.probes import per_sample_stats

    torch.manual_seed(0)
    m = zoo.mlp(12, 4, depth=3, width=16).double()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (16,), generator=g)
    a = per_sample_stats(m, F.cross_entropy, (x, y))
    b = per_sample_stats(copy.deepcopy(m).cuda(), F.cross_entropy, (x.cuda(), y.cuda()))
    assert torch.allclose(b.gram.cpu(), a.gram, rtol=1e-10, atol=1e-14)
    assert torch.allclose(b.sq_norms.cpu(), a.sq_norms, rtol=1e-10, atol=1e-14)
    assert b.fallback == a.fallback == {}


def test_codec_round_trip_of_a_cuda_tensor_matches_the_cpu_bytes():
    from gradcond.compression import decode, encode

    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0))
    pc = encode(w, generator=torch.Generator().manual_seed(3))
    pg = encode(w.cuda(), generator=torch.Generator().manual_seed(3))
    assert pg.to_bytes() == pc.to_bytes()
    out = decode(pg)
    half_bin = (float(w.max()) - float(w.min())) / 2 ** pg.n_bits / 2
    slack = 4 * torch.finfo(w.dtype).eps * max(abs(pg.w_min), abs(pg.w_max))  # the codec's documented rounding slack
    assert float((out.cpu() - w).abs().max()) <= half_bin + slack


def test_layerwise_memory_accounting_on_cuda_is_below_full_backprop():
    from gradcond.train.layerwise import memory_accounting

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
                        nn.Flatten(), nn.Linear(32 * 16 * 16, 10)).cuda()
    x, y = torch.randn(64, 1, 16, 16, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    full = memory_accounting(net, (x, y))
    top = memory_accounting(net[2:], (x, y), frozen=net[:2])
    assert full.method != "saved-tensors"  # the allocator's peak on CUDA
    assert 0 < top.total < full.total


def test_hf_gpt2_teleport_on_cuda_keeps_the_logits():
    transformers = pytest.importorskip("transformers")
    from gradcond.graph import analyze
    from gradcond.teleport import random_cob, teleport

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32)
    m = transformers.GPT2LMHeadModel(cfg).double().cuda().eval()
    ids = torch.randint(0, 97, (2, 12), device="cuda")
    s = analyze(m, {"input_ids": ids})
    assert s.num_free > 0
    tp = teleport(m, random_cob(s, 0.9, "inter", torch.Generator().manual_seed(0)))
    with torch.no_grad():
        ya, yb = m(input_ids=ids).logits, tp(input_ids=ids).logits
    assert float((ya - yb).abs().max()) <= 1e-12 * float(ya.abs().max())
