"""What Mosquitto's autosave costs: its disk writes, CPU and stalls by how much it holds.

    .venv/bin/python bench/broker_autosave.py                 # queued 0, 16, 128 MiB
    .venv/bin/python bench/broker_autosave.py --mib 64 --interval 5

A broker from the generated config (persistence on) holds MiB of 256 KiB QoS 1 messages
queued for one persistent client that is away, and is otherwise idle but for a probe: small
QoS 1 messages to a connected subscriber, one every 10 ms. Over 10 s: the broker's disk
writes (/proc/PID/io) and CPU time, the database's size, and the probe's round trips (a
save blocks the broker's only thread, so the slowest round trip is about the longest save).
The baseline is the same run with autosave off (`autosave_interval 0`: saved only on a clean
stop).
"""

from __future__ import annotations

import argparse
import os
import queue
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.ops import broker as broker_mod  # noqa: E402
from fleet.ops.broker import Broker  # noqa: E402
from hfl.runtime.mqtt import BrokerSettings, Session  # noqa: E402

WINDOW_S = 10.0


def io(pid: int) -> tuple[int, float]:
    """Bytes the process wrote to disk so far, and its CPU seconds."""
    fields = dict(ln.split(": ") for ln in Path(f"/proc/{pid}/io").read_text().splitlines())
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields["write_bytes"]), (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def session(settings: BrokerSettings, client_id: str, subscriptions: list[str] = (),
            inbox: queue.Queue | None = None, **kw: object) -> Session:
    s = Session(client_id, settings, inbox=inbox or queue.Queue(), subscriptions=subscriptions,
                **kw)  # type: ignore[arg-type]
    s.start()
    assert s.wait_ready(10), f"{client_id} not ready"
    return s


def run(mib: int, interval: int) -> str:
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d, \
            Broker(Path(d), persistence=True, autosave_s=interval) as b:
        settings = BrokerSettings(port=b.port)
        session(settings, "away", ["q/#"]).stop()  # a persistent session, then away
        pub = session(settings, "pub")
        chunk = os.urandom(256 * 1024 - 100)
        for _ in range(mib * 4):
            pub.publish("q/x", chunk)
        assert pub.flush(120)
        inbox: queue.Queue = queue.Queue()
        echo = session(settings, "echo", ["ping"], inbox, clean_start=True)
        time.sleep(3)  # past the first save of what was queued
        w0, c0 = io(b.pid)  # type: ignore[arg-type]
        start = time.monotonic()
        rtts = []
        while time.monotonic() - start < WINDOW_S:
            t = time.monotonic()
            pub.publish("ping", b"x")
            inbox.get(timeout=60)
            rtts.append(time.monotonic() - t)
            time.sleep(0.01)
        w1, c1 = io(b.pid)  # type: ignore[arg-type]
        elapsed = time.monotonic() - start
        db = Path(d) / "data" / "mosquitto.db"
        size = db.stat().st_size / 2**20 if db.exists() else 0.0
        echo.stop()
        pub.stop()
    rtts.sort()
    return (f"{interval:>8} {mib:>11} {size:>9.1f} {(w1 - w0) / 2**20 / elapsed:>14.1f} "
            f"{100 * (c1 - c0) / elapsed:>7.1f} {1000 * rtts[len(rtts) // 2]:>11.1f} "
            f"{1000 * rtts[-1]:>8.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mib", type=int, nargs="+", default=[0, 16, 128],
                    help="MiB queued for the client that is away")
    ap.add_argument("--interval", type=int, default=broker_mod.AUTOSAVE_S,
                    help="autosave_interval to measure (against 0)")
    args = ap.parse_args()
    print("interval  queued MiB    db MiB  writes MiB/s   CPU %  rtt med ms  max ms")
    for mib in args.mib:
        for interval in (0, args.interval):
            print(run(mib, interval), flush=True)


if __name__ == "__main__":
    main()
