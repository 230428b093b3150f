"""Files read from disk never execute code (issue 20 §6): checkpoints are loaded with ``weights_only=True``,
CIFAR batches with an unpickler that admits only numpy array reconstruction.

Each malicious file carries a payload whose ``__reduce__`` calls ``os.mkdir(marker)``; a control load with plain
``pickle`` proves the payload is live (the marker appears), and the refused loads leave no marker."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from gradcond.data import DataFileError, load_dataset
from gradcond.data.files import UnsafePickleError
from gradcond.train import load_checkpoint
from gradcond.utils import UserError


class Payload:
    """Unpickling this calls ``os.mkdir(marker)``: a stand-in for ``os.system("...")``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _prove_live(path: Path, marker: Path) -> None:
    """Control: an unrestricted unpickler runs the payload (so the refusals above really prevented something)."""
    assert not marker.exists()
    torch.load(path, weights_only=False)  # what gradcond did before: runs the payload while loading
    assert marker.is_dir()


def _malicious_checkpoint(path: Path, marker: Path) -> None:
    """A checkpoint with every key fit() writes, one of which holds the payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "optimizer": Payload(marker), "epoch": 0, "step": 1, "rows": [], "n_metrics": 0,
                "n_events": 0, "rng": torch.get_rng_state()}, path)


def test_malicious_checkpoint_refused_by_load_checkpoint(tmp_path):
    marker, ck = tmp_path / "pwned", tmp_path / "last.pt"
    _malicious_checkpoint(ck, marker)
    with pytest.raises(UserError) as info:
        load_checkpoint(ck)
    assert str(info.value) == (f"checkpoint {ck} was refused: it holds a reference to posix.mkdir, which loading "
                               "could execute; gradcond only loads checkpoints of tensors and plain values - delete "
                               "it unless you wrote it with gradcond.")
    assert "weights_only" not in str(info.value)  # never the advice to load an untrusted file unsafely
    assert not marker.exists()
    _prove_live(ck, marker)


def test_malicious_checkpoint_refused_on_resume(run_cli, tmp_path):
    common = ["--quiet", "--set", "name=r", "--set", "train.epochs=2"]
    out = tmp_path / "out"
    rc, _, err = run_cli("run", "--out", str(out), *common, "--set", 'callbacks=[{name="stop_after", epochs=1}]')
    assert rc == 0, err
    marker = tmp_path / "pwned"
    ck = out / ".r.partial" / "checkpoints" / "last.pt"
    _malicious_checkpoint(ck, marker)  # someone else's run directory
    rc, _, err = run_cli("run", "--out", str(out), *common, "--resume")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert err.startswith(f"gradcond: error: checkpoint {ck} was refused: it holds a reference to posix.mkdir")
    assert "weights_only" not in err and "False" not in err
    assert not marker.exists()
    _prove_live(ck, marker)


def test_real_checkpoint_loads_with_weights_only(run_cli, tmp_path):
    """A demo checkpoint (monitor and teleport callback states, schedule, RNG states) needs no unsafe type."""
    rc, _, err = run_cli("run", "--out", str(tmp_path), "--quiet", "--set", "train.epochs=2",
                         "--set", "schedule.name=plateau")
    assert rc == 0, err
    for sub in ("demo", "demo/teleport"):
        ck = load_checkpoint(tmp_path / sub / "checkpoints" / "last.pt")
        assert ck["epoch"] == 1 and ck["step"] > 0 and ck["config"]["name"] == "demo"
        assert ck["schedule"] is not None and {c["type"].rsplit(".", 1)[-1] for c in ck["callbacks"]} >= {"Monitor"}
    assert any(c["type"].endswith("TeleportCallback") for c in
               load_checkpoint(tmp_path / "demo" / "teleport" / "checkpoints" / "last.pt")["callbacks"])


def test_damaged_checkpoint_is_one_line_error(tmp_path):
    ck = tmp_path / "last.pt"
    ck.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="is corrupt or truncated"):
        load_checkpoint(ck)
    torch.save({"just": "a dict"}, ck)
    with pytest.raises(UserError, match="is not a gradcond training checkpoint"):
        load_checkpoint(ck)


def _good_checkpoint_bytes() -> bytes:
    import io

    from gradcond.train.trainer import content_digest

    ck = {"model": {"w": torch.arange(300.0)}, "optimizer": {}, "epoch": 2, "step": 9}
    buf = io.BytesIO()
    torch.save({**ck, "digest": content_digest(ck)}, buf)  # as fit() writes it
    return buf.getvalue()


def test_truncated_checkpoint_says_corrupt_or_truncated(tmp_path):
    data = _good_checkpoint_bytes()
    ck = tmp_path / "last.pt"
    for cut in (len(data) // 4, len(data) // 2, len(data) - 10):
        ck.write_bytes(data[:cut])
        with pytest.raises(UserError) as info:
            load_checkpoint(ck)
        msg = str(info.value)
        assert msg.startswith(f"checkpoint {ck} is corrupt or truncated (") and "weights_only" not in msg
        assert msg.endswith("delete it (or the run) and train again without --resume.")


def test_every_content_changing_bit_flip_is_reported_corrupt(tmp_path):
    """Flip one bit at every byte: each file either loads to exactly the saved values (the flip hit a field nobody
    reads, e.g. a timestamp) or is refused as corrupt -- never loaded with changed values, never called unsafe."""
    data = _good_checkpoint_bytes()
    ck = tmp_path / "last.pt"
    corrupt = 0
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        ck.write_bytes(bytes(flipped))
        try:
            out = load_checkpoint(ck)
        except UserError as exc:
            assert "is corrupt or truncated" in str(exc), (i, str(exc))
            corrupt += 1
            continue
        assert torch.equal(out["model"]["w"], torch.arange(300.0)) and (out["epoch"], out["step"]) == (2, 9), i
    assert corrupt > len(data) // 2  # the payload bytes (tensor data, pickle) are covered by the CRCs


def test_corrupt_checkpoint_on_resume_is_one_line(run_cli, tmp_path):
    common = ["--quiet", "--set", "name=r", "--set", "train.epochs=2"]
    rc, _, err = run_cli("run", "--out", str(tmp_path), *common, "--set", 'callbacks=[{name="stop_after", epochs=1}]')
    assert rc == 0, err
    ck = tmp_path / ".r.partial" / "checkpoints" / "last.pt"
    data = bytearray(ck.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ck.write_bytes(bytes(data))
    rc, _, err = run_cli("run", "--out", str(tmp_path), *common, "--resume")
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"gradcond: error: checkpoint {ck} is corrupt or truncated (")


# ---- CIFAR pickles ----------------------------------------------------------------------------------------------
def _cifar_batch(n: int, seed: int) -> dict:
    rng = np.random.RandomState(seed)
    return {b"batch_label": b"training batch", b"labels": rng.randint(0, 10, n).tolist(),
            b"data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), b"filenames": [b"x.png"] * n}


def _write_cifar10(root: Path, protocol: int, evil: dict | None = None) -> dict:
    batches = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        d = _cifar_batch(4, i)
        if evil is not None and name == "data_batch_3":
            d.update(evil)
        batches[name] = d
        with open(root / name, "wb") as fh:
            pickle.dump(d, fh, protocol=protocol)
    return batches


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_load_with_the_restricted_unpickler(tmp_path, protocol):
    written = _write_cifar10(tmp_path, protocol)
    d = load_dataset("cifar10", form="image", root=tmp_path, dtype=torch.float64)
    x = np.concatenate([written[f"data_batch_{i}"][b"data"] for i in range(1, 6)]).reshape(-1, 3, 32, 32) / 255.0
    assert torch.equal(d.train.tensors[0], torch.from_numpy(x))
    assert d.train.tensors[1].tolist() == sum((written[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])


@pytest.mark.parametrize("evil_key", [b"data", b"labels"])
def test_malicious_cifar_batch_refused_code_not_run(tmp_path, evil_key):
    marker = tmp_path / "pwned"
    _write_cifar10(tmp_path, 4, evil={evil_key: Payload(marker)})
    with pytest.raises(UnsafePickleError) as info:
        load_dataset("cifar10", root=tmp_path)
    msg = str(info.value)
    assert msg == (f"{tmp_path / 'data_batch_3'} is not a plain CIFAR batch: it refers to posix.mkdir, which could run "
                   "code on load; refused (only numpy arrays, lists, dicts, bytes and numbers are accepted).")
    assert isinstance(info.value, DataFileError) and not marker.exists()
    with open(tmp_path / "data_batch_3", "rb") as fh:  # control: a bare pickle.load runs the payload
        pickle.load(fh, encoding="bytes")
    assert marker.is_dir()


def test_malicious_cifar_batch_refused_at_the_cli(run_cli, tmp_path):
    root, marker = tmp_path / "cifar", tmp_path / "pwned"
    root.mkdir()
    _write_cifar10(root, 2, evil={b"data": Payload(marker)})
    rc, _, err = run_cli("run", "--out", str(tmp_path / "out"), "--quiet", "--set", "data.name=cifar10",
                         "--set", f'data.options={{root="{root}"}}', "--set", "model.name=mlp")
    assert rc == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "is not a plain CIFAR batch: it refers to posix.mkdir" in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_cifar_pickle_of_other_globals_refused(tmp_path):
    """Even harmless-looking globals outside numpy's array reconstruction are refused (e.g. builtins.eval)."""
    import codecs

    class Encoded:
        def __reduce__(self):
            return (codecs.encode, ("x", "zlib_codec"))

    for name, obj in (("data_batch_1", {b"data": eval, b"labels": []}),
                      ("data_batch_2", {b"data": np.float64(1.0), b"labels": []}),
                      ("data_batch_3", {b"data": Encoded(), b"labels": []})):
        (tmp_path / name).write_bytes(pickle.dumps(obj, protocol=4))
    from gradcond.data.files import _unpickle

    with pytest.raises(UnsafePickleError, match="refers to builtins.eval"):
        _unpickle(tmp_path / "data_batch_1")
    assert isinstance(_unpickle(tmp_path / "data_batch_2")[b"data"], np.float64)  # numpy scalars are plain data
    with pytest.raises(UnsafePickleError, match="calls _codecs.encode with 'zlib_codec'"):  # latin-1 only
        _unpickle(tmp_path / "data_batch_3")
