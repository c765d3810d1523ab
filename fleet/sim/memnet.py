"""An in-memory network for the sans-I/O machines: real envelopes, real signatures, real
sealing and real gates, but no sockets, and a clock that only moves when asked to.

Only the broker is replaced: every `Send` is signed (and sealed for its recipients) by
`hfl.runtime.node.encode_send`, queued, and delivered to each peer whose subscriptions match its
topic through that peer's own `Gate`, exactly as the MQTT runner would. Retained messages
reach later subscribers. Faults (drop, repeat, reorder) are a function passed in.

Time is simulated: deliveries and training take none, and `advance` moves the clock and
ticks every machine, so deadlines fire when, and only when, someone failed to answer.

`outage` is a broker that dies and comes back with nothing (no persistence): what it held
is lost and every peer is cut off (what it sends is lost, nothing reaches it) until it
`reconnect`s, which, as the MQTT runner does, subscribes it again, publishes its online
status and hands its machine the `reconnected` event.
The unit tests and the fast simulator (`fleet.sim.memsim`) run on it.
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from paho.mqtt.client import topic_matches_sub

from edge_agent.machine import Declined, Train, Update
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.runtime.actions import Note, Send, log_note
from hfl.runtime.node import encode_send
from hfl.wire.gate import Gate
from hfl.wire.messages import NODES, Kind, StatusMeta
from hfl.wire.topics import Topics

Trainer = Callable[[str, Train], "Update | Declined | None"]  # None: the agent stays silent
Fault = Callable[[str, bytes], list[bytes]]  # one message in, what gets delivered out

log = logging.getLogger("hfl.memnet")


@dataclass
class Peer:
    identity: Identity
    machine: object
    filters: list[str]
    gate: Gate


@dataclass
class MemNet:
    topics: Topics
    roster: Roster
    trainer: Trainer | None = None
    fault: Fault | None = None
    shuffle: random.Random | None = None
    now: float = 1000.0
    record: bool = True  # keep every Send and Note (tests); a long simulation turns it off
    peers: dict[str, Peer] = field(default_factory=dict)
    queue: deque = field(default_factory=deque)
    retained: dict[str, bytes] = field(default_factory=dict)
    notes: list[tuple[str, Note]] = field(default_factory=list)
    sent: list[tuple[str, Send]] = field(default_factory=list)
    others: list[tuple[str, object]] = field(default_factory=list)  # role actions (NewVersion)
    # A role action's handler, called with the peer's id and the action as it happens;
    # actions without one are kept in `others`.
    handlers: dict[type, Callable[[str, object], None]] = field(default_factory=dict)
    offline: set[str] = field(default_factory=set)  # peers cut off by an `outage`
    lost: int = 0  # messages lost to outages
    # filter → its subscribers, and topic → its subscribers: a fleet of thousands shares a
    # few dozen filters, so a new topic is matched against those, not against every peer.
    _filters: dict[str, list[Peer]] = field(default_factory=dict, repr=False)
    _routes: dict[str, list[Peer]] = field(default_factory=dict, repr=False)

    def add(self, identity: Identity, machine: object, filters: list[str]) -> None:
        peer = self.peers[identity.id] = Peer(identity, machine, filters,
                                              Gate(self.roster, self.topics, identity=identity))
        for f in dict.fromkeys(filters):
            self._filters.setdefault(f, []).append(peer)
        self._routes.clear()
        for topic, payload in self.retained.items():  # a new subscriber gets retained copies
            if any(topic_matches_sub(f, topic) for f in filters):
                self._deliver(self.peers[identity.id], topic, payload)

    def publish(self, sender: str, send: Send) -> bytes:
        data = encode_send(send, self.peers[sender].identity, self.roster, now=self.now)
        if self.record:
            self.sent.append((sender, send))
        if sender in self.offline:
            self.lost += 1
            return data
        self.inject(send.topic, data, retain=send.retain)
        return data

    def outage(self) -> None:
        """The broker dies and restarts empty: what it queued and retained is gone, and
        every peer is cut off until it reconnects."""
        self.lost += len(self.queue)
        self.queue.clear()
        self.retained.clear()
        self.offline = set(self.peers)

    def inject(self, topic: str, data: bytes, retain: bool = False) -> None:
        if retain:
            self.retained[topic] = data
        for payload in (self.fault(topic, data) if self.fault else [data]):
            self.queue.append((topic, payload))

    def subscribers(self, topic: str) -> list[Peer]:
        peers = self._routes.get(topic)
        if peers is None:
            matched = {id(p) for f, ps in self._filters.items() if topic_matches_sub(f, topic)
                       for p in ps}
            peers = self._routes[topic] = [p for p in self.peers.values() if id(p) in matched]
        return peers

    def run(self, max_steps: int = 10_000_000) -> None:
        """Deliver until the network is quiet."""
        for _ in range(max_steps):
            if not self.queue:
                return
            if self.shuffle is not None:
                self.queue.rotate(-self.shuffle.randrange(len(self.queue)))
            topic, payload = self.queue.popleft()
            for peer in self.subscribers(topic):
                if peer.identity.id in self.offline:
                    self.lost += 1
                    continue
                self._deliver(peer, topic, payload)
        raise AssertionError("network never went quiet")

    def advance(self, seconds: float) -> None:
        """Let time pass: every machine ticks, then the network runs."""
        self.now += seconds
        for peer in list(self.peers.values()):
            self._act(peer, peer.machine.tick(self.now))  # type: ignore[attr-defined]
        self.run()

    def reconnect(self, *ids: str) -> None:
        """These peers' connections came back, one after the other: each is subscribed
        again, says it is online (retained) and gets its machine's `reconnected` event
        (what the broker may have lost goes again); then the network runs."""
        for id_ in ids:
            peer = self.peers[id_]
            self.offline.discard(id_)
            for topic, payload in list(self.retained.items()):  # a subscriber gets retained
                if any(topic_matches_sub(f, topic) for f in peer.filters):
                    self._deliver(peer, topic, payload)
            member = self.roster.get(id_)
            if member is not None and member.role in NODES:
                meta = StatusMeta(state="online", group=member.group).model_dump(mode="json")
                self.publish(id_, Send(Kind.STATUS, self.topics.status(member.role.value, id_),
                                       "", 0, "online", meta, retain=True))
            event = getattr(peer.machine, "reconnected", None)
            if event is not None:
                self._act(peer, event(self.now))
        self.run()

    def _deliver(self, peer: Peer, topic: str, payload: bytes) -> None:
        accepted = peer.gate.accept(topic, payload, self.now)
        if accepted is None:
            return
        env, route = accepted
        try:
            actions = peer.machine.handle(env, route, self.now)  # type: ignore[attr-defined]
        except Rejected as r:
            peer.gate.reject(r, topic)
            actions = r.answer
        self._act(peer, actions)

    def _act(self, peer: Peer, actions: list) -> None:
        for a in actions:
            if isinstance(a, Send):
                self.publish(peer.identity.id, a)
            elif isinstance(a, Note):
                log_note(log, peer.identity.id, a)  # at the level a runner would
                if self.record:
                    self.notes.append((peer.identity.id, a))
            elif isinstance(a, Train):
                result = self.trainer(peer.identity.id, a) if self.trainer else None
                if result is not None:
                    self._act(peer, peer.machine.trained(a.job, a.round, result))  # type: ignore[attr-defined]
            elif (handler := self.handlers.get(type(a))) is not None:
                handler(peer.identity.id, a)
            else:
                self.others.append((peer.identity.id, a))

    def rejections(self, peer: str) -> dict[str, int]:
        return dict(self.peers[peer].gate.rejections)

    def events(self, name: str) -> list[tuple[str, dict]]:
        return [(p, n.fields) for p, n in self.notes if n.event == name]
