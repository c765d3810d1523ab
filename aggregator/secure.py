"""One secure edge round at the aggregator: the SecAgg+ server with its stage deadlines.

Sans-I/O like the machine that owns it: verified envelopes in, `Send`s out, and an
`outcome` once the round is decided — the unmasked group sum (as a mean delta and summed
metrics), or an abort when fewer than the threshold survive, which the machine retries.
Each stage ends when every expected agent has answered or its deadline passes: the advert
stage at the round deadline (agents advertise once trained), the others after
`stage_timeout_s`, as the key exchange itself takes milliseconds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from hfl.crypto import secagg_wire as wire
from hfl.crypto.secagg import Server, Stage
from hfl.crypto.secagg_wire import WireStage
from hfl.errors import Rejected
from hfl.runtime.actions import Action, Send
from hfl.wire.messages import Kind, Metrics, ModelSpec
from hfl.wire.topics import Topics

if TYPE_CHECKING:
    from hfl.wire.envelope import Envelope

# The stage being collected (what the agents send, in order) → the server's stage that
# collects it.
SERVER_STAGE: dict[str, Stage] = {WireStage.ADVERT: Stage.ADVERTS, WireStage.SHARES: Stage.SHARES,
                WireStage.MASKED: Stage.MASKED, WireStage.UNSHARES: Stage.UNMASK}
# The stage being collected → the stage collected next, once it closes (the unshares close
# the round).
NEXT = {WireStage.ADVERT: WireStage.SHARES, WireStage.SHARES: WireStage.MASKED,
        WireStage.MASKED: WireStage.UNSHARES}


@dataclass(frozen=True)
class Done:
    mean: np.ndarray
    metrics: Metrics
    agents: int
    dropped: list[str]
    clip_bits: float  # adaptive clipping: the sum of the agents' (noised) bits


@dataclass(frozen=True)
class Abort:
    reason: str


class SecureRound:
    def __init__(self, job: str, round: int, selected: list[str], num_params: int,
                 spec: ModelSpec, topics: Topics, agg: str, now: float) -> None:
        self.job, self.round, self.spec = job, round, spec
        self.topics, self.agg = topics, agg
        self.num_params = num_params
        self.params, self.fixed = wire.round_params(job, round, len(selected), num_params, spec)
        self.server = Server(self.params, selected)
        self.selected = list(selected)
        self.stage = WireStage.ADVERT
        self.expected = set(selected)
        self.got: set[str] = set()
        self.deadline = now + spec.deadline_s
        self.survivors: list[str] = []
        self.lost: set[str] = set()  # agents that stopped answering at a closed stage
        self.outcome: Done | Abort | None = None

    def export(self) -> dict:
        """A checkpoint of the round: its stage, who answered it, and the server's own state
        (the masked sum is `export_sum`, what each agent sent `export_client`)."""
        assert self.outcome is None, "a decided round is settled, never saved"
        return {"stage": self.stage, "expected": sorted(self.expected), "got": sorted(self.got),
                "lost": sorted(self.lost),
                "deadline": self.deadline, "survivors": self.survivors,
                "server": self.server.export()}

    def export_sum(self) -> tuple[dict, dict[str, np.ndarray]] | None:
        """The masked sum, saved when a masked input changed it (None: decided)."""
        return None if self.outcome is not None else ({"round": self.round},
                                                       {"acc": self.server.acc})

    def export_client(self, sender: str) -> tuple[dict, dict[str, np.ndarray]] | None:
        """What `sender` added to the round, saved once as it arrives (None: nothing)."""
        return None if self.outcome is not None else self.server.export_client(sender)

    @classmethod
    def restore(cls, job: str, round: int, selected: list[str], num_params: int,
                spec: ModelSpec, topics: Topics, agg: str, doc: dict,
                summed: tuple[dict, dict[str, np.ndarray]] | None,
                clients: dict[str, tuple[dict, dict[str, np.ndarray]]]) -> SecureRound:
        sr = cls(job, round, selected, num_params, spec, topics, agg, 0.0)
        acc = summed[1]["acc"] if summed is not None and summed[0]["round"] == round else None
        sr.server = Server.restore(sr.params, selected, doc["server"], acc, clients)
        sr.stage = WireStage(doc["stage"])
        sr.survivors, sr.deadline = list(doc["survivors"]), doc["deadline"]
        sr.expected, sr.got = set(doc["expected"]), set(doc["got"])
        sr.lost = set(doc.get("lost", ()))
        return sr

    def handle(self, env: Envelope, now: float) -> list[Action]:
        if self.outcome is not None or env.stage != self.stage:
            raise Rejected("stale-stage", f"{env.stage} from {env.sender} during {self.stage}")
        if env.sender in self.got:
            return []
        sender, server = env.sender, self.server
        if self.stage is WireStage.ADVERT:
            server.add_advert(sender, wire.advert_in(env.tensors))
        elif self.stage is WireStage.SHARES:
            server.add_shares(sender, wire.shares_in(env.meta, env.tensors))
        elif self.stage is WireStage.MASKED:
            y = env.tensors.get("y")
            if y is None or y.dtype != np.uint32 or y.shape != (self.params.length,):
                raise Rejected("bad-shape", f"masked input: want uint32[{self.params.length}]")
            server.add_masked(sender, y)
        else:
            server.add_unmask(sender, wire.unshares_in(env.meta, env.tensors))
        self.got.add(sender)
        return self._advance(now) if self.got >= self.expected else []

    def answered(self, sender: str, stage: str) -> bool:
        """Whether `sender`'s answer to `stage` is in the round already (a copy is a repeat)."""
        collects = SERVER_STAGE.get(stage)
        return collects is not None and self.server.answered(collects, sender)

    def answers(self) -> dict[str, set[str]]:
        """Who answered which stage, as the round ends."""
        out: dict[str, set[str]] = {}
        for a in self.selected:
            stages = {str(st) for st in SERVER_STAGE if self.answered(a, st)}
            if stages:
                out[a] = stages
        return out

    def decline(self, sender: str, now: float) -> list[Action]:
        """`sender` sits the round out instead of advertising: the advert stage stops
        waiting for it (a decline after its advert is a peer's error)."""
        if self.outcome is not None or self.stage is not WireStage.ADVERT or sender in self.got:
            raise Rejected("stale-stage", f"decline from {sender} during {self.stage}")
        self.expected.discard(sender)
        return self._advance(now) if self.got >= self.expected else []

    def tick(self, now: float) -> list[Action]:
        if self.outcome is None and now >= self.deadline:
            return self._advance(now)
        return []

    # ------------------------------------------------------------------ stages

    def _next(self, stage: WireStage, expected: set[str], deadline: float) -> None:
        self.lost |= self.expected - self.got
        self.stage, self.expected, self.got, self.deadline = stage, expected, set(), deadline

    def unanswered(self) -> set[str]:
        """The agents that did not see the round through: never advertised (past the
        deadline) or stopped answering at a later stage; those that declined are not in."""
        return self.lost | (self.expected - self.got)

    def _send(self, stage: str, meta: dict, tensors: dict, to: str | None = None) -> Send:
        """A stage message to the group, or on the round topic's level for agent `to`."""
        topic = (self.topics.rounds(self.agg, self.job) if to is None
                 else self.topics.round_to(self.agg, self.job, to))
        return Send(Kind.ROUND, topic, self.job, self.round, stage, meta, tensors)

    def broadcast(self, only: set[str] | None = None) -> list[Send]:
        """The messages that opened the stage being collected (none for the adverts, which
        the round announcement asks for): sent on each stage change, and again after a
        restart or a reconnection (only to the agents `only` where each agent has its own),
        as agents drop a repeat of a stage they answered."""
        if self.outcome is not None or self.stage is WireStage.ADVERT:
            return []
        if self.stage is WireStage.SHARES:
            return [self._send(WireStage.KEYS, *wire.key_table_out(self.server.key_table()))]
        if self.stage is WireStage.MASKED:  # each agent its own shares, where only it may read
            return [self._send(WireStage.ROUTED, *wire.routed_out(to, row), to=to)
                    for to, row in self.server.routed().items() if only is None or to in only]
        return [self._send(WireStage.UNMASK, {"survivors": self.survivors}, {})]

    def _advance(self, now: float) -> list[Action]:
        """Close the stage being collected and open the next."""
        timeout = self.spec.secagg.stage_timeout_s
        server = self.server
        try:
            if self.stage is WireStage.ADVERT:
                server.freeze_adverts()
                expected = set(server.key_table())
            elif self.stage is WireStage.SHARES:
                server.freeze_shares()
                expected = set(server.routed())
            elif self.stage is WireStage.MASKED:
                server.freeze_survivors()
                survivors = server.survivors()
                if len(survivors) < self.spec.min_agents:
                    raise Rejected("secagg-too-few",
                                   f"{len(survivors)} < quorum {self.spec.min_agents}")
                self.survivors, expected = survivors, set(survivors)
            if self.stage in NEXT:
                self._next(NEXT[self.stage], expected, now + timeout)
                return list(self.broadcast())
            if not self.server.ready():
                raise Rejected("secagg-too-few", "not enough shares to unmask")
            total = self.fixed.decode(self.server.result())
            mean, metrics, bits = wire.unpack(total, self.num_params, self.spec)
            self.outcome = Done(mean, metrics, len(self.survivors), self.server.dropped, bits)
        except Rejected as r:
            self.outcome = Abort(f"{self.stage}: {r}")
        return []
