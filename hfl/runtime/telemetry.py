"""A service's telemetry, read off what it already has: nothing is counted twice.

- `Stats` folds the actions its machine returns (as hfl.runtime.activity does) into what no counter
  holds yet: rounds, retries, failures, updates summed, round durations and the ε spent
  per job. Pure: time is an argument.
- `Telemetry` keeps a node's `Stats` and `Activity` current (a node observer) and adds the
  counters its node, gate and MQTT session keep, in one snapshot, `TelemetryMeta`: the
  signed, retained message on `telemetry/{role}/{id}` that `hfl status` and `hfl dashboard`
  read, and what the Prometheus endpoint (hfl.runtime.metrics) serves at each scrape.
- `instrument` wraps the node's machine so that its tick also returns that message when
  something changed, at most every `interval` seconds, and at least every `every` seconds
  (a service: each interval; an agent, of which there are thousands: every 12), so that an
  observer can tell a node gone quiet (stale) from a node with nothing new. The runner sends
  it like any other, and at once even while its state saves fail (hfl.runtime.node).

What an operator must be able to trust is in it too: when the process started and how often
the service started before on its state folder (a counter back at 0 is a restart), the blocks
an aggregator keeps failing (`failing`: why, since when, how many) and the saves failing now
(`saves_failing`: the last error, since when).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hfl.runtime.actions import Action, Note, Send
from hfl.runtime.activity import Activity
from hfl.runtime.node import Machine, Node
from hfl.wire.messages import (
    ActivityMeta,
    Counts,
    Failing,
    Kind,
    Role,
    RoundTimes,
    TelemetryMeta,
)
from hfl.wire.topics import ID_MAX

DEFAULT_INTERVAL = 5.0
# Upper bounds of the round-duration histogram, in seconds (Prometheus `le` buckets).
ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
MAX_OPEN = 256  # rounds started and not yet ended that are remembered (retries leave some)
MAX_FAILING = 64  # jobs whose blocks fail that are remembered
AGENT_EVERY = 12  # an agent's telemetry goes out at least every 12 intervals (a service's: 1)


@dataclass
class Stats:
    """Counts and round durations from a node's actions.

    A round starts with an aggregator's `round_open`, an agent's `train` or the coordinator's
    first task of a block, and ends with `round_closed`, `update_sent` or the version that
    block made; (job, round) pairs them up."""

    rounds: int = 0
    retries: int = 0
    failures: int = 0
    updates: int = 0
    dropped: int = 0
    declines: dict[str, int] = field(default_factory=dict)  # rounds sat out, by reason
    epsilon: dict[str, float] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * (len(ROUND_BUCKETS) + 1))
    round_count: int = 0
    round_total: float = 0.0
    round_last: float | None = None
    failing: dict[str, Failing] = field(default_factory=dict)  # job → its blocks failing now
    _open: dict[tuple[str, int], float] = field(default_factory=dict)

    def observe(self, action: Any, now: float) -> None:
        if isinstance(action, Send):
            if action.kind is Kind.TASK:  # the coordinator starts (or retries) a block
                self._start((action.job, action.round), now)
            return
        if not isinstance(action, Note):
            return
        f, event = action.fields, action.event
        job, rnd = f.get("job"), f.get("round")
        if event in ("round_open", "train"):
            self._start((job, rnd), now)
        elif event == "round_closed":
            self.rounds += 1
            self.updates += int(f.get("agents", 0))
            self.dropped += len(f.get("dropped", ()))
            self._end((job, rnd), now)
        elif event == "update_sent":
            self.rounds += 1
            self._end((job, rnd), now)
        elif event == "version":
            self.rounds += 1
            if isinstance(f.get("version"), int):
                self._end((job, f["version"] - 1), now)
            if f.get("epsilon") is not None:
                self.epsilon[str(job)] = float(f["epsilon"])
        elif event == "declined":  # an agent's own, or at its aggregator, each of its agents'
            reason = str(f.get("reason", "unknown"))[:64]
            self.declines[reason] = self.declines.get(reason, 0) + 1
        elif event in ("round_retry", "block_retry"):
            self.retries += 1
        elif event == "block_failed" or (event == "job_ended" and f.get("state") == "failed"):
            self.failures += 1
            if event == "block_failed":
                self._failed(str(job), str(f.get("reason", "unknown")), now)
        elif event == "partial_sent" and f.get("weight", 0) > 0:
            self.failing.pop(str(job), None)  # a block that worked ends the streak

    def _failed(self, job: str, reason: str, now: float) -> None:
        old = self.failing.pop(job, None)
        self.failing[job] = Failing(reason=reason[:500], since=old.since if old else now,
                                    count=old.count + 1 if old else 1, job=job[:ID_MAX])
        if len(self.failing) > MAX_FAILING:
            del self.failing[next(iter(self.failing))]

    def failure(self) -> Failing | None:
        """The job whose block failed last, while its blocks keep failing."""
        return next(reversed(self.failing.values()), None)

    def _start(self, key: tuple[Any, Any], now: float) -> None:
        self._open.setdefault(key, now)  # a retried block keeps its first start
        if len(self._open) > MAX_OPEN:
            del self._open[next(iter(self._open))]

    def _end(self, key: tuple[Any, Any], now: float) -> None:
        start = self._open.pop(key, None)
        if start is None:
            return  # started before this process did
        seconds = max(now - start, 0.0)
        self.buckets[bisect.bisect_left(ROUND_BUCKETS, seconds)] += 1
        self.round_count += 1
        self.round_total += seconds
        self.round_last = seconds

    def cumulative_buckets(self) -> list[tuple[float, int]]:
        """(upper bound, rounds that took at most that long), the last bound infinite."""
        out, total = [], 0
        for bound, n in zip((*ROUND_BUCKETS, float("inf")), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class Telemetry:
    """One node's telemetry: its activity and stats, folded from its actions, and its
    counters, in one `TelemetryMeta` snapshot."""

    def __init__(self, node: Node, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.time, every: float | None = None) -> None:
        ident = node.identity
        agg = ident.id if ident.role is Role.AGGREGATOR else node.group
        self.node, self.interval, self.clock = node, interval, clock
        if every is None:
            every = interval * (AGENT_EVERY if ident.role is Role.AGENT else 1)
        self.every = max(every, interval)
        self._last = float("-inf")  # when the last message went out
        self.topic = node.topics.telemetry(ident.role.value, ident.id)
        self.activity = Activity(ident.role.value, ident.id, agg)
        self.stats = Stats()
        self.started = clock()
        self._sent: dict[str, Any] | None = None  # what the last message said
        self._next = 0.0
        node.observers.append(self.observe)

    def observe(self, action: Action) -> None:
        self.activity = self.activity.after(action)
        self.stats.observe(action, self.clock())

    def counts(self) -> Counts:
        # dict() copies a Counter in one step under the GIL: safe from a scraping thread.
        n, g = dict(self.node.counters), dict(self.node.gate.counters)
        s, st = dict(self.node.session.counters), self.stats
        return Counts(
            messages_in=g.get("received", 0), messages_out=n.get("sent", 0),
            bytes_in=s.get("bytes_received", 0), bytes_out=n.get("bytes_sent", 0),
            duplicates=g.get("duplicates", 0), connects=s.get("connects", 0),
            disconnects=s.get("disconnects", 0), internal_errors=n.get("internal_errors", 0),
            unsendable=n.get("unsendable", 0), checkpoints=n.get("checkpoints", 0),
            checkpoint_errors=n.get("checkpoint_errors", 0),
            registry_errors=n.get("registry_errors", 0), rounds=st.rounds, retries=st.retries,
            failures=st.failures, updates=st.updates, dropped=st.dropped)

    def restarts(self) -> int | None:
        """Starts before this one on the node's state folder; None without one."""
        durable = self.node.durable
        starts = durable.store.starts if durable is not None else None
        return max(starts - 1, 0) if starts else None

    def saves_failing(self) -> Failing | None:
        f = self.node.save_failure
        return None if f is None else Failing(reason=f.reason[:500], since=f.since,
                                              count=f.count)

    def meta(self, now: float) -> TelemetryMeta:
        a, st = self.activity, self.stats
        return TelemetryMeta(
            uptime_s=max(now - self.started, 0.0),
            started=self.started,
            restarts=self.restarts(),
            every_s=self.every if self.interval > 0 else None,
            failing=st.failure(),
            saves_failing=self.saves_failing(),
            activity=ActivityMeta(job=a.job, block=a.block, round=a.round, stage=a.stage[:64]),
            counts=self.counts(),
            round_s=RoundTimes(count=st.round_count, total_s=st.round_total,
                               last_s=st.round_last),
            rejections=dict(self.node.rejections),
            declines=dict(st.declines),
            epsilon=dict(st.epsilon))

    def tick(self, now: float) -> list[Action]:
        """The telemetry message when something changed since the last one (its own
        sending aside), checked at most every `interval` seconds, or when `every` seconds
        passed since the last one; an interval of 0 turns it off."""
        if self.interval <= 0 or now < self._next:
            return []
        self._next = now + self.interval
        meta = self.meta(now)
        said = meta.model_dump(exclude={"uptime_s": True,
                                        "counts": {"messages_out", "bytes_out"}})
        if said == self._sent and now - self._last < self.every:
            return []
        self._sent, self._last = said, now
        return [Send(Kind.TELEMETRY, self.topic, "", 0, "telemetry",
                     meta.model_dump(mode="json"), retain=True)]


class Instrumented:
    """A machine whose tick also returns its node's telemetry when it is due."""

    def __init__(self, machine: Machine, telemetry: Telemetry) -> None:
        self.machine, self.telemetry = machine, telemetry

    def handle(self, env: Any, route: Any, now: float) -> list[Action]:
        return self.machine.handle(env, route, now)

    def tick(self, now: float) -> list[Action]:
        return [*self.machine.tick(now), *self.telemetry.tick(now)]

    def reconnected(self, now: float) -> list[Action]:
        event = getattr(self.machine, "reconnected", None)
        return event(now) if event is not None else []


def instrument(node: Node, machine: Machine, interval: float = DEFAULT_INTERVAL,
               every: float | None = None) -> tuple[Telemetry, Instrumented]:
    telemetry = Telemetry(node, interval, every=every)
    return telemetry, Instrumented(machine, telemetry)
