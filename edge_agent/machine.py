"""The agent's side of an edge round as a sans-I/O state machine.

Events in: round announcements and stage messages from its aggregator (the announcement is
retained, so it may repeat), the result of local training, `now`. Actions out: `Train` (the
runner trains the job's task on local data) and what goes to the aggregator: the sealed
delta in a plain round, the SecAgg+ stage answers in a secure one (`edge_agent.secure`), or
a decline (`DeclineMeta`: a task this board does not allow or has in another version or
layout, no usable data, a task that failed), so the round goes on without waiting for us
and the reason reaches the coordinator. Training happens outside, so the machine stays pure.

Its answers must not be lost with a broker that dies (`hfl.runtime.delivery`): each one waits in an
`Outbox` until the aggregator acknowledges it (`Kind.ACK`), and goes again when the
connection comes back (`reconnected`), when the aggregator says it is online again (its
status), or after a back-off; a newer round of the job, or this round closed, ends that.

The round model is checked before anything trains on it: the first edge round of a block
must carry the coordinator's signature on exactly these parameters (`Origin`). In a DP job
the delta is clipped to L2 norm S and, in `distributed` mode, noised with this agent's
share of the group's noise before it is quantized and masked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edge_agent.secure import SecureClient
from hfl.crypto.secagg_wire import WireStage
from hfl.errors import Rejected
from hfl.privacy.dp import NoiseSource, adaptive_noise, agent_noise_std, clip_l2
from hfl.runtime.actions import Action, Note, Send
from hfl.runtime.delivery import Outbox, acked
from hfl.wire.messages import (
    DeclineMeta,
    Kind,
    Metrics,
    ModelSpec,
    Role,
    RoundMeta,
    StatusMeta,
    UpdateMeta,
    expect_tensor,
    parse_meta,
)
from hfl.wire.quantize import quantize_int8
from hfl.wire.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.crypto.identity import Identity, Roster
    from hfl.wire.envelope import Envelope


@dataclass(frozen=True)
class Train:
    """Train the job's task on the local `spec.data_source` from `params`; answer with
    `AgentMachine.trained`."""

    job: str
    round: int
    spec: ModelSpec
    params: np.ndarray


@dataclass(frozen=True)
class Update:
    """What training gave: the delta from the round model and its metrics."""

    delta: np.ndarray
    metrics: Metrics


@dataclass(frozen=True)
class Declined:
    """Why this board sits the round out (a `DeclineMeta` reason) and the details."""

    reason: str
    detail: str = ""


class AgentMachine:
    def __init__(self, identity: Identity, aggregator: str, tasks: set[str],
                 datasets: set[str], topics: Topics, roster: Roster) -> None:
        self.identity = identity
        self.id = identity.id
        self.aggregator = aggregator
        self.tasks = set(tasks)  # the tasks this board's config allows
        self.datasets = set(datasets)
        self.topics = topics
        self.roster = roster
        self.last_round: dict[str, int] = {}  # per job: the newest round seen
        self.pending: tuple[str, int] | None = None  # the (job, round) being trained
        self.specs: dict[str, ModelSpec] = {}  # per job: the spec of its newest round
        self.sizes: dict[str, int] = {}  # per job: its parameter count
        self.secure: dict[str, SecureClient] = {}  # per job: the secure round under way
        self.noise = NoiseSource()  # DP noise shares, from a secret seed
        self.rounding = np.random.default_rng()  # stochastic rounding of int8 updates
        self.outbox = Outbox()  # answers sent and not yet acknowledged by the aggregator

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        if env.type == Kind.ACK.value:
            return self._acked(env, route)
        if env.type == Kind.STATUS.value:
            return self._status(env, route, now)
        if env.type != Kind.ROUND.value:
            raise Rejected("unexpected-type", f"agent does not take {env.type}")
        return self._track(self._round(env, route), now)

    def tick(self, now: float) -> list[Action]:
        """An agent keeps no deadlines (the aggregator keeps time): only its answers that
        wait for an acknowledgement go again when due."""
        again, gone = self.outbox.due(now)
        return [*again, *(Note("gave_up", {"job": k.job, "round": k.round, "stage": k.stage})
                          for k in gone)]

    def reconnected(self, now: float) -> list[Action]:
        """The connection is back: the broker may have lost what we sent (and every session),
        so every unacknowledged answer goes again."""
        return list(self.outbox.reconnected(now))

    def _track(self, actions: list[Action], now: float | None) -> list[Action]:
        """Keep every answer to the aggregator until it acknowledges it."""
        for a in actions:
            if isinstance(a, Send) and a.kind is Kind.UPDATE:
                self.outbox.track(a, self.aggregator, now)
        return actions

    def _acked(self, env: Envelope, route: Route) -> list[Action]:
        if env.sender != self.aggregator or route.to != self.id:
            raise Rejected("wrong-sender", f"ack from {env.sender} to {route.to}")
        key, meta = acked(env)
        self.outbox.ack(key)
        if meta.outcome == "refused":  # too late, or refused: sending it again cannot help
            return [Note("answer_refused", {"job": env.job, "round": env.round,
                                            "stage": env.stage, "reason": meta.reason})]
        return []

    def _status(self, env: Envelope, route: Route, now: float) -> list[Action]:
        """Our aggregator is online again, so subscribed: what it has not acknowledged goes
        again (it may have come back to a broker that lost its session)."""
        if route.role != Role.AGGREGATOR.value or env.sender != self.aggregator:
            raise Rejected("unexpected-type", f"status of {route.role} {env.sender}")
        if parse_meta(StatusMeta, env.meta).state != "online":
            return []
        return list(self.outbox.peer_online(self.aggregator, now))

    def _round(self, env: Envelope, route: Route) -> list[Action]:
        if route.agg != self.aggregator:
            raise Rejected("wrong-group", f"round from {route.agg}, my aggregator is "
                           f"{self.aggregator}")
        # The routed shares travel on the round topic's level for one agent, nothing else does.
        if (route.kind == "round_to") != (env.stage == WireStage.ROUTED):
            raise Rejected("wrong-topic", f"{env.stage} on a {route.kind} topic")
        if route.kind == "round_to" and route.agent != self.id:
            raise Rejected("wrong-recipient", f"shares for {route.agent}, I am {self.id}")
        last = self.last_round.get(env.job, -1)
        if env.round < last or (env.round == last and env.stage == "open"):
            return []  # a retained or redelivered announcement already handled
        if env.stage == "open":
            return self._open(env)
        if env.round != last:
            return []  # a stage of a round we never joined
        if env.stage == "closed":
            self.outbox.forget(env.job, round=env.round)  # counted, or too late: over
            self.secure.pop(env.job, None)
            if self.pending == (env.job, env.round):
                self.pending = None  # closed without us: drop the result when it comes
            return []
        sc = self.secure.get(env.job)
        if sc is None or sc.round != env.round:
            return []
        return sc.handle(env)

    def _open(self, env: Envelope) -> list[Action]:
        self.last_round[env.job] = env.round
        self.outbox.forget(env.job, before=env.round)  # a newer round: the last one is over
        self.secure.pop(env.job, None)
        meta = parse_meta(RoundMeta, env.meta)
        info = {"job": env.job, "round": env.round}
        if self.id not in meta.selected:
            return [Note("not_selected", info)]
        params = expect_tensor(env.tensors, "params", np.float32, (meta.num_params,))
        self._check_origin(meta, env.job, params)
        if meta.spec.task not in self.tasks:
            return self._decline(env.job, env.round, Declined(
                "no-task", f"task {meta.spec.task} is not allowed on this board"))
        if meta.spec.data_source not in self.datasets:
            return self._decline(env.job, env.round, Declined(
                "no-data", f"no data source {meta.spec.data_source} on this board"))
        if meta.spec.secagg.enabled:
            self.secure[env.job] = SecureClient(
                self.id, env.job, env.round, len(meta.selected), meta.num_params, meta.spec,
                self.topics.update(self.aggregator, self.id), self.aggregator,
                self.identity.key, self.roster.public_key)
        self.pending = (env.job, env.round)
        self.specs[env.job] = meta.spec
        self.sizes[env.job] = meta.num_params
        # The note first: the runner carries out Train at once, and its answer (the update)
        # would otherwise come before the note that training started.
        return [Note("train", info), Train(env.job, env.round, meta.spec, params)]

    def _check_origin(self, meta: RoundMeta, job: str, params: np.ndarray) -> None:
        if meta.edge_round != 0:
            return  # an edge model of the aggregator's own (κ1 > 1), signed by it
        if meta.origin is None:
            raise Rejected("bad-origin", "a block's first round must carry the model's origin")
        signer = self.roster.get(meta.origin.signer)
        if signer is None or signer.role is not Role.COORDINATOR:
            raise Rejected("bad-origin", f"{meta.origin.signer} is not a coordinator")
        meta.origin.verify(signer.public_key, job, meta.block, params)

    def _privatize(self, spec: ModelSpec, delta: np.ndarray) -> float | None:
        """Clip `delta` in place and, in distributed mode, add this agent's noise share;
        with adaptive clipping, return the (noised) bit saying whether it fitted the bound."""
        p, m = spec.privacy, spec.min_agents
        assert p is not None and p.noise_multiplier is not None
        z, bit = p.noise_multiplier, None
        _, norm = clip_l2(delta, p.clip)
        if p.adaptive:
            bit_std, z = adaptive_noise(z, m)
            shares = np.array([0.5 if norm <= p.clip else -0.5], np.float32)
            if p.mode == "distributed":
                self.noise.add_gaussian(shares, bit_std / np.sqrt(m))
            bit = float(shares[0])
        if p.mode == "distributed":
            self.noise.add_gaussian(delta, agent_noise_std(z, p.clip, m))
        return bit

    def _decline(self, job: str, round: int, why: Declined) -> list[Action]:
        self.secure.pop(job, None)
        meta = DeclineMeta(reason=why.reason, detail=why.detail[:500])  # type: ignore[arg-type]
        send = Send(Kind.UPDATE, self.topics.update(self.aggregator, self.id), job, round,
                    "decline", meta.model_dump(mode="json"))
        return [send, Note("declined", {"job": job, "round": round, "reason": why.reason,
                                        "detail": why.detail})]

    def trained(self, job: str, round: int, result: Update | Declined) -> list[Action]:
        """The runner finished `Train(job, round)`: answer unless the round moved on."""
        return self._track(self._trained(job, round, result), None)

    def _trained(self, job: str, round: int, result: Update | Declined) -> list[Action]:
        if self.pending != (job, round):
            return [Note("train_discarded", {"job": job, "round": round})]
        self.pending = None
        if self.last_round.get(job) != round:
            return [Note("train_late", {"job": job, "round": round})]
        if isinstance(result, Declined):
            return self._decline(job, round, result)
        delta, metrics = result.delta, result.metrics
        if delta.shape != (self.sizes[job],) or not np.isfinite(delta).all():
            return self._decline(job, round, Declined(
                "bad-update", "the task's update is not finite or has the wrong size"))
        clip_bit = None
        if self.specs[job].privacy is not None:
            delta = np.array(delta, dtype=np.float32)  # ours to change
            clip_bit = self._privatize(self.specs[job], delta)
        sc = self.secure.get(job)
        if sc is not None and sc.round == round:
            return sc.trained(delta, metrics, clip_bit or 0.0)
        meta = UpdateMeta(metrics=metrics, clip_bit=clip_bit)
        tensors: dict[str, np.ndarray] = {"delta": delta}
        if self.specs[job].compression == "int8":  # after clip and noise: post-processing
            q, scale = quantize_int8(np.asarray(delta, np.float32).reshape(-1), self.rounding)
            tensors = {"delta_q": q, "scale": scale}
        send = Send(Kind.UPDATE, self.topics.update(self.aggregator, self.id), job, round,
                    "update", meta.model_dump(mode="json"), tensors, to=(self.aggregator,))
        return [send, Note("update_sent", {"job": job, "round": round})]
