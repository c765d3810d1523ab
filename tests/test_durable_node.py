"""The durable node's contract over a real Mosquitto: a message is acknowledged only once the
state it changed is saved, and nothing the machine sends leaves before that; so a node that
stops without saving gets the same messages again, and a node that saved does not."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from fleet.ops.broker import Broker
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.runtime.actions import Action, Note, Send
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node, encode_send
from hfl.runtime.state import Checkpointer, StateError, StateStore
from hfl.wire.messages import Kind, Role
from hfl.wire.topics import Topics


class Counter:
    """Counts updates per sender; says `seen` once per update, on the partials topic."""

    def __init__(self, topics: Topics) -> None:
        self.topics = topics
        self.counts: dict[str, int] = {}  # saved
        self.handled = 0  # in this process
        self.changed: set[str] = set()

    def handle(self, env, route, now) -> list[Action]:
        if env.type != Kind.UPDATE.value:
            return []  # the publisher's own online/offline
        self.counts[env.sender] = self.counts.get(env.sender, 0) + 1
        self.handled += 1
        self.changed.add("counts")
        return [Send(Kind.PARTIAL, self.topics.partials("site-a"), "j", 0, "seen",
                     {"from": env.sender})]

    def tick(self, now) -> list[Action]:
        return []

    def record(self, key):
        return {"counts": self.counts}, {}

    def restore(self, records) -> None:
        if "counts" in records:
            self.counts = dict(records["counts"][0]["counts"])

    def resume(self, now) -> list[Action]:
        return [Note("resumed")]


class FailingStore(StateStore):
    def write(self, records) -> None:
        raise StateError("cannot write the state in x: disk full (simulated)")


def node(ident: Identity, roster: Roster, topics: Topics, broker: Broker,
         store: StateStore) -> tuple[Node, Counter]:
    machine = Counter(topics)
    saver = Checkpointer(machine, store)
    saver.load()
    n = Node(ident, roster, BrokerSettings(broker.host, broker.port), topics,
             topics.aggregator_filters("site-a"), durable=saver)
    return n, machine


def run_for(n: Node, machine: Counter, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        n.step(machine, 0.05)


@pytest.fixture
def world(broker: Broker):
    topics, roster = Topics(), Roster()
    ids = {i: Identity.generate(i, r) for i, r in [("site-a", Role.AGGREGATOR),
                                                   ("a1", Role.AGENT), ("a2", Role.AGENT)]}
    roster.enroll(ids["site-a"])
    roster.enroll(ids["a1"], "site-a")
    roster.enroll(ids["a2"], "site-a")
    return topics, roster, ids


def publish_updates(world, broker: Broker, n: int) -> None:
    topics, roster, ids = world
    pub = Node(ids["a1"], roster, BrokerSettings(broker.host, broker.port), topics, [])
    pub.start(10)
    for k in range(n):
        who = ("a1", "a2")[k % 2]
        data = encode_send(Send(Kind.UPDATE, topics.update("site-a", who), "j", k, "update",
                                {}, {"x": np.zeros(1, np.float32)}), ids[who], roster)
        pub.session.publish(topics.update("site-a", who), data)
    assert pub.session.flush(10)
    pub.stop()


def test_unsaved_messages_come_again_and_saved_ones_do_not(world, broker: Broker,
                                                           tmp_path: Path) -> None:
    topics, roster, ids = world
    seen: list[str] = []
    watcher = Node(ids["a2"], roster, BrokerSettings(broker.host, broker.port), topics,
                   [topics.partials("site-a")])
    # A node whose saves fail: it handles the updates but may neither ack nor send.
    first, m1 = node(ids["site-a"], roster, topics, broker, FailingStore(tmp_path))
    first.start(10)
    watcher.start(10)
    publish_updates(world, broker, 6)
    run_for(first, m1, 1.5)
    assert sum(m1.counts.values()) == 6  # handled...
    assert first.counters["checkpoint_errors"] >= 1
    assert first.counters["sent"] == 0  # ...but nothing went out
    first.session.stop()  # gone without saving: the broker keeps the 6 unacknowledged
    # The next run of the service, with a working disk: the 6 again, each once.
    second, m2 = node(ids["site-a"], roster, topics, broker, StateStore(tmp_path))
    second.start(10)
    run_for(second, m2, 1.5)
    assert m2.counts == {"a1": 3, "a2": 3}
    assert second.counters["sent"] == 6
    second.stop()
    third, m3 = node(ids["site-a"], roster, topics, broker, StateStore(tmp_path))
    third.start(10)
    run_for(third, m3, 1.0)
    assert m3.counts == {"a1": 3, "a2": 3}  # restored, and nothing delivered again
    assert m3.handled == 0
    third.stop()
    while not watcher.inbox.empty():
        msg = watcher.inbox.get()
        acc = watcher.gate.accept(msg.topic, msg.payload, time.time())
        if acc is not None:
            seen.append(acc[0].meta["from"])
    watcher.stop()
    assert sorted(seen) == ["a1"] * 3 + ["a2"] * 3  # sent once each, after the save


def test_an_observer_sees_failing_saves_while_they_fail_and_then_the_restart(
        world, broker: Broker, tmp_path: Path) -> None:
    """Through the real path: telemetry of a service whose disk is full reaches `hfl status`'s
    view while nothing else may leave; the service started again says it restarted."""
    from fleet.ops.view import stale_after
    from fleet.ops.watch import Watch
    from hfl.runtime.telemetry import instrument

    topics, roster, ids = world
    ops = Identity.generate("ops", Role.OBSERVER)
    roster.enroll(ops)
    watch = Watch(ops, roster, BrokerSettings(broker.host, broker.port), topics)
    watch.start(10)
    owner = ids["site-a"].who
    try:
        first, m1 = node(ids["site-a"], roster, topics, broker, FailingStore(tmp_path,
                                                                             owner=owner))
        _, served = instrument(first, m1, interval=0.2)
        first.start(10)
        publish_updates(world, broker, 4)
        run_for(first, served, 1.5)
        watch.pump(0.5)
        (site_a,) = watch.snapshot()["aggregators"]
        assert sum(m1.counts.values()) == 4 and first.counters["checkpoint_errors"] >= 2
        # Nothing the machine decided left (the four partials wait for a save)...
        assert len([a for a in first._outbox if isinstance(a, Send)]) == 4
        # ...but the telemetry did, saying why, with the count of failed saves.
        assert site_a["counts"]["checkpoint_errors"] >= 2 and not site_a["stale"]
        failing = site_a["saves_failing"]
        assert failing["reason"] == "cannot write the state in x: disk full (simulated)"
        assert failing["count"] >= 2
        assert any(p.startswith("state saves failing for") for p in site_a["problems"])
        assert (site_a["restarts"], site_a["restarted"]) == (0, "")
        # Its loop stuck (connected, status online): its telemetry goes stale.
        later = time.time() + stale_after(0.2) + 1
        (stuck,) = watch.view.snapshot(later)["aggregators"]
        assert stuck["state"] == "online" and stuck["stale"]
        first.session.stop()
        first.durable.close()

        # Started again on the same folder, its disk fine: the restart is said, the
        # failure is over and the counters count from this start.
        second, m2 = node(ids["site-a"], roster, topics, broker, StateStore(tmp_path,
                                                                              owner=owner))
        _, served = instrument(second, m2, interval=0.2)
        second.start(10)
        run_for(second, served, 1.5)
        watch.pump(0.5)
        (site_a,) = watch.snapshot()["aggregators"]
        assert m2.counts == {"a1": 2, "a2": 2}
        assert site_a["state"] == "online" and site_a["saves_failing"] is None
        assert site_a["counts"]["checkpoint_errors"] == 0 and site_a["restarts"] == 1
        assert site_a["restarted"].startswith("restarted ") and "(start 2)" in site_a[
            "restarted"]
        second.stop()
    finally:
        watch.stop()


class Refuser(Counter):
    """Refuses every update, with an answer to its sender (as an acknowledgement is); hears
    of each reconnection, and says so on the partials topic."""

    def __init__(self, topics: Topics) -> None:
        super().__init__(topics)
        self.reconnects: list[float] = []

    def handle(self, env, route, now) -> list[Action]:
        if env.type != Kind.UPDATE.value:
            return []
        self.changed.add("counts")  # a refusal that changed state: saved before the answer
        raise Rejected("stale-round", "too late", answer=[Send(
            Kind.PARTIAL, self.topics.partials("site-a"), "j", env.round, "refused",
            {"from": env.sender})])

    def reconnected(self, now) -> list[Action]:
        self.reconnects.append(now)
        return [Send(Kind.PARTIAL, self.topics.partials("site-a"), "j", 0, "back", {})]


def drain(watcher: Node) -> list[tuple[str, int]]:
    out = []
    while not watcher.inbox.empty():
        msg = watcher.inbox.get()
        acc = watcher.gate.accept(msg.topic, msg.payload, time.time())
        if acc is not None:
            out.append((acc[0].stage, acc[0].round))
    return out


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "plain"])
def test_a_refusals_answer_leaves_and_each_reconnection_is_told_once(
        world, tmp_path: Path, durable: bool) -> None:
    topics, roster, ids = world
    broker = Broker(tmp_path / "broker").start()  # no persistence: it comes back empty
    try:
        settings = BrokerSettings(broker.host, broker.port)
        machine = Refuser(topics)
        saver = Checkpointer(machine, StateStore(tmp_path / "state")) if durable else None
        n = Node(ids["site-a"], roster, settings, topics, topics.aggregator_filters("site-a"),
                 durable=saver)
        watcher = Node(ids["a2"], roster, settings, topics, [topics.partials("site-a")])
        n.start(10)
        watcher.start(10)
        run_for(n, machine, 0.5)
        assert machine.reconnects == []  # the first connection is no reconnection
        publish_updates(world, broker, 2)
        run_for(n, machine, 1.0)
        assert n.rejections == {"stale-round": 2}
        assert sorted(drain(watcher)) == [("refused", 0), ("refused", 1)]
        for k in (1, 2):
            broker.kill()
            broker.start()
            for node_ in (n, watcher):  # each session comes back and subscribes again
                deadline = time.monotonic() + 15
                while node_.session.counters["connects"] < k + 1 or not node_.session.connected:
                    assert time.monotonic() < deadline, "no reconnection"
                    run_for(n, machine, 0.1)
            run_for(n, machine, 0.5)
            assert len(machine.reconnects) == k
        assert n.counters["reconnects"] == 2
        run_for(n, machine, 0.5)
        assert ("back", 0) in drain(watcher)  # what `reconnected` sends goes out
        n.stop()
        watcher.stop()
    finally:
        broker.close()
