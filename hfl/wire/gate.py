"""The inbound gate, free of I/O: raw MQTT payloads in, verified envelopes out.

Reassembles chunks, decodes and verifies the envelope against the roster, binds the
sender to the topic it used, drops exact repeats (QoS 1 redeliveries, retained copies)
and opens bodies sealed for us. Every refusal is counted by reason; nothing a peer sends
raises out of here. A sealed body addressed only to others is not a fault (a round model
for the agents selected this round): it is counted as `not_for_us` and dropped. A chunked
message that never completes is counted when it is dropped: `chunks-evicted` (to keep the
memory bound) or `chunks-expired` (too old); a chunk received again is counted as
`chunk_repeats`, an empty payload (a cleared retained message) as `empty`.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.wire import chunks, envelope
from hfl.wire.chunks import Reassembler
from hfl.wire.envelope import Envelope
from hfl.wire.messages import KNOWN_TYPES, Kind, check_route
from hfl.wire.topics import Route, Topics

T = TypeVar("T")

if TYPE_CHECKING:
    from hfl.runtime.roster_feed import RosterFeed

log = logging.getLogger("hfl.wire.gate")

SEEN_CAPACITY = 100_000  # (sender, nonce) pairs remembered to drop exact repeats
PENDING_BYTES = 1 << 30  # incomplete chunked messages held in all, at least


def pending_bounds(max_message: int) -> tuple[int, int]:
    """What incomplete chunked messages may hold (hfl.wire.chunks.reserved), in all and per
    sender topic. Partials cost only what has arrived of them, so the bounds leave room for
    every sender's upload at once; one sender holds at most a message and a retry."""
    return max(16 * max_message, PENDING_BYTES), 2 * max_message


class Gate:
    def __init__(self, roster: Roster, topics: Topics, *, identity: Identity | None = None,
                 max_message: int = envelope.DEFAULT_MAX_MESSAGE) -> None:
        self.roster = roster
        self.identity = identity  # opens what is sealed for it
        self.topics = topics
        self.max_message = max_message
        self.counters: Counter[str] = Counter()
        self.rejections: Counter[str] = Counter()
        self._seen: OrderedDict[tuple[str, str], None] = OrderedDict()
        in_all, per_key = pending_bounds(max_message)
        self._reassembler = Reassembler(max_message=max_message, max_pending_bytes=in_all,
                                        max_key_bytes=per_key)
        self._evicted = 0  # evictions counted so far
        self._stale = 0  # replaced retained sets counted so far

    def accept(self, topic: str, payload: bytes, now: float) -> tuple[Envelope, Route] | None:
        """One inbound payload → a verified envelope and its route, or None (incomplete,
        a repeat, or rejected and counted)."""
        if not payload:
            self.counters["empty"] += 1
            return None  # a cleared retained message
        try:
            try:
                cut = self.topics.chunk_of(topic)
                if cut is None:
                    data = self._reassembler.feed(topic, payload, now)
                else:  # a frame of the retained set on `topic`, which is the set's from now on
                    topic, index = cut
                    data = self._reassembler.feed_chunk(topic, index, payload, now)
            finally:
                self._count_chunks()
            if data is None:
                return None
            route = self.topics.parse(topic)
            env = envelope.decode(data, topic=topic, public_key=self.roster.public_key,
                                  known_types=KNOWN_TYPES, max_size=self.max_message)
            member = self.roster.get(env.sender)
            if member is None:  # removed from the roster while we decoded
                raise Rejected("unknown-sender", env.sender)
            check_route(Kind(env.type), route, env.sender, member.role, member.group)
        except Rejected as r:
            self.reject(r, topic)
            return None
        key = (env.sender, env.header.nonce)
        if key in self._seen:
            self.counters["duplicates"] += 1
            return None
        self._seen[key] = None
        if len(self._seen) > SEEN_CAPACITY:
            self._seen.popitem(last=False)
        if env.sealed_body is not None and self.identity is not None:
            try:
                env = envelope.unseal(env, self.identity.id, self.identity.seal)
            except Rejected as r:
                if r.reason == "not-for-us":
                    self.counters["not_for_us"] += 1
                else:
                    self.reject(r, topic)
                return None
        self.counters["received"] += 1
        return env, route

    def deliver(self, topic: str, payload: bytes, now: float, feed: RosterFeed | None,
                handle: Callable[[Envelope, Route], T]) -> T | None:
        """The one way a received message reaches its reader: accepted (verified, opened),
        then a signed roster to `feed` and anything else to `handle`; a message either of
        them refuses is counted by its reason. Returns what `handle` returned, or the
        refusal's answer (a list of actions), else None."""
        accepted = self.accept(topic, payload, now)
        if accepted is None:
            return None
        env, route = accepted
        try:
            if env.type != Kind.ROSTER.value:
                return handle(env, route)
            if feed is not None:
                feed.on_message(env)
        except Rejected as r:
            self.reject(r, f"{env.type} from {env.sender}")
            if r.answer:
                return r.answer  # type: ignore[return-value]
        return None

    def reject(self, r: Rejected, where: str) -> None:
        self.rejections[r.reason] += 1
        log.warning("rejected %s: %s", where, r)

    def holds(self, topic: str, msg_id: bytes) -> bool:
        """Whether chunks of message `msg_id` on `topic` wait for the rest."""
        return self._reassembler.holds(topic, msg_id)

    def chunk_key(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """(topic, message id) of the message a chunk frame belongs to, for `holds`: a frame
        on a chunk subtopic belongs to its topic's retained set. None for anything else."""
        msg_id = chunks.message_id(payload)
        if msg_id is None:
            return None
        cut = self.topics.chunk_of(topic)
        return (topic if cut is None else cut[0]), msg_id

    @property
    def pending(self) -> tuple[int, int]:
        """Incomplete chunked messages held, and their bytes."""
        return self._reassembler.pending, self._reassembler.pending_bytes

    def _count_chunks(self) -> None:
        r = self._reassembler
        if r.evicted > self._evicted:
            self.rejections["chunks-evicted"] += r.evicted - self._evicted
            self._evicted = r.evicted
        if r.stale > self._stale:
            self.rejections["chunks-stale"] += r.stale - self._stale
            self._stale = r.stale
        if r.repeats > self.counters["chunk_repeats"]:
            self.counters["chunk_repeats"] = r.repeats

    def expire(self, now: float) -> None:
        expired = self._reassembler.expire(now)
        if expired:
            self.rejections["chunks-expired"] += expired
