"""On-board data sources (hfl.data) and the built-in tasks' data, on tiny synthetic files
(never the real MNIST): every bad value is a DataError naming the file and the row."""

from __future__ import annotations

import gzip
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from hfl import data
from hfl.models.zoo import Mlp
from hfl.task import DataError, Source


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
    ds = data.mnist(tmp_path, "test")
    assert ds.x.shape == (7, 1, 28, 28) and ds.x.dtype == np.float32
    assert ds.y.dtype == np.int64
    np.testing.assert_allclose(ds.x[:, 0], images / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(ds.y, labels)
    assert ds.x.min() >= 0.0 and ds.x.max() <= 1.0


def test_the_builtin_tasks_read_mnist_through_their_source(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 5, gz=True)
    task = Mlp({"input_shape": [1, 28, 28], "num_classes": 10})
    assert len(task.data(Source("d", {"source": "mnist"}, tmp_path))) == 5
    with pytest.raises(DataError, match="t10k-images"):
        task.data(Source("d", {"source": "mnist", "split": "test"}, tmp_path))
    with pytest.raises(DataError, match="set digits, mnist or npz"):
        task.data(Source("d", {"source": "cifar"}, tmp_path))
    with pytest.raises(DataError, match="no path"):
        task.data(Source("d", {"source": "mnist"}))


def test_load_mnist_rejects_bad_magic(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 3, gz=False)
    bad = tmp_path / "train-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x03" + bad.read_bytes()[4:])
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*magic"):
        data.mnist(tmp_path, "train")


def test_load_mnist_rejects_truncated_and_mismatched_files(tmp_path: Path) -> None:
    _write_mnist(tmp_path, "train", 3, gz=False)
    img = tmp_path / "train-images-idx3-ubyte"
    img.write_bytes(img.read_bytes()[:-1])
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        data.mnist(tmp_path, "train")
    _write_mnist(tmp_path, "train", 3, gz=False)
    lbl = tmp_path / "train-labels-idx1-ubyte"
    lbl.write_bytes(_idx(0x801, np.zeros(4, np.uint8)))
    with pytest.raises(DataError, match="3 images.*4 labels"):
        data.mnist(tmp_path, "train")


def test_digits() -> None:
    ds = data.digits()
    assert ds.x.shape == (1797, 1, 8, 8) and ds.x.dtype == np.float32
    assert ds.x.min() == 0.0 and ds.x.max() == 1.0
    assert set(np.unique(ds.y)) == set(range(10))


def test_npz_and_the_builtin_tasks_checks(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((6, 4, 4))
    np.savez(tmp_path / "ok.npz", x=x, y=np.array([0, 1, 2, 0, 1, 4]))
    task = Mlp({"input_shape": [1, 4, 4], "num_classes": 5})
    ds = task.data(Source("d", {"source": "npz"}, tmp_path / "ok.npz"))
    assert ds.x.shape == (6, 1, 4, 4) and ds.x.dtype == np.float32  # a channel axis added
    with pytest.raises(DataError, match="label 4 is not a class of 3"):
        Mlp({"input_shape": [1, 4, 4], "num_classes": 3}).data(
            Source("d", {"source": "npz"}, tmp_path / "ok.npz"))
    with pytest.raises(DataError, match=r"shape \(4, 4\).*\(1, 3, 3\)"):
        Mlp({"input_shape": [1, 3, 3], "num_classes": 5}).data(
            Source("d", {"source": "npz"}, tmp_path / "ok.npz"))
    np.savez(tmp_path / "no_y.npz", x=x)
    with pytest.raises(DataError, match="missing"):
        data.npz(tmp_path / "no_y.npz")
    np.savez(tmp_path / "short.npz", x=x, y=np.zeros(5, np.int64))
    with pytest.raises(DataError, match="short.npz"):
        data.npz(tmp_path / "short.npz")
    np.savez(tmp_path / "float_y.npz", x=x, y=np.zeros(6))
    with pytest.raises(DataError, match="integers"):
        task.data(Source("d", {"source": "npz"}, tmp_path / "float_y.npz"))
    with pytest.raises(DataError, match="not a readable"):
        data.npz(tmp_path / "absent.npz")


def test_csv_columns_and_the_row_of_a_bad_value(tmp_path: Path) -> None:
    f = tmp_path / "points.csv"
    f.write_text("x, other ,y\n1,a,4\n\n2,b,7.5\n")
    s = data.csv(f, x=["x"], y="y")
    assert s.x.shape == (2, 1) and s.y.shape == (2,) and s.y.tolist() == [4.0, 7.5]
    assert data.csv(f, x="x", y=["y", "x"]).y.shape == (2, 2)
    f.write_text("x,y\n1,2\n3,oops\n")
    with pytest.raises(DataError, match=r"points.csv row 2: not a number"):
        data.csv(f, x=["x"], y="y")
    f.write_text("x,y\n1,2\nnan,3\n")
    with pytest.raises(DataError, match="row 1: x is not finite"):
        data.csv(f, x=["x"], y="y")
    with pytest.raises(DataError, match=r"no column\(s\) \['z'\]"):
        data.csv(f, x=["z"])
    f.write_text("x,y\n")
    with pytest.raises(DataError, match="no samples"):
        data.csv(f, x=["x"], y="y")
    with pytest.raises(DataError, match="cannot read"):
        data.csv(tmp_path / "absent.csv", x=["x"])


def test_a_folder_of_samples_labelled_by_sub_folder(tmp_path: Path) -> None:
    for label, n in (("walk", 2), ("idle", 3)):
        (tmp_path / label).mkdir()
        for i in range(n):
            np.save(tmp_path / label / f"{i}.npy", np.full((3, 4), i, np.float32))
    s = data.folder(tmp_path)
    assert s.x.shape == (5, 3, 4) and s.y.tolist() == [0, 0, 0, 1, 1]  # idle, walk: sorted
    np.save(tmp_path / "walk" / "odd.npy", np.zeros((2, 2)))
    with pytest.raises(DataError, match=r"odd.npy: shape \(2, 2\)"):
        data.folder(tmp_path)
    (tmp_path / "walk" / "odd.npy").write_bytes(b"junk")
    with pytest.raises(DataError, match="odd.npy: cannot read"):
        data.folder(tmp_path)
    with pytest.raises(DataError, match="no files"):
        data.folder(tmp_path, pattern="*.wav")


def test_a_sqlite_table_read_only(tmp_path: Path) -> None:
    db = tmp_path / "readings.db"
    with sqlite3.connect(db) as c:
        c.execute('CREATE TABLE r ("t" REAL, "temp" REAL, "hum" REAL, "label" INTEGER)')
        c.executemany("INSERT INTO r VALUES (?,?,?,?)",
                      [(i, 20 + i, 50 - i, i % 2) for i in range(10)])
    s = data.sqlite(db, "r", x=["temp", "hum"], y="label", order_by="t DESC", limit=4)
    assert s.x.shape == (4, 2) and s.x[0].tolist() == [29, 41] and s.y.tolist() == [1, 0, 1, 0]
    assert len(data.sqlite(db, "r", x=["temp"], where="t < 3")) == 3
    with pytest.raises(DataError, match="no such table"):
        data.sqlite(db, "nope", x=["temp"])
    with pytest.raises(DataError, match=r"no column\(s\) \['temp; DROP'\]"):
        data.sqlite(db, "r", x=["temp; DROP"])
    with sqlite3.connect(db) as c:
        c.execute("INSERT INTO r VALUES (11, NULL, 1, 0)")
    with pytest.raises(DataError, match="readings.db:r row 11: not a finite number"):
        data.sqlite(db, "r", x=["temp", "hum"], order_by="t")
