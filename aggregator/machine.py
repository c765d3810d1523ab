"""The aggregator's edge rounds as a sans-I/O state machine (HierFAVG).

Events in: a verified task from the coordinator, agents' updates and status, and `now`.
Actions out: round announcements (retained) to the group, the partial to the coordinator.

A task asks for one block of κ1 edge rounds starting from the global model. Each edge
round selects agents and sends them the model, sealed for them. With secure aggregation
(the default) the round runs the SecAgg+ stages (`aggregator.secure`) and yields only the
group's sum; without it, the agents' sealed deltas go into a streaming weighted sum. Either
way the round ends when every selected agent answered or the deadline passed, and moves the
edge model by the mean delta. After κ1 rounds the partial is `W·(edge model − global model)`
with weight W, the samples of the last round (with κ1 = 1 exactly Σ n_i·Δ_i), sealed for
the coordinator.

Checkpoints: the machine names the records a change touched in `changed` (`job/{job}`: the
block and its edge model; `round/{job}`: the round being collected — the running sum and
who is in it, or the SecAgg+ server's own state; in a secure round `sum/{job}`, the masked
sum, written only when a masked input changes it, and `client/{job}/{round}/{agent}`, what
an agent sent, written once rather than with every later message, which made a round's
saves O(n²)) and builds each with `record`; the runner
saves them (`hfl.runtime.state`) before it acknowledges the messages behind them or lets out what
they produced. `restore` takes them back after a restart and `resume` says what to send
again: nothing is counted twice, as who contributed is part of the record.

End-to-end delivery (`hfl.runtime.delivery`), so that a broker that loses what it held loses nothing
of a job: every agent's answer and every task is acknowledged (`Kind.ACK`: taken, a repeat,
or refused and why) once what it changed is saved, a repeat too, so a lost acknowledgement
costs one more copy; a repeat of the round that just ended is recognised as such. The
partial waits in an `Outbox` until the coordinator acknowledges it (a new block ends that).
Messages to the agents need no acknowledgement of their own: their answers are one. When
the connection comes back (`reconnected`), the partial, the round announcement (retained)
and the current SecAgg+ stage go again; when an agent the round waits for says it is online
(after it subscribed), what it waits for goes again, once for all such agents in a second
(and at most every 5 s).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from aggregator.secure import Abort, Done, SecureRound
from hfl.crypto.secagg import MIN_CLIENTS
from hfl.crypto.secagg_wire import WireStage
from hfl.errors import Rejected
from hfl.models.aggregate import WeightedSum
from hfl.privacy.dp import AdaptiveClip, NoiseSource, adaptive_noise, edge_noise_std
from hfl.runtime import record as codec
from hfl.runtime.actions import Action, Note, Send, effects
from hfl.runtime.delivery import Outbox, ack, acked
from hfl.runtime.record import stored, transient
from hfl.runtime.state import Record
from hfl.wire.messages import (
    DeclineMeta,
    Kind,
    Metrics,
    ModelSpec,
    Origin,
    PartialMeta,
    Release,
    RoundMeta,
    StatusMeta,
    TaskMeta,
    UpdateMeta,
    expect_tensor,
    parse_meta,
)
from hfl.wire.quantize import dequantize_int8
from hfl.wire.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.wire.envelope import Envelope


# After a restart, an open round gets at least this long past its old deadline to take in
# the messages the broker kept for us while we were down.
RESUME_GRACE_S = 5.0
# Agents that come back online within this long are sent their round's messages once, and
# a round sends them again at most this often (its announcement is sealed for every agent).
NUDGE_S = 1.0
NUDGE_EVERY_S = 5.0


def update_delta(tensors: dict[str, np.ndarray], spec: ModelSpec, num_params: int) -> np.ndarray:
    """A plain update's float32 delta: as sent, or dequantized from int8 levels and a scale."""
    if spec.compression != "int8":
        return expect_tensor(tensors, "delta", np.float32, (num_params,))
    q = expect_tensor(tensors, "delta_q", np.int8, (num_params,))
    scale = expect_tensor(tensors, "scale", np.float32, (1,))
    if not scale[0] >= 0:  # finite is checked on decode; a negative scale mirrors the update
        raise Rejected("bad-meta", f"int8 scale {scale[0]} < 0")
    return dequantize_int8(q, scale)


def round_id(spec: ModelSpec, block: int, edge_round: int, attempt: int) -> int:
    """A round number unique and increasing within a job, derived, never stored."""
    return (block * spec.kappa1 + edge_round) * (spec.max_retries + 1) + attempt


def select(candidates: list[str], spec: ModelSpec, rnd: int) -> list[str]:
    """Sample ⌈C·n⌉ (at least the quorum) agents, reproducibly for (seed, model, round):
    a rerun of the same spec under a new job id samples the same agents — or, for a DP job,
    from a secret seed: privacy amplification by sampling needs a sample that the model's
    consumers cannot predict."""
    k = spec.sample_size(len(candidates))
    digest = (os.urandom(32) if spec.privacy is not None
              else hashlib.sha256(f"{spec.seed}/{spec.name}/{rnd}".encode()).digest())
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    picked = rng.choice(len(candidates), size=k, replace=False)
    return sorted(candidates[i] for i in picked)


def _dump_partial(partial: Send | None) -> tuple[dict | None, np.ndarray | None]:
    return (partial.meta, partial.tensors.get("sum")) if partial is not None else (None, None)


def _load_partial(meta: dict | None, total: np.ndarray | None, ej: EdgeJob,
                  ctx: Mapping[str, Any]) -> Send | None:
    return None if meta is None else partial_send(ctx["topics"], ctx["agg_id"], ej, meta, total)


@dataclass
class EdgeJob:
    """The block: its record (`job/{job}`) is this, declared (`hfl.runtime.record`); the
    round being collected has its own record (`round/{job}`), built by the machine."""

    job: str = field(metadata=transient)  # the record's key
    spec: ModelSpec
    num_params: int
    block: int
    global_params: np.ndarray = field(metadata=stored("global"))
    params: np.ndarray
    coordinator: str
    origin: Origin
    edge_round: int = 0
    attempt: int = 0
    selected: list[str] = field(default_factory=list)
    # The round being collected: in `round/{job}`.
    acc: WeightedSum | None = field(default=None, metadata=transient)  # plain rounds
    secure: SecureRound | None = field(default=None, metadata=transient)  # secure rounds
    senders: set[str] = field(default_factory=set, metadata=transient)
    deadline: float = 0.0
    dropped: int = 0  # agents whose masks were recovered in this block
    candidates: list[str] = field(default_factory=list)  # this edge round's sampling pool
    # adaptive clipping, plain rounds: Σ of the agents' bits (in `round/{job}`)
    clip_bits: float = field(default=0.0, metadata=transient)
    releases: list[Release] = field(default_factory=list)  # this block's, for DP accounting
    declined: dict[str, str] = field(default_factory=dict)  # this block's: agent → why
    # The block's result, kept to answer a repeated task: its meta, and its sum as an array.
    partial: Send | None = field(default=None, metadata=stored(dump=_dump_partial,
                                                               load=_load_partial))
    # Soft state: agents the round waits for that came online, and when to send them its
    # messages again (one copy for all that come within NUDGE_S).
    nudge: set[str] = field(default_factory=set, metadata=transient)
    nudge_at: float | None = field(default=None, metadata=transient)
    # when they were last sent again for agents back online
    nudged: float = field(default=float("-inf"), metadata=transient)

    @property
    def round(self) -> int:
        return round_id(self.spec, self.block, self.edge_round, self.attempt)

    @property
    def collecting(self) -> bool:
        return self.acc is not None or self.secure is not None


class AggregatorMachine:
    def __init__(self, agg_id: str, group: Callable[[], list[str]], topics: Topics) -> None:
        self.id = agg_id
        self.group = group  # the agents enrolled under us now (a re-issued roster may change it)
        self.topics = topics
        self.online: set[str] = set()
        self.jobs: dict[str, EdgeJob] = {}
        self.noise = NoiseSource()  # edge-mode DP noise, from a secret seed
        self.clips: dict[str, AdaptiveClip] = {}  # per DP job with adaptive clipping
        self.changed: set[str] = set()  # records to save before anything goes out
        self._clients: dict[str, set[str]] = {}  # job → its agents' records in the store
        # Agents that let a round down (silent past its deadline, or gone mid-way): left out
        # of selection while the others suffice, until they send anything signed again. An
        # "online" status is no proof: a stalled board can keep its connection.
        self.silent: dict[str, float] = {}
        self.outbox = Outbox()  # partials not yet acknowledged by the coordinator
        # Per job, the round that ended last and who answered which of its stages: a copy
        # an agent sends again after it ended is a repeat, not a stale message (soft state).
        self.past: dict[str, tuple[int, dict[str, set[str]]]] = {}

    # ------------------------------------------------------------------ events

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        kind = Kind(env.type)
        if kind is Kind.STATUS:
            return self._status(env, route, now)
        if kind is Kind.ACK:
            return self._acked(env)
        if kind not in (Kind.TASK, Kind.UPDATE):
            raise Rejected("unexpected-type", f"aggregator does not take {kind.value}")
        if kind is Kind.UPDATE:
            self.silent.pop(env.sender, None)  # it answers: alive, even if late
        try:
            out = self._task(env, now) if kind is Kind.TASK else self._update(env, now)
        except Rejected as r:  # acknowledged all the same: a copy would be refused too
            raise Rejected(r.reason, r.detail, answer=[
                *r.answer, ack(self.id, self.topics, env, "refused", str(r))]) from None
        repeat = any(isinstance(a, Note) and a.event == "duplicate" for a in out)
        if repeat and not effects(out):
            # Nothing changed: nothing to save. Its acknowledgement still waits for the save
            # of the batch that holds the first copy (the node sends none before).
            return [*out, ack(self.id, self.topics, env, "repeat")]
        also = []
        if kind is Kind.UPDATE and env.stage != "update":  # a SecAgg+ stage: its own record
            also.append(f"client/{env.job}/{env.round}/{env.sender}")
            if env.stage == WireStage.MASKED:
                also.append(f"sum/{env.job}")
        self._touched(env.job, block=kind is Kind.TASK or effects(out), also=also)
        return [*out, ack(self.id, self.topics, env, "repeat" if repeat else "taken")]

    def reconnected(self, now: float) -> list[Action]:
        """The connection is back, maybe to a broker that lost every session and retained
        message: the partials not yet acknowledged, and for each open round its
        announcement (retained; while agents train) or the SecAgg+ stage's messages."""
        out: list[Action] = list(self.outbox.reconnected(now))
        for ej in self.jobs.values():
            out += self._again(ej, None)
        return out

    def _again(self, ej: EdgeJob, agents: set[str] | None) -> list[Action]:
        """What the round being collected asked its agents (or only `agents`, where the
        stage has a message for each), sent again: the agents answer each message once and
        drop a repeat, their answers waiting for our acknowledgement do the rest."""
        ej.nudge, ej.nudge_at = set(), None
        if ej.secure is not None and ej.secure.stage is not WireStage.ADVERT:
            return list(ej.secure.broadcast(agents))
        return self._announce(ej) if ej.collecting else []

    def _awaited(self, ej: EdgeJob) -> set[str]:
        """The agents the round being collected still waits for."""
        if ej.secure is not None:
            return ej.secure.expected - ej.secure.got
        if ej.acc is not None:
            return self._plain_unanswered(ej)
        return set()

    def _acked(self, env: Envelope) -> list[Action]:
        key, meta = acked(env)
        self.outbox.ack(key)
        if meta.outcome == "refused":
            return [Note("partial_refused", {"job": env.job, "block": env.round,
                                             "reason": meta.reason})]
        return []

    def tick(self, now: float) -> list[Action]:
        again, gone = self.outbox.due(now)
        out: list[Action] = [*again, *(Note("gave_up", {"job": k.job, "block": k.round})
                                       for k in gone)]
        for ej in list(self.jobs.values()):
            if ej.nudge_at is not None and now >= ej.nudge_at:
                who = ej.nudge & self._awaited(ej)
                if who:
                    out += self._again(ej, who)
                    ej.nudged = now
                ej.nudge, ej.nudge_at = set(), None
            if ej.secure is not None:
                acts = ej.secure.tick(now) + self._settle(ej, now)
            elif ej.acc is not None and now >= ej.deadline:
                if ej.acc.count >= ej.spec.min_agents:
                    acts = self._close_plain(ej, now)
                else:
                    acts = self._retry(ej, now, f"{ej.acc.count} < {ej.spec.min_agents}")
            else:
                continue
            if acts:
                self._touched(ej.job, block=True)
            out += acts
        return out

    # ------------------------------------------------------------------ checkpoints

    def _touched(self, job: str, block: bool, also: list[str] | None = None) -> None:
        """An accepted update changes the round (in a secure round, its sender's record and,
        in the masked stage, the sum: `also`); anything that sends changes the block, and
        may end the secure round whose sum and agents' records are saved: they are saved
        again, or deleted, with it."""
        self.changed.add(f"round/{job}")
        self.changed.update(also or ())
        if block:
            self.changed.update((f"job/{job}", f"sum/{job}"))
            self.changed.update(self._clients.get(job, ()))

    def record(self, key: str) -> Record | None:
        """The record `key` as it is now; None when it no longer exists."""
        kind, _, job = key.partition("/")
        if kind == "client":
            return self._client_record(key)
        ej = self.jobs.get(job)
        if ej is None:
            return None
        if kind == "sum":
            return ej.secure.export_sum() if ej.secure is not None else None
        if kind == "job":
            doc, arrays = codec.dump(ej)
            clip = self.clips.get(job)
            return {**doc, "clip": clip.bound if clip else None}, arrays
        if ej.secure is not None:
            return {"secure": ej.secure.export()}, {}
        if ej.acc is not None:
            doc, total = ej.acc.state()
            return {"plain": doc, "senders": sorted(ej.senders), "clip_bits": ej.clip_bits}, {
                "total": total}
        return None

    def _client_record(self, key: str) -> Record | None:
        """`client/{job}/{round}/{agent}`: what the agent sent in that secure round, while
        the round is open; saved once as it comes, not with every later message."""
        _, job, rnd, agent = key.split("/")
        ej = self.jobs.get(job)
        rec = None
        if ej is not None and ej.secure is not None and str(ej.secure.round) == rnd:
            rec = ej.secure.export_client(agent)
        saved = self._clients.setdefault(job, set())
        if rec is None:
            saved.discard(key)
        else:
            saved.add(key)
        return rec

    def restore(self, records: dict[str, Record]) -> None:
        """Take back what `record` saved (before the node starts)."""
        clients: dict[tuple[str, str], dict[str, Record]] = {}
        for key in records:
            if key.startswith("client/"):
                _, job, rnd, agent = key.split("/")
                clients.setdefault((job, rnd), {})[agent] = records[key]
                self._clients.setdefault(job, set()).add(key)  # stale ones go at the next save
        for key, (doc, arrays) in records.items():
            kind, _, job = key.partition("/")
            if kind != "job":
                continue
            ej = codec.load(EdgeJob, (doc, arrays), job=job, topics=self.topics,
                             agg_id=self.id)
            spec, p = ej.spec, ej.spec.privacy
            if doc["clip"] is not None and p is not None and p.noise_multiplier is not None:
                self.clips[job] = AdaptiveClip(doc["clip"], p.target_quantile, p.clip_lr,
                                               bit_noise_std=adaptive_noise(
                                                   p.noise_multiplier, spec.min_agents)[0])
            round_rec = records.get(f"round/{job}")
            if round_rec is not None:
                self._restore_round(ej, *round_rec, records.get(f"sum/{job}"),
                                    clients.get((job, str(ej.round)), {}))
            self.jobs[job] = ej

    def _restore_round(self, ej: EdgeJob, doc: dict, arrays: dict[str, np.ndarray],
                       summed: Record | None, clients: dict[str, Record]) -> None:
        if "secure" in doc:
            ej.secure = SecureRound.restore(ej.job, ej.round, ej.selected, ej.num_params,
                                            ej.spec, self.topics, self.id, doc["secure"],
                                            summed, clients)
        else:
            ej.acc = WeightedSum.restore(doc["plain"], arrays["total"], ej.spec.metrics)
            ej.senders, ej.clip_bits = set(doc["senders"]), doc["clip_bits"]

    def resume(self, now: float) -> list[Action]:
        """After `restore`: send again what may not have left before the crash (receivers
        take repeats idempotently), and give each open round a little time to take in what
        the broker kept for us meanwhile before its deadline closes it."""
        out: list[Action] = []
        for ej in self.jobs.values():
            if ej.partial is not None:
                out.append(self.outbox.track(ej.partial, ej.coordinator, now))
            elif ej.collecting:
                ej.deadline = max(ej.deadline, now + RESUME_GRACE_S)
                out += self._announce(ej)
                if ej.secure is not None:
                    ej.secure.deadline = max(ej.secure.deadline, now + RESUME_GRACE_S)
                    out += ej.secure.broadcast()
                self._touched(ej.job, block=True)
            out.append(Note("resumed", {"job": ej.job, "round": ej.round,
                                        "stage": ej.secure.stage if ej.secure else None,
                                        "done": ej.partial is not None}))
        return out

    def _status(self, env: Envelope, route: Route, now: float) -> list[Action]:
        meta = parse_meta(StatusMeta, env.meta)
        online = meta.state == "online"
        if route.role == "coordinator":  # back online, so subscribed: its partials again
            return list(self.outbox.peer_online(env.sender, now)) if online else []
        if env.sender in self.group():
            (self.online.add if online else self.online.discard)(env.sender)
        if online:  # (again): a round that waits for it sends it what it waits for
            for ej in self.jobs.values():
                if env.sender in self._awaited(ej):
                    ej.nudge.add(env.sender)
                    if ej.nudge_at is None:
                        ej.nudge_at = max(now + NUDGE_S, ej.nudged + NUDGE_EVERY_S)
        return []

    def _task(self, env: Envelope, now: float) -> list[Action]:
        meta = parse_meta(TaskMeta, env.meta)
        if self.id not in meta.spec.aggregators:
            raise Rejected("not-in-job", f"task for {meta.spec.aggregators}")
        params = expect_tensor(env.tensors, "params", np.float32, (meta.num_params,))
        ej = self.jobs.get(env.job)
        if ej is not None and env.round < ej.block:
            raise Rejected("stale-round", f"task block {env.round} < {ej.block}")
        if ej is not None and env.round == ej.block:
            # The coordinator repeated the task: answer again if done, else keep going.
            again = Note("duplicate", {"job": env.job, "block": env.round})
            if ej.partial is None:
                return [again]
            return [self.outbox.track(ej.partial, ej.coordinator, now), again,
                    Note("partial_resent", {"job": env.job})]
        self.outbox.forget(env.job, kind=Kind.PARTIAL.value, before=env.round)  # superseded
        ej = EdgeJob(
            job=env.job,
            spec=meta.spec,
            num_params=meta.num_params,
            block=env.round,
            global_params=params.copy(),
            params=params.copy(),
            coordinator=env.sender,
            origin=meta.origin,
        )
        self.jobs[env.job] = ej
        p = meta.spec.privacy
        if p is not None and p.adaptive:  # the bound carries over from block to block
            assert p.noise_multiplier is not None
            clip = self.clips.setdefault(env.job, AdaptiveClip(
                p.clip, p.target_quantile, p.clip_lr,
                bit_noise_std=adaptive_noise(p.noise_multiplier, meta.spec.min_agents)[0]))
            ej.spec = meta.spec.model_copy(update={"privacy": p.model_copy(
                update={"clip": clip.bound})})
        return self._open(ej, now)

    def _update(self, env: Envelope, now: float) -> list[Action]:
        ej = self.jobs.get(env.job)
        if ej is None or not ej.collecting or env.round != ej.round:
            past = self.past.get(env.job)
            if past is not None and past[0] == env.round and env.stage in past[1].get(
                    env.sender, ()):  # sent again after the round ended: it is in
                return [self._duplicate(env)]
            raise Rejected("stale-round", f"update for {env.job}/{env.round}")
        if env.sender not in ej.selected:
            raise Rejected("not-selected", env.sender)
        if env.stage == "decline":
            return self._decline(ej, env, now)
        if ej.secure is not None:
            if ej.secure.answered(env.sender, env.stage):  # in the round already
                return [self._duplicate(env)]
            return ej.secure.handle(env, now) + self._settle(ej, now)
        assert ej.acc is not None
        if env.stage != "update":
            raise Rejected("stale-stage", f"{env.stage} in a plain round")
        if env.sender in ej.senders:
            return [self._duplicate(env)]
        if env.sender in ej.declined:
            raise Rejected("stale-stage", f"update from {env.sender}, which declined")
        meta = parse_meta(UpdateMeta, env.meta)
        delta = update_delta(env.tensors, ej.spec, ej.num_params)
        if meta.metrics.samples <= 0:
            raise Rejected("bad-meta", "an update needs samples > 0")
        # DP-FedAvg counts every agent once: the sensitivity analysis assumes weights of 1.
        weight = 1.0 if ej.spec.privacy is not None else meta.metrics.samples
        try:
            ej.acc.add(delta, weight, meta.metrics)
        except ValueError as e:  # metrics other than the task's: nothing was added
            raise Rejected("bad-meta", str(e)) from None
        ej.clip_bits += meta.clip_bit or 0.0
        ej.senders.add(env.sender)
        return self._answered_plain(ej, now)

    def _decline(self, ej: EdgeJob, env: Envelope, now: float) -> list[Action]:
        """A selected agent sits the round out: the round stops waiting for it, it is not
        selected again in this block, and the reason goes up with the partial."""
        if env.sender in ej.declined:
            return [self._duplicate(env)]
        if env.sender in ej.senders:
            raise Rejected("stale-stage", f"decline from {env.sender} after its update")
        meta = parse_meta(DeclineMeta, env.meta)
        out: list[Action] = [Note("declined", {"job": ej.job, "round": ej.round,
                                               "agent": env.sender, "reason": meta.reason,
                                               "detail": meta.detail})]
        if ej.secure is not None:
            out += ej.secure.decline(env.sender, now)
        ej.declined[env.sender] = f"{meta.reason}: {meta.detail}"[:200]
        if ej.secure is not None:
            return out + self._settle(ej, now)
        return out + self._answered_plain(ej, now)

    @staticmethod
    def _duplicate(env: Envelope) -> Note:
        return Note("duplicate", {"job": env.job, "round": env.round, "agent": env.sender,
                                  "stage": env.stage})

    def _remember(self, ej: EdgeJob) -> None:
        """The round being collected is ending: who answered which of its stages, so that a
        copy sent again after it ended is taken for the repeat it is."""
        answers: dict[str, set[str]] = {}
        if ej.secure is not None:
            answers = ej.secure.answers()
        elif ej.acc is not None:
            answers = {a: {"update"} for a in ej.senders}
        for a in ej.selected:
            if a in ej.declined:
                answers.setdefault(a, set()).add("decline")
        self.past[ej.job] = (ej.round, answers)

    def _answered_plain(self, ej: EdgeJob, now: float) -> list[Action]:
        """Close a plain round once every selected agent sent its update or declined."""
        assert ej.acc is not None
        if not set(ej.selected) <= ej.senders | set(ej.declined):
            return []
        if ej.acc.count >= ej.spec.min_agents:
            return self._close_plain(ej, now)
        return self._retry(ej, now, f"{ej.acc.count} < {ej.spec.min_agents} "
                           f"({len(set(ej.selected) & set(ej.declined))} declined)")

    def _settle(self, ej: EdgeJob, now: float) -> list[Action]:
        """Act on a secure round's outcome once it has one."""
        outcome = ej.secure.outcome if ej.secure else None
        if outcome is not None and ej.secure is not None:
            self._let_down(ej.secure.unanswered(), now)
            self._remember(ej)
        if isinstance(outcome, Abort):
            ej.secure = None
            return self._retry(ej, now, outcome.reason)
        if isinstance(outcome, Done):
            ej.secure = None
            ej.dropped += len(outcome.dropped)
            return self._close(ej, outcome.mean, outcome.metrics, outcome.agents, now,
                               dropped=outcome.dropped, clip_bits=outcome.clip_bits)
        return []

    # ------------------------------------------------------------------ transitions

    def _open(self, ej: EdgeJob, now: float) -> list[Action]:
        group = set(self.group()) - set(ej.declined)  # a decliner sits out the block
        online = sorted(self.online & group)
        # Status may lag the agents' connections: fall back to the whole enrolled group.
        pool = online if len(online) >= ej.spec.min_agents else sorted(group)
        # Those that let a round down sit out while the others are enough for a round.
        alive = [a for a in pool if a not in self.silent]
        need = max(ej.spec.min_agents, MIN_CLIENTS if ej.spec.secagg.enabled else 1)
        candidates = alive if len(alive) >= need else pool
        if not candidates:
            why = "no agents enrolled in this group"
            if ej.declined:
                why = f"every agent declined ({'; '.join(sorted(set(ej.declined.values())))})"
            return self._fail_block(ej, why[:500])
        ej.candidates = candidates
        ej.selected = select(candidates, ej.spec, ej.round)
        ej.senders = set()
        ej.clip_bits = 0.0
        ej.deadline = now + ej.spec.deadline_s
        info = {"job": ej.job, "round": ej.round, "block": ej.block, "selected": len(ej.selected)}
        out: list[Action] = []
        if ej.spec.secagg.enabled:
            try:
                ej.secure = SecureRound(ej.job, ej.round, ej.selected, ej.num_params, ej.spec,
                                        self.topics, self.id, now)
            except ValueError as e:  # a group too small to hide anyone's update
                why = (f"secure group too small: {len(candidates)} agents available, {e}")
                if ej.spec.secagg.small_groups != "plain":
                    return self._fail_block(ej, f"{why}; secagg.small_groups = \"plain\" "
                                            "aggregates such rounds in the clear")
                out.append(Note("round_in_the_clear", {**info, "why": why}))
        if ej.secure is None:
            ej.acc = WeightedSum(ej.num_params, ej.spec.metrics)
        return [*self._announce(ej), Note("round_open", info), *out]

    def _announce(self, ej: EdgeJob) -> list[Action]:
        """The round's announcement (retained) with its model, sealed for the selected."""
        spec = ej.spec
        if ej.secure is None and spec.secagg.enabled:  # a small group's round in the clear
            spec = spec.model_copy(update={"secagg": spec.secagg.model_copy(
                update={"enabled": False})})
        meta = RoundMeta(
            spec=spec,
            num_params=ej.num_params,
            block=ej.block,
            edge_round=ej.edge_round,
            selected=ej.selected,
            deadline=ej.deadline,
            origin=ej.origin if ej.edge_round == 0 else None,
        )
        return [Send(Kind.ROUND, self.topics.rounds(self.id, ej.job), ej.job, ej.round, "open",
                     meta.model_dump(mode="json"), {"params": ej.params}, retain=True,
                     to=tuple(ej.selected))]

    def _let_down(self, agents: set[str], now: float) -> None:
        for a in agents:
            self.silent[a] = now

    def _plain_unanswered(self, ej: EdgeJob) -> set[str]:
        return set(ej.selected) - ej.senders - set(ej.declined)

    def _close_plain(self, ej: EdgeJob, now: float) -> list[Action]:
        acc = ej.acc
        assert acc is not None
        self._let_down(self._plain_unanswered(ej), now)
        self._remember(ej)
        ej.acc = None
        return self._close(ej, acc.mean(), acc.metrics(), acc.count, now,
                           clip_bits=ej.clip_bits)

    def _close(self, ej: EdgeJob, mean: np.ndarray, metrics: Metrics, agents: int, now: float,
               dropped: list[str] | None = None, clip_bits: float = 0.0) -> list[Action]:
        if ej.spec.privacy is not None:
            self._privatize(ej, mean, agents, clip_bits)
            metrics = metrics.model_copy(update={"samples": float(agents)})  # weights of 1
            ej.releases.append(Release(candidates=ej.candidates, sampled=len(ej.selected)))
        np.add(ej.params, mean, out=ej.params)
        closed = Send(Kind.ROUND, self.topics.rounds(self.id, ej.job), ej.job, ej.round,
                      "closed", {}, retain=True)
        note = Note("round_closed", {"job": ej.job, "round": ej.round, "agents": agents,
                                     "selected": len(ej.selected), "dropped": dropped or [],
                                     **metrics.model_dump()})
        ej.edge_round += 1
        ej.attempt = 0
        if ej.edge_round < ej.spec.kappa1:
            return [closed, note, *self._open(ej, now)]
        partial = (ej.params - ej.global_params) * np.float32(metrics.samples)
        return [closed, note, *self._send_partial(ej, partial, metrics.samples, agents, metrics)]

    def _privatize(self, ej: EdgeJob, mean: np.ndarray, agents: int, clip_bits: float) -> None:
        """Edge mode: N(0, z²S²) on the group's sum (so /agents on its mean) and on the bit
        sum. Adaptive clipping: move the group's bound for the rounds that follow."""
        p = ej.spec.privacy
        assert p is not None and p.noise_multiplier is not None
        z = p.noise_multiplier
        if p.adaptive:
            bit_std, z = adaptive_noise(z, ej.spec.min_agents)
            if p.mode == "edge":
                bits = np.array([clip_bits], np.float32)
                self.noise.add_gaussian(bits, bit_std)
                clip_bits = float(bits[0])
            bound = self.clips[ej.job].update(clip_bits, clients=len(ej.selected))
            ej.spec = ej.spec.model_copy(update={"privacy": p.model_copy(
                update={"clip": bound})})
        if p.mode == "edge":
            self.noise.add_gaussian(mean, edge_noise_std(z, p.clip) / agents)

    def _retry(self, ej: EdgeJob, now: float, why: str) -> list[Action]:
        if ej.acc is not None:
            self._let_down(self._plain_unanswered(ej), now)
        if ej.collecting:
            self._remember(ej)
        ej.acc = ej.secure = None
        if ej.attempt >= ej.spec.max_retries:
            return self._fail_block(ej, f"round failed: {why}")
        ej.attempt += 1
        note = Note("round_retry", {"job": ej.job, "round": ej.round, "why": why})
        return [note, *self._open(ej, now)]

    def _fail_block(self, ej: EdgeJob, reason: str) -> list[Action]:
        note = Note("block_failed", {"job": ej.job, "block": ej.block, "reason": reason},
                    logging.WARNING, f"job {ej.job} block {ej.block} failed here: {reason}")
        return [note, *self._send_partial(ej, None, 0.0, 0, Metrics(samples=0), reason)]

    def _send_partial(
        self, ej: EdgeJob, partial: np.ndarray | None, weight: float, agents: int, m: Metrics,
        failure: str = "",
    ) -> list[Action]:
        meta = PartialMeta(weight=weight, agents=agents, dropped=ej.dropped, metrics=m,
                           failure=failure[:500], releases=ej.releases,
                           declined=dict(list(ej.declined.items())[:1000]))
        ej.partial = partial_send(self.topics, self.id, ej, meta.model_dump(mode="json"), partial)
        info = {"job": ej.job, "block": ej.block, "weight": weight, "agents": agents}
        # Kept until the coordinator acknowledges it; its back-off starts at the next tick.
        return [self.outbox.track(ej.partial, ej.coordinator), Note("partial_sent", info)]


def partial_send(topics: Topics, agg_id: str, ej: EdgeJob, meta: dict,
                 partial: np.ndarray | None) -> Send:
    """The block's partial, as sent to the coordinator (and kept until it acknowledges it)."""
    tensors = {"sum": partial} if partial is not None else {}
    return Send(Kind.PARTIAL, topics.partials(agg_id), ej.job, ej.block, "partial", meta,
                tensors, to=(ej.coordinator,))
