"""A node served as systemd runs it: READY only once subscribed, STATUS as its rounds move,
the watchdog fed by a live loop (and by training) and starved by a stuck one, and a real
`hfl-agent run` that leaves cleanly on SIGTERM and is reported "lost" when killed."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fleet.ops.broker import Broker, BrokerTls, free_port
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki
from hfl.data import digits
from hfl.models.zoo import Mlp
from hfl.runtime.actions import Note
from hfl.runtime.mqtt import BrokerSettings, Inbound, Session
from hfl.runtime.node import Node
from hfl.runtime.sdnotify import Notifier
from hfl.runtime.service import serve
from hfl.task import Round
from hfl.wire import envelope
from hfl.wire.messages import KNOWN_TYPES, Role
from hfl.wire.topics import Topics
from tests.notify import HoldingBroker, NotifySocket

T = Topics()
ROOT = Path(__file__).parents[1]


class Idle:
    """A machine with nothing to do."""

    def handle(self, env, route, now):
        return []

    def tick(self, now):
        return []


class Rounds:
    """Says it opened a new round every `every` ticks; blocks in tick while `stall` is set."""

    def __init__(self, every: int = 3) -> None:
        self.every, self.ticks = every, 0
        self.stall, self.unstalled = threading.Event(), threading.Event()

    def handle(self, env, route, now):
        return []

    def tick(self, now):
        while self.stall.is_set() and not self.unstalled.wait(0.05):
            pass  # a loop stuck in a handler: nothing below runs, nothing pings
        self.ticks += 1
        return [Note("round_open", {"job": "j1", "round": self.ticks // self.every})]


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify")
    yield n
    n.close()


def agent_node(port: int) -> tuple[Node, Roster]:
    ident = Identity.generate("a1", Role.AGENT)
    roster = Roster()
    roster.enroll(ident, "site-a")
    node = Node(ident, roster, BrokerSettings(port=port), T, T.agent_filters("site-a", "a1"),
                group="site-a")
    return node, roster


def serve_in_thread(node: Node, machine, sd: Notifier, **kw) -> tuple[threading.Thread, list]:
    code: list[int] = []
    t = threading.Thread(target=lambda: code.append(serve(node, machine, notifier=sd, **kw)),
                         daemon=True)
    t.start()
    return t, code


def test_ready_only_once_the_subscriptions_are_granted(notify: NotifySocket) -> None:
    broker = HoldingBroker()
    try:
        node, _ = agent_node(broker.port)
        t, code = serve_in_thread(node, Idle(), Notifier(notify.path))
        assert broker.subscribed.wait(10), "no SUBSCRIBE"
        # Connected (CONNACK sent), subscriptions asked for, no SUBACK yet: not ready.
        assert notify.wait_for("READY=1", timeout=1.0) is None
        assert notify.status("no job yet")  # the status line is there already
        granted = time.monotonic()
        broker.grant()
        ready = notify.wait_for("READY=1", timeout=5)
        assert ready is not None and ready >= granted
        node.stop_event.set()
        t.join(10)
        assert code == [0] and notify.wait_for("STOPPING=1", timeout=2)
    finally:
        broker.close()


def test_a_refused_subscription_never_reports_ready(notify: NotifySocket) -> None:
    broker = HoldingBroker()
    try:
        node, _ = agent_node(broker.port)
        t, code = serve_in_thread(node, Idle(), Notifier(notify.path), timeout=2)
        assert broker.subscribed.wait(10)
        broker.grant(0x87)  # Not authorized
        t.join(10)
        assert code == [1]
        assert "READY=1" not in notify.texts()
    finally:
        broker.close()


@pytest.mark.parametrize("euid", [0, 1000])
def test_root_is_warned_and_a_missing_broker_is_named(
        euid: int, notify: NotifySocket, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: euid)
    port = free_port()
    node, _ = agent_node(port)
    t, code = serve_in_thread(node, Idle(), Notifier(notify.path), timeout=0.5)  # keeps
    t.join(10)  # pytest's own signal handlers: serve() installs its own on the main thread
    assert code == [1]
    assert ("runs as root" in caplog.text) == (euid == 0)
    assert f"broker 127.0.0.1:{port} not reachable" in caplog.text
    assert "READY=1" not in notify.texts()


def test_waiting_for_the_broker_feeds_the_watchdog_and_a_stop_ends_it(
        notify: NotifySocket) -> None:
    broker = HoldingBroker()  # never grants: the node waits for its SUBACK
    try:
        node, _ = agent_node(broker.port)
        t, code = serve_in_thread(node, Idle(), Notifier(notify.path, watchdog=0.4))
        assert broker.subscribed.wait(10)
        since = time.monotonic()
        time.sleep(0.7)
        assert len(notify.times("WATCHDOG=1", since)) >= 2  # not restarted while starting
        node.stop_event.set()  # what SIGTERM does
        t.join(5)
        assert code == [0] and "READY=1" not in notify.texts()
    finally:
        broker.close()


def test_status_follows_the_rounds_and_the_watchdog_follows_the_loop(
        broker: Broker, notify: NotifySocket) -> None:
    node, _ = agent_node(broker.port)
    machine = Rounds()
    sd = Notifier(notify.path, watchdog=0.4)  # pings due every 0.2 s
    t, code = serve_in_thread(node, machine, sd)
    try:
        assert notify.wait_for("READY=1", timeout=10)
        assert notify.wait_status("job j1, round 2: round_open", timeout=5)
        statuses = [s for s in notify.texts() if s.startswith("STATUS=")]
        assert statuses[0] == "STATUS=agent a1 (site-a): serving, no job yet"
        rounds = [s for s in statuses if "round_open" in s]
        assert rounds[:3] == [f"STATUS=agent a1 (site-a): job j1, round {r}: round_open"
                              for r in range(3)]  # one line per change, none repeated

        since = time.monotonic()
        time.sleep(1.2)
        pings = notify.times("WATCHDOG=1", since)
        gaps = np.diff(pings)
        assert len(pings) >= 4 and gaps.min() >= 0.19 and gaps.max() < 0.4, pings

        machine.stall.set()  # the loop gets stuck in tick
        time.sleep(0.3)  # at most one ping was already due
        stuck = time.monotonic()
        time.sleep(1.0)  # 2.5 watchdog intervals: systemd would have restarted us
        assert notify.times("WATCHDOG=1", stuck) == []
        machine.unstalled.set()
        time.sleep(0.5)
        assert notify.times("WATCHDOG=1", stuck), "pings resume with the loop"
    finally:
        machine.unstalled.set()
        node.stop_event.set()
        t.join(10)
    assert code == [0]


def test_training_feeds_the_watchdog_per_batch_and_a_stop_cuts_it_short(
        broker: Broker, notify: NotifySocket) -> None:
    node, _ = agent_node(broker.port)
    task = Mlp({"input_shape": [1, 8, 8], "num_classes": 10})
    data = digits()
    batches = threading.Event()

    def progress() -> None:
        batches.set()
        node.alive()

    class Trains(Idle):
        """Trains for a long time in its first tick, reporting progress as the agent does."""

        def tick(self, now):
            if not batches.is_set():
                task.fit(task.model(), data, Round(epochs=100_000, progress=progress))
            return []

    t, code = serve_in_thread(node, Trains(), Notifier(notify.path, watchdog=0.4))
    try:
        assert batches.wait(30), "training did not start"
        since = time.monotonic()
        time.sleep(1.0)
        assert len(notify.times("WATCHDOG=1", since)) >= 3  # fed from inside the long step
        stop = time.monotonic()
    finally:
        node.stop_event.set()
        t.join(5)
    assert not t.is_alive() and code == [0]
    assert time.monotonic() - stop < 2.0  # within a batch, not after 100,000 epochs
    assert notify.wait_for("STOPPING=1", 1)


# ---------------------------------------------------------------- a real hfl-agent process


@pytest.fixture(scope="module")
def tls_fleet(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Pki, Broker]]:
    root = tmp_path_factory.mktemp("svc")
    pki = Pki.init(root / "pki")
    pki.issue("coordinator", "coordinator")
    pki.issue("site-a", "aggregator")
    pki.issue("a1", "agent", group="site-a")
    pki.issue("obs", "observer")
    tls = BrokerTls.from_pki(pki, "broker", root / "broker", T)
    with Broker(root / "broker", tls=tls) as broker:
        yield pki, broker


def agent_config(path: Path, pki: Pki, broker: Broker) -> Path:
    path.write_text(f'[identity]\nid = "a1"\ndir = "{pki.device("a1").dir}"\n'
                    f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
                    '[agent]\naggregator = "site-a"\ndevice = "cpu"\n'
                    '[agent.datasets.digits]\nsource = "digits"\n')
    return path


def hfl_agent(config: Path, notify: NotifySocket) -> subprocess.Popen:
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "2000000",
           "PYTHONPATH": str(ROOT)}
    exe = Path(sys.executable).with_name("hfl-agent")
    return subprocess.Popen([str(exe), "run", "-c", str(config)], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def next_state(spy: queue.Queue[Inbound], roster: Roster, timeout: float) -> str | None:
    """The state in the next status message (a verified envelope), or None in `timeout`."""
    try:
        msg = spy.get(timeout=timeout)
    except queue.Empty:
        return None
    env = envelope.decode(msg.payload, topic=msg.topic, public_key=roster.public_key,
                          known_types=KNOWN_TYPES)
    return env.meta["state"]


def test_hfl_agent_under_systemd_stops_cleanly_on_sigterm_and_is_lost_when_killed(
        tls_fleet, notify: NotifySocket, tmp_path: Path) -> None:
    pki, broker = tls_fleet
    roster = pki.roster()
    config = agent_config(tmp_path / "agent.toml", pki, broker)
    spy: queue.Queue[Inbound] = queue.Queue()
    watcher = Session("obs", pki.device("obs").broker_settings(broker.host, broker.port),
                      inbox=spy, subscriptions=[T.status("agent", "a1")], clean_start=True)
    watcher.start()
    assert watcher.wait_ready(10)
    proc = hfl_agent(config, notify)
    try:
        assert notify.wait_for("READY=1", timeout=60), proc.stdout and proc.stdout.read1()
        assert next_state(spy, roster, 5) == "online"  # retained before READY
        assert notify.wait_for("WATCHDOG=1", timeout=3)  # 2 s watchdog: a ping each second
        assert notify.status("agent a1 (site-a): serving, no job yet")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert notify.wait_for("STOPPING=1", 1)
        assert next_state(spy, roster, 5) == "offline"
        assert next_state(spy, roster, 1) is None  # and no Last Will after it

        again = hfl_agent(config, NotifySocket(tmp_path / "notify2"))
        try:
            assert next_state(spy, roster, 60) == "online"
            again.kill()  # no DISCONNECT: the broker publishes the Last Will
            again.wait(10)
            assert next_state(spy, roster, 10) == "lost"
        finally:
            again.kill()
            again.wait()
    finally:
        proc.kill()
        proc.wait()
        watcher.stop()
