"""gradcond.utils.as_batches / as_batch: the one normaliser of "data" used by probes, teleports and the CoB optimiser."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from gradcond.data import load_dataset
from gradcond.utils import as_batch, as_batches


def _xy(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)


def test_every_accepted_form_gives_the_same_tensors():
    x, y = _xy()
    one = as_batches((x, y))
    assert len(one) == 1 and one[0][0] is x and one[0][1] is y  # no copy
    assert as_batches([x, y])[0][1] is y
    pairs = as_batches([(x[:4], y[:4]), (x[4:], y[4:])])
    assert [b[0].shape[0] for b in pairs] == [4, 2]
    loader = as_batches(DataLoader(TensorDataset(x, y), batch_size=4))
    assert torch.equal(torch.cat([b[0] for b in loader]), x) and torch.equal(torch.cat([b[1] for b in loader]), y)
    whole = as_batches(TensorDataset(x, y))
    assert len(whole) == 1 and torch.equal(whole[0][0], x)
    bundle = load_dataset("gaussian", n=20, dim=5, seed=0)
    assert as_batches(bundle)[0][0] is bundle.train.tensors[0]
    # extra tensors (weights, indices) are dropped: everything downstream reads (x, y)
    assert len(as_batches((x, y, torch.ones(6)))[0]) == 2


def test_inputs_alone_only_where_targets_are_optional():
    x, _ = _xy()
    assert as_batches(x, targets=False) == [(x,)]
    assert [len(b) for b in as_batches(DataLoader(TensorDataset(x), batch_size=4), targets=False)] == [1, 1]
    with pytest.raises(ValueError, match="needs targets"):
        as_batches(x)


def test_as_batch_reads_only_the_first_batch():
    x, y = _xy()
    seen = []

    def gen():
        for i in range(3):
            seen.append(i)
            yield x[2 * i: 2 * i + 2], y[2 * i: 2 * i + 2]

    b = as_batch(gen())
    assert torch.equal(b[0], x[:2]) and seen == [0]


@pytest.mark.parametrize("bad, match", [
    (42, "expected a batch \\(x, y\\) of tensors"),
    ([], "holds no batches; pass at least one"),
    ((torch.zeros(3, 2), torch.zeros(4)), "must share a leading batch dimension; got x \\(3, 2\\) and y \\(4,\\)"),
    ((torch.zeros(0, 2), torch.zeros(0)), "the batch is empty"),
    ([(torch.zeros(2, 2), torch.zeros(2)), "oops"], "every batch must be a tuple \\(x, y\\) of tensors, got str"),
])
def test_bad_data_is_one_clear_sentence(bad, match):
    with pytest.raises(ValueError, match=match):
        as_batches(bad)


def test_as_batch_errors():
    with pytest.raises(ValueError, match="expected a batch"):
        as_batch(42)
    with pytest.raises(ValueError, match="expected a batch"):
        as_batch([])
