"""The aggregator's edge rounds as a sans-I/O state machine (HierFAVG).

Events in: a verified task from the coordinator, agents' updates and status, and `now`.
Actions out: round announcements (retained) to the group, the partial to the coordinator.

A task asks for one block of κ1 edge rounds starting from the global model. Each edge
round selects agents, collects their deltas into a streaming weighted sum until every
selected agent answered or the deadline passed, and moves the edge model by the mean
delta. After κ1 rounds the partial is `W·(edge model − global model)` with weight W, the
samples of the last round: with κ1 = 1 that is exactly Σ n_i·Δ_i.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hfl.actions import Action, Note, Send
from hfl.aggregate import WeightedSum
from hfl.errors import Rejected
from hfl.messages import (
    Kind,
    Metrics,
    ModelSpec,
    PartialMeta,
    RoundMeta,
    StatusMeta,
    TaskMeta,
    UpdateMeta,
    expect_tensor,
    parse_meta,
)
from hfl.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.envelope import Envelope


def round_id(spec: ModelSpec, block: int, edge_round: int, attempt: int) -> int:
    """A round number unique and increasing within a job, derived, never stored."""
    return (block * spec.kappa1 + edge_round) * (spec.max_retries + 1) + attempt


def select(candidates: list[str], spec: ModelSpec, job: str, rnd: int) -> list[str]:
    """Sample ⌈C·n⌉ (at least the quorum) agents, reproducibly for (seed, job, round)."""
    n = len(candidates)
    k = min(n, max(spec.min_agents, math.ceil(spec.client_fraction * n)))
    digest = hashlib.sha256(f"{spec.seed}/{job}/{rnd}".encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    picked = rng.choice(len(candidates), size=k, replace=False)
    return sorted(candidates[i] for i in picked)


@dataclass
class EdgeJob:
    job: str
    spec: ModelSpec
    num_params: int
    block: int
    global_params: np.ndarray
    params: np.ndarray
    edge_round: int = 0
    attempt: int = 0
    selected: list[str] = field(default_factory=list)
    acc: WeightedSum | None = None
    senders: set[str] = field(default_factory=set)
    deadline: float = 0.0
    partial: Send | None = None  # the block's result, kept to answer a repeated task

    @property
    def round(self) -> int:
        return round_id(self.spec, self.block, self.edge_round, self.attempt)

    @property
    def collecting(self) -> bool:
        return self.acc is not None


class AggregatorMachine:
    def __init__(self, agg_id: str, group: list[str], topics: Topics) -> None:
        self.id = agg_id
        self.group = set(group)
        self.topics = topics
        self.online: set[str] = set()
        self.jobs: dict[str, EdgeJob] = {}

    # ------------------------------------------------------------------ events

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        kind = Kind(env.type)
        if kind is Kind.TASK:
            return self._task(env, now)
        if kind is Kind.UPDATE:
            return self._update(env, now)
        if kind is Kind.STATUS:
            return self._status(env)
        raise Rejected("unexpected-type", f"aggregator does not take {kind.value}")

    def tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        for ej in list(self.jobs.values()):
            if ej.collecting and now >= ej.deadline:
                assert ej.acc is not None
                if ej.acc.count >= ej.spec.min_agents:
                    out += self._close(ej, now)
                else:
                    out += self._retry(ej, now)
        return out

    def _status(self, env: Envelope) -> list[Action]:
        meta = parse_meta(StatusMeta, env.meta)
        if env.sender in self.group:
            (self.online.add if meta.state == "online" else self.online.discard)(env.sender)
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
            return [ej.partial, Note("partial_resent", {"job": env.job})] if ej.partial else []
        ej = EdgeJob(
            job=env.job,
            spec=meta.spec,
            num_params=meta.num_params,
            block=env.round,
            global_params=params.copy(),
            params=params.copy(),
        )
        self.jobs[env.job] = ej
        return self._open(ej, now)

    def _update(self, env: Envelope, now: float) -> list[Action]:
        ej = self.jobs.get(env.job)
        if ej is None or not ej.collecting or env.round != ej.round:
            raise Rejected("stale-round", f"update for {env.job}/{env.round}")
        assert ej.acc is not None
        if env.sender not in ej.selected:
            raise Rejected("not-selected", env.sender)
        if env.sender in ej.senders:
            return [Note("duplicate", {"job": ej.job, "round": ej.round, "agent": env.sender})]
        meta = parse_meta(UpdateMeta, env.meta)
        delta = expect_tensor(env.tensors, "delta", np.float32, (ej.num_params,))
        if meta.metrics.samples <= 0:
            raise Rejected("bad-meta", "an update needs samples > 0")
        ej.acc.add(delta, meta.metrics.samples, meta.metrics)
        ej.senders.add(env.sender)
        if len(ej.senders) == len(ej.selected):
            return self._close(ej, now)
        return []

    # ------------------------------------------------------------------ transitions

    def _open(self, ej: EdgeJob, now: float) -> list[Action]:
        online = sorted(self.online & self.group)
        # Status may lag the agents' connections: fall back to the whole enrolled group.
        candidates = online if len(online) >= ej.spec.min_agents else sorted(self.group)
        if not candidates:
            return self._fail_block(ej, "no agents enrolled in this group")
        ej.selected = select(candidates, ej.spec, ej.job, ej.round)
        ej.acc = WeightedSum(ej.num_params)
        ej.senders = set()
        ej.deadline = now + ej.spec.deadline_s
        meta = RoundMeta(
            spec=ej.spec,
            num_params=ej.num_params,
            block=ej.block,
            selected=ej.selected,
            deadline=ej.deadline,
        )
        send = Send(
            Kind.ROUND,
            self.topics.rounds(self.id, ej.job),
            ej.job,
            ej.round,
            "open",
            meta.model_dump(mode="json"),
            {"params": ej.params},
            retain=True,
        )
        info = {"job": ej.job, "round": ej.round, "block": ej.block, "selected": len(ej.selected)}
        return [send, Note("round_open", info)]

    def _close(self, ej: EdgeJob, now: float) -> list[Action]:
        acc = ej.acc
        assert acc is not None
        ej.acc = None
        np.add(ej.params, acc.mean(), out=ej.params)
        closed = Send(Kind.ROUND, self.topics.rounds(self.id, ej.job), ej.job, ej.round,
                      "closed", {}, retain=True)
        metrics = acc.metrics()
        note = Note("round_closed", {"job": ej.job, "round": ej.round, "agents": acc.count,
                                     "selected": len(ej.selected), **metrics.model_dump()})
        ej.edge_round += 1
        ej.attempt = 0
        if ej.edge_round < ej.spec.kappa1:
            return [closed, note, *self._open(ej, now)]
        partial = (ej.params - ej.global_params) * np.float32(acc.weight)
        return [closed, note, *self._send_partial(ej, partial, acc.weight, acc.count, metrics)]

    def _retry(self, ej: EdgeJob, now: float) -> list[Action]:
        assert ej.acc is not None
        got = ej.acc.count
        ej.acc = None
        if ej.attempt >= ej.spec.max_retries:
            return self._fail_block(ej, f"quorum not reached ({got} < {ej.spec.min_agents})")
        ej.attempt += 1
        note = Note("round_retry", {"job": ej.job, "round": ej.round, "got": got,
                                    "need": ej.spec.min_agents})
        return [note, *self._open(ej, now)]

    def _fail_block(self, ej: EdgeJob, reason: str) -> list[Action]:
        note = Note("block_failed", {"job": ej.job, "block": ej.block, "reason": reason})
        return [note, *self._send_partial(ej, None, 0.0, 0, Metrics(samples=0))]

    def _send_partial(
        self, ej: EdgeJob, partial: np.ndarray | None, weight: float, agents: int, m: Metrics
    ) -> list[Action]:
        meta = PartialMeta(weight=weight, agents=agents, metrics=m)
        tensors = {"sum": partial} if partial is not None else {}
        ej.partial = Send(Kind.PARTIAL, self.topics.partials(self.id), ej.job, ej.block,
                          "partial", meta.model_dump(mode="json"), tensors)
        info = {"job": ej.job, "block": ej.block, "weight": weight, "agents": agents}
        return [ej.partial, Note("partial_sent", info)]
