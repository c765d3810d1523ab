"""Durable state for the services that must survive `kill -9`: atomic files and a checkpoint
store.

`write_atomic` replaces a file so that a reader or a crash sees the old bytes or the new,
never a mix: write a temporary file beside it, fsync, rename over, fsync the folder.

`StateStore` keeps named records, each a JSON document and a safetensors body, in one SQLite
file in WAL mode with `synchronous=FULL`: a `write` of several records is one transaction,
durable once it returns, and a crash or a full disk in the middle leaves every record as it
was before. Any failure to open or write is a `StateError` that names the folder and says
what to check.

A state folder belongs to one service. Opened with an `owner` ("aggregator site-a"), the
store holds an exclusive lock on `state.lock` in the folder for as long as it is open (the
kernel drops it when the process dies, `kill -9` included) and records the owner in the
database: a second service is refused while the first runs, and a different one even after.
It also counts the owner's starts there (`starts`), which its telemetry reports.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from hfl.wire import tensors as _tensors

# A record: a JSON document and named arrays (the body).
Record = tuple[dict[str, Any], dict[str, np.ndarray]]

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    key TEXT PRIMARY KEY, doc TEXT NOT NULL, body BLOB NOT NULL, updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
LOCK_NAME = "state.lock"


class StateError(Exception):
    """The state folder cannot be opened, read or written (permissions, full disk, a
    read-only mount). The message names the folder; nothing already stored is changed."""


def write_atomic(path: Path, data: bytes | bytearray, mode: int = 0o644) -> None:
    """Replace `path` with `data`: the old file or the new one, whatever happens."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # the rename itself is durable only once the folder is
    finally:
        os.close(dir_fd)


def _lock(folder: Path, owner: str) -> int:
    """An exclusive, non-blocking flock on the folder's lock file, which then names the
    holder and its pid (for the error another process gets); the descriptor holds it."""
    fd = os.open(folder / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 256).decode(errors="replace").split()
            who = " ".join(holder[:-1]) or "another service"
            pid = f"pid {holder[-1]}, " if len(holder) > 1 else ""
            raise StateError(f"state folder {folder} belongs to {who} ({pid}running); give "
                             f"this service ({owner}) its own state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{owner} {os.getpid()}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


def unusable(action: str, folder: Path, e: BaseException) -> StateError:
    """The error for a folder that failed us, with what to check."""
    return StateError(f"cannot {action} in {folder}: {e} (check that the service's user may "
                      "write there and that the disk has room)")


class StateStore:
    """Records by key in `folder/name`; `write` is all or nothing.

    `owner` (the service's role and id, "aggregator site-a") claims the folder: see the
    module's docstring. Without one (tests, tools that read a service's state) nothing is
    locked or checked."""

    def __init__(self, folder: Path, name: str = "state.sqlite", *,
                 owner: str | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / name
        self.owner = owner
        self.starts: int | None = None  # the owner's starts on this folder, this one included
        self._lock: int | None = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            if owner is not None:  # before the database: the folder's owner goes first
                self._lock = _lock(self.folder, owner)
            self.db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            self._unlock()
            raise unusable("open the state", self.folder, e) from None
        try:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")  # a commit is on disk when it returns
            self.db.executescript(SCHEMA)
            if owner is not None:
                self._claim(owner)
                self.starts = self._count_start()
        except sqlite3.Error as e:
            self.close()
            raise unusable("open the state", self.folder, e) from None
        except StateError:
            self.close()
            raise

    def _claim(self, owner: str) -> None:
        """Record `owner` in a new store; refuse a store another service wrote."""
        self.db.execute("INSERT OR IGNORE INTO meta VALUES ('owner', ?)", (owner,))
        (recorded,) = self.db.execute("SELECT value FROM meta WHERE key='owner'").fetchone()
        if recorded != owner:
            raise StateError(f"state folder {self.folder} was written by {recorded}; give "
                             f"this service ({owner}) its own state_dir")

    def _count_start(self) -> int | None:
        """Count this start (telemetry says a counter back at 0 is a restart, not a loss);
        None when it cannot be written: a full disk must not stop a service that can resume."""
        try:
            self.db.execute("INSERT INTO meta VALUES ('starts', '1') ON CONFLICT(key) DO "
                            "UPDATE SET value = CAST(value AS INTEGER) + 1")
            (n,) = self.db.execute("SELECT value FROM meta WHERE key='starts'").fetchone()
            return int(n)
        except (sqlite3.Error, ValueError):
            return None

    def close(self) -> None:
        """Close the database and let go of the folder."""
        self.db.close()
        self._unlock()

    def _unlock(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None

    def write(self, records: Mapping[str, Record | None]) -> None:
        """Store every record (None deletes its key) in one transaction."""
        rows = []
        for key, rec in records.items():
            if rec is not None:
                doc, arrays = rec
                # NaN and infinity are kept (Python's JSON reads them back).
                rows.append((key, json.dumps(doc), _tensors.dump(arrays)))
        gone = [(k,) for k, rec in records.items() if rec is None]
        now = time.time()
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany(
                    "INSERT INTO records VALUES (?,?,?,?) ON CONFLICT(key) DO UPDATE SET "
                    "doc=excluded.doc, body=excluded.body, updated=excluded.updated",
                    [(k, d, b, now) for k, d, b in rows])
                self.db.executemany("DELETE FROM records WHERE key=?", gone)
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise unusable("write the state", self.folder, e) from None

    def read(self) -> dict[str, Record]:
        """Every record, by key."""
        try:
            rows = self.db.execute("SELECT key, doc, body FROM records ORDER BY key").fetchall()
        except sqlite3.Error as e:
            raise unusable("read the state", self.folder, e) from None
        out: dict[str, Record] = {}
        for key, doc, body in rows:
            # Copies: the arrays become the machines' own, which they change in place.
            out[key] = (json.loads(doc), {n: a.copy() for n, a in _tensors.load(body).items()})
        return out


class Checkpointable(Protocol):
    """A state machine that names the records it changed and builds them on request."""

    changed: set[str]

    def record(self, key: str) -> Record | None: ...
    def restore(self, records: dict[str, Record]) -> None: ...
    def resume(self, now: float) -> list[Any]: ...


class Checkpointer:
    """The runner's side of checkpointing: restore a machine from its store at start, save
    the records it changed (all in one transaction), say what to send again on resuming.

    A `Node` given one acknowledges a message only once the records it changed are saved,
    and lets a machine's actions out only then (`hfl.runtime.node`)."""

    def __init__(self, machine: Checkpointable, store: StateStore,
                 resume: Callable[[float], list[Any]] | None = None) -> None:
        self.machine, self.store = machine, store
        self._resume = resume or machine.resume

    def load(self) -> int:
        """Restore the machine from the store; how many records there were."""
        records = self.store.read()
        try:
            self.machine.restore(records)
        except (KeyError, TypeError, ValueError) as e:  # pydantic's errors are ValueErrors
            raise StateError(f"the state in {self.store.folder} does not fit this version of "
                             f"hfl ({type(e).__name__}: {str(e)[:200]}): move it away to start "
                             "afresh") from None
        return len(records)

    def dirty(self) -> bool:
        return bool(self.machine.changed)

    def close(self) -> None:
        self.store.close()

    def save(self) -> None:
        """Write every changed record; on a StateError they stay marked for the next try."""
        keys = sorted(self.machine.changed)
        self.store.write({k: self.machine.record(k) for k in keys})
        self.machine.changed.difference_update(keys)

    def resume(self, now: float) -> list[Any]:
        return self._resume(now)
