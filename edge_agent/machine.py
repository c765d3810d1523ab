"""The agent's side of an edge round as a sans-I/O state machine.

Events in: round announcements from its aggregator (retained, so they may repeat), the
result of local training, `now`. Actions out: `Train` (the runner trains on local data)
and the update for the aggregator. Training happens outside, so the machine stays pure.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hfl.actions import Action, Note, Send
from hfl.errors import Rejected
from hfl.messages import Kind, Metrics, ModelSpec, RoundMeta, UpdateMeta, expect_tensor, parse_meta
from hfl.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.envelope import Envelope


@dataclass(frozen=True)
class Train:
    """Train on the local `spec.dataset` from `params`; answer with `AgentMachine.trained`."""

    job: str
    round: int
    spec: ModelSpec
    params: np.ndarray


class AgentMachine:
    def __init__(self, agent_id: str, aggregator: str, datasets: set[str], topics: Topics) -> None:
        self.id = agent_id
        self.aggregator = aggregator
        self.datasets = set(datasets)
        self.topics = topics
        self.last_round: dict[str, int] = {}  # per job: the newest round seen
        self.pending: tuple[str, int] | None = None  # the (job, round) being trained

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        if env.type != Kind.ROUND.value:
            raise Rejected("unexpected-type", f"agent does not take {env.type}")
        if route.agg != self.aggregator:
            raise Rejected("wrong-group", f"round from {route.agg}, my aggregator is "
                           f"{self.aggregator}")
        last = self.last_round.get(env.job, -1)
        if env.round < last or (env.round == last and env.stage == "open"):
            return []  # a retained or redelivered announcement already handled
        self.last_round[env.job] = env.round
        if env.stage == "closed":
            if self.pending == (env.job, env.round):
                self.pending = None  # closed without us: drop the result when it comes
            return []
        if env.stage != "open":
            raise Rejected("unknown-stage", env.stage)
        meta = parse_meta(RoundMeta, env.meta)
        info = {"job": env.job, "round": env.round}
        if self.id not in meta.selected:
            return [Note("not_selected", info)]
        if meta.spec.dataset not in self.datasets:
            return [Note("no_data", {**info, "dataset": meta.spec.dataset})]
        params = expect_tensor(env.tensors, "params", np.float32, (meta.num_params,))
        self.pending = (env.job, env.round)
        return [Train(env.job, env.round, meta.spec, params), Note("train", info)]

    def tick(self, now: float) -> list[Action]:
        return []  # an agent has no deadlines of its own: the aggregator keeps time

    def trained(self, job: str, round: int, delta: np.ndarray, metrics: Metrics) -> list[Action]:
        """The runner finished `Train(job, round)`: send the update unless the round moved on."""
        if self.pending != (job, round):
            return [Note("train_discarded", {"job": job, "round": round})]
        self.pending = None
        if self.last_round.get(job) != round:
            return [Note("train_late", {"job": job, "round": round})]
        meta = UpdateMeta(metrics=metrics)
        send = Send(Kind.UPDATE, self.topics.update(self.aggregator, self.id), job, round,
                    "update", meta.model_dump(mode="json"), {"delta": delta})
        return [send, Note("update_sent", {"job": job, "round": round})]
