"""The whole stack over a real Mosquitto with TLS, client certificates, the roster's ACL and
secure aggregation: jobs end to end, decomposition, forged input, and what an admin
subscriber to `#` can see."""

from __future__ import annotations

import json
import queue
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge_agent.runner import LocalTrainer
from fleet.sim.follow import follow
from fleet.sim.inproc import FleetLayout, InProcessFleet
from fleet.sim.simulate import demo_config, fleet_data
from hfl.crypto.identity import Identity
from hfl.runtime.mqtt import Session
from hfl.wire import envelope
from hfl.wire.messages import KNOWN_TYPES, ModelRequest, ModelSpec, Role
from tests.contract import WireReassembler


def start_fleet(tmp_path: Path, rounds: int = 8, observers: tuple[str, ...] = (),
                idle: tuple[str, ...] = ()):
    """The demo's fleet; `idle` agents are enrolled in site-1 but run no node."""
    cfg = demo_config(rounds=rounds, seed=3, private=False)
    groups, held_out = fleet_data(cfg)
    fleet = InProcessFleet(FleetLayout(groups, apps=("app",), observers=observers), tmp_path)
    for agent in idle:
        groups["site-1"][agent] = {}
    fleet.enroll()
    for agent in idle:
        del groups["site-1"][agent]
    fleet.start()
    return cfg, fleet, held_out


def run_job(fleet: InProcessFleet, cfg, held_out, rid: str, spy: Session | None = None):
    """The app requests the demo model on both sites and follows the job to its end."""
    app = fleet.app("app", models=["model"])
    try:
        if spy is not None:
            spy.start()
            assert spy.wait_ready(10)
        app.start()
        jobs = app.request(ModelRequest(request_id=rid, models=[cfg.spec(["site-1",
                                                                          "site-2"])]))
        out = follow(app, jobs, fleet.tasks, held_out, timeout=240)
    finally:
        app.stop()
        if spy is not None:
            spy.stop()
        fleet.stop()
    return jobs, out


def test_two_sites_of_three_agents_learn_digits_over_mqtt(tmp_path: Path) -> None:
    cfg, fleet, held_out = start_fleet(tmp_path)
    jobs, out = run_job(fleet, cfg, held_out, "t1")
    assert [r.round for r in out.rows] == list(range(1, 9))
    assert out.rows[-1].metrics["accuracy"] >= 0.85
    assert out.status[jobs[0]].meta.state == "done"
    assert all(r.agents == 6 and r.dropped == 0 for r in out.rows)
    # The ONNX file in the registry is the one the app scored: same predictions.
    last = fleet.versions[-1]
    sess = ort.InferenceSession(last.onnx.read_bytes(), providers=["CPUExecutionProvider"])
    x = held_out.x[:32]
    np.testing.assert_allclose(sess.run(["output"], {"input": x})[0],
                               out.latest[jobs[0]].predict(x), rtol=1e-5, atol=1e-6)
    assert fleet.rejections() == {}


def test_two_models_are_decomposed_onto_their_aggregators(tmp_path: Path) -> None:
    cfg, fleet, held_out = start_fleet(tmp_path)
    app = fleet.app("app", models=["mlp-a", "lr-b"])
    base = cfg.spec(["site-1"]).model_dump()
    specs = [ModelSpec(**{**base, "name": "mlp-a", "rounds": 2, "aggregators": ["site-1"]}),
             ModelSpec(**{**base, "name": "lr-b", "task": "logreg", "rounds": 2,
                          "aggregators": ["site-2"]}),
             ModelSpec(**{**base, "name": "nope", "task": "not-installed"})]
    try:
        app.start()
        jobs = app.request(ModelRequest(request_id="t2", models=specs))
        out = follow(app, jobs, fleet.tasks, held_out, timeout=240)
    finally:
        app.stop()
        fleet.stop()
    assert sorted(jobs) == ["t2-lr-b", "t2-mlp-a", "t2-nope"]
    # The coordinator answered the request over the broker: one model refused, with why.
    assert list(out.refused) == ["t2-nope"] and "not-installed" in out.refused["t2-nope"]
    for job in ("t2-lr-b", "t2-mlp-a"):
        assert out.status[job].meta.state == "done"
        assert [r.round for r in out.rows if r.job == job] == [1, 2]
        assert all(r.agents == 3 for r in out.rows if r.job == job)  # one site's agents
    assert out.latest["t2-lr-b"].meta.num_params == 64 * 10 + 10
    assert out.latest["t2-mlp-a"].meta.task == "mlp"
    # Each version scored by its own task: both classifiers report held-out accuracy.
    assert all(0 <= r.metrics["accuracy"] <= 1 for r in out.rows)


def test_forged_update_is_rejected_and_counted(tmp_path: Path) -> None:
    # agent-9's TLS certificate is stolen, not its signing key: the broker lets the thief
    # publish on agent-9's topic, the aggregator's gate refuses the signature.
    cfg, fleet, _ = start_fleet(tmp_path, idle=("agent-9",))
    mallory = Identity.generate("agent-9", Role.AGENT)
    topic = fleet.topics.update("site-1", "agent-9")
    forged = envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                             sender="agent-9", key=mallory.key,
                             tensors={"delta": np.ones(10, np.float32)})
    s = Session("agent-9", fleet.settings("agent-9"), inbox=queue.Queue())
    try:
        s.start()
        assert s.wait_ready(10)
        s.publish(topic, forged)
        assert s.flush(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not fleet.nodes["site-1"].rejections:
            time.sleep(0.05)
    finally:
        s.stop()
        fleet.stop()
    assert dict(fleet.nodes["site-1"].rejections) == {"bad-signature": 1}


def test_an_admin_subscriber_to_everything_finds_no_plaintext_vector(
        tmp_path: Path, monkeypatch) -> None:
    deltas: list[np.ndarray] = []
    real_train = LocalTrainer.__call__

    def recording(self, t):
        update = real_train(self, t)
        deltas.append(update.delta.copy())
        return update

    monkeypatch.setattr(LocalTrainer, "__call__", recording)
    cfg, fleet, held_out = start_fleet(tmp_path, rounds=3, observers=("ops",))
    inbox: queue.Queue = queue.Queue()
    spy = Session("ops", fleet.settings("ops"), inbox=inbox,
                  subscriptions=[f"{fleet.topics.prefix}/#"])
    jobs, out = run_job(fleet, cfg, held_out, "t3", spy=spy)
    assert out.status[jobs[0]].meta.state == "done"
    captured = _reassemble(inbox)
    assert len(captured) > 50  # the spy saw the whole job
    published = [np.concatenate([a.ravel() for a in _state(v)]) for v in fleet.versions]
    vectors = published + deltas
    assert len(deltas) >= 6 * 3
    for v in vectors:  # a few 64-byte windows of each vector: any plaintext copy has them
        for i in range(0, v.size - 16, max(1, v.size // 5)):
            needle = v[i : i + 16].tobytes()
            assert not any(needle in data for data in captured), "plaintext vector on the wire"
    for data in captured:  # and no body carries float tensors in the clear
        env = envelope.decode(data, topic=_topic_of(data), public_key=fleet.roster.public_key,
                              known_types=KNOWN_TYPES)
        floats = [a for a in env.tensors.values() if a.dtype.kind == "f" and a.size > 16]
        assert env.sealed_body is not None or not floats, env.type


def _reassemble(inbox: queue.Queue) -> list[bytes]:
    wire = WireReassembler()
    out = []
    while not inbox.empty():
        msg = inbox.get()
        if (whole := wire.feed(msg.topic, msg.payload)) is not None:
            out.append(whole[1])
    return out


def _topic_of(data: bytes) -> str:
    h = int.from_bytes(data[4:8], "little")
    return json.loads(data[8 : 8 + h])["topic"]


def _state(v) -> list[np.ndarray]:
    from safetensors.numpy import load_file

    return list(load_file(str(v.safetensors)).values())


def test_a_second_run_in_the_same_folder_gets_a_fresh_ca(tmp_path: Path) -> None:
    layout = FleetLayout({"site-1": {"agent-1": {}}})
    first = InProcessFleet(layout, tmp_path)
    first.enroll()
    old_ca = first.pki.ca_cert()
    second = InProcessFleet(layout, tmp_path)
    second.enroll()  # `make demo` twice: the earlier run's CA is replaced, not an error
    assert second.pki.ca_cert() != old_ca
    assert second.roster.group("site-1") == ["agent-1"]
