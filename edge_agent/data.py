"""Local data adapters: what a board trains on, as float32 images and int64 labels."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SOURCES: tuple[str, ...] = ("digits", "mnist", "npz")

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension


@dataclass(frozen=True)
class Dataset:
    """x: float32, N x C x H x W (any N x ... accepted); y: int64 labels, N.

    `classes` fixes the class count; a subset keeps its parent's count, so a board whose
    shard lacks some labels still builds a model with the job's number of outputs.
    """

    x: np.ndarray
    y: np.ndarray
    classes: int | None = None

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y)
        if x.ndim < 2:
            raise ValueError(f"x must be N x ..., got shape {x.shape}")
        if y.ndim != 1 or len(y) != len(x):
            raise ValueError(f"y must be a vector of {len(x)} labels, got shape {y.shape}")
        if y.size and not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels must be integers, got {y.dtype}")
        y = y.astype(np.int64, copy=False)
        if y.size and y.min() < 0:
            raise ValueError("labels must be non-negative")
        if self.classes is not None and y.size and y.max() >= self.classes:
            raise ValueError(f"label {y.max()} out of range for {self.classes} classes")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def num_classes(self) -> int:
        if self.classes is not None:
            return self.classes
        return int(self.y.max()) + 1 if self.y.size else 0

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    def subset(self, idx: np.ndarray) -> Dataset:
        return Dataset(self.x[idx], self.y[idx], classes=self.num_classes or None)


def load_digits() -> Dataset:
    """scikit-learn's bundled 8x8 digits (1,797 samples), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return Dataset(x, d.target.astype(np.int64), classes=10)


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An unsigned-byte IDX array, checked against its header (zero-copy over the bytes)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4:
        raise ValueError(f"{path.name}: too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path.name}: bad IDX magic {got:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path.name}: truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path.name}: {len(raw)} bytes, header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):  # the raw file is faster to read when both exist
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz in {directory}")


def load_mnist(directory: str | Path, split: str = "train") -> Dataset:
    """MNIST from the IDX files in `directory` (gzipped or not), pixels / 255."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory)
    img_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    lbl_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IDX_IMAGES)
    labels = _read_idx(lbl_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise ValueError(f"{img_path.name} has {len(images)} images, "
                         f"{lbl_path.name} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_path.name}: label {labels.max()} is not a digit")
    x = np.divide(images, np.float32(255.0), dtype=np.float32)
    return Dataset(x.reshape(len(images), 1, *images.shape[1:]), labels.astype(np.int64),
                   classes=10)


def load_npz(path: str | Path) -> Dataset:
    """Arrays `x` (N x C x H x W, or N x H x W: a channel axis is added) and integer `y`."""
    with np.load(Path(path), allow_pickle=False) as f:
        missing = {"x", "y"} - set(f.files)
        if missing:
            raise ValueError(f"{path}: missing array(s) {sorted(missing)}")
        x, y = f["x"], f["y"]
    if not np.issubdtype(x.dtype, np.number) or x.dtype.kind == "c":
        raise ValueError(f"{path}: x must be real numbers, got {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: x has non-finite values")
    try:
        return Dataset(x, y)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def split(ds: Dataset, test_fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """A random (train, test) split; `test_fraction` of the samples (rounded) go to test.
    A fraction of 0 keeps everything for training (the test set is empty)."""
    if not 0.0 <= test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
    perm = np.random.default_rng(seed).permutation(len(ds))
    n_test = int(round(len(ds) * test_fraction))
    return ds.subset(np.sort(perm[n_test:])), ds.subset(np.sort(perm[:n_test]))


def load(source: str, *, path: str | Path | None = None, split: str = "train") -> Dataset:
    """Load a dataset by source name: "digits", "mnist" (a directory) or "npz" (a file)."""
    if source == "digits":
        return load_digits()
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}; known: {', '.join(SOURCES)}")
    if path is None:
        raise ValueError(f"data source {source!r} needs a path")
    if source == "mnist":
        return load_mnist(path, split)
    return load_npz(path)
