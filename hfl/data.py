"""On-board data sources a task opens in one line: CSV, .npz, a folder of samples, a SQLite
table, readings arriving on the board's sensor bus (`live`, a bounded window on disk), plus
the public sets the built-in tasks use (scikit-learn's digits, MNIST's IDX files).

Each returns `hfl.task.Samples`, checked on the way in: a value that is not a number, NaN
or infinity, a wrong shape or an empty set is a `DataError` naming the file and the row,
so the agent sits the round out with that reason instead of training on it.

```python
def data(self, source):
    return hfl.data.csv(source.path, x=["ax", "ay", "az"], y="label")
```
"""

from __future__ import annotations

import csv as _csv
import gzip
import math
import sqlite3
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hfl.task import DataError, NoData, Samples, Source

if TYPE_CHECKING:
    from hfl.models.live import LiveWindow

Columns = str | Sequence[str]


def _names(cols: Columns | None) -> list[str]:
    return [] if cols is None else [cols] if isinstance(cols, str) else list(cols)


def _nonempty(samples: Samples, source: str) -> Samples:
    if len(samples) == 0:
        raise NoData(source, "no samples")
    return samples


def _target(values: np.ndarray, cols: Columns | None) -> np.ndarray | None:
    """y as the caller named it: one column gives a vector, a list gives N x k."""
    if cols is None:
        return None
    return values[:, 0] if isinstance(cols, str) else values


def csv(path: str | Path, x: Columns, y: Columns | None = None, *, delimiter: str = ",",
        dtype: type = np.float32) -> Samples:
    """Columns of a CSV file with a header row: `x` the input columns, `y` the target (a
    name gives a vector, a list an N x k array). Rows are counted from 1 after the header."""
    path = Path(path)
    xs, ys = _names(x), _names(y)
    try:
        with path.open(newline="") as f:
            reader = _csv.reader(f, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                raise DataError(str(path), "empty file (a header row is needed)")
            header = [h.strip() for h in header]
            missing = [c for c in xs + ys if c not in header]
            if missing:
                raise DataError(str(path), f"no column(s) {missing}; the header has {header}")
            idx = [header.index(c) for c in xs + ys]
            rows = []
            for n, row in enumerate(reader, start=1):
                if not row or all(not v.strip() for v in row):
                    continue  # a blank line
                try:
                    rows.append([float(row[i]) for i in idx])
                except (ValueError, IndexError):
                    raise DataError(str(path), f"not a number in {xs + ys}: {row!r}"[:200],
                                    row=n) from None
    except OSError as e:
        raise DataError(str(path), f"cannot read it: {e.strerror or e}") from None
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(idx))
    return _nonempty(Samples(values[:, :len(xs)].astype(dtype),
                             _target(values[:, len(xs):].astype(dtype), y), str(path)),
                     str(path))


def npz(path: str | Path, x: str = "x", y: str | None = "y") -> Samples:
    """Arrays `x` (N x ...) and `y` of an .npz file (no pickled objects, ever)."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = {n for n in (x, y) if n is not None} - set(f.files)
            if missing:
                raise DataError(str(path), f"missing array(s) {sorted(missing)}; it has "
                                f"{sorted(f.files)}")
            xa, ya = f[x], (f[y] if y is not None else None)
    except (OSError, ValueError) as e:
        raise DataError(str(path), f"not a readable .npz: {e}") from None
    return _nonempty(Samples(xa, ya, str(path)), str(path))


def folder(path: str | Path, pattern: str = "*.npy",
           load: Callable[[Path], np.ndarray] | None = None) -> Samples:
    """A folder of samples, one file each (`.npy` by default, or any file `load` reads):
    files in sub-folders are labelled by the sub-folder (classes in sorted order, y int64);
    files directly in `path` are unlabelled. Every sample must have the same shape."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(str(root), "not a folder")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files: list[tuple[Path, int | None]] = [(f, None) for f in sorted(root.glob(pattern))
                                             if f.is_file()]
    files += [(f, k) for k, c in enumerate(classes) for f in sorted((root / c).glob(pattern))
              if f.is_file()]
    if not files:
        raise DataError(str(root), f"no files matching {pattern!r}")
    if classes and any(k is None for _, k in files):
        raise DataError(str(root), "files both in the folder and in class sub-folders")
    read = load or (lambda f: np.load(f, allow_pickle=False))
    xs = []
    for f, _ in files:
        try:
            xs.append(np.asarray(read(f)))
        except Exception as e:  # any reader's failure names the file
            raise DataError(str(f), f"cannot read the sample: {e}") from None
        if xs[-1].shape != xs[0].shape:
            raise DataError(str(f), f"shape {xs[-1].shape}, the first sample's is "
                            f"{xs[0].shape}")
    y = np.array([k for _, k in files], np.int64) if classes else None
    return Samples(np.stack(xs), y, str(root))


def sqlite(path: str | Path, table: str, x: Columns, y: Columns | None = None, *,
           where: str = "", order_by: str = "", limit: int | None = None) -> Samples:
    """Columns of a SQLite table, read-only. `where` and `order_by` are SQL fragments of the
    task's own (never a job's); `limit` keeps the last rows of `order_by` when given."""
    path = Path(path)
    xs, ys = _names(x), _names(y)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise DataError(str(path), f"cannot open the database: {e}") from None
    where_ = f"{path.name}:{table}"
    try:
        known = [r[1] for r in db.execute("SELECT * FROM pragma_table_info(?)", (table,))]
        if not known:
            raise DataError(where_, "no such table")
        missing = [c for c in xs + ys if c not in known]
        if missing:
            raise DataError(where_, f"no column(s) {missing}; it has {known}")
        cols = ", ".join(_quote(c) for c in xs + ys)
        sql = f"SELECT {cols} FROM {_quote(table)}"
        sql += f" WHERE {where}" if where else ""
        sql += f" ORDER BY {order_by}" if order_by else ""
        sql += f" LIMIT {int(limit)}" if limit is not None else ""
        rows = db.execute(sql).fetchall()
    except sqlite3.Error as e:
        raise DataError(where_, f"query failed: {e}") from None
    finally:
        db.close()
    for n, row in enumerate(rows, start=1):
        if any(not isinstance(v, (int, float)) or not math.isfinite(v) for v in row):
            raise DataError(where_, f"not a finite number: {row!r}"[:200], row=n)
    values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(xs) + len(ys))
    return _nonempty(Samples(values[:, :len(xs)].astype(np.float32),
                             _target(values[:, len(xs):].astype(np.float32), y), where_),
                     where_)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# ---------------------------------------------------------------- the board's sensor bus

_windows: dict[Path, LiveWindow] = {}  # file → its started window, one per process


def live(source: Source, length: int, stride: int | None = None, *,
         int_labels: bool = False) -> Samples:
    """Readings arriving on a local MQTT topic, cut into windows of `length` consecutive
    readings, one every `stride` (`hfl.models.live.windows`): x is [M, width, length] (channels
    first, for a Conv1d), y the label of each window's last reading (windows without one
    are left out). The source's settings say where to listen and how much to keep:

        [agent.datasets.accel]
        topic = "sensors/accel"       # required
        host = "127.0.0.1"            # the board's own broker (plain MQTT), port 1883
        max_rows = 100000             # readings kept on disk, the newest
        max_age_s = 86400             # and none older than this
        file = "accel.sqlite"         # in the agent's state_dir; it survives restarts

    The window is started on the first call and kept for the process: readings go on
    arriving between rounds. A bus that is down is retried in the background (the agent
    trains on what the file holds meanwhile); an empty window is `NoData`."""
    from hfl.models.live import windows

    x, y, _ = live_window(source).snapshot()
    xs = windows(x, length, stride)
    if y is None:
        return _nonempty(Samples(xs, None, source.name), source.name)
    ys = windows(y, length, stride)[:, -1] if y.ndim == 1 else windows(y, length, stride)[..., -1]
    keep = np.isfinite(ys.reshape(len(ys), -1)).all(axis=1)
    ys = ys[keep].astype(np.int64) if int_labels else ys[keep]
    return _nonempty(Samples(xs[keep], ys, source.name), source.name)


def live_window(source: Source) -> LiveWindow:
    """The source's window, started on first use and kept for the process."""
    from hfl.models.live import LiveWindow  # paho and sqlite: only on boards that use it

    topic = source.get("topic")
    if not isinstance(topic, str) or not topic:
        raise DataError(source.name, "set topic, the MQTT topic the readings arrive on")
    path = source.state_dir / str(source.get("file", f"{source.name}.sqlite"))
    window = _windows.get(path)
    if window is None:
        try:
            window = LiveWindow(path, topic, host=str(source.get("host", "127.0.0.1")),
                                port=int(source.get("port", 1883)),
                                max_rows=int(source.get("max_rows", 100_000)),
                                max_age_s=source.get("max_age_s"))
            window.start(timeout=None)
        except Exception as e:  # a bad setting or an unusable file: name the source
            raise DataError(source.name, str(e)) from None
        _windows[path] = window
    return window


def stop_live() -> None:
    """Stop every live window of this process (an agent stopping, a test)."""
    while _windows:
        _windows.popitem()[1].stop()


# ---------------------------------------------------------------- public sets (built-in tasks)

_IDX_IMAGES = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS = 0x00000801  # unsigned bytes, 1 dimension


def digits() -> Samples:
    """scikit-learn's bundled 8x8 digits (1,797 samples), N x 1 x 8 x 8 in [0, 1]."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    return Samples(x, d.target.astype(np.int64), "digits")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """An unsigned-byte IDX array, checked against its header (zero-copy over the bytes)."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if len(raw) < 4:
        raise DataError(path.name, "too short for an IDX header")
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise DataError(path.name, f"bad IDX magic {got:#010x}, expected {magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(path.name, "truncated IDX header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(path.name, f"{len(raw)} bytes, header {dims} implies {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_file(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):  # the raw file is faster to read when both exist
        if (directory / name).is_file():
            return directory / name
    raise DataError(str(directory), f"neither {stem} nor {stem}.gz there")


def mnist(directory: str | Path, split: str = "train") -> Samples:
    """MNIST from the IDX files in `directory` (gzipped or not), N x 1 x 28 x 28 in [0, 1]."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(directory)
    img_path = _idx_file(directory, f"{prefix}-images-idx3-ubyte")
    lbl_path = _idx_file(directory, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, _IDX_IMAGES)
    labels = _read_idx(lbl_path, _IDX_LABELS)
    if len(images) != len(labels):
        raise DataError(str(directory), f"{img_path.name} has {len(images)} images, "
                        f"{lbl_path.name} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise DataError(lbl_path.name, f"label {labels.max()} is not a digit")
    x = np.divide(images, np.float32(255.0), dtype=np.float32)
    return Samples(x.reshape(len(images), 1, *images.shape[1:]), labels.astype(np.int64),
                   str(directory))
