"""nn.Embedding as a layer of the null-space teleport (issue 19, item 4; seed 001 Algorithm 1, eqs. 3, 5, 11).

The representation matrix of an embedding is its one-hot input, so the kept space is spanned by the rows of the
tokens seen in the batch: the projected update zeroes those rows of the gradient and moves the others.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradcond.teleport import NullSpaceTeleport, supported_layers


class TinyLM(nn.Module):
    def __init__(self, vocab=13, d=6, tied=False, padding_idx=None):
        super().__init__()
        self.emb = nn.Embedding(vocab, d, padding_idx=padding_idx)
        self.mid = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def _loss(logits, ids):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _teleport_grad(model, ids, param):
    """G = d/dW (1/2 ||grad_theta L||^2) (eq. 4), computed independently with plain autograd."""
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.autograd.grad(_loss(model(ids), ids), params, create_graph=True)
    obj = 0.5 * sum((gi * gi).sum() for gi in g)
    return torch.autograd.grad(obj, [param])[0]


def test_one_step_equals_the_independent_projection():
    """One step on a tied embedding / head: eta * P with P = G (I - H^+ H) (the head's inputs H, eq. 11) and the
    rows of the seen tokens (and the padding row) zeroed (the embedding's one-hot inputs)."""
    torch.manual_seed(0)
    model = TinyLM(tied=True, vocab=13, d=8, padding_idx=12).double()
    ids = torch.tensor([[0, 3, 3, 5], [1, 0, 7, 2]])  # 8 tokens, rank of H below 8 features
    eta = 0.1
    G = _teleport_grad(model, ids, model.emb.weight).detach()
    with torch.no_grad():
        H = torch.tanh(model.mid(model.emb(ids))).reshape(-1, 8)
    P = G - G @ (torch.linalg.pinv(H) @ H)
    P[torch.unique(ids)] = 0
    P[12] = 0  # the padding row never moves
    w0 = model.emb.weight.detach().clone()
    NullSpaceTeleport(_loss, layers=["emb", "head"], eta=eta, steps=1).teleport(model, (ids, ids))
    torch.testing.assert_close(model.emb.weight.detach() - w0, eta * P, rtol=1e-8, atol=1e-13)
    assert float(P.abs().max()) > 1e-6


def test_untied_embedding_has_no_gradient_outside_the_seen_rows():
    """Without a tie the teleport objective's gradient lies in the seen rows (the source's assumption, Sec. 3.2):
    the projected update is zero and the embedding stays."""
    torch.manual_seed(3)
    model = TinyLM(vocab=13, d=6).double()
    ids = torch.tensor([[0, 3, 3, 5]])
    G = _teleport_grad(model, ids, model.emb.weight).detach()
    unseen = torch.tensor([i for i in range(13) if i not in (0, 3, 5)])
    assert float(G[unseen].abs().max()) == 0.0
    w0 = model.emb.weight.detach().clone()
    NullSpaceTeleport(_loss, layers=["emb"], eta=0.1, steps=1).teleport(model, (ids, ids))
    assert torch.equal(model.emb.weight.detach(), w0)


def test_tied_embedding_and_head_keep_the_batch_loss():
    torch.manual_seed(1)
    model = TinyLM(tied=True, vocab=17, d=8).double()
    ids = torch.randint(0, 17, (1, 5))  # 5 tokens < 8 features: the head keeps a null space
    with torch.no_grad():
        before = float(_loss(model(ids), ids))
    w0 = model.emb.weight.detach().clone()
    res = NullSpaceTeleport(_loss, layers=["emb", "head"], eta=0.05, steps=3).teleport(model, (ids, ids))
    with torch.no_grad():
        after = float(_loss(model(ids), ids))
    assert abs(after - before) <= 1e-12 * abs(before)
    moved = (model.emb.weight.detach() - w0).abs().amax(dim=1)
    assert float(moved.max()) > 0 and float(moved[torch.unique(ids)].max()) == 0
    assert res.batches[0].grad_norm_after > res.batches[0].grad_norm_before
    assert model.head.weight is model.emb.weight


def test_tied_head_does_not_move_when_every_row_is_seen():
    torch.manual_seed(2)
    model = TinyLM(tied=True, vocab=5, d=8).double()
    ids = torch.tensor([[0, 1, 2, 3, 4, 0]])  # every token seen: the embedding keeps all its rows
    w0 = model.emb.weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding block is skipped (empty null space) with a warning
        NullSpaceTeleport(_loss, layers=["emb", "head"], eta=0.05, steps=2).teleport(model, (ids, ids))
    assert torch.equal(model.emb.weight.detach(), w0)


def test_embedding_selection_rules():
    model = TinyLM(tied=True)
    assert {"emb", "head"} <= set(supported_layers(model))
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"layer 'emb' shares its weight with 'head' \(tied embeddings\); select "
                                         r"both"):
        NullSpaceTeleport(_loss, layers=["emb"]).teleport(model, (ids, ids))
    capped = nn.Sequential(nn.Embedding(5, 3, max_norm=1.0), nn.Linear(3, 5))
    assert "0" not in supported_layers(capped)
    with pytest.raises(ValueError, match=r"layer '0' \(Embedding\) is not supported by NullSpaceTeleport; supported: "
                                         r".*nn.Embedding \(without max_norm or sparse gradients\)"):
        NullSpaceTeleport("cross_entropy", layers=["0"]).teleport(capped, (ids[:, :1], ids[0, :1]))
