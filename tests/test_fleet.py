"""The whole stack over a real Mosquitto: jobs end to end, decomposition, forged input."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from fleet.broker import Broker
from fleet.follow import follow
from fleet.inproc import FleetLayout, InProcessFleet
from fleet.simulate import demo_config, fleet_data
from hfl import envelope
from hfl.identity import Identity
from hfl.messages import ModelRequest, ModelSpec, Role
from hfl.mqtt import BrokerSettings, Session


def start_fleet(broker: Broker, tmp_path: Path, rounds: int = 8):
    cfg = demo_config(rounds=rounds, seed=3)
    groups, held_out = fleet_data(cfg)
    fleet = InProcessFleet(FleetLayout(groups, apps=("app",)),
                           BrokerSettings(host=broker.host, port=broker.port), tmp_path)
    fleet.start()
    return cfg, fleet, held_out


def test_two_sites_of_three_agents_learn_digits_over_mqtt(broker: Broker, tmp_path: Path) -> None:
    cfg, fleet, held_out = start_fleet(broker, tmp_path)
    app = fleet.app("app", models=["model"])
    try:
        app.start()
        jobs = app.request(ModelRequest(request_id="t1", models=[cfg.spec(["site-1",
                                                                           "site-2"])]))
        out = follow(app, jobs, held_out, timeout=240)
    finally:
        app.stop()
        fleet.stop()
    assert [r.round for r in out.rows] == list(range(1, 9))
    assert out.rows[-1].accuracy >= 0.85
    assert out.status[jobs[0]].meta.state == "done"
    assert all(r.agents == 6 for r in out.rows)
    # The ONNX file in the registry is the one the app scored: same predictions.
    last = fleet.versions[-1]
    sess = ort.InferenceSession(last.onnx.read_bytes(), providers=["CPUExecutionProvider"])
    x = held_out.x[:32]
    np.testing.assert_allclose(sess.run(["logits"], {"input": x})[0],
                               out.latest[jobs[0]].predict(x), rtol=1e-5, atol=1e-6)
    assert fleet.rejections() == {}


def test_two_models_are_decomposed_onto_their_aggregators(broker: Broker, tmp_path: Path) -> None:
    cfg, fleet, held_out = start_fleet(broker, tmp_path)
    app = fleet.app("app", models=["mlp-a", "lr-b"])
    base = cfg.spec(["site-1"]).model_dump()
    specs = [ModelSpec(**{**base, "name": "mlp-a", "rounds": 2, "aggregators": ["site-1"]}),
             ModelSpec(**{**base, "name": "lr-b", "arch": "logreg", "rounds": 2,
                          "aggregators": ["site-2"]})]
    try:
        app.start()
        jobs = app.request(ModelRequest(request_id="t2", models=specs))
        out = follow(app, jobs, held_out, timeout=240)
    finally:
        app.stop()
        fleet.stop()
    assert sorted(jobs) == ["t2-lr-b", "t2-mlp-a"]
    for job in jobs:
        assert out.status[job].meta.state == "done"
        assert [r.round for r in out.rows if r.job == job] == [1, 2]
        assert all(r.agents == 3 for r in out.rows if r.job == job)  # one site's agents
    assert out.latest["t2-lr-b"].meta.num_params == 64 * 10 + 10
    assert out.latest["t2-mlp-a"].meta.arch == "mlp"


def test_forged_update_is_rejected_and_counted(broker: Broker, tmp_path: Path) -> None:
    cfg, fleet, _ = start_fleet(broker, tmp_path)
    mallory = Identity.generate("agent-1", Role.AGENT)  # agent-1's id, not its key
    topic = fleet.topics.update("site-1", "agent-1")
    forged = envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                             sender="agent-1", key=mallory.key,
                             tensors={"delta": np.ones(10, np.float32)})


    s = Session("mallory", fleet.settings, inbox=queue.Queue())
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
