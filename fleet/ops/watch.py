"""The observer's connection: the status, telemetry, job and roster topics, each message
verified against the roster (an observer trusts the broker no more than a node does) and
folded into a `FleetView`. `hfl status` pumps it in its own loop; `hfl dashboard` runs it
in a thread and reads snapshots from its HTTP handlers.

It connects with a clean session that expires at once: an operator's tool leaves nothing
queued on the broker when it goes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import replace
from typing import Any

from fleet.ops.view import FleetView
from hfl.crypto.identity import Identity, Roster
from hfl.runtime.mqtt import BrokerSettings, Inbound, Session
from hfl.runtime.roster_feed import RosterFeed
from hfl.wire.gate import Gate
from hfl.wire.topics import Topics

log = logging.getLogger("hfl.watch")


class Watch:
    def __init__(self, identity: Identity, roster: Roster, settings: BrokerSettings,
                 topics: Topics, feed: RosterFeed | None = None) -> None:
        self.feed = feed
        self.gate = Gate(roster, topics)  # nothing it reads is sealed
        self.view = FleetView(roster)
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.session = Session(identity.id, replace(settings, session_expiry=0),
                               inbox=self.inbox, subscriptions=topics.observer_filters(),
                               clean_start=True)
        self.lock = threading.Lock()  # between the pump and snapshot readers
        self.stop_event = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 10.0) -> None:
        """Connect and subscribe; ConnectionError saying why not within `timeout`."""
        self.session.start()
        if not self.session.wait_ready(timeout):
            s = self.session.settings
            self.session.stop()
            why = f": {self.session.refusal}" if self.session.refusal else ""
            raise ConnectionError(f"broker {s.host}:{s.port} not ready within {timeout:.0f} s"
                                  f"{why}")

    def pump(self, timeout: float) -> int:
        """Fold in the messages that arrive within `timeout` seconds; how many came."""
        deadline = time.monotonic() + timeout
        n = 0
        while (left := deadline - time.monotonic()) > 0:
            try:
                msg = self.inbox.get(timeout=left)
            except queue.Empty:
                break
            self._take(msg)
            n += 1
        return n

    def settle(self, quiet: float = 0.5, timeout: float = 10.0) -> None:
        """Take the retained messages the broker replays on subscribe: until none came for
        `quiet` seconds (MQTT marks no end of them), at most `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pump(min(quiet, deadline - time.monotonic())):
            pass

    def _take(self, msg: Inbound) -> None:
        now = time.time()
        with self.lock:
            self.gate.deliver(msg.topic, msg.payload, now, self.feed, self.view.apply)
            self.gate.expire(now)

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            snap = self.view.snapshot(time.time())
            snap["refused"] = dict(self.gate.rejections)  # what this observer refused
            return snap

    def run_in_thread(self) -> None:
        def loop() -> None:
            while not self.stop_event.is_set():
                try:
                    self.pump(0.2)
                except Exception:  # keep watching whatever one message did
                    log.exception("watching the fleet")

        self._thread = threading.Thread(target=loop, name="hfl-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.session.stop()
