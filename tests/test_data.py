"""Local data adapters, on tiny synthetic IDX and npz files (never the real MNIST)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from edge_agent import data


def _idx(magic: int, arr: np.ndarray) -> bytes:
    dims = np.array(arr.shape, dtype=">u4").tobytes()
    return magic.to_bytes(4, "big") + dims + arr.astype(np.uint8).tobytes()


def _write_mnist(directory: Path, prefix: str, n: int, *, gz: bool, seed: int = 0) -> tuple:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    for stem, blob in ((f"{prefix}-images-idx3-ubyte", _idx(0x803, images)),
                       (f"{prefix}-labels-idx1-ubyte", _idx(0x801, labels))):
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(blob))
        else:
            (directory / stem).write_bytes(blob)
    return images, labels


@pytest.mark.parametrize("gz", [True, False])
def test_load_mnist_reads_idx_files(tmp_path: Path, gz: bool) -> None:
    images, labels = _write_mnist(tmp_path, "t10k", 7, gz=gz)
    ds = data.load_mnist(tmp_path, "test")
    assert ds.x.shape == (7, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64 and ds.num_classes == 10
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0


def test_load_dispatches_mnist_train(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 5, gz=True)
    assert len(data.load("mnist", path=str(tmp_path))) == 5
    with pytest.raises(FileNotFoundError):
        data.load("mnist", path=str(tmp_path), split="test")


def test_load_mnist_rejects_bad_magic(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 3, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.*magic"):
        data.load_mnist(tmp_path, "train")


def test_load_mnist_rejects_truncated_and_mismatched_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 3, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-1])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte"):
        data.load_mnist(tmp_path, "train")
    _write_mnist(tmp_path, "train", 3, gz=False)
    lbl = tmp_path / "train-labels-idx1-ubyte"
    lbl.write_bytes(_idx(0x801, np.zeros(4, np.uint8)))
    with pytest.raises(ValueError, match="3 images.*4 labels"):
        data.load_mnist(tmp_path, "train")


def test_load_digits() -> None:
    ds = data.load("digits")
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert ds.num_classes == 10 and set(np.unique(ds.y)) == set(range(10))


def test_npz_round_trip_and_validation(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 4, 4))
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 2, 0, 1, 4]))
    ds = data.load("npz", path=tmp_path / "ok.npz")
    assert ds.x.shape == (6, 1, 4, 4) and ds.x.dtype == np.float32 and ds.num_classes == 5
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(ValueError, match="missing"):
        data.load_npz(tmp_path / "no_y.npz")
    np.savez(tmp_path / "short.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="short.npz"):
        data.load_npz(tmp_path / "short.npz")
    np.savez(tmp_path / "float_y.npz", x=x, y=np.zeros(6))
    with pytest.raises(ValueError, match="integers"):
        data.load_npz(tmp_path / "float_y.npz")


def test_load_rejects_unknown_source_and_missing_path() -> None:
    with pytest.raises(ValueError, match="digits"):
        data.load("cifar")
    with pytest.raises(ValueError, match="path"):
        data.load("mnist")
    with pytest.raises(ValueError, match="split"):
        data.load_mnist("/nonexistent", "val")


def test_split_and_subset_keep_classes() -> None:
    ds = data.Dataset(np.arange(40).reshape(10, 1, 2, 2), np.arange(10) % 5)
    train, test = data.split(ds, 0.3, seed=0)
    assert (len(train), len(test)) == (7, 3)
    # Together the two halves are exactly the original samples, each once, pairs intact.
    ids = np.concatenate([train.x[:, 0, 0, 0], test.x[:, 0, 0, 0]]).astype(int) // 4
    np.testing.assert_array_equal(np.sort(ids), np.arange(10))
    np.testing.assert_array_equal(np.concatenate([train.y, test.y]), ids % 5)
    again = data.split(ds, 0.3, seed=0)
    np.testing.assert_array_equal(again[1].y, test.y)
    small = ds.subset(np.array([0, 1]))
    assert small.num_classes == 5 and len(small) == 2
    with pytest.raises(ValueError):
        data.split(ds, 1.0, seed=0)


def test_dataset_validates() -> None:
    with pytest.raises(ValueError):
        data.Dataset(np.zeros((3, 1, 2, 2)), np.zeros(2, np.int64))
    with pytest.raises(ValueError):
        data.Dataset(np.zeros((2, 1, 2, 2)), np.array([0, -1]))
    with pytest.raises(ValueError):
        data.Dataset(np.zeros((2, 1, 2, 2)), np.array([0, 3]), classes=3)
    empty = data.Dataset(np.zeros((0, 1, 2, 2)), np.zeros(0, np.int64))
    assert len(empty) == 0 and empty.num_classes == 0
