"""hfl.models.live: readings parsed and refused by reason, cut into windows, and a LiveWindow over a
real Mosquitto (started on a free port) that keeps its bounds on disk and in memory, and
survives a restart and a kill -9."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from fleet.ops.broker import Broker, free_port
from hfl.errors import Rejected
from hfl.models import live
from hfl.models.live import LiveSourceError, LiveWindow, parse, windows

ROOT = Path(__file__).resolve().parents[1]
SENSOR = ROOT / "examples" / "sensors" / "accelerometer.py"
TOPIC = "sensors/accel"
TIMEOUT = 10.0
NOW = 1_700_000_000.0


# --- parsing and windows, no broker ---------------------------------------------------------

def test_parse_reads_the_three_formats() -> None:
    r = parse(b'{"t": 1699999999.5, "x": [1, 2.5, -3], "y": 2, "note": "ignored"}', NOW)
    assert (r.t, r.x.tolist(), r.y.shape, float(r.y)) == (1699999999.5, [1, 2.5, -3], (), 2)
    assert r.x.dtype == np.float32
    bare = parse(b"[0.5, 0.25]", NOW)
    assert (bare.t, bare.x.tolist(), bare.y) == (NOW, [0.5, 0.25], None)
    listed = parse(b'{"x": [1], "y": [0.5, 1.5], "t": null}', NOW)
    assert (listed.t, listed.y.tolist()) == (NOW, [0.5, 1.5])
    raw = parse(struct.pack("<3f", 1.0, -2.0, 0.5), NOW, format="f32")
    assert raw.x.tolist() == [1.0, -2.0, 0.5] and raw.y is None


@pytest.mark.parametrize(("payload", "kw", "reason"), [
    (b"not json", {}, "unparseable"),
    (b"\xff\xfe\xfd", {}, "unparseable"),
    (b"[" * 100_000, {"max_payload": 1 << 20}, "unparseable"),
    (b'"text"', {}, "bad_shape"),
    (b'{"y": 1}', {}, "bad_shape"),
    (b'{"x": 3}', {}, "bad_shape"),
    (b"[]", {}, "bad_shape"),
    (b'[1, "2"]', {}, "bad_shape"),
    (b"[1, true]", {}, "bad_shape"),
    (b"[1, [2]]", {}, "bad_shape"),
    (b"[1, NaN]", {}, "not_finite"),
    (b"[1, Infinity]", {}, "not_finite"),
    (b"[1e39]", {}, "not_finite"),  # finite in float64, not in float32
    (b"[1" + b"0" * 400 + b"]", {}, "not_finite"),
    (b'{"x": [1], "y": NaN}', {}, "not_finite"),
    (b"[1, 2]", {"width": 3}, "wrong_width"),
    (b'{"x": [1], "y": [1, 2]}', {"y_shape": ()}, "bad_label"),
    (b'{"x": [1], "y": "cat"}', {}, "bad_shape"),
    (b'{"x": [1], "t": "noon"}', {}, "bad_time"),
    (b'{"x": [1], "t": 1e400}', {}, "bad_time"),
    (f'{{"x": [1], "t": {NOW + 3600}}}'.encode(), {}, "bad_time"),
    (f'{{"x": [1], "t": {NOW - 100}}}'.encode(), {"max_age_s": 60}, "too_old"),
    (b"[" + b"1," * 40_000 + b"1]", {}, "too_large"),
    (b"\x00\x00\x80", {"format": "f32"}, "unparseable"),
    (struct.pack("<2f", 1.0, math.nan), {"format": "f32"}, "not_finite"),
])
def test_parse_refuses_by_reason(payload: bytes, kw: dict, reason: str) -> None:
    with pytest.raises(Rejected) as e:
        parse(payload, NOW, **kw)
    assert e.value.reason == reason


def test_windows_cut_a_stream_channels_first() -> None:
    x = np.arange(20 * 3, dtype=np.float32).reshape(20, 3)  # 20 readings of 3 axes
    w = windows(x, 8, 4)
    assert w.shape == (4, 3, 8)  # starts 0, 4, 8, 12; the last 4 readings fill no window
    assert w[1, 2].tolist() == x[4:12, 2].tolist()  # window 1, axis z, time last
    assert w.flags.writeable and w.flags.c_contiguous
    assert windows(x, 5).shape == (4, 3, 5)  # default stride: no overlap
    y = np.arange(20)
    assert windows(y, 8, 4)[:, -1].tolist() == [7, 11, 15, 19]  # each window's last label
    assert windows(x, 21).shape == (0, 3, 21)
    with pytest.raises(ValueError):
        windows(x, 0)


# --- over a real broker ---------------------------------------------------------------------

def wait_for(what: Callable[[], bool], timeout: float = TIMEOUT, message: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting: {message}")
        time.sleep(0.02)


@contextmanager
def publisher(b: Broker) -> Iterator[mqtt.Client]:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect(b.host, b.port)
    c.loop_start()
    try:
        yield c
    finally:
        c.disconnect()
        c.loop_stop()


def publish(c: mqtt.Client, payloads: Sequence[bytes | str], topic: str = TOPIC) -> None:
    """QoS 1, at most 200 in flight (no loss at the broker), all acknowledged on return."""
    info = None
    for i, p in enumerate(payloads):
        info = c.publish(topic, p, qos=1)
        if i % 200 == 199:
            info.wait_for_publish(TIMEOUT)
    if info is not None:
        info.wait_for_publish(TIMEOUT)


def reading(i: int, t: float | None = None, width: int = 3) -> str:
    """x is [i, i, i], or [i, 0, 0, ...] when wide; y is i % 3."""
    x = [float(i)] * 3 if width == 3 else [float(i)] + [0.0] * (width - 1)
    doc: dict = {"x": x, "y": i % 3}
    if t is not None:
        doc["t"] = t
    return json.dumps(doc)


def window(b: Broker, path: Path, **kw: object) -> LiveWindow:
    return LiveWindow(path, TOPIC, host=b.host, port=b.port, flush_every_s=0.05,
                      **kw)  # type: ignore[arg-type]


def stored(w: LiveWindow, n: int) -> None:
    wait_for(lambda: w.stats()["stored"] >= n, message=f"{n} readings stored: {w.stats()}")


def rows_on_disk(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT count(*) FROM readings").fetchone()[0]


def file_bytes(path: Path) -> tuple[int, int]:
    """(the database file, its WAL) in bytes."""
    wal = path.with_name(path.name + "-wal")
    return path.stat().st_size, wal.stat().st_size if wal.exists() else 0


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.broker
def test_readings_arrive_in_order_with_their_labels(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "accel.db"  # parent folders are created
    t0 = time.time() - 30  # all before the arrival time of the last
    with window(broker, path) as w, publisher(broker) as c:
        publish(c, [reading(i, t0 + i) for i in range(20)])
        publish(c, ["[7, 8, 9]"])  # no time: its arrival time; no label: NaN
        stored(w, 21)
        x, y, t = w.snapshot()
        s = w.stats()
    assert x.shape == (21, 3) and x.dtype == np.float32
    assert x[:20, 0].tolist() == list(range(20)) and x[20].tolist() == [7, 8, 9]
    assert t[:20].tolist() == [t0 + i for i in range(20)] and t[20] > t0 + 19
    assert y is not None and y[:20].tolist() == [i % 3 for i in range(20)] and np.isnan(y[20])
    assert (s["received"], s["stored"], s["rows"], s["refused"], s["dropped"]) == \
        (21, 21, 21, {}, 0)
    assert (s["oldest"], s["newest"], s["width"]) == (t0, t[20], 3)


@pytest.mark.broker
def test_raw_float32_readings(broker: Broker, tmp_path: Path) -> None:
    with window(broker, tmp_path / "raw.db", format="f32") as w, publisher(broker) as c:
        publish(c, [np.array([i, -i], "<f4").tobytes() for i in range(5)] + [b"\x00" * 12])
        wait_for(lambda: w.stats()["received"] == 6)
        x, y, _ = w.snapshot()
        s = w.stats()
    assert x.tolist() == [[i, -i] for i in range(5)] and y is None
    assert s["refused"] == {"wrong_width": 1}


@pytest.mark.broker
def test_the_count_bound_holds_on_disk(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "count.db"
    width, max_rows = 256, 100  # 1 KiB rows: 10x more readings write 3 MB through the file
    with window(broker, path, max_rows=max_rows) as w, publisher(broker) as c:
        publish(c, [reading(i, width=width) for i in range(300)])
        stored(w, 300)
        publish(c, [reading(i, width=width) for i in range(300, 3300)])
        stored(w, 3300)
        assert rows_on_disk(path) == max_rows
        db_bytes, wal_bytes = file_bytes(path)
        x, _, _ = w.snapshot()
    assert x[:, 0].tolist() == list(range(3200, 3300))  # the latest 100, oldest first
    # freed pages are reused and the WAL restarts after each checkpoint
    assert db_bytes <= 2 * max_rows * width * 4 + (64 << 10), db_bytes
    assert wal_bytes <= live.WAL_LIMIT + (live.WAL_PAGES << 12), wal_bytes


@pytest.mark.broker
def test_the_age_bound_holds_on_disk(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "age.db"
    with window(broker, path, max_age_s=1.0) as w, publisher(broker) as c:
        publish(c, [reading(i) for i in range(30)])
        stored(w, 30)
        time.sleep(1.2)  # the first 30 age out ...
        publish(c, [reading(i) for i in range(30, 330)])  # ... as 10x more arrive
        stored(w, 330)
        assert rows_on_disk(path) == 300
        publish(c, [reading(0, time.time() - 5)])  # already too old: never stored
        wait_for(lambda: w.stats()["refused"] == {"too_old": 1})
        x, _, _ = w.snapshot()
        assert x[:, 0].tolist() == list(range(30, 330))
        later, _, _ = w.snapshot(now=time.time() + 2)  # all aged out, and deleted
        assert later.shape == (0, 3) and rows_on_disk(path) == 0


@pytest.mark.broker
def test_bad_readings_are_refused_by_reason_and_never_stored(broker: Broker,
                                                            tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    bad = [b"\x00garbage", b"[1, 2]", b"[1, 2, NaN]", b'{"x": [1, 2, 1e39]}', b'{"y": 1}',
           b"[" + b"1," * 40_000 + b"1]", b'{"x": [1, 2, 3], "y": [1, 2]}',
           json.dumps({"x": [1, 2, 3], "t": time.time() + 86_400})]
    reasons = {"unparseable": 1, "wrong_width": 1, "not_finite": 2, "bad_shape": 1,
               "too_large": 1, "bad_label": 1, "bad_time": 1}
    with window(broker, path) as w, publisher(broker) as c:
        publish(c, [reading(1)])  # width 3, scalar labels
        publish(c, bad)
        publish(c, [reading(2)])
        wait_for(lambda: w.stats()["received"] == len(bad) + 2)
        x, y, _ = w.snapshot()
        s = w.stats()
    assert s["refused"] == reasons and s["stored"] == 2
    assert x[:, 0].tolist() == [1, 2] and y is not None and y.tolist() == [1, 2]
    assert rows_on_disk(path) == 2


@pytest.mark.broker
def test_a_writer_that_falls_behind_drops_the_oldest_pending(broker: Broker,
                                                              tmp_path: Path) -> None:
    w = LiveWindow(tmp_path / "behind.db", TOPIC, host=broker.host, port=broker.port,
                   max_pending=10, flush_every_s=600)  # the writer never wakes on its own
    with w, publisher(broker) as c:
        publish(c, [reading(i) for i in range(50)])
        wait_for(lambda: w.stats()["received"] == 50)
        s = w.stats()
        x, _, _ = w.snapshot()  # writes what is pending
    assert (s["pending"], s["dropped"], s["rows"]) == (10, 40, 0)
    assert x[:, 0].tolist() == list(range(40, 50))


@pytest.mark.broker
def test_an_error_while_handling_a_reading_is_counted_not_raised(
        broker: Broker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = live.parse

    def flaky(payload: bytes, *a: object, **kw: object) -> live.Reading:
        if payload == b"[6, 6, 6]":
            raise RuntimeError("a bug")
        return real(payload, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(live, "parse", flaky)
    with window(broker, tmp_path / "err.db") as w, publisher(broker) as c:
        publish(c, ["[6, 6, 6]", reading(1)])
        stored(w, 1)  # paho's thread lived on
        s = w.stats()
    assert s["refused"] == {"error": 1} and s["rows"] == 1


@pytest.mark.broker
def test_the_window_survives_a_restart_and_the_session_queues(broker: Broker,
                                                             tmp_path: Path) -> None:
    path = tmp_path / "restart.db"
    with window(broker, path, max_rows=50) as w, publisher(broker) as c:
        publish(c, [reading(i) for i in range(60)])
        stored(w, 60)
    again = window(broker, path, max_rows=50)
    x, _, _ = again.snapshot()  # not started: reads the file
    assert x[:, 0].tolist() == list(range(10, 60))
    with publisher(broker) as c:
        publish(c, [reading(i) for i in range(60, 65)])  # while the agent is down
    with again, publisher(broker) as c:
        publish(c, [reading(65)])
        wait_for(lambda: again.stats()["rows"] == 50 and
                 again.snapshot()[0][-1, 0] == 65)
        x, y, _ = again.snapshot()
    assert x[:, 0].tolist() == list(range(16, 66))  # the queued 5 were kept too
    assert y is not None and y.tolist() == [i % 3 for i in range(16, 66)]
    with pytest.raises(LiveSourceError, match="width 3, not 4"):
        window(broker, path, width=4).start()


CHILD = """
import sys, time
from hfl.models.live import LiveWindow
w = LiveWindow(sys.argv[1], "sensors/accel", port=int(sys.argv[2]), flush_every_s=0.05)
w.start()
print("ready", flush=True)
while w.stats()["stored"] < int(sys.argv[3]):
    time.sleep(0.02)
print("stored", flush=True)
time.sleep(60)
"""


@pytest.mark.broker
def test_the_window_survives_a_kill_9(broker: Broker, tmp_path: Path) -> None:
    path = tmp_path / "killed.db"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(broker.port), "40"],
                             stdout=subprocess.PIPE, text=True, cwd=ROOT,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        with publisher(broker) as c:
            publish(c, [reading(i) for i in range(40)])
        assert child.stdout.readline().strip() == "stored"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(TIMEOUT)
    assert child.returncode == -signal.SIGKILL
    x, y, _ = LiveWindow(path, TOPIC).snapshot()
    assert x[:, 0].tolist() == list(range(40)) and y is not None


@pytest.mark.broker
def test_start_names_the_source_when_it_cannot(broker: Broker, tmp_path: Path) -> None:
    nobody = free_port()
    with pytest.raises(LiveSourceError, match=f"mqtt://127.0.0.1:{nobody}/{TOPIC}.*reach"):
        LiveWindow(tmp_path / "a.db", TOPIC, port=nobody).start(timeout=2)
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(LiveSourceError, match="dir.db: cannot open"):
        window(broker, tmp_path / "dir.db").start()
    (tmp_path / "junk.db").write_bytes(b"not a database at all" * 100)
    with pytest.raises(LiveSourceError, match="junk.db: cannot open"):
        window(broker, tmp_path / "junk.db").start()


@pytest.mark.broker
def test_a_password_protected_bus(mosquitto: str, tmp_path: Path) -> None:
    passwords = tmp_path / "passwd"
    tool = shutil.which("mosquitto_passwd")  # in the mosquitto package, next to its client
    assert tool, "mosquitto_passwd is missing (it comes with mosquitto)"
    subprocess.run([tool, "-b", "-c", str(passwords), "board", "s3cret"], check=True,
                   capture_output=True)
    passwords.chmod(0o644)  # mosquitto drops to its own user when started as root
    extra = f"allow_anonymous false\npassword_file {passwords}"
    with Broker(tmp_path / "broker", extra=extra) as b:
        with pytest.raises(LiveSourceError, match="refused the connection: Not authorized"):
            window(b, tmp_path / "a.db", username="board", password="wrong").start()
        with window(b, tmp_path / "a.db", username="board", password="s3cret") as w:
            assert w.stats()["connected"]


@pytest.mark.broker
def test_start_offline_connects_when_the_broker_comes(mosquitto: str, tmp_path: Path) -> None:
    port = free_port()
    w = LiveWindow(tmp_path / "late.db", TOPIC, port=port, flush_every_s=0.05)
    w.start(timeout=None)  # returns at once, retrying in the background
    try:
        assert not w.stats()["connected"]
        with Broker(tmp_path / "broker", port=port) as b:
            wait_for(lambda: w.stats()["connected"], timeout=40, message="connected")
            with publisher(b) as c:
                publish(c, [reading(1)])
            stored(w, 1)
    finally:
        w.stop()


def run_sensor(b: Broker, *args: str) -> None:
    subprocess.run([sys.executable, str(SENSOR), "--host", b.host, "--port", str(b.port),
                    "--topic", TOPIC, *args], check=True, timeout=120, capture_output=True)


@pytest.mark.broker
def test_memory_stays_bounded_as_readings_stream_in(broker: Broker, tmp_path: Path) -> None:
    with window(broker, tmp_path / "rss.db", max_rows=500) as w:
        def received_all(n: int) -> None:
            # the broker may drop QoS 1 messages for a lagging subscriber: wait until
            # the count stops moving, whatever it reached
            last = -1
            while (now := w.stats()["received"]) != last and now < n:
                last = now
                time.sleep(0.5)

        run_sensor(broker, "--rate", "0", "--count", "3000")
        received_all(3000)
        w.snapshot()
        before = rss_bytes()
        run_sensor(broker, "--rate", "0", "--count", "30000")
        received_all(33000)
        x, _, _ = w.snapshot()
        after = rss_bytes()
        s = w.stats()
    assert s["received"] >= 20_000  # most of the 10x more readings did arrive
    assert s["rows"] == len(x) == 500
    assert after - before < 8 << 20, f"RSS grew by {(after - before) >> 10} KiB"


@pytest.mark.broker
def test_the_accelerometer_example_feeds_a_window(broker: Broker, tmp_path: Path) -> None:
    with window(broker, tmp_path / "accel.db") as w:
        run_sensor(broker, "--rate", "0", "--count", "150", "--pattern",
                   "idle:1,walk:1,run:1")  # 50 readings each at the signal's 50 Hz
        stored(w, 150)
        x, y, _ = w.snapshot()
    assert x.shape == (150, 3) and y is not None
    assert y.tolist() == [0] * 50 + [1] * 50 + [2] * 50
    assert abs(x[:50, 2].mean() - 1.0) < 0.05  # idle: gravity on z
    assert x[100:, 0].std() > x[50:100, 0].std() > x[:50, 0].std()  # run > walk > idle
    cut = windows(x, 25, 25)
    assert cut.shape == (6, 3, 25) and windows(y, 25, 25)[:, -1].tolist() == [0, 0, 1, 1, 2, 2]
