"""Telemetry read off what a node already has: the real machines' actions over the in-memory
network (rounds, updates, durations, retries, failures), the node's counters, the message it
publishes (when, and who may), and the Prometheus exposition of the same snapshot."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from fleet.sim.memnet import MemNet
from hfl.config import Config, load_config
from hfl.crypto.identity import Identity, Roster
from hfl.runtime.actions import Note, Send
from hfl.runtime.metrics import TelemetryCollector
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node, encode_send
from hfl.runtime.telemetry import ROUND_BUCKETS, Instrumented, Stats, Telemetry
from hfl.wire.gate import Gate
from hfl.wire.messages import Kind, Role, TelemetryMeta
from hfl.wire.topics import Topics
from tests.test_machines import STEP, build, constant_trainer, request, spec

T = Topics()


@pytest.fixture
def stats(monkeypatch: pytest.MonkeyPatch) -> dict[str, Stats]:
    """Each peer's Stats, folded from every action its machine returns, at the net's time."""
    out: dict[str, Stats] = {}
    act = MemNet._act

    def fold(self: MemNet, peer, actions: list) -> None:
        for a in actions:
            out.setdefault(peer.identity.id, Stats()).observe(a, self.now)
            act(self, peer, [a])

    monkeypatch.setattr(MemNet, "_act", fold)
    return out


def test_rounds_updates_and_durations_of_real_machines(stats) -> None:
    net = build(trainer=constant_trainer(silent={"a3"}))
    request(net, spec(rounds=2))
    net.advance(11)  # site-a closes its first round at the deadline, without a3; the second
    net.advance(11)  # leaves a3 out (it let a round down) and waits for nobody
    site_a, site_b, coord = stats["site-a"], stats["site-b"], stats["coord"]
    assert (site_a.rounds, site_a.updates, site_a.retries, site_a.failures) == (2, 4, 0, 0)
    assert (site_b.rounds, site_b.updates) == (2, 6)
    assert (site_a.round_count, site_a.round_total, site_a.round_last) == (2, 11.0, 0.0)
    assert (site_b.round_count, site_b.round_total) == (2, 0.0)
    # Site-a's rounds took 11 s (the bucket (10, 30]) and no time at all.
    le = dict(site_a.cumulative_buckets())
    assert (le[0.5], le[10.0], le[30.0], le[float("inf")]) == (1, 1, 2, 2)
    assert dict(site_b.cumulative_buckets())[0.5] == 2
    # The coordinator's global rounds wait for site-a; two versions.
    assert (coord.rounds, coord.round_count, coord.round_total) == (2, 2, 11.0)
    assert coord.epsilon == {}
    assert (stats["a1"].rounds, stats["a1"].round_count) == (2, 2)
    assert stats["a3"].rounds == 0 and stats["a3"].round_count == 0  # trained, never sent


def test_retries_and_failures_are_counted(stats) -> None:
    net = build(trainer=constant_trainer(silent={"a2", "a3"}))
    request(net, spec(rounds=1, max_retries=1))
    net.advance(11)
    net.advance(11)
    assert (stats["site-a"].retries, stats["site-a"].failures, stats["site-a"].rounds) == (
        1, 1, 0)
    assert (stats["coord"].rounds, stats["coord"].failures) == (1, 0)  # site-b carried it

    stats.clear()
    net = build(trainer=constant_trainer(silent=set(STEP)))  # nobody answers anywhere
    request(net, spec(rounds=1, max_retries=0))
    net.advance(11)
    assert stats["coord"].failures == 1 and stats["coord"].rounds == 0


def test_a_site_that_cannot_form_its_secure_group_is_failing_since_its_first_block(
        stats) -> None:
    net = build(groups={"site-a": ["a1", "a2", "a3"], "site-b": ["b1", "b2"]})
    request(net, spec(rounds=3, secagg={"enabled": True}))  # each block at t = 1000
    failing = stats["site-b"].failure()
    assert failing is not None and (failing.job, failing.count, failing.since) == (
        "r1-m", 3, 1000.0)
    assert failing.reason.startswith("secure group too small: 2 agents available")
    assert stats["site-b"].failures == 3 and stats["site-a"].failure() is None


def test_a_block_that_works_ends_the_failing_streak_of_its_job() -> None:
    st = Stats()
    for t, job in ((10, "j1"), (20, "j2"), (30, "j1")):
        st.observe(Note("block_failed", {"job": job, "block": 0, "reason": f"r{t}"}), t)
    f = st.failure()  # the job that failed last, since its first failure
    assert (f.job, f.count, f.since, f.reason) == ("j1", 2, 10.0, "r30")
    st.observe(Note("partial_sent", {"job": "j1", "weight": 0.0}), 35)  # a failed block's
    assert st.failure().job == "j1"
    st.observe(Note("partial_sent", {"job": "j1", "weight": 12.0}), 40)
    assert (st.failure().job, st.failure().since) == ("j2", 20.0)
    st.observe(Note("partial_sent", {"job": "j2", "weight": 3.0}), 50)
    assert st.failure() is None and st.failures == 3


def test_epsilon_per_job_from_the_coordinators_versions() -> None:
    st = Stats()
    st.observe(Note("version", {"job": "j1", "version": 1, "epsilon": 1.25}), 0.0)
    st.observe(Note("version", {"job": "j1", "version": 2, "epsilon": 2.5}), 1.0)
    st.observe(Note("version", {"job": "j2", "version": 1, "epsilon": None}), 1.0)
    assert st.epsilon == {"j1": 2.5} and st.rounds == 3


# ---------------------------------------------------------------- the message


@pytest.fixture
def fleet_ids() -> tuple[Roster, dict[str, Identity]]:
    roster, ids = Roster(), {}
    for id_, role, group in (("site-a", Role.AGGREGATOR, None), ("site-b", Role.AGGREGATOR, None),
                             ("a1", Role.AGENT, "site-a"), ("app", Role.APP, None),
                             ("obs", Role.OBSERVER, None)):
        ids[id_] = Identity.generate(id_, role)
        roster.enroll(ids[id_], group)
    return roster, ids


def node_of(ident: Identity, roster: Roster) -> Node:
    return Node(ident, roster, BrokerSettings(), T, [])  # never started: no I/O


def test_sent_when_something_changed_at_most_every_interval(fleet_ids) -> None:
    roster, ids = fleet_ids
    node = node_of(ids["site-a"], roster)
    now = [100.0]
    tel = Telemetry(node, interval=5, clock=lambda: now[0], every=60)
    (first,) = tel.tick(100)
    assert (first.kind, first.topic, first.retain) == (
        Kind.TELEMETRY, T.telemetry("aggregator", "site-a"), True)
    assert tel.tick(101) == []  # within the interval
    assert tel.tick(106) == []  # nothing changed
    node.counters.update(sent=1, bytes_sent=500)  # its own sending is no news
    assert tel.tick(112) == []
    node.gate.rejections["bad-signature"] += 1
    tel.observe(Note("round_open", {"job": "j1", "round": 7, "selected": 3}))
    assert tel.tick(113) == []  # checked at 112: next check at 117
    (second,) = tel.tick(118)
    meta = TelemetryMeta.model_validate(second.meta)
    assert meta.rejections == {"bad-signature": 1}
    assert (meta.activity.job, meta.activity.round, meta.activity.stage) == (
        "j1", 7, "round_open")
    assert (meta.counts.messages_out, meta.counts.bytes_out) == (1, 500)
    assert meta.uptime_s == 18.0 and meta.every_s == 60
    # Nothing new: still sent once `every` seconds passed, so an observer can tell a quiet
    # node from one gone silent.
    assert [tel.tick(t) for t in (123, 173)] == [[], []]
    (beat,) = tel.tick(178)
    assert TelemetryMeta.model_validate(beat.meta).uptime_s == 78.0
    assert Telemetry(node, interval=0).tick(1000) == []  # 0: off


def test_a_service_says_how_it_is_every_interval_an_agent_every_twelve(fleet_ids) -> None:
    roster, ids = fleet_ids
    service, agent = (Telemetry(node_of(ids[i], roster), interval=5) for i in ("site-a", "a1"))
    assert (service.every, agent.every) == (5, 60)
    assert [len(service.tick(t)) for t in (0, 5, 10, 12, 15)] == [1, 1, 1, 0, 1]
    assert [len(agent.tick(t)) for t in (0, 5, 55, 60)] == [1, 0, 0, 1]
    assert TelemetryMeta.model_validate(service.tick(20)[0].meta).every_s == 5


def test_only_a_service_publishes_telemetry_and_only_its_own(fleet_ids) -> None:
    roster, ids = fleet_ids
    observer = Gate(roster, T)
    send = Telemetry(node_of(ids["site-a"], roster), interval=1).tick(0)[0]
    env, route = observer.accept(send.topic, encode_send(send, ids["site-a"], roster), 1.0)
    assert (env.type, route.kind, route.role, route.id) == (
        "telemetry", "telemetry", "aggregator", "site-a")
    # site-b signs a message on site-a's topic; an app and an observer are no services.
    forged = encode_send(send, ids["site-b"], roster)
    assert observer.accept(send.topic, forged, 1.0) is None
    for who, role in (("app", "app"), ("obs", "observer")):
        own = Send(Kind.TELEMETRY, T.telemetry(role, who), "", 0, "telemetry", send.meta,
                   retain=True)
        assert observer.accept(own.topic, encode_send(own, ids[who], roster), 1.0) is None
    assert dict(observer.rejections) == {"wrong-sender": 1, "wrong-role": 2}


def test_the_instrumented_machine_adds_telemetry_to_its_ticks(fleet_ids) -> None:
    roster, ids = fleet_ids

    class Inner:
        def handle(self, env, route, now):
            return [Note("handled")]

        def tick(self, now):
            return [Note("ticked")]

    tel = Telemetry(node_of(ids["a1"], roster), interval=5)
    machine = Instrumented(Inner(), tel)
    assert machine.handle(None, None, 0) == [Note("handled")]
    ticked, telemetry = machine.tick(0)
    assert ticked == Note("ticked") and telemetry.kind is Kind.TELEMETRY
    assert machine.tick(1) == [Note("ticked")]


# ---------------------------------------------------------------- Prometheus


def scrape(tel: Telemetry) -> dict[tuple[str, tuple], float]:
    registry = CollectorRegistry()
    registry.register(TelemetryCollector(tel))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_prometheus_exposition_is_the_snapshot(fleet_ids) -> None:
    roster, ids = fleet_ids
    node = node_of(ids["site-a"], roster)
    tel = Telemetry(node)
    node.counters.update(sent=4, bytes_sent=4096, checkpoints=7, checkpoint_errors=3)
    node.gate.counters.update(received=9)
    node.gate.rejections.update({"bad-signature": 2, "stale-round": 1})
    for t, event, fields in ((0, "round_open", {"round": 1}),
                             (3, "round_closed", {"round": 1, "agents": 3, "dropped": ["a1"]}),
                             (3, "round_open", {"round": 2}),
                             (63.5, "round_closed", {"round": 2, "agents": 2})):
        tel.stats.observe(Note(event, {"job": "j1", **fields}), t)
    tel.stats.observe(Note("version", {"job": "j1", "version": 1, "epsilon": 0.75}), 64)
    m = scrape(tel)
    me = (("node", "site-a"), ("role", "aggregator"))
    assert m[("hfl_messages_sent_total", me)] == 4
    assert m[("hfl_sent_bytes_total", me)] == 4096
    assert m[("hfl_messages_received_total", me)] == 9
    assert (m[("hfl_checkpoints_total", me)], m[("hfl_checkpoint_errors_total", me)]) == (7, 3)
    assert m[("hfl_rejections_total", (*me[:1], ("reason", "bad-signature"), me[1]))] == 2
    assert m[("hfl_rejections_total", (*me[:1], ("reason", "stale-round"), me[1]))] == 1
    assert m[("hfl_updates_total", me)] == 5 and m[("hfl_dropped_agents_total", me)] == 1
    assert m[("hfl_rounds_total", me)] == 3  # two edge rounds closed and the version note
    assert m[("hfl_round_duration_seconds_count", me)] == 2
    assert m[("hfl_round_duration_seconds_sum", me)] == 63.5
    bucket = {le: m[("hfl_round_duration_seconds_bucket", (("le", le), *me))]
              for le in ("2.5", "5.0", "60.0", "120.0", "+Inf")}
    assert bucket == {"2.5": 0, "5.0": 1, "60.0": 1, "120.0": 2, "+Inf": 2}
    assert len([k for k in m if k[0] == "hfl_round_duration_seconds_bucket"]) == len(
        ROUND_BUCKETS) + 1
    assert m[("hfl_epsilon_spent", (("job", "j1"), *me))] == 0.75
    assert m[("hfl_connected", me)] == 0  # never started
    assert (m[("hfl_blocks_failing", me)], m[("hfl_saves_failing", me)]) == (0, 0)
    assert ("hfl_restarts", me) not in m  # no state folder
    tel.stats.observe(Note("block_failed", {"job": "j1", "reason": "too small"}), 70)
    tel.stats.observe(Note("block_failed", {"job": "j1", "reason": "too small"}), 80)
    assert scrape(tel)[("hfl_blocks_failing", me)] == 2


def test_the_metrics_section_is_validated(tmp_path) -> None:
    base = '[identity]\nid = "a1"\ndir = "pki"\n'
    assert Config.model_validate({"identity": {"id": "a1", "dir": "pki"}}).metrics.port is None
    path = tmp_path / "a.toml"
    path.write_text(base + "[metrics]\nport = 70000\n")
    with pytest.raises(ValueError, match="metrics.port"):
        load_config(path)
    path.write_text(base + '[metrics]\nport = 9464\nhost = "0.0.0.0"\ntelemetry_s = 0\n')
    m = load_config(path).metrics
    assert (m.port, m.host, m.telemetry_s) == (9464, "0.0.0.0", 0)


def test_the_example_service_configs_load_with_metrics_off() -> None:
    examples = sorted((Path(__file__).resolve().parents[1] / "examples" / "services").glob(
        "*.toml"))
    assert [p.stem for p in examples] == ["agent", "aggregator", "coordinator", "observer"]
    for path in examples:
        cfg = load_config(path)
        assert cfg.metrics.port is None and cfg.metrics.telemetry_s == 5.0
    assert load_config(examples[-1]).identity.id == "ops"
