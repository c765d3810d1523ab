"""End-to-end delivery: what a machine sent and its receiver has not acknowledged yet.

A broker's PUBACK says only that the broker took a message. A broker killed before it
saved it (or one that keeps nothing: a restart without persistence, a fail-over) loses it,
along with every session, so a message published before its receiver has subscribed again
goes nowhere. The messages a job cannot do without therefore carry an acknowledgement of
their own, from the receiver, once what they changed is saved (`Kind.ACK`, `AckMeta`):

- an agent's answers in an edge round (`update`, `decline`, and every SecAgg+ stage:
  `advert`, `shares`, `masked`, `unshares`), acknowledged by its aggregator;
- an aggregator's partial, acknowledged by the coordinator;
- the coordinator's tasks, acknowledged by each aggregator.

The sender keeps each such message here until its acknowledgement comes and sends it
again: at once when its own connection comes back (`reconnected`) or when the receiver
says it is online again (its status is published after it has subscribed, so a message
sent then reaches it), and otherwise, as a last resort, after `first_s`, doubling up to
`max_s`. It stops
when the acknowledgement comes, when the machine says the round or block is over or
superseded (`forget`), or after `give_up_s`. Receivers already drop repeats; they answer
each one with an acknowledgement again, so a lost acknowledgement costs one more copy.

Pure bookkeeping: no clock (time is an argument), no I/O; the machines own an `Outbox`
each and return what it gives them as actions.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hfl.runtime.actions import Send
from hfl.wire.messages import AckMeta, Kind, parse_meta

if TYPE_CHECKING:
    from hfl.wire.envelope import Envelope
    from hfl.wire.topics import Topics

# The timer is the last resort: a reconnection and the receiver's online status send again
# at once, and a broker that lost a message restarted, so both come. A receiver slow to
# acknowledge (a thousand agents' updates to save) must not get every message twice.
RESEND_FIRST_S = 30.0  # the first copy waits this long for its acknowledgement
RESEND_MAX_S = 300.0  # the wait doubles with each copy, up to this
GIVE_UP_S = 3600.0  # a message unacknowledged this long is dropped (the session expiry)
JITTER = 0.25  # each wait is stretched by up to this fraction, so a fleet does not resend
# in lockstep (derived from the message and the copy number: no randomness, no clock)


@dataclass(frozen=True)
class Key:
    """A message by what it is, not by its bytes: every copy has a fresh nonce."""

    to: str  # the receiver, whose acknowledgement settles it
    kind: str
    job: str
    round: int
    stage: str

    @classmethod
    def of(cls, send: Send, to: str) -> Key:
        return cls(to, send.kind.value, send.job, send.round, send.stage)


@dataclass
class _Pending:
    send: Send
    since: float | None  # when it was first sent (None: not yet known, set at the next tick)
    due: float | None  # when the next copy goes
    step: int = 0  # the back-off step: copies sent since the first (or since a reconnect)


class Outbox:
    """Messages sent and not yet acknowledged, with when to send each one again."""

    def __init__(self, first_s: float = RESEND_FIRST_S, max_s: float = RESEND_MAX_S,
                 give_up_s: float = GIVE_UP_S) -> None:
        if not 0 < first_s <= max_s:
            raise ValueError("need 0 < first_s <= max_s")
        self.first_s, self.max_s, self.give_up_s = first_s, max_s, give_up_s
        self._pending: dict[Key, _Pending] = {}
        self.resent = 0  # copies sent again, all told
        self.acked = 0  # acknowledgements that settled a message
        self.given_up = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, key: Key) -> bool:
        return key in self._pending

    def pending(self) -> list[Key]:
        return list(self._pending)

    def track(self, send: Send, to: str, now: float | None = None) -> Send:
        """`send` is going out to `to`: keep it until acknowledged (a message with the same
        key replaces it, its schedule started afresh). `now` None: a handler that is not
        given the time; the schedule starts at the next `due`. Returns `send`."""
        p = _Pending(send, now, None)
        if now is not None:
            p.due = now + self._wait(Key.of(send, to), 0)
        self._pending[Key.of(send, to)] = p
        return send

    def ack(self, key: Key) -> bool:
        """The receiver has it: never send it again. False when it was not waiting (a
        second acknowledgement, or one for a message given up or forgotten)."""
        if self._pending.pop(key, None) is None:
            return False
        self.acked += 1
        return True

    def forget(self, job: str, *, kind: str | None = None, before: int | None = None,
               round: int | None = None, to: str | None = None) -> int:
        """Stop sending `job`'s messages (of `kind`, to `to`) for rounds below `before`, or
        of round `round`, or all of them: the round or block is over or superseded, so a
        copy could only be refused. Returns how many were dropped."""
        drop = [k for k in self._pending
                if k.job == job and (kind is None or k.kind == kind)
                and (to is None or k.to == to)
                and (before is None or k.round < before)
                and (round is None or k.round == round)]
        for k in drop:
            del self._pending[k]
        return len(drop)

    def due(self, now: float) -> tuple[list[Send], list[Key]]:
        """The copies to send now, and the messages given up (dropped) at `now`."""
        out: list[Send] = []
        gone: list[Key] = []
        for key, p in list(self._pending.items()):
            if p.since is None:  # tracked without a time: its schedule starts now
                p.since, p.due = now, now + self._wait(key, 0)
                continue
            if now - p.since >= self.give_up_s:
                del self._pending[key]
                gone.append(key)
                continue
            if p.due is not None and now >= p.due:
                out.append(self._again(key, p, now, p.step + 1))
        self.given_up += len(gone)
        return out, gone

    def reconnected(self, now: float) -> list[Send]:
        """Our connection came back (the broker may have lost what it held for us): every
        message again, now, each with its back-off started afresh."""
        return self._now(self._pending, now)

    def peer_online(self, peer: str, now: float) -> list[Send]:
        """`peer` says it is online, so subscribed: what waits for it, again, now."""
        return self._now([k for k in self._pending if k.to == peer], now)

    def _now(self, keys: Iterable[Key], now: float) -> list[Send]:
        out = []
        for key in list(keys):
            p = self._pending[key]
            if p.since is None:
                p.since = now
            out.append(self._again(key, p, now, 0))  # a new connection: back-off afresh
        return out

    def _again(self, key: Key, p: _Pending, now: float, step: int) -> Send:
        p.step = step
        p.due = now + self._wait(key, step)
        self.resent += 1
        return p.send

    def _wait(self, key: Key, step: int) -> float:
        """How long a copy at back-off `step` waits for its acknowledgement: first_s ·
        2^step, at most max_s, stretched by a jitter that is a function of the message and
        the step."""
        base = min(self.first_s * 2.0 ** min(step, 32), self.max_s)
        h = zlib.crc32(f"{key.to}\0{key.kind}\0{key.job}\0{key.round}\0{key.stage}\0"
                       f"{step}".encode())
        return base * (1.0 + JITTER * (h / 0xFFFFFFFF))


def ack(me: str, topics: Topics, env: Envelope, outcome: str, reason: str = "") -> Send:
    """`me`'s acknowledgement of `env` to its sender: its job, round and stage, the kind in
    `meta.of`; `outcome` taken, repeat, late or refused (with `reason`)."""
    meta = AckMeta(of=env.type, outcome=outcome, reason=reason[:200])  # type: ignore[arg-type]
    return Send(Kind.ACK, topics.ack(me, env.sender), env.job, env.round, env.stage,
                meta.model_dump(mode="json"))


def acked(env: Envelope) -> tuple[Key, AckMeta]:
    """The key of the message an acknowledgement settles (sent to its sender), and what it
    says; a malformed one is `Rejected("bad-meta")`."""
    meta = parse_meta(AckMeta, env.meta)
    return Key(env.sender, meta.of, env.job, env.round, env.stage), meta
