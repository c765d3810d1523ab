"""The thin runner every role shares: MQTT in, verified envelopes to a state machine,
actions out to MQTT.

Paho's network thread only queues raw messages; one loop thread passes them through the
`Gate` (chunks, signature, sender-to-topic binding, repeats), feeds the machine and
carries out what it returns. A role adds handlers for its own actions (training,
exporting a model version). Nothing a peer sends can raise out of the loop: every bad
message becomes a counted rejection with a logged reason.

A node given a `Checkpointer` (aggregator, coordinator) survives `kill -9`: it acknowledges
an inbound message only once the records it changed are saved, and holds back whatever the
machine wants to send until then, so nothing it published is ever contradicted by the state
it restarts from, and the broker delivers again whatever was not saved. Saves are grouped:
one when something is to go out (but for acknowledgements, which wait for the batch), when
the inbox runs dry, or every `ACK_BATCH` messages (well inside the broker's window of
unacknowledged messages). The chunks of a message are
acknowledged once the whole message is handled. A failing save (a full disk) is logged and
counted and retried; until it succeeds nothing is acknowledged and nothing goes out but the
node's telemetry, which says so (hfl.runtime.telemetry).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hfl.crypto.identity import Identity, Roster
from hfl.runtime.actions import Action, Note, Send, log_note
from hfl.runtime.mqtt import BrokerSettings, Inbound, Session
from hfl.runtime.roster_feed import RosterFeed
from hfl.runtime.state import Checkpointer, StateError
from hfl.wire import envelope
from hfl.wire.envelope import Envelope
from hfl.wire.gate import Gate
from hfl.wire.messages import Kind, StatusMeta
from hfl.wire.topics import Route, Topics

log = logging.getLogger("hfl.runtime.node")

ACK_BATCH = 32  # messages handled before a save at the latest
SAVE_RETRY_S = 1.0  # after a failed save, the next try waits this long
HOLD_IDLE_S = 1.0  # chunks held this long with nothing arriving are acknowledged anyway


def encode_send(action: Send, identity: Identity, roster: Roster,
                now: float | None = None) -> bytes:
    """The signed envelope for a machine's `Send`, sealed for its recipients.

    A recipient no longer in the roster (revoked) is left out; ValueError when none is left.
    """
    seal_to = None
    if action.to:
        seal_to = {r: k for r in action.to if (k := roster.seal_key(r)) is not None}
        if len(seal_to) < len(action.to):
            log.warning("%s on %s: not sealed for unknown %s", action.kind.value, action.topic,
                        sorted(set(action.to) - set(seal_to)))
        if not seal_to:
            raise ValueError(f"no known recipient among {list(action.to)}")
    return envelope.encode(type=action.kind.value, topic=action.topic, job=action.job,
                           round=action.round, stage=action.stage, sender=identity.id,
                           key=identity.key, tensors=action.tensors, meta=action.meta, now=now,
                           seal_to=seal_to)


def urgent(actions: list[Action]) -> bool:
    """Whether any of `actions` should go out now (so be saved now): anything but a `Note` or
    an acknowledgement. Acknowledgements wait for the batch's save, as the MQTT ones do: one
    per message would make every message a save of its own."""
    return any(not isinstance(a, Note) and not (isinstance(a, Send) and a.kind is Kind.ACK)
               for a in actions)


def _unheld(action: Action) -> bool:
    """Telemetry is no consequence of the state the node saves: it goes out at once, and so
    says how the node is even while its saves fail (a full disk holds everything else)."""
    return isinstance(action, Send) and action.kind is Kind.TELEMETRY


@dataclass
class SaveFailure:
    """Saves failing now: the last error, the first failure's time, the tries so far."""

    reason: str
    since: float
    count: int = 1


class Stopped(BaseException):
    """A stop was asked for while a handler was busy: unwinds it (not an `Exception`, so no
    handler's error net catches it)."""


class Machine(Protocol):
    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]: ...
    def tick(self, now: float) -> list[Action]: ...
    # Optional: `reconnected(now) -> list[Action]`, called once the connection is back after
    # a loss (subscriptions sent again): what the broker may have lost, sent again.


class Node:
    def __init__(
        self,
        identity: Identity,
        roster: Roster,
        settings: BrokerSettings,
        topics: Topics,
        subscriptions: list[str],
        *,
        max_payload: int = 256 * 1024,
        max_message: int = envelope.DEFAULT_MAX_MESSAGE,
        group: str | None = None,
        feed: RosterFeed | None = None,
        durable: Checkpointer | None = None,
    ) -> None:
        self.identity = identity
        self.roster = roster
        self.feed = feed  # keeps `roster` current (signed rosters from the coordinator)
        self.topics = topics
        self.group = group
        self.gate = Gate(roster, topics, identity=identity, max_message=max_message)
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.counters: Counter[str] = Counter()
        self._status_topic = topics.status(identity.role.value, identity.id)
        # "lost" from the broker when the connection dies; "offline" only from stop().
        will = (self._status_topic, self._status_payload("lost"), True)
        self.session = Session(identity.id, settings, inbox=self.inbox,
                               subscriptions=subscriptions, will=will, max_payload=max_payload,
                               birth=lambda: (self._status_topic, self._status_payload("online")),
                               leave_unacked=durable is not None)
        self.durable = durable
        self._outbox: list[Action] = []  # the machine's actions, until their state is saved
        self._unacked: list[Inbound] = []  # handled, to acknowledge once saved
        self._held: dict[tuple[str, bytes], list[Inbound]] = {}  # chunks of an open message
        self._tried_at = self._heard_at = 0.0
        # Saves failing now: the last error, since when, how many tries (telemetry shows it).
        self.save_failure: SaveFailure | None = None
        self.handlers: dict[type, Callable[[Any], list[Action] | None]] = {
            Send: self.send,
            Note: self._log_note,
        }
        # see every action (hfl.runtime.activity)
        self.observers: list[Callable[[Action], None]] = []
        self.heartbeat: Callable[[], object] | None = None  # fed by alive() (the watchdog)
        self.stop_event = threading.Event()
        self._connects = 0  # the session's connects the machine has been told of

    # ------------------------------------------------------------------ outbound

    def _status_payload(self, state: str) -> bytes:
        meta = StatusMeta(state=state, group=self.group).model_dump(mode="json")  # type: ignore[arg-type]
        return envelope.encode(type=Kind.STATUS.value, topic=self._status_topic, job="",
                               round=0, stage=state, sender=self.identity.id,
                               key=self.identity.key, meta=meta)

    def send(self, action: Send) -> None:
        try:
            data = encode_send(action, self.identity, self.roster)
        except ValueError as e:
            self.counters["unsendable"] += 1
            log.error("not sent: %s on %s: %s", action.kind.value, action.topic, e)
            return
        self.session.publish(action.topic, data, retain=action.retain)
        self.counters["sent"] += 1
        self.counters["bytes_sent"] += len(data)

    def _log_note(self, note: Note) -> None:
        log_note(log, self.identity.id, note)

    # ------------------------------------------------------------------ inbound

    @property
    def rejections(self) -> Counter[str]:
        return self.gate.rejections

    def tally(self) -> dict[str, dict[str, int]]:
        """Every counter: messages handled and sent, repeats dropped, rejections by reason,
        saves; logged when the node stops."""
        pending, pending_bytes = self.gate.pending
        return {"node": dict(self.counters), "gate": dict(self.gate.counters),
                "rejected": dict(self.gate.rejections), "mqtt": dict(self.session.counters),
                "pending": {"messages": pending, "bytes": pending_bytes}}

    # ------------------------------------------------------------------ loop

    def start(self, timeout: float = 30.0) -> None:
        """Connect; return once connected, subscribed (every SUBACK granted) and online.
        While waiting, `alive()`: the watchdog is fed and a stop asked for ends the wait."""
        self.session.start()
        deadline = time.monotonic() + timeout
        while not self.session.wait_ready(min(0.2, max(deadline - time.monotonic(), 0))):
            self.alive()
            if time.monotonic() < deadline:
                continue
            s, who = self.session.settings, self.identity.id
            if not self.session.connected:
                why = f": {self.session.refusal}" if self.session.refusal else ""
                raise ConnectionError(f"{who}: broker {s.host}:{s.port} not reachable within "
                                      f"{timeout:.0f} s{why}")
            if self.session.counters.get("subscribe_refused"):
                raise ConnectionError(f"{who}: broker {s.host}:{s.port}: {self.session.refusal} "
                                      "(does its ACL match the roster? hfl pki broker-config)")
            raise ConnectionError(f"{who}: broker {s.host}:{s.port} did not acknowledge the "
                                  f"subscriptions within {timeout:.0f} s")
        if self.durable is not None:  # send again what may not have left before a crash
            self._outbox += self.durable.resume(time.time())
            self.commit(time.time())
        if self.feed is not None:
            self.dispatch(self.feed.poll(time.time(), force=True))

    def stop(self, timeout: float = 10.0) -> None:
        """Leave cleanly: save, say offline (the Last Will is only for unclean exits), flush."""
        self.stop_event.set()
        try:
            if self.durable is not None:
                self.commit(time.time(), retry=True)
            log.info("%s tally %s", self.identity.id, json.dumps(self.tally(), sort_keys=True))
            self.session.publish(self._status_topic, self._status_payload("offline"),
                                 retain=True)
            self.session.flush(timeout)
        finally:
            self.session.stop()
            if self.durable is not None:
                self.durable.close()  # lets go of the state folder (a restart may take it)

    def dispatch(self, actions: list[Action]) -> None:
        todo = list(actions)
        while todo:
            action = todo.pop(0)
            handler = self.handlers.get(type(action))
            if handler is None:
                raise TypeError(f"no handler for {type(action).__name__}")
            for observe in self.observers:
                observe(action)
            more = handler(action)
            if more:
                todo[:0] = more

    def step(self, machine: Machine, timeout: float) -> None:
        """Handle at most one inbound message, then let time pass in the machine."""
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            msg = None
        now = time.time()
        back = self._reconnected(machine, now)
        if self.durable is not None:
            self._outbox += back
            self._step_durable(machine, msg, now)
        else:
            self.dispatch(back)
            if msg is not None:
                self._receive(machine, msg, now, self.dispatch)
            self.dispatch(machine.tick(now))
            if self.feed is not None:
                self.dispatch(self.feed.poll(now))
        self.gate.expire(now)

    def _reconnected(self, machine: Machine, now: float) -> list[Action]:
        """The machine's `reconnected` event, once per new connection (after the first):
        the broker may have lost its sessions, queued and retained messages meanwhile."""
        connects = self.session.counters["connects"]
        if connects <= max(self._connects, 1) or not self.session.connected:
            return []  # the first connection, or one already told of
        self._connects = connects
        self.counters["reconnects"] += 1
        event = getattr(machine, "reconnected", None)
        return list(event(now)) if event is not None else []

    def _receive(self, machine: Machine, msg: Inbound, now: float,
                 sink: Callable[[list[Action]], Any]) -> None:
        try:
            refusal = self.gate.deliver(msg.topic, msg.payload, now, self.feed,
                                        lambda env, route: sink(machine.handle(env, route, now)))
            if refusal:  # what a machine still sends about a message it refused (an ack)
                sink(refusal)
        except Exception:  # a bug of ours must not take the service down
            self.counters["internal_errors"] += 1
            log.exception("handling a message on %s", msg.topic)

    # ------------------------------------------------------------------ checkpoints

    def _step_durable(self, machine: Machine, msg: Inbound | None, now: float) -> None:
        if msg is not None:
            self._heard_at = now
            self._receive(machine, msg, now, self._outbox.extend)
            key = self.gate.chunk_key(msg.topic, msg.payload)
            if key is not None and self.gate.holds(*key):
                self._held.setdefault(key, []).append(msg)  # acknowledged with its message
            else:
                self._unacked += self._held.pop(key, []) if key is not None else []
                self._unacked.append(msg)
        for action in machine.tick(now):
            if _unheld(action):  # how the node is, not what it decided: out at once
                self.dispatch([action])
            else:
                self._outbox.append(action)
        if self.feed is not None:
            self._outbox += self.feed.poll(now)
        # Chunks of a message dropped (evicted, expired) hold nothing any more; and a long
        # silence may mean the broker waits for acknowledgements before it sends the rest.
        quiet = now - self._heard_at >= HOLD_IDLE_S
        for key in [k for k in self._held if quiet or not self.gate.holds(*k)]:
            self._unacked += self._held.pop(key)
        if urgent(self._outbox) or len(self._unacked) >= ACK_BATCH or self.inbox.empty():
            self.commit(now)

    def commit(self, now: float, retry: bool = False) -> bool:
        """Save what changed; then let out what waited for it and acknowledge what was
        handled. False when the save failed (logged and counted; tried again later)."""
        assert self.durable is not None
        if self.durable.dirty():
            if self.save_failure and not retry and now - self._tried_at < SAVE_RETRY_S:
                return False
            self._tried_at = now
            try:
                self.durable.save()
            except StateError as e:
                self.counters["checkpoint_errors"] += 1
                f = self.save_failure
                if f is None:
                    log.error("%s: %s; nothing is acknowledged or sent until a save succeeds "
                              "(retrying every %.0f s)", self.identity.id, e, SAVE_RETRY_S)
                    self.save_failure = SaveFailure(str(e), now)
                else:
                    f.reason, f.count = str(e), f.count + 1
                return False
            if self.save_failure is not None:
                log.warning("%s: state saved again after %d failed tries in %.0f s",
                            self.identity.id, self.save_failure.count,
                            now - self.save_failure.since)
                self.save_failure = None
            self.counters["checkpoints"] += 1
        out, self._outbox = self._outbox, []
        self.dispatch(out)
        self.session.ack(self._unacked)
        self._unacked = []
        return True

    def alive(self) -> None:
        """Progress: the loop turned, or a long handler (training) finished a batch. Feeds
        the watchdog, so a loop stuck anywhere stops feeding it; once a stop is asked for,
        raises `Stopped` to cut a long handler short."""
        if self.stop_event.is_set():
            raise Stopped
        if self.heartbeat is not None:
            self.heartbeat()

    def run(self, machine: Machine, tick: float = 0.2) -> None:
        """Serve until `stop_event` is set."""
        try:
            while not self.stop_event.is_set():
                self.step(machine, tick)
                self.alive()
        except Stopped:
            pass  # asked to stop in the middle of a step: the caller leaves cleanly


def run_in_thread(node: Node, machine: Machine, name: str) -> threading.Thread:
    """Start `node` and serve `machine` in a daemon thread (the in-process fleet)."""

    def serve() -> None:
        try:
            node.run(machine)
        except Exception:
            log.exception("%s stopped on an error", name)

    t = threading.Thread(target=serve, name=name, daemon=True)
    t.start()
    return t

