"""One secure edge round at the agent: the SecAgg+ client.

The agent trains first and advertises its keys once its input is ready, so the key
exchange that follows takes milliseconds and only the advert stage has to wait for
training. Each aggregator stage is answered exactly once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hfl.crypto import secagg_wire as wire
from hfl.crypto.secagg import Client
from hfl.crypto.secagg_wire import WireStage
from hfl.errors import Rejected
from hfl.runtime.actions import Action, Note, Send
from hfl.wire.messages import Kind, Metrics, ModelSpec

if TYPE_CHECKING:
    from hfl.wire.envelope import Envelope


class SecureClient:
    def __init__(self, me: str, job: str, round: int, selected: int, num_params: int,
                 spec: ModelSpec, topic: str, aggregator: str, key: Ed25519PrivateKey,
                 verify_key: Callable[[str], Ed25519PublicKey | None]) -> None:
        self.job, self.round, self.topic, self.aggregator = job, round, topic, aggregator
        self.spec, self.verify_key = spec, verify_key
        self.params, self.fixed = wire.round_params(job, round, selected, num_params, spec)
        self.me = me
        self.client = Client(me, self.params, key)
        self.done: set[str] = set()  # the aggregator's stages already answered
        self.input: np.ndarray | None = None  # the fixed-point input, once trained

    def _send(self, stage: str, meta: dict, tensors: dict) -> Send:
        return Send(Kind.UPDATE, self.topic, self.job, self.round, stage, meta, tensors,
                    to=(self.aggregator,))

    def handle(self, env: Envelope) -> list[Action]:
        """A stage message from the aggregator; a repeat of one already answered is ignored."""
        if env.stage in self.done:
            return []
        if self.input is None:
            return []  # not trained yet, so not advertised: this round goes on without us
        if env.stage == WireStage.KEYS:
            cts = self.client.share(wire.key_table_in(env.meta, env.tensors), self.verify_key)
            self.done.add(env.stage)
            return [self._send(WireStage.SHARES, *wire.shares_out(cts))]
        if env.stage == WireStage.ROUTED:
            self.client.receive(wire.routed_in(env.meta, env.tensors, self.me))
            self.done.add(env.stage)
            y = self.client.mask(self.input)
            return [self._send(WireStage.MASKED, {}, {"y": y}),
                    Note("update_sent", {"job": self.job, "round": self.round})]
        if env.stage == WireStage.UNMASK:
            survivors = env.meta.get("survivors")
            if not isinstance(survivors, list) or not all(isinstance(s, str) for s in survivors):
                raise Rejected("bad-meta", "unmask: survivors must be a list of ids")
            shares = self.client.unmask(survivors)
            self.done.add(env.stage)
            return [self._send(WireStage.UNSHARES, *wire.unshares_out(shares))]
        raise Rejected("unknown-stage", env.stage)

    def trained(self, delta: np.ndarray, metrics: Metrics, clip_bit: float = 0.0) -> list[Action]:
        """Encode the input and advertise the round's keys."""
        self.input, clipped = wire.pack(delta, metrics, self.spec, self.fixed, clip_bit)
        out: list[Action] = [self._send(WireStage.ADVERT, {},
                                        wire.advert_out(self.client.advertise()))]
        if clipped:
            out.append(Note("clipped", {"job": self.job, "round": self.round,
                                        "coordinates": clipped}))
        return out
