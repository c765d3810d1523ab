"""Secure edge rounds (SecAgg+) through the three machines on the in-memory network: real
envelopes, real sealing and masking; agents dropping at each stage, replays, forged models."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

from aggregator.machine import round_id
from edge_agent.machine import Declined, Update
from fleet.sim.memnet import MemNet
from hfl.crypto import secagg_wire as wire
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.wire.messages import Kind, ModelSpec, RoundMeta
from tests.test_machines import P, build, request, versions

GROUPS = {"site-a": [f"a{i}" for i in range(10)], "site-b": ["b0", "b1", "b2"]}
STEP = {a: 0.01 * (i + 1) * (-1) ** i for i, a in enumerate(sum(GROUPS.values(), []))}
SAMPLES = {a: 10 + 7 * i for i, a in enumerate(sum(GROUPS.values(), []))}
TOL = 1e-5  # fixed point: 2^-26 per coordinate for 10 agents and a clip of 2


def trainer(agent, t):
    from hfl.wire.messages import Metrics

    return Update(np.full(P, STEP[agent], np.float32),
                  Metrics(samples=SAMPLES[agent], train_loss=1.0, eval_samples=4, eval_loss=2.0,
                          eval_metrics={"accuracy": 0.25, "rmse": 3.0}))


def spec(**kw) -> ModelSpec:
    base = dict(name="m", task="logreg", dataset="d",
                metrics=[{"name": "accuracy", "bound": 1.0},
                         {"name": "rmse", "reduce": "rms", "bound": 10.0}],
                aggregators=sorted(GROUPS), rounds=1, min_agents=2, deadline_s=10,
                max_retries=1, secagg={"threshold": 0.6, "stage_timeout_s": 5})
    return ModelSpec(**{**base, **kw})


def fedavg(agents) -> float:
    return sum(SAMPLES[a] * STEP[a] for a in agents) / sum(SAMPLES[a] for a in agents)


def stage_of(data: bytes) -> tuple[str, int]:
    h = int.from_bytes(data[4:8], "little")
    header = json.loads(data[8 : 8 + h])
    return header["stage"], header["round"]


def drop(agents: set[str], stage: str, rounds: set[int] | None = None):
    """A fault: these agents' messages of `stage` (in `rounds`, or any) never arrive."""
    def fault(topic: str, data: bytes) -> list[bytes]:
        agent = topic.rsplit("/", 1)[-1]
        st, rnd = stage_of(data)
        if "/updates/" in topic and agent in agents and st == stage and (
                rounds is None or rnd in rounds):
            return []
        return [data]
    return fault


def net(**kw) -> MemNet:
    return build(trainer=trainer, groups=GROUPS, **kw)


def test_a_secure_round_yields_the_weighted_mean_and_the_group_metrics() -> None:
    n = net()
    request(n, spec())
    (v,) = versions(n)
    np.testing.assert_allclose(v.params, fedavg(STEP), atol=TOL)
    assert v.agents == 13 and v.dropped == 0
    assert v.metrics.eval_metrics["accuracy"] == pytest.approx(0.25, abs=1e-4)
    assert v.metrics.eval_metrics["rmse"] == pytest.approx(3.0, abs=1e-3)  # √(mean of 9s)
    assert v.metrics.eval_loss == pytest.approx(2.0, abs=1e-3)
    assert all(not n.rejections(p) for p in n.peers)
    # The aggregator saw masked vectors only: no update carried a float delta.
    updates = [s for p, s in n.sent if s.kind is Kind.UPDATE]
    assert {s.stage for s in updates} == {"advert", "shares", "masked", "unshares"}
    assert all(s.to == (s.topic.split("/")[3],) for s in updates)  # sealed for the aggregator


@pytest.mark.parametrize("dropped", [0, 1, 3, 4])
def test_agents_dropping_after_sharing_keys_are_recovered(dropped: int) -> None:
    gone = set(GROUPS["site-a"][:dropped])
    n = net(fault=drop(gone, "masked"))
    request(n, spec())
    assert bool(versions(n)) == (dropped == 0)  # site-a waits for missing masked inputs
    n.advance(6)  # the masked stage times out; the unmask stage recovers their masks
    (v,) = versions(n)
    survivors = [a for a in STEP if a not in gone]
    np.testing.assert_allclose(v.params, fedavg(survivors), atol=TOL)
    assert v.agents == 13 - dropped and v.dropped == dropped


def test_five_dropped_is_below_threshold_the_round_aborts_and_the_retry_succeeds() -> None:
    first = round_id(spec(), 0, 0, 0)
    gone = set(GROUPS["site-a"][:5])
    n = net(fault=drop(gone, "masked", rounds={first}))
    request(n, spec())
    n.advance(6)  # 5 survivors < t = 6: abort, retry as a new round
    retries = n.events("round_retry")
    assert len(retries) == 1 and "secagg-too-few" in retries[0][1]["why"]
    # The retry leaves the five out (they let the round down and said nothing since): the
    # other five are enough for it.
    (v,) = versions(n)
    np.testing.assert_allclose(v.params, fedavg([a for a in STEP if a not in gone]), atol=TOL)
    assert v.agents == 8


def test_a_survivor_silent_at_unmask_still_gives_the_exact_sum() -> None:
    n = net(fault=drop({"a0", "a1"}, "unshares"))
    request(n, spec())
    n.advance(6)
    (v,) = versions(n)
    np.testing.assert_allclose(v.params, fedavg(STEP), atol=TOL)


def test_agents_that_never_advertise_are_left_out_at_the_deadline() -> None:
    n = net(fault=drop({"a8", "a9"}, "advert"))
    request(n, spec())
    n.advance(11)
    (v,) = versions(n)
    np.testing.assert_allclose(v.params, fedavg([a for a in STEP if a not in {"a8", "a9"}]),
                               atol=TOL)
    assert v.dropped == 0  # never in the round, so no masks to recover


def test_agents_that_decline_leave_the_secure_round_without_its_deadline() -> None:
    def declining(agent, t):
        return Declined("bad-data", "x row 3") if agent in {"a8", "a9"} else trainer(agent, t)

    n = build(trainer=declining, groups=GROUPS)
    request(n, spec())
    (v,) = versions(n)  # no time passed: nobody waited for the two
    np.testing.assert_allclose(v.params, fedavg([a for a in STEP if a not in {"a8", "a9"}]),
                               atol=TOL)
    assert (v.agents, v.dropped, v.declines) == (11, 0, 2)
    assert all(not n.rejections(p) for p in n.peers)
    # A decline after the advert is a peer's error: refused, the round goes on.
    stray = Send(Kind.UPDATE, n.topics.update("site-a", "a1"), "r1-m", 0, "decline",
                 {"reason": "no-data"})
    n.publish("a1", stray)
    n.run()
    assert n.rejections("site-a") == {"stale-round": 1}


def test_replayed_masked_input_from_an_earlier_round_is_rejected_and_counted() -> None:
    n = net()
    request(n, spec(rounds=2))
    old = next(s for p, s in n.sent if p == "a3" and s.stage == "masked")
    n.publish("a3", old)  # re-signed by a3 itself, fresh nonce, old round
    n.run()
    assert n.rejections("site-a") == {"stale-round": 1}
    assert len(versions(n)) == 2


def test_a_model_altered_by_the_aggregator_is_refused_by_the_agents() -> None:
    n = net()
    request(n, spec(rounds=1))
    opened = next(s for p, s in n.sent if p == "site-a" and s.stage == "open")
    meta = RoundMeta.model_validate(opened.meta)
    forged = Send(Kind.ROUND, opened.topic, opened.job, opened.round + 100, "open",
                  opened.meta, {"params": opened.tensors["params"] + 1}, retain=True,
                  to=opened.to)
    assert meta.origin is not None
    n.publish("site-a", forged)
    n.run()
    assert n.rejections("a0") == {"bad-origin": 1}


def test_a_group_too_small_to_hide_anyone_fails_the_job_with_the_reason() -> None:
    n = net()
    request(n, spec(aggregators=["site-b"], client_fraction=0.3, min_agents=1))
    final = [s for _, s in n.sent if s.kind is Kind.JOB][-1]
    assert final.meta["state"] == "failed"
    assert "site-b: secure group too small: 3 agents available" in final.meta["reason"]
    assert not [s for _, s in n.sent if s.kind is Kind.UPDATE]  # no agent was asked


# ---------------------------------------------------------------- routed shares, one agent each


def test_each_agent_is_sent_only_its_own_shares_on_its_own_topic() -> None:
    n = net()
    request(n, spec())
    routed = [s for p, s in n.sent if p == "site-a" and s.stage == "routed"]
    assert sorted(s.topic for s in routed) == [
        n.topics.round_to("site-a", "r1-m", a) for a in GROUPS["site-a"]]
    for s in routed:
        me = n.topics.parse(s.topic).agent
        assert s.meta["to"] == me and not s.retain and not s.to
        assert me not in s.meta["from"] and set(s.meta["from"]) < set(GROUPS["site-a"])
        assert s.tensors["offsets"].size == len(s.meta["from"]) + 1  # its k shares, no more
        assert len(wire.routed_in(s.meta, s.tensors, me)) == len(s.meta["from"])
    assert not [s for _, s in n.sent if s.stage == "routed" and "/rounds/" not in s.topic]


class Misroutes:
    """site-a's machine, which also sends a1 the shares addressed to a2 (on a1's own topic)
    and a2's shares on the group's round topic, before the genuine messages."""

    def __init__(self, machine, n: MemNet) -> None:
        self.machine, self.topics = machine, n.topics

    def handle(self, env, route, now):
        return self._misroute(self.machine.handle(env, route, now))

    def tick(self, now):
        return self._misroute(self.machine.tick(now))

    def _misroute(self, out: list) -> list:
        routed = {s.meta["to"]: s for s in out if isinstance(s, Send) and s.stage == "routed"}
        if not routed:
            return out
        a2 = routed["a2"]
        return [replace(a2, topic=routed["a1"].topic),
                replace(a2, topic=self.topics.rounds("site-a", a2.job)), *out]


def test_an_agent_refuses_shares_not_addressed_to_it() -> None:
    n = net()
    n.peers["site-a"].machine = Misroutes(n.peers["site-a"].machine, n)
    request(n, spec())
    (v,) = versions(n)  # the genuine shares still went through
    np.testing.assert_allclose(v.params, fedavg(STEP), atol=TOL)
    assert n.rejections("a1") == {"wrong-recipient": 1, "wrong-topic": 1}
    assert all(n.rejections(a) == {"wrong-topic": 1} for a in GROUPS["site-a"] if a != "a1")
    # A genuine message for a2 that reaches a1 (a broker without the ACL) is refused too.
    theirs = n.topics.round_to("site-a", "r1-m", "a2")
    data = n.publish("site-a", next(s for _, s in n.sent if s.topic == theirs))
    n.run()
    n._deliver(n.peers["a1"], theirs, data)
    assert n.rejections("a1") == {"wrong-recipient": 2, "wrong-topic": 1}


def test_routed_shares_round_trip_and_refuse_a_bad_message() -> None:
    row = {"a3": b"\x01" * 40, "a1": b"\x02" * 41}
    meta, tensors = wire.routed_out("a2", row)
    assert meta == {"to": "a2", "from": ["a1", "a3"]}
    assert wire.routed_in(meta, tensors, "a2") == row
    assert wire.routed_in(*wire.routed_out("a2", {}), "a2") == {}  # its neighbours all gone
    bad = [({**meta, "to": "a1"}, tensors, "wrong-recipient"),
           ({"from": meta["from"]}, tensors, "wrong-recipient"),
           ({**meta, "from": ["a1", "a1"]}, tensors, "bad-meta"),
           ({**meta, "from": ["a1", "x/y"]}, tensors, "bad-meta"),
           ({**meta, "from": ["a1"]}, tensors, "bad-shape"),
           (meta, {**tensors, "offsets": tensors["offsets"][::-1].copy()}, "bad-shape"),
           (meta, {"offsets": tensors["offsets"]}, "bad-shape")]
    for m, t, reason in bad:
        with pytest.raises(Rejected) as e:
            wire.routed_in(m, t, "a2")
        assert e.value.reason == reason, (m, reason)
