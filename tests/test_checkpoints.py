"""Crash and restart of the aggregator and the coordinator machines, on the in-memory network:
each change is saved in a real checkpoint store as a durable node saves it; at the crash the
machine is thrown away with everything in memory, a new one is restored from the store, and
the messages the broker would deliver again (those that came while it was down, and the last
one it handled, never acknowledged) arrive again. The outcome must be the unfailed run's."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.machine import AggregatorMachine
from coordinator.machine import CoordinatorMachine
from fleet.sim.memnet import MemNet
from hfl.runtime.state import Checkpointer, StateStore
from hfl.wire.gate import Gate
from hfl.wire.messages import Kind
from tests import test_secure_rounds as secure
from tests.test_machines import GROUPS, build, fedavg, request, spec, versions

EVERYONE = [a for g in GROUPS.values() for a in g]


class Crashable:
    """A machine saved after every event, as a durable node saves before it acknowledges or
    sends; `crash` makes it deaf (a dead process) until the test restarts another."""

    def __init__(self, machine, store: StateStore, crash_after: int = 0,
                 counts: str = "/updates/") -> None:
        self.machine, self.store = machine, store
        self.saver = Checkpointer(machine, store)
        self.crash_after, self.counts = crash_after, counts
        self.handled = 0
        self.down = False

    def handle(self, env, route, now):
        if self.down:
            return []
        out = self.machine.handle(env, route, now)
        self.saver.save()
        if self.counts in env.topic:
            self.handled += 1
            self.down = self.handled == self.crash_after
        return out

    def tick(self, now):
        if self.down:
            return []
        out = self.machine.tick(now)
        self.saver.save()
        return out


class Wire:
    """Records what the broker delivers on topics containing `part`, in order."""

    def __init__(self, part: str) -> None:
        self.part = part
        self.seen: list[tuple[str, bytes]] = []

    def __call__(self, topic: str, data: bytes) -> list[bytes]:
        if self.part in topic:
            self.seen.append((topic, data))
        return [data]


def restart(net: MemNet, name: str, fresh, store: StateStore, redeliver: list) -> Checkpointer:
    """A new process: machine restored from the store, a gate with no memory of repeats, the
    resumed actions sent, then what the broker delivers again."""
    saver = Checkpointer(fresh, store)
    assert saver.load() > 0
    peer = net.peers[name]
    peer.machine = fresh
    peer.gate = Gate(net.roster, net.topics, identity=peer.identity)
    net._act(peer, fresh.resume(net.now))
    net.run()
    for topic, data in redeliver:
        net.inject(topic, data)
    net.run()
    return saver


def aggregator(net: MemNet, name: str) -> AggregatorMachine:
    return AggregatorMachine(name, lambda: net.roster.group(name), net.topics)


@pytest.mark.parametrize("crash_after", [1, 2])
def test_plain_round_resumes_from_its_checkpoint_and_counts_nobody_twice(
        tmp_path: Path, crash_after: int) -> None:
    wire = Wire("/agg/site-a/updates/")
    net = build(fault=wire)
    store = StateStore(tmp_path)
    net.peers["site-a"].machine = Crashable(aggregator(net, "site-a"), store, crash_after)
    request(net, spec(rounds=1))
    assert not versions(net)  # site-a died with 3 - crash_after updates still to take in
    # The broker delivers again the last update handled (not acknowledged) and the rest.
    again = wire.seen[crash_after - 1:]
    fresh = aggregator(net, "site-a")
    restart(net, "site-a", fresh, store, again)
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, fedavg(EVERYONE), rtol=1e-6)
    assert v.agents == 6
    dups = [f for p, f in net.events("duplicate") if p == "site-a"]
    assert len(dups) == 1  # the redelivered one, recognised from the checkpoint
    assert not net.rejections("site-a")


def test_a_finished_block_answers_from_its_checkpoint(tmp_path: Path) -> None:
    net = build()
    store = StateStore(tmp_path)
    net.peers["site-a"].machine = Crashable(aggregator(net, "site-a"), store, crash_after=3)
    request(net, spec(rounds=1))  # the third update closes the round, then site-a dies
    (v,) = versions(net)
    fresh = aggregator(net, "site-a")
    restart(net, "site-a", fresh, store, [])
    # Resent on resume; the coordinator has averaged it already and takes it as a repeat.
    assert [f for p, f in net.events("late") if p == "coord"] == [
        {"job": "r1-m", "aggregator": "site-a", "block": 0}]
    assert not net.rejections("coord")
    assert len(versions(net)) == 1
    np.testing.assert_allclose(v.params, fedavg(EVERYONE), rtol=1e-6)


# Secure rounds: 10 agents in site-a, each sends advert, shares, masked, unshares in turn.
@pytest.mark.parametrize("stage", ["advert", "shares", "masked", "unshares"])
def test_secure_round_resumes_at_each_stage_with_the_exact_sum(tmp_path: Path,
                                                               stage: str) -> None:
    order = ["advert", "shares", "masked", "unshares"]
    crash_after = 10 * order.index(stage) + 4  # the 4th message of `stage`
    wire = Wire("/agg/site-a/updates/")
    net = secure.net(fault=wire)
    store = StateStore(tmp_path)
    net.peers["site-a"].machine = Crashable(aggregator(net, "site-a"), store, crash_after)
    request(net, secure.spec())
    assert not versions(net)
    fresh = aggregator(net, "site-a")
    before = len(net.sent)
    restart(net, "site-a", fresh, store, wire.seen[crash_after - 1:])
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, secure.fedavg(secure.STEP), atol=secure.TOL)
    assert v.agents == 13 and v.dropped == 0
    assert not net.rejections("site-a")
    if stage == "masked":  # resumed: each agent's own shares again, on its own topic
        again = [s.topic for p, s in net.sent[before:] if p == "site-a" and s.stage == "routed"]
        assert again == [net.topics.round_to("site-a", "r1-m", a)
                         for a in secure.GROUPS["site-a"]]


def test_secure_round_restarted_after_agents_dropped_still_recovers_their_masks(
        tmp_path: Path) -> None:
    gone = {"a0", "a1"}
    net = secure.net(fault=secure.drop(gone, "masked"))
    store = StateStore(tmp_path)
    # 10 adverts, 10 shares, 8 masked inputs: the aggregator dies waiting for a0 and a1.
    net.peers["site-a"].machine = Crashable(aggregator(net, "site-a"), store, crash_after=28)
    request(net, secure.spec())
    fresh = aggregator(net, "site-a")
    restart(net, "site-a", fresh, store, [])
    net.advance(6)  # past the resumed stage deadline: unmask with the 8 survivors
    (v,) = versions(net)
    survivors = [a for a in secure.STEP if a not in gone]
    np.testing.assert_allclose(v.params, secure.fedavg(survivors), atol=secure.TOL)
    assert v.agents == 11 and v.dropped == 2


def test_a_secure_rounds_saves_do_not_grow_with_the_agents_heard_and_leave_nothing(
        tmp_path: Path) -> None:
    """A save after an agent's message writes that agent's record and the round's own
    state, not again what every earlier agent sent (which made a round's saves O(n²));
    once the round is over, no agent's record is left in the store."""
    net = secure.net()
    store = StateStore(tmp_path)
    saver = Crashable(aggregator(net, "site-a"), store)
    written: list[int] = []
    write = store.write

    def counted(records: dict) -> None:
        written.append(sum(len(json.dumps(doc)) + sum(a.nbytes for a in arrays.values())
                           for doc, arrays in filter(None, records.values())))
        write(records)

    store.write = counted  # type: ignore[method-assign]
    per_message: list[tuple[str, int]] = []
    handle = saver.handle

    def measured(env, route, now):
        before = len(written)
        out = handle(env, route, now)
        if "/updates/" in env.topic:
            per_message.append((env.stage, sum(written[before:])))
        return out

    saver.handle = measured  # type: ignore[method-assign]
    net.peers["site-a"].machine = saver
    request(net, secure.spec())
    (v,) = versions(net)
    np.testing.assert_allclose(v.params, secure.fedavg(secure.STEP), atol=secure.TOL)
    shares = [n for stage, n in per_message if stage == "shares"]
    assert len(shares) == 10
    # All but the last, whose stage change also rewrites the round's agents' records.
    assert max(shares[:-1]) <= 1.2 * min(shares[:-1]), shares
    assert not [k for k in store.read() if k.startswith("client/")]


def coordinator(net: MemNet) -> CoordinatorMachine:
    return CoordinatorMachine.of(net.peers["coord"].identity, net.roster, net.topics,
                                 lambda s: (s, np.zeros(6, np.float32)))


def test_coordinator_killed_between_partials_publishes_the_same_global_model(
        tmp_path: Path) -> None:
    wire = Wire("/coord/partials/")
    net = build(fault=wire)
    store = StateStore(tmp_path)
    net.peers["coord"].machine = Crashable(coordinator(net), store, crash_after=1,
                                           counts="/coord/partials/")
    request(net, spec(rounds=2))
    assert not versions(net)  # one partial in, the coordinator died before the second
    fresh = coordinator(net)
    restart(net, "coord", fresh, store, wire.seen[1:])
    vs = versions(net)
    assert [v.version for v in vs] == [1, 2]
    np.testing.assert_allclose(vs[0].params, fedavg(EVERYONE), rtol=1e-6)
    np.testing.assert_allclose(vs[1].params, 2 * fedavg(EVERYONE), rtol=1e-6)
    states = [s.stage for _, s in net.sent if s.kind is Kind.JOB]
    assert states[-1] == "done"
    assert not net.rejections("coord")


def test_coordinator_restarted_after_a_version_sends_it_again(tmp_path: Path) -> None:
    net = build()
    store = StateStore(tmp_path)
    net.peers["coord"].machine = Crashable(coordinator(net), store, crash_after=2,
                                           counts="/coord/partials/")
    request(net, spec(rounds=2))  # both partials of block 0: version 1, then the crash
    assert [v.version for v in versions(net)] == [1]
    fresh = coordinator(net)
    restart(net, "coord", fresh, store, [])
    vs = versions(net)
    # Resuming names version 1 again (the runner skips it when its registry has it) and
    # sends block 1's tasks again; both aggregators answer and version 2 follows.
    assert [v.version for v in vs] == [1, 1, 2]
    np.testing.assert_array_equal(vs[0].params, vs[1].params)
    np.testing.assert_allclose(vs[2].params, 2 * fedavg(EVERYONE), rtol=1e-6)
