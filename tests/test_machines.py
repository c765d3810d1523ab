"""The three state machines together over the in-memory network: FedAvg arithmetic,
HierFAVG blocks, quorum and deadlines, repeats, reordering, stale and malformed input."""

from __future__ import annotations

import logging
import random
from dataclasses import replace

import numpy as np
import pytest

from aggregator.machine import AggregatorMachine, round_id
from coordinator.machine import CoordinatorMachine, NewVersion
from edge_agent.machine import AgentMachine, Declined, Train, Update
from fleet.sim.memnet import MemNet
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.wire import envelope
from hfl.wire.messages import Kind, Metrics, ModelRequest, ModelSpec, Role
from hfl.wire.topics import Route, Topics

P = 6
GROUPS = {"site-a": ["a1", "a2", "a3"], "site-b": ["b1", "b2", "b3"]}
# Each agent moves the model by a constant of its own and weighs by its sample count.
STEP = {"a1": 1.0, "a2": 2.0, "a3": 3.0, "b1": -1.0, "b2": 0.5, "b3": 4.0}
SAMPLES = {"a1": 10, "a2": 20, "a3": 30, "b1": 5, "b2": 5, "b3": 50}


def spec(**kw) -> ModelSpec:
    # A job as the coordinator resolved it (no task is installed in these machines' tests).
    base = dict(name="m", task="logreg", metrics=[{"name": "accuracy", "bound": 1.0}],
                dataset="d",
                aggregators=sorted(GROUPS), rounds=2, kappa1=1, min_agents=2, deadline_s=10,
                max_retries=1, secagg={"enabled": False})  # secure rounds: test_secure_rounds
    return ModelSpec(**{**base, **kw})


def constant_trainer(silent: set[str] = frozenset(), decline: dict[str, str] | None = None):
    """`silent` agents never answer; `decline` ones answer with that reason."""
    def train(agent: str, t: Train):
        if agent in silent:
            return None
        if agent in (decline or {}):
            return Declined(decline[agent], f"{agent} cannot")
        delta = np.full(P, STEP[agent], dtype=np.float32)
        return Update(delta, Metrics(samples=SAMPLES[agent], train_loss=STEP[agent],
                                     eval_samples=1, eval_loss=1.0,
                                     eval_metrics={"accuracy": 0.5}))
    return train


def build(trainer=None, groups=GROUPS, registry: frozenset[str] = frozenset(),
          **netkw) -> MemNet:
    """Coordinator, apps, aggregators and agents on an in-memory network; `registry`: job
    ids the coordinator's registry holds from earlier jobs."""
    topics = Topics()
    roster = Roster()
    ids: dict[str, Identity] = {}

    def enrol(id_, role, group=None):
        ids[id_] = Identity.generate(id_, role)
        roster.enroll(ids[id_], group)

    enrol("coord", Role.COORDINATOR)
    for app in ("app", "app2"):
        enrol(app, Role.APP)
    for agg, agents in groups.items():
        enrol(agg, Role.AGGREGATOR)
        for a in agents:
            enrol(a, Role.AGENT, agg)
    net = MemNet(topics, roster, trainer=trainer or constant_trainer(), **netkw)
    coord = ids["coord"]
    net.add(coord, CoordinatorMachine.of(coord, roster, topics,
                                         lambda s: (s, np.zeros(P, np.float32)),
                                         taken=lambda job: job in registry),
            topics.coordinator_filters("coord"))
    for app in ("app", "app2"):
        net.add(ids[app], _Sink(), topics.app_filters(["m"], app=app))
    for agg, agents in groups.items():
        net.add(ids[agg], AggregatorMachine(agg, lambda agg=agg: roster.group(agg), topics),
                topics.aggregator_filters(agg))
        for a in agents:
            net.add(ids[a], AgentMachine(ids[a], agg, {"logreg"}, {"d"}, topics, roster),
                    topics.agent_filters(agg, a))
    return net


class _Sink:
    def handle(self, env, route, now):
        return []

    def tick(self, now):
        return []


def request(net: MemNet, *specs: ModelSpec, rid: str = "r1", app: str = "app") -> None:
    req = ModelRequest(request_id=rid, models=list(specs))
    net.publish(app, Send(Kind.REQUEST, net.topics.app_requests(app), "", 0, "request",
                          req.model_dump(mode="json")))
    net.run()


def replies(net: MemNet, app: str = "app") -> list[dict]:
    return [s.meta for _, s in net.sent
            if s.kind is Kind.REPLY and s.topic == net.topics.replies(app)]


def versions(net: MemNet, job: str = "r1-m") -> list[NewVersion]:
    return [a for _, a in net.others if isinstance(a, NewVersion) and a.job == job]


def job_states(net: MemNet, job: str = "r1-m") -> list[str]:
    return [s.stage for _, s in net.sent if s.kind is Kind.JOB and s.job == job]


def fedavg(agents: list[str]) -> float:
    """The expected sample-weighted mean step, computed from the test's own tables."""
    return sum(SAMPLES[a] * STEP[a] for a in agents) / sum(SAMPLES[a] for a in agents)


def test_two_rounds_of_hierarchical_fedavg_match_the_weighted_mean() -> None:
    net = build()
    request(net, spec())
    vs = versions(net)
    assert [v.version for v in vs] == [1, 2]
    everyone = [a for g in GROUPS.values() for a in g]
    np.testing.assert_allclose(vs[0].params, fedavg(everyone), rtol=1e-6)
    np.testing.assert_allclose(vs[1].params, 2 * fedavg(everyone), rtol=1e-6)
    assert vs[-1].agents == 6
    assert job_states(net)[-1] == "done"
    assert all(not net.rejections(p) for p in net.peers)


def test_the_next_blocks_tasks_go_out_before_the_version_is_stored() -> None:
    """Storing and exporting a version is slow I/O; the fleet's next block must not wait."""
    net = build()
    tasks_by_then: dict[int, list[int]] = {}  # version → task rounds already sent
    net.handlers[NewVersion] = lambda _peer, v: tasks_by_then.__setitem__(
        v.version, [s.round for _, s in net.sent if s.kind is Kind.TASK])
    request(net, spec(rounds=2))
    assert tasks_by_then[1].count(1) == len(GROUPS)  # block 2's tasks left before version 1
    assert 2 not in tasks_by_then[2]  # the last version starts nothing
    assert job_states(net)[-1] == "done"


def test_kappa1_edge_rounds_then_sample_weighted_cloud_average() -> None:
    net = build()
    request(net, spec(kappa1=3, rounds=1))
    (v,) = versions(net)
    # Each site moves 3 times by its own mean; the cloud weighs each site by its samples.
    wa = sum(SAMPLES[a] for a in GROUPS["site-a"])
    wb = sum(SAMPLES[a] for a in GROUPS["site-b"])
    expect = (wa * 3 * fedavg(GROUPS["site-a"]) + wb * 3 * fedavg(GROUPS["site-b"])) / (wa + wb)
    np.testing.assert_allclose(v.params, expect, rtol=1e-5)
    assert len(net.events("round_closed")) == 6


def test_every_message_delivered_twice_counts_once() -> None:
    net = build(fault=lambda topic, data: [data, data])
    request(net, spec())
    vs = versions(net)
    np.testing.assert_allclose(vs[-1].params, 2 * fedavg([a for g in GROUPS.values() for a in g]),
                               rtol=1e-6)
    assert sum(p.gate.counters["duplicates"] for p in net.peers.values()) > 0


def test_reordered_delivery_gives_the_same_model() -> None:
    net = build(shuffle=random.Random(7))
    request(net, spec())
    np.testing.assert_allclose(versions(net)[-1].params,
                               2 * fedavg([a for g in GROUPS.values() for a in g]), rtol=1e-6)


def test_silent_agent_round_closes_at_deadline_with_the_survivors() -> None:
    net = build(trainer=constant_trainer(silent={"a3"}))
    request(net, spec(rounds=1))
    assert not versions(net)  # site-a still waits for a3
    net.advance(11)  # past the edge deadline: 2 of 3 meet the quorum of 2
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, fedavg(["a1", "a2", "b1", "b2", "b3"]), rtol=1e-6)
    assert v.agents == 5


def test_a_decline_closes_the_round_at_once_and_reaches_the_job_history() -> None:
    net = build(trainer=constant_trainer(decline={"a3": "bad-data"}))
    request(net, spec(rounds=2))
    vs = versions(net)  # no deadline passed: the round did not wait for a3
    assert [v.version for v in vs] == [1, 2] and all(v.agents == 5 for v in vs)
    np.testing.assert_allclose(vs[-1].params, 2 * fedavg(["a1", "a2", "b1", "b2", "b3"]),
                               rtol=1e-6)
    assert [f["reason"] for _, f in net.events("declined")] == ["bad-data"] * 4  # 2 sides × 2
    status = [s for _, s in net.sent if s.kind is Kind.JOB][-1].meta
    assert [(r["declines"], r["declined"]) for r in status["history"]] == [
        (1, {"a3": "bad-data: a3 cannot"})] * 2
    assert vs[-1].declines == 1


def test_an_agent_without_the_task_declines_and_is_left_out_of_the_block() -> None:
    net = build()
    for peer in ("a1", "a2"):
        net.peers[peer].machine.tasks = {"another"}
    request(net, spec(rounds=1, kappa1=2, max_retries=1))
    assert [f["reason"] for p, f in net.events("declined") if p == "site-a"] == ["no-task"] * 2
    # Two of three declined: below the quorum of 2, so site-a retried and then failed the
    # block (not selecting them again), and the version came from site-b alone.
    selected = [set(s.meta["selected"]) for p, s in net.sent
                if p == "site-a" and s.kind is Kind.ROUND and s.stage == "open"]
    assert selected[0] == {"a1", "a2", "a3"} and all(sel == {"a3"} for sel in selected[1:])
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, 2 * fedavg(GROUPS["site-b"]), rtol=1e-6)


def test_an_agent_that_let_a_round_down_sits_out_until_it_answers_again() -> None:
    net = build(trainer=constant_trainer(silent={"a3"}))
    request(net, spec(rounds=3))
    net.advance(11)  # block 0: a3 never answers; the round closes at its deadline
    opens = [set(s.meta["selected"]) for p, s in net.sent
             if p == "site-a" and s.kind is Kind.ROUND and s.stage == "open"]
    # Blocks 1 and 2 need no deadline: a3 is left out while a1 and a2 meet the quorum,
    # though its status still says online.
    assert opens == [{"a1", "a2", "a3"}, {"a1", "a2"}, {"a1", "a2"}]
    assert len(versions(net)) == 3
    assert net.peers["site-a"].machine.silent.keys() == {"a3"}
    # Anything it signs again (here a late answer to an old round, refused as stale) proves
    # it alive: it is back in the next job's rounds.
    old = next(s for p, s in net.sent if p == "a1" and s.kind is Kind.UPDATE)
    net.publish("a3", replace(old, topic=net.topics.update("site-a", "a3")))
    net.run()
    assert "a3" not in net.peers["site-a"].machine.silent
    request(net, spec(rounds=1), rid="r2")
    assert {"a1", "a2", "a3"} == set([s.meta["selected"] for p, s in net.sent
                                     if p == "site-a" and s.stage == "open"][-1])


def test_the_silent_are_selected_again_when_the_others_are_too_few() -> None:
    net = build(trainer=constant_trainer(silent={"a2", "a3"}))
    request(net, spec(rounds=1, max_retries=1, min_agents=2))
    net.advance(11)  # attempt 0: a2 and a3 silent, 1 < 2 → retry with them again
    retry = [set(s.meta["selected"]) for p, s in net.sent
             if p == "site-a" and s.kind is Kind.ROUND and s.stage == "open"][-1]
    assert retry == {"a1", "a2", "a3"}  # a1 alone cannot meet the quorum


def test_a_small_secure_group_is_skipped_with_its_reason_or_runs_in_the_clear() -> None:
    small = {"site-a": ["a1", "a2", "a3"], "site-b": ["b1", "b2"]}
    net = build(groups=small)
    request(net, spec(rounds=1, secagg={"enabled": True}))
    (failed,) = [f["reason"] for p, f in net.events("block_failed") if p == "site-b"]
    assert "secure group too small: 2 agents available" in failed
    assert 'secagg.small_groups = "plain"' in failed
    (v,) = versions(net)
    assert v.agents == 3  # site-a's alone
    net = build(groups=small)
    request(net, spec(rounds=1, secagg={"enabled": True, "small_groups": "plain"}))
    (v,) = versions(net)
    assert v.agents == 5
    assert [f["why"] for p, f in net.events("round_in_the_clear")] == [
        "secure group too small: 2 agents available, secure aggregation needs n >= 3"]
    # Site-b's agents were told the round is plain: they sent sealed deltas, not masks.
    stages = {s.stage for p, s in net.sent if p in ("b1", "b2") and s.kind is Kind.UPDATE}
    assert stages == {"update"}


def test_each_version_names_the_sites_missing_from_it_and_why_at_warning(caplog) -> None:
    caplog.set_level(logging.WARNING)
    small = {"site-a": ["a1", "a2", "a3"], "site-b": ["b1", "b2"]}
    net = build(groups=small)
    request(net, spec(rounds=3, secagg={"enabled": True}))
    why = ("secure group too small: 2 agents available, secure aggregation needs n >= 3; "
           'secagg.small_groups = "plain" aggregates such rounds in the clear')
    assert [v.agents for v in versions(net)] == [3, 3, 3]
    final = [s for _, s in net.sent if s.kind is Kind.JOB][-1].meta
    assert final["state"] == "done"
    assert [r["missing"] for r in final["history"]] == [{"site-b": why}] * 3
    # Said at WARNING, by the site for each block and by the coordinator for each version.
    warned = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert warned.count(("WARNING", f"site-b: job r1-m block 0 failed here: {why}")) == 1
    assert ("WARNING", f"site-b: job r1-m block 2 failed here: {why}") in warned
    assert ("WARNING", f"coord: job r1-m version 3 was made without site-b ({why})") in warned
    assert len(warned) == 6, warned
    # A whole site: no version lists anyone missing, nothing is said.
    caplog.clear()
    net = build()
    request(net, spec(rounds=1))
    (row,) = [s for _, s in net.sent if s.kind is Kind.JOB][-1].meta["history"]
    assert row["missing"] == {} and caplog.records == []


def test_a_site_whose_partial_never_came_is_missing_by_the_deadline(caplog) -> None:
    caplog.set_level(logging.WARNING)
    net = build()
    net.peers["site-b"].machine = _Sink()  # its aggregator hangs: tasks in, nothing out
    request(net, spec(rounds=1))
    assert versions(net) == []
    net.advance(31)  # the block's timeout: κ1 · deadline · (retries + 1) + 10 s of grace
    (v,) = versions(net)
    assert v.agents == 3
    (row,) = [s for _, s in net.sent if s.kind is Kind.JOB][-1].meta["history"]
    assert row["missing"] == {"site-b": "no partial by the deadline"}
    assert [r.getMessage() for r in caplog.records] == [
        "coord: job r1-m version 1 was made without site-b (no partial by the deadline)"]


def test_a_job_every_site_failed_ends_failed_at_warning(caplog) -> None:
    caplog.set_level(logging.WARNING)
    net = build(trainer=constant_trainer(silent=set(STEP)))
    request(net, spec(rounds=1, max_retries=0))
    net.advance(11)
    assert job_states(net)[-1] == "failed"
    msgs = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "site-a: job r1-m block 0 failed here: round failed: 0 < 2" in msgs
    assert any(m.startswith("coord: job r1-m failed: every aggregator failed the block")
               for m in msgs), msgs


def test_below_quorum_retries_then_the_other_site_carries_the_block() -> None:
    net = build(trainer=constant_trainer(silent={"a2", "a3"}))
    request(net, spec(rounds=1, max_retries=1))
    net.advance(11)  # attempt 0 of site-a fails the quorum → retry
    assert len(net.events("round_retry")) == 1
    net.advance(11)  # attempt 1 fails too → block failed, partial of weight 0
    assert [f["reason"] for _, f in net.events("block_failed")] == [
        "round failed: 1 < 2"]
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, fedavg(GROUPS["site-b"]), rtol=1e-6)


def acks(net: MemNet, to: str) -> list[tuple[int, str, str]]:
    """(round, stage, outcome) of every acknowledgement sent to `to`."""
    return [(s.round, s.stage, s.meta["outcome"]) for _, s in net.sent
            if s.kind is Kind.ACK and s.topic.endswith(f"/{to}")]


def test_update_for_a_closed_round_is_rejected_as_stale_but_a_repeat_is_a_repeat() -> None:
    net = build()
    request(net, spec(rounds=2))
    first, second = [s for p, s in net.sent if p == "a1" and s.kind is Kind.UPDATE]
    # a1's update of the round that ended last, sent again (its ack was lost): it is in
    # that round, so a repeat, acknowledged as such, not refused and not counted again.
    net.publish("a1", second)
    net.run()
    assert net.rejections("site-a") == {}
    assert acks(net, "a1")[-1] == (second.round, "update", "repeat")
    # Its update of the round before: stale, refused, and acknowledged all the same.
    net.publish("a1", first)
    net.run()
    assert net.rejections("site-a") == {"stale-round": 1}
    assert acks(net, "a1")[-1] == (first.round, "update", "refused")
    assert len(versions(net)) == 2
    np.testing.assert_allclose(versions(net)[-1].params, 2 * fedavg(
        GROUPS["site-a"] + GROUPS["site-b"]), rtol=1e-6)


def test_malformed_update_is_rejected_and_the_round_still_completes() -> None:
    net = build(trainer=constant_trainer(silent={"a1"}))
    request(net, spec(rounds=1))
    rnd = round_id(spec(), 0, 0, 0)
    bad = Send(Kind.UPDATE, net.topics.update("site-a", "a1"), "r1-m", rnd, "update",
               {"metrics": {"samples": 3}}, {"delta": np.ones(P + 1, np.float32)})
    net.publish("a1", bad)
    net.run()
    assert net.rejections("site-a") == {"bad-shape": 1}
    bad_meta = Send(Kind.UPDATE, net.topics.update("site-a", "a1"), "r1-m", rnd, "update",
                    {"metrics": {"samples": -1}}, {"delta": np.ones(P, np.float32)})
    net.publish("a1", bad_meta)
    net.run()
    assert net.rejections("site-a")["bad-meta"] == 1
    net.advance(11)
    assert len(versions(net)) == 1


def test_agent_cannot_speak_for_another_agent_or_another_site() -> None:
    net = build()
    request(net, spec(rounds=1, min_agents=3))
    topic_of_a2 = net.topics.update("site-a", "a2")
    forged = Send(Kind.UPDATE, topic_of_a2, "r1-m", 0, "update", {}, {})
    net.publish("a1", forged)  # a1 signs, but on a2's topic
    net.publish("b1", Send(Kind.UPDATE, net.topics.update("site-a", "b1"), "r1-m", 0,
                           "update", {}, {}))  # b1 belongs to site-b
    net.run()
    assert net.rejections("site-a") == {"wrong-sender": 1, "wrong-group": 1}


def test_unenrolled_or_tampered_sender_is_rejected_by_the_gate() -> None:
    net = build()
    stranger = Identity.generate("a1", Role.AGENT)  # same id, not the enrolled key
    topic = net.topics.update("site-a", "a1")
    data = envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                           sender="a1", key=stranger.key)
    net.inject(topic, data)
    data = envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                           sender="nobody", key=stranger.key)
    net.inject(topic, data)
    net.run()
    assert net.rejections("site-a") == {"bad-signature": 1, "unknown-sender": 1}


def test_retained_round_redelivered_does_not_train_twice() -> None:
    trained: list[tuple[str, int]] = []
    base = constant_trainer()

    def counting(agent, t):
        trained.append((agent, t.round))
        return base(agent, t)

    net = build(trainer=counting)
    request(net, spec(rounds=1, min_agents=3))
    n = len(trained)
    # A reconnecting agent gets the retained round announcements again.
    for topic, data in list(net.retained.items()):
        if "/rounds/" in topic:
            net.peers["a1"].gate._seen.clear()  # as after a restart
            net._deliver(net.peers["a1"], topic, data)
    assert len(trained) == n


def test_request_naming_an_unknown_aggregator_fails_the_job_clearly() -> None:
    net = build()
    request(net, spec(aggregators=["site-a", "site-x"]))
    (status,) = [s for _, s in net.sent if s.kind is Kind.JOB]
    assert status.meta["state"] == "failed"
    assert "site-x" in status.meta["reason"]
    assert not [s for _, s in net.sent if s.kind is Kind.TASK]


def test_invalid_request_is_rejected_with_the_field_named_and_answered() -> None:
    net = build()
    net.publish("app", Send(Kind.REQUEST, net.topics.app_requests("app"), "", 0, "request",
                            {"request_id": "r2", "models": [{"name": "x"}]}))
    net.publish("app", Send(Kind.REQUEST, net.topics.app_requests("app"), "", 0, "request",
                            {"models": 3}))
    net.run()
    assert net.rejections("coord") == {"bad-request": 2}
    (named, anonymous) = replies(net)
    assert named["request_id"] == "r2" and named["accepted"] == []
    assert "models.0.task: Field required" in named["refused"][""]
    assert anonymous["request_id"] == "" and "request_id" in anonymous["refused"][""]


def test_every_request_is_answered_and_a_job_id_names_one_job_for_ever() -> None:
    net = build(registry=frozenset({"old-m"}))
    request(net, spec(rounds=1))
    request(net, spec(rounds=1))  # the same request again: the same job, not a second one
    request(net, spec(rounds=2))  # the same id for another spec
    request(net, spec(rounds=1), app="app2")  # another app's request, the same id
    request(net, spec(rounds=1), rid="old")  # an earlier job's id, kept in the registry
    request(net, spec(rounds=1, aggregators=["site-x"]), rid="r9")  # a job that cannot run
    ours = replies(net)
    assert [r["accepted"] for r in ours] == [["r1-m"], ["r1-m"], [], [], []]
    assert "another spec" in ours[2]["refused"]["m"]
    assert "registry" in ours[3]["refused"]["m"]
    assert "unknown aggregators: site-x" in ours[4]["refused"]["m"]
    (theirs,) = replies(net, "app2")
    assert "belongs to another app" in theirs["refused"]["m"]
    # One job, one version; the repeat was answered with its state (done by then).
    assert len(versions(net)) == 1 and job_states(net) == ["running", "done", "done"]
    # The app that failed to start a job may ask again under the same id, fixed.
    request(net, spec(rounds=1), rid="r9")
    assert replies(net)[-1]["accepted"] == ["r9-m"] and len(versions(net, "r9-m")) == 1


def test_two_models_in_one_request_become_two_jobs_on_their_aggregators() -> None:
    net = build()
    request(net, spec(name="m", aggregators=["site-a"], rounds=1),
            spec(name="n", aggregators=["site-b"], rounds=1))
    tasks = {(s.job, s.topic) for _, s in net.sent if s.kind is Kind.TASK}
    assert tasks == {("r1-m", net.topics.tasks("site-a")), ("r1-n", net.topics.tasks("site-b"))}
    np.testing.assert_allclose(versions(net, "r1-m")[0].params, fedavg(GROUPS["site-a"]), rtol=1e-6)
    np.testing.assert_allclose(versions(net, "r1-n")[0].params, fedavg(GROUPS["site-b"]), rtol=1e-6)


def test_patience_stops_a_job_whose_eval_loss_stopped_improving() -> None:
    net = build()  # every agent reports the same eval loss each round: no improvement
    request(net, spec(rounds=10, patience=2))
    assert [v.version for v in versions(net)] == [1, 2, 3]
    final = [s for _, s in net.sent if s.kind is Kind.JOB][-1]
    assert final.meta["state"] == "stopped"


@pytest.mark.parametrize("stage", ["open", "closed"])
def test_agent_ignores_rounds_of_other_groups(stage: str) -> None:
    topics = Topics()
    m = AgentMachine(Identity.generate("a1", Role.AGENT), "site-a", {"logreg"}, {"d"}, topics,
                     Roster())
    with pytest.raises(Rejected) as e:
        m.handle(_FakeEnv("round", "j", 0, stage), Route("rounds", agg="site-b", job="j"), 0.0)
    assert e.value.reason == "wrong-group"


class _FakeEnv:
    def __init__(self, type_, job, round_, stage):
        self.type, self.job, self.round, self.stage = type_, job, round_, stage
        self.meta, self.tensors = {}, {}


def test_server_momentum_and_learning_rate_shape_the_global_steps() -> None:
    m = fedavg([a for g in GROUPS.values() for a in g])  # every block's mean delta
    net = build()
    request(net, spec(rounds=3, server_momentum=0.5))
    # v1 = m, v2 = 0.5·m + m, v3 = 0.5·1.5m + m; the model adds each velocity.
    expect = np.cumsum([m, 1.5 * m, 1.75 * m])
    for v, e in zip(versions(net), expect, strict=True):
        np.testing.assert_allclose(v.params, e, rtol=1e-5)
    net = build()
    request(net, spec(rounds=2, server_lr=2.0), rid="r2")
    np.testing.assert_allclose(versions(net, "r2-m")[-1].params, 4 * m, rtol=1e-5)
