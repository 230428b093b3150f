import gzip
import pickle

import numpy as np
import pytest
import torch

from gradcond import data
from gradcond.data import DataFileError, load_dataset, read_idx, write_idx

BUILTIN = {
    # name: (form, input_shape, num_outputs, task)
    "digits": ("flat", (64,), 10, "classification"),
    "mnist1d": ("flat", (40,), 10, "classification"),
    "gaussian": ("flat", (100,), 100, "regression"),
    "spirals": ("flat", (2,), 2, "classification"),
    "checkerboard": ("flat", (2,), 2, "classification"),
    "sine": ("flat", (1,), 1, "regression"),
}


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_builtin_shapes_labels_and_determinism(name):
    form, shape, k, task = BUILTIN[name]
    kw = {"n": 500} if name == "gaussian" else {}
    a = load_dataset(name, form=form, seed=3, **kw)
    b = load_dataset(name, form=form, seed=3, **kw)
    assert a.input_shape == shape and a.num_outputs == k and a.task == task
    for split_a, split_b in ((a.train, b.train), (a.test, b.test)):
        xa, ya = split_a.tensors
        xb, yb = split_b.tensors
        assert xa.shape[1:] == shape and len(xa) == len(ya) > 0
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.isfinite(xa).all()
        if task == "classification":
            assert ya.dtype == torch.long and ya.min() >= 0 and ya.max() < k
            assert len(torch.unique(ya)) == k or split_a is a.test
        else:
            assert ya.dtype == xa.dtype


def test_seed_changes_generated_data_but_not_digits_split():
    assert not torch.equal(load_dataset("spirals", seed=0).train.tensors[0], load_dataset("spirals", seed=1).train.tensors[0])
    assert torch.equal(load_dataset("digits", seed=0).test.tensors[0], load_dataset("digits", seed=1).test.tensors[0])


def test_digits_forms_are_reshapes_of_the_same_data():
    flat = load_dataset("digits", form="flat").train.tensors[0]
    img = load_dataset("digits", form="image").train.tensors[0]
    seq = load_dataset("digits", form="sequence").train.tensors[0]
    assert img.shape[1:] == (1, 8, 8) and seq.shape[1:] == (8, 8)
    assert torch.equal(img.reshape(len(img), -1), flat) and torch.equal(seq.reshape(len(seq), -1), flat)
    assert flat.min() >= 0 and flat.max() <= 1  # scaled from 0..16
    d = load_dataset("digits")
    assert len(d.train) + len(d.test) == 1797


def test_float64_and_bad_dtype():
    assert load_dataset("digits", dtype=torch.float64).train.tensors[0].dtype == torch.float64
    with pytest.raises(ValueError, match="dtype must be"):
        load_dataset("digits", dtype=torch.int32)


def test_gaussian_protocol():
    d = load_dataset("gaussian", n=2000, dim=100, seed=1)
    x, y = d.train.tensors
    torch.testing.assert_close(x.norm(dim=1), torch.full((2000,), 10.0), rtol=1e-5, atol=0)
    # labels: i.i.d. N(0, 1/dim) entries (seed 003 §I.2): sample variance within 3% of 1/100
    assert abs(float(y.double().var()) - 0.01) < 0.0003
    assert d.loss == "dot"


def test_checkerboard_and_sine_labels_match_their_definition():
    x, y = load_dataset("checkerboard").train.tensors
    assert x.min() >= -0.5 and x.max() <= 0.5
    expected = (np.floor((x[:, 0].double().numpy() + 0.5) * 8) + np.floor((x[:, 1].double().numpy() + 0.5) * 8)) % 2
    assert np.array_equal(y.numpy(), expected.astype(np.int64))
    d = load_dataset("checkerboard")
    assert len(d.train) + len(d.test) == 5000
    xs, ys = load_dataset("sine", dtype=torch.float64).train.tensors
    torch.testing.assert_close(ys, torch.sin(xs))
    assert xs.min() >= 0 and xs.max() <= 4 * np.pi


def test_mnist1d_is_generated_and_leaves_numpy_rng_alone():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    d = load_dataset("mnist1d", seed=7)
    assert np.array_equal(np.random.get_state()[1], state)
    assert len(d.train) == 4000 and len(d.test) == 1000
    with pytest.raises(ValueError, match="accepted: flat, sequence"):
        load_dataset("mnist1d", form="image")


def test_unknown_names_and_options():
    with pytest.raises(ValueError, match=r"unknown dataset 'nope'; accepted: .*digits"):
        load_dataset("nope")
    with pytest.raises(ValueError, match="unknown data form"):
        load_dataset("digits", form="cube")
    with pytest.raises(ValueError, match="unknown option"):
        load_dataset("spirals", colour=3)


def test_loaders_deterministic_order():
    d = load_dataset("digits")
    a = [y for _, y in d.loaders(100, seed=5)[0]]
    b = [y for _, y in d.loaders(100, seed=5)[0]]
    c = [y for _, y in d.loaders(100, seed=6)[0]]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))


# ---------------------------------------------------------------- file loaders
def _write_mnist_dir(root, gz: bool, n_train=6, n_test=4):
    rng = np.random.RandomState(0)
    suffix = ".gz" if gz else ""
    arrays = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        x = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        y = rng.randint(0, 10, size=n).astype(np.uint8)
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", x)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", y)
        arrays[split] = (x, y)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "kmnist"])
def test_idx_loader_roundtrip(tmp_path, gz, name):
    arrays = _write_mnist_dir(tmp_path, gz)
    d = load_dataset(name, form="image", root=tmp_path)
    x, y = d.train.tensors
    assert x.shape == (6, 1, 28, 28) and d.input_shape == (1, 28, 28)
    np.testing.assert_allclose(x[:, 0].numpy(), arrays["train"][0] / 255.0, rtol=1e-6)
    assert np.array_equal(y.numpy(), arrays["train"][1])
    assert load_dataset(name, form="flat", root=tmp_path).input_shape == (784,)


def test_idx_truncated_and_missing_files(tmp_path):
    _write_mnist_dir(tmp_path, gz=False)
    f = tmp_path / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(DataFileError, match=r"train-images-idx3-ubyte is truncated.*dims \(6, 28, 28\)"):
        load_dataset("mnist", root=tmp_path)
    f.write_bytes(b"\x00\x00")
    with pytest.raises(DataFileError, match="not an IDX file"):
        read_idx(f)
    f.unlink()
    with pytest.raises(DataFileError, match="missing data file .*train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)
    with pytest.raises(DataFileError, match="does not exist"):
        load_dataset("mnist", root=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="pass root=DIR"):
        load_dataset("mnist")


def test_idx_gz_truncated(tmp_path):
    x = np.zeros((3, 4, 4), np.uint8)
    p = tmp_path / "a.gz"
    with gzip.open(p, "wb") as fh:
        fh.write(bytes([0, 0, 8, 3]) + np.array([3, 4, 4], ">i4").tobytes() + x.tobytes()[:-1])
    with pytest.raises(DataFileError, match="truncated"):
        read_idx(p)


def _write_cifar(root, num_classes=10, n=5):
    rng = np.random.RandomState(1)
    key = b"labels" if num_classes == 10 else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"] if num_classes == 10 else ["train", "test"]
    written = {}
    for name in files:
        d = {b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), key: list(rng.randint(0, num_classes, n))}
        with open(root / name, "wb") as fh:
            pickle.dump(d, fh)
        written[name] = d
    return written


@pytest.mark.parametrize("k", [10, 100])
def test_cifar_loader(tmp_path, k):
    written = _write_cifar(tmp_path, k)
    d = load_dataset(f"cifar{k}", form="image", root=tmp_path)
    x, y = d.train.tensors
    first = "data_batch_1" if k == 10 else "train"
    assert x.shape == ((25 if k == 10 else 5), 3, 32, 32) and d.num_outputs == k
    np.testing.assert_allclose(x[0].numpy().ravel(), written[first][b"data"][0] / 255.0, rtol=1e-6)
    assert load_dataset(f"cifar{k}", form="sequence", root=tmp_path).input_shape == (32, 96)


def test_cifar_truncated_and_missing(tmp_path):
    _write_cifar(tmp_path)
    p = tmp_path / "data_batch_3"
    p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(DataFileError, match="data_batch_3 is truncated"):
        load_dataset("cifar10", root=tmp_path)
    p.unlink()
    with pytest.raises(DataFileError, match="missing data file .*data_batch_3"):
        load_dataset("cifar10", root=tmp_path)


def test_names_listed():
    assert set(BUILTIN) <= set(data.names())
