"""A live data source on the board: sensor readings from a local MQTT topic, kept in a
bounded on-disk window that the agent trains on.

    window = LiveWindow("/var/lib/hfl/accel.db", "sensors/accel", max_rows=50_000,
                        max_age_s=3600)
    window.start()                 # raises LiveSourceError if the bus is not reachable
    x, y, t = window.snapshot()    # float32 [N, width], float32 [N] or None, float64 [N]
    xs = windows(x, 128, 64)       # [M, width, 128] for a 1-D CNN
    window.stop()

Payloads (one reading each; the format is decided by content, `format="f32"` declares raw):

- a JSON object ``{"t": 1718000000.5, "x": [0.01, -0.02, 0.98], "y": 2}``: `x` a list of
  numbers (required), `t` the reading's unix time (optional: the arrival time otherwise),
  `y` its label or target, a number or a list of numbers (optional; null means none);
  other keys are ignored;
- a bare JSON array of numbers: `x` alone;
- with ``format="f32"``: raw little-endian float32 bytes, `x` alone.

The first accepted reading fixes the width (or `width=`), the first labelled one the shape
of `y`; both are kept in the file. A reading that does not parse, has the wrong width or
label shape, a value that is not finite in float32, a time more than MAX_SKEW_S ahead or
already older than `max_age_s`, or more than `max_payload` bytes is refused and counted by
reason (`stats()["refused"]`), never stored, never raised.

Storage is the window's own SQLite file in WAL mode, one row per reading (time, float32
blobs). The bounds hold on disk: at most `max_rows` rows (the latest arrivals) and none
older than `max_age_s`, enforced once per written batch and on `snapshot`. Readings wait in
a bounded queue (`max_pending`) and are written in one transaction every `flush_every_s`
(fewer writes on an SD card); if the writer falls behind, the oldest pending readings are
dropped and counted. Only `snapshot` holds the whole window in memory.

Restarts: the rows stay in the file; the MQTT session is persistent (clean start off, a
session expiry, QoS 1) with a client id stable for this host, file and topic, so the broker
queues what arrives while the agent is down (up to its `max_queued_messages`). Readings are
acknowledged on receipt: a `kill -9` loses at most the pending ones (`flush_every_s` worth);
with synchronous=NORMAL a power cut may lose the last transactions, never the file.

`start(timeout=5.0)` connects at once and raises LiveSourceError, naming the source, if the
broker cannot be reached, refuses the client or the subscription within `timeout`;
`start(timeout=None)` starts offline and keeps retrying in the background (a sensor bus that
comes up after the agent). Either way paho reconnects with back-off once started.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import logging
import math
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from hfl.errors import Rejected

log = logging.getLogger("hfl.models.live")

FORMATS = ("json", "f32")
MAX_PAYLOAD = 64 * 1024  # bytes: a reading is a few numbers, not a file
MAX_SKEW_S = 300.0  # a reading's own time may be this far ahead of ours (clock drift)
BATCH = 512  # pending readings that wake the writer before flush_every_s
WAL_PAGES = 256  # checkpoint the WAL every 1 MiB (4 KiB pages) ...
WAL_LIMIT = 1 << 20  # ... and truncate it back to 1 MiB: the file stays bounded
SCHEMA = """
CREATE TABLE IF NOT EXISTS readings (id INTEGER PRIMARY KEY AUTOINCREMENT,  -- arrival order
                                     t REAL NOT NULL, x BLOB NOT NULL, y BLOB);
CREATE INDEX IF NOT EXISTS readings_t ON readings (t);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class LiveSourceError(RuntimeError):
    """The window's file cannot be opened or its broker cannot be reached."""


@dataclass(frozen=True)
class Reading:
    t: float
    x: np.ndarray  # float32 [width]
    y: np.ndarray | None  # float32 [] (a number) or [k]; None without a label


# --- parsing: pure functions ----------------------------------------------------------------

def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _floats(v: Any, what: str) -> np.ndarray:
    """A JSON number or list of numbers as float32, finite; Rejected otherwise."""
    if _is_number(v):
        values = [v]
    elif isinstance(v, list) and v and all(_is_number(e) for e in v):
        values = v
    else:
        raise Rejected("bad_shape", f"{what} must be a number or a non-empty list of numbers")
    try:
        a = np.array(values, dtype=np.float64)
    except OverflowError:  # a JSON integer beyond float64
        raise Rejected("not_finite", f"{what} overflows") from None
    with np.errstate(over="ignore"):
        a = a.astype(np.float32)
    if not np.isfinite(a).all():
        raise Rejected("not_finite", f"{what} holds NaN, inf or a value beyond float32")
    return a if isinstance(v, list) else a.reshape(())


def _json_fields(payload: bytes) -> tuple[Any, Any, Any]:
    """(t, x, y) of a JSON reading, None where absent."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8; absurdly deep nesting
        raise Rejected("unparseable", f"not JSON: {e}") from None
    if isinstance(doc, list):
        return None, doc, None
    if isinstance(doc, dict) and "x" in doc:
        return doc.get("t"), doc["x"], doc.get("y")
    raise Rejected("bad_shape", 'expected {"x": [...]} or an array of numbers')


def parse(payload: bytes, now: float, *, format: str = "json", width: int | None = None,
          y_shape: tuple[int, ...] | None = None, max_age_s: float | None = None,
          max_payload: int = MAX_PAYLOAD) -> Reading:
    """One reading from one payload, checked against the window's width and label shape
    (None: not fixed yet); raises Rejected with a counter key."""
    if len(payload) > max_payload:
        raise Rejected("too_large", f"{len(payload)} bytes > {max_payload}")
    if format == "f32":
        if not payload or len(payload) % 4:
            raise Rejected("unparseable", f"{len(payload)} bytes is not float32 values")
        t, x, y = None, np.frombuffer(payload, "<f4").astype(np.float32), None
        if not np.isfinite(x).all():
            raise Rejected("not_finite", "x holds NaN or inf")
    else:
        t, raw_x, raw_y = _json_fields(payload)
        if not isinstance(raw_x, list):
            raise Rejected("bad_shape", "x must be a list of numbers")
        x = _floats(raw_x, "x")
        y = None if raw_y is None else _floats(raw_y, "y")
    if width is not None and x.size != width:
        raise Rejected("wrong_width", f"{x.size} values, the window holds {width}")
    if y is not None and y_shape is not None and y.shape != y_shape:
        raise Rejected("bad_label", f"label of shape {y.shape}, the window holds {y_shape}")
    if t is None:
        t = now
    elif not _is_number(t) or not math.isfinite(t):
        raise Rejected("bad_time", "t must be a unix time in seconds")
    elif t > now + MAX_SKEW_S:
        raise Rejected("bad_time", f"t is {t - now:.0f} s ahead of this clock")
    if max_age_s is not None and t < now - max_age_s:
        raise Rejected("too_old", f"t is {now - t:.0f} s old, the window keeps {max_age_s} s")
    return Reading(float(t), x, y)


def windows(a: np.ndarray, length: int, stride: int | None = None) -> np.ndarray:
    """Cut a stream of readings [N, *rest] into [M, *rest, length]: `length` consecutive
    readings each, one window every `stride` readings (default `length`: no overlap), the
    last axis time. So [N, 3] accelerometer readings give [M, 3, 128] for a Conv1d, and
    `windows(y, 128, 64)[:, -1]` labels each window with its last reading's label.

    A copy (writable, contiguous, for torch.from_numpy); readings that do not fill a last
    window are left out. Windows may span a gap in time (a restart): cut `t` the same way
    to check."""
    stride = length if stride is None else stride
    if length < 1 or stride < 1:
        raise ValueError(f"length and stride must be >= 1, not {length} and {stride}")
    a = np.asarray(a)
    if a.ndim == 0:
        raise ValueError("windows needs a stream of readings (at least one axis)")
    if len(a) < length:
        return np.empty((0, *a.shape[1:], length), a.dtype)
    view = np.lib.stride_tricks.sliding_window_view(a, length, axis=0)
    return np.ascontiguousarray(view[::stride])


# --- storage --------------------------------------------------------------------------------

def _shape_text(shape: tuple[int, ...]) -> str:
    return json.dumps(list(shape))


class _Store:
    """The window's SQLite file. Not thread-safe: LiveWindow serialises calls."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
            try:
                mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
                if mode != "wal":
                    raise sqlite3.OperationalError(f"WAL mode unavailable (journal: {mode})")
                self.db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable across crashes
                self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
                self.db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
                self.db.executescript(SCHEMA)
                self.meta = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            except BaseException:
                self.db.close()
                raise
        except (OSError, sqlite3.Error) as e:
            raise LiveSourceError(f"live source file {path}: cannot open it: {e}") from e

    @property
    def width(self) -> int | None:
        return int(self.meta["width"]) if "width" in self.meta else None

    @property
    def y_shape(self) -> tuple[int, ...] | None:
        return tuple(json.loads(self.meta["y_shape"])) if "y_shape" in self.meta else None

    def write(self, readings: list[Reading], meta: dict[str, str], now: float,
              max_rows: int, max_age_s: float | None) -> None:
        """Insert `readings` and apply the bounds, in one transaction. The count bound is
        applied first, so the inserts reuse the freed pages and the file never holds more
        than max_rows rows; readings this batch would evict at once are not written."""
        readings = readings[-max_rows:]
        with self.db:
            for key, value in meta.items():
                if self.meta.get(key) != value:
                    self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))
                    self.meta[key] = value
            self._evict(len(readings), max_rows)
            self.db.executemany(
                "INSERT INTO readings (t, x, y) VALUES (?, ?, ?)",
                [(r.t, r.x.astype("<f4").tobytes(),
                  None if r.y is None else r.y.astype("<f4").tobytes()) for r in readings])
            self._age_out(now, max_age_s)

    def prune(self, now: float, max_rows: int, max_age_s: float | None) -> None:
        with self.db:
            self._evict(0, max_rows)
            self._age_out(now, max_age_s)

    def _evict(self, coming: int, max_rows: int) -> None:
        """Make room for `coming` rows under max_rows. Ids grow with arrival, so the latest
        arrivals are the top ids: one indexed DELETE, no count(*) scan."""
        top = self.db.execute("SELECT max(id) FROM readings").fetchone()[0] or 0
        if top + coming > max_rows:
            self.db.execute("DELETE FROM readings WHERE id <= ?", (top + coming - max_rows,))

    def _age_out(self, now: float, max_age_s: float | None) -> None:
        if max_age_s is not None:
            self.db.execute("DELETE FROM readings WHERE t < ?", (now - max_age_s,))

    def rows(self, since: float) -> list[tuple[float, bytes, bytes | None]]:
        return self.db.execute("SELECT t, x, y FROM readings WHERE t >= ? ORDER BY t, id",
                               (since,)).fetchall()

    def extent(self) -> tuple[int, float | None, float | None]:
        """(rows, oldest t, newest t)."""
        return self.db.execute("SELECT count(*), min(t), max(t) FROM readings").fetchone()

    def close(self) -> None:
        self.db.close()


def _arrays(rows: list[tuple[float, bytes, bytes | None]], width: int | None,
            y_shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Rows as (x [N, width], y [N, *y_shape] with NaN where unlabelled or None, t [N])."""
    n = len(rows)
    t = np.array([r[0] for r in rows], dtype=np.float64)
    x = np.frombuffer(b"".join(r[1] for r in rows), "<f4").astype(np.float32)
    x = x.reshape(n, width or 0)
    if y_shape is None:
        return x, None, t
    y = np.full((n, *y_shape), np.nan, dtype=np.float32)
    labelled = [i for i, r in enumerate(rows) if r[2] is not None]
    if labelled:
        values = np.frombuffer(b"".join(bytes(rows[i][2] or b"") for i in labelled), "<f4")
        y[labelled] = values.reshape(len(labelled), *y_shape)
    return x, y, t


# --- the live window ------------------------------------------------------------------------

def default_client_id(path: Path, topic: str) -> str:
    """Stable for this host, file and topic, so the persistent session survives restarts."""
    key = f"{socket.gethostname()}\0{path.resolve()}\0{topic}".encode()
    return f"hfl-live-{hashlib.sha256(key).hexdigest()[:16]}"


class LiveWindow:
    """Readings from an MQTT topic, in a bounded SQLite window at `path` (see the module)."""

    def __init__(self, path: str | os.PathLike[str], topic: str, *, host: str = "127.0.0.1",
                 port: int = 1883, width: int | None = None, format: str = "json",
                 max_rows: int = 100_000, max_age_s: float | None = None,
                 client_id: str | None = None, username: str | None = None,
                 password: str | None = None, ca: str | None = None, keepalive: int = 30,
                 session_expiry_s: int = 3600, max_payload: int = MAX_PAYLOAD,
                 max_pending: int = 10_000, flush_every_s: float = 0.5) -> None:
        if format not in FORMATS:
            raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
        if width is not None and width < 1:
            raise ValueError(f"width must be >= 1, not {width}")
        if max_rows < 1 or max_pending < 1:
            raise ValueError("max_rows and max_pending must be >= 1")
        if max_age_s is not None and max_age_s <= 0:
            raise ValueError(f"max_age_s must be > 0 or None, not {max_age_s}")
        self.path = Path(path)
        self.topic = topic
        self.host, self.port = host, port
        self.format = format
        self.max_rows, self.max_age_s = max_rows, max_age_s
        self.client_id = client_id or default_client_id(self.path, topic)
        self._auth = (username, password)
        self._ca = ca
        self._keepalive, self._session_expiry_s = keepalive, session_expiry_s
        self._max_payload = max_payload
        self._flush_every_s = flush_every_s
        self._width = width
        self._y_shape: tuple[int, ...] | None = None
        # readings between paho's thread and the writer; a full deque drops its oldest
        self._pending: collections.deque[Reading] = collections.deque(maxlen=max_pending)
        self._cond = threading.Condition()
        self._db_lock = threading.Lock()
        self._store: _Store | None = None
        self._client: mqtt.Client | None = None
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._answered = threading.Event()  # the first CONNACK failure or SUBACK
        self._connected = False
        self._last_error = ""
        self._refusal = ""  # why the broker refused the last connect, if it did
        self._counts = {"received": 0, "stored": 0, "dropped": 0}
        self._refused: collections.Counter[str] = collections.Counter()

    @property
    def source(self) -> str:
        return f"live source mqtt://{self.host}:{self.port}/{self.topic} -> {self.path}"

    # --- lifecycle ---

    def start(self, timeout: float | None = 5.0) -> LiveWindow:
        """Open the file, connect and subscribe. With a `timeout`, wait that long for the
        subscription and raise LiveSourceError if it fails; None: start offline, retrying."""
        if self._client is not None:
            raise RuntimeError(f"{self.source}: already started")
        self._open()
        self._stopping = False
        self._writer = threading.Thread(target=self._write_loop, name="hfl-live-writer",
                                        daemon=True)
        self._writer.start()
        client = self._client = self._make_client()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self._session_expiry_s
        if timeout is None:
            client.connect_async(self.host, self.port, self._keepalive, clean_start=False,
                                 properties=props)
            client.loop_start()
            return self
        client.connect_timeout = timeout
        try:
            client.connect(self.host, self.port, self._keepalive, clean_start=False,
                           properties=props)
        except OSError as e:
            self.stop()
            raise LiveSourceError(f"{self.source}: cannot reach the broker: {e}") from e
        client.loop_start()
        if not self._answered.wait(timeout) or not self._connected:
            # A refused CONNACK is followed by a disconnect: say the refusal, not that.
            why = self._refusal or self._last_error or f"no answer within {timeout} s"
            self.stop()
            raise LiveSourceError(f"{self.source}: not subscribed: {why}")
        return self

    def stop(self) -> None:
        """Disconnect (the session stays on the broker), write what is pending, close."""
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        with self._db_lock:
            if self._store is not None:
                self._flush_locked(time.time())
                self._store.close()
                self._store = None
        self._answered.clear()
        self._connected = False

    def __enter__(self) -> LiveWindow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- reading the window ---

    def snapshot(self, now: float | None = None) -> tuple[np.ndarray, np.ndarray | None,
                                                          np.ndarray]:
        """(x float32 [N, width], y float32 [N, *label shape] or None, t float64 [N]) of the
        readings in the window at `now` (default: the clock), oldest first; y is NaN where
        a reading had no label, None when none ever had. Pending readings are written and
        the bounds applied first."""
        now = time.time() if now is None else now
        with self._db_lock, self._opened() as store:
            self._flush_locked(now)
            store.prune(now, self.max_rows, self.max_age_s)
            since = -math.inf if self.max_age_s is None else now - self.max_age_s
            rows = store.rows(since)
            return _arrays(rows, self._width, self._y_shape)

    def stats(self) -> dict[str, Any]:
        """Counters since this object was made (received; stored: accepted into the window,
        including those the count bound evicted in the same batch; dropped: pending readings
        lost when the writer fell behind or a write failed; refused by reason; the last
        connection error) and what the file holds now (rows, oldest and newest t)."""
        with self._db_lock, self._opened() as store:
            rows, oldest, newest = store.extent()
        with self._cond:
            return {"source": self.source, "connected": self._connected, **self._counts,
                    "refused": dict(self._refused), "pending": len(self._pending),
                    "rows": rows, "oldest": oldest, "newest": newest, "width": self._width,
                    "last_error": self._last_error}

    # --- internals ---

    def _open(self) -> _Store:
        """Open the file (once) and adopt, or check, the width and label shape it holds."""
        if self._store is None:
            store = _Store(self.path)
            if store.width is not None and self._width not in (None, store.width):
                store.close()
                raise LiveSourceError(f"{self.source}: the file holds readings of width "
                                      f"{store.width}, not {self._width}: use another file "
                                      "or remove it")
            if self._width is None:
                self._width = store.width
            if self._y_shape is None:  # () is a shape: a scalar label
                self._y_shape = store.y_shape
            self._store = store
        return self._store

    @contextlib.contextmanager
    def _opened(self) -> Iterator[_Store]:
        """The open store, or the file opened for this call only (a stopped window)."""
        temporary = self._store is None
        try:
            yield self._open()
        finally:
            if temporary and self._store is not None:
                self._store.close()
                self._store = None

    def _make_client(self) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                             protocol=mqtt.MQTTv5)
        if self._auth[0] is not None:
            client.username_pw_set(*self._auth)
        if self._ca is not None:
            client.tls_set(ca_certs=self._ca)
        client.reconnect_delay_set(1, 30)
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        return client

    def _on_connect(self, client: mqtt.Client, _u: Any, _f: Any, reason: Any,
                    _p: Any) -> None:
        if reason.is_failure:
            self._last_error = self._refusal = f"the broker refused the connection: {reason}"
            log.warning("%s: %s", self.source, self._last_error)
            self._answered.set()
            return
        self._refusal = ""
        client.subscribe(self.topic, qos=1)

    def _on_subscribe(self, _c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any],
                      _p: Any) -> None:
        if any(r.is_failure for r in reasons):
            self._last_error = f"the broker refused the subscription: {reasons[0]}"
            log.warning("%s: %s", self.source, self._last_error)
        else:
            self._connected = True
        self._answered.set()

    def _on_disconnect(self, _c: mqtt.Client, _u: Any, _f: Any, reason: Any,
                       _p: Any) -> None:
        self._connected = False
        if reason.is_failure and not self._stopping:
            self._last_error = f"disconnected: {reason}"

    def _on_message(self, _c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        # An exception escaping here would kill paho's network thread: count it instead.
        try:
            self._receive(bytes(msg.payload), time.time())
        except Exception:
            log.exception("%s: a reading could not be handled", self.source)
            with self._cond:
                self._refused["error"] += 1

    def _receive(self, payload: bytes, now: float) -> None:
        with self._cond:
            self._counts["received"] += 1
        try:
            r = parse(payload, now, format=self.format, width=self._width,
                      y_shape=self._y_shape, max_age_s=self.max_age_s,
                      max_payload=self._max_payload)
        except Rejected as e:
            with self._cond:
                first = not self._refused[e.reason]
                self._refused[e.reason] += 1
            log.log(logging.WARNING if first else logging.DEBUG, "%s: refused a reading: %s",
                    self.source, e)
            return
        # Only paho's thread fixes these, so the first accepted reading decides.
        self._width = self._width or r.x.size
        if r.y is not None and self._y_shape is None:
            self._y_shape = r.y.shape
        with self._cond:
            if len(self._pending) == self._pending.maxlen:
                self._counts["dropped"] += 1
            self._pending.append(r)
            if len(self._pending) >= BATCH:
                self._cond.notify()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._stopping or len(self._pending) >= BATCH,
                                    timeout=self._flush_every_s)
                stopping = self._stopping
            with self._db_lock:
                self._flush_locked(time.time())
            if stopping:
                return

    def _flush_locked(self, now: float) -> None:
        """Write the pending readings (caller holds _db_lock and the store is open)."""
        if self._store is None:
            return
        with self._cond:
            batch = list(self._pending)
            self._pending.clear()
        if not batch:
            return
        meta = {"width": str(self._width)}
        if self._y_shape is not None:
            meta["y_shape"] = _shape_text(self._y_shape)
        try:
            self._store.write(batch, meta, now, self.max_rows, self.max_age_s)
        except sqlite3.Error:  # a full disk, say: count the loss, keep receiving
            log.exception("%s: writing %d readings failed", self.source, len(batch))
            key = "dropped"
        else:
            key = "stored"
        with self._cond:
            self._counts[key] += len(batch)

