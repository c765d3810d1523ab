"""The operator's view of a real in-process fleet (Mosquitto with TLS and the roster's ACL,
secure aggregation, a DP job): `hfl status --once` and `--json` as an observer, the
Prometheus endpoints of an aggregator and the coordinator, and `hfl jobs` / `hfl models`.

What they show is checked against what the fleet really did: the app's own view of the job
(versions, agents per version, ε), a forged update we sent, agents we stopped or cut off."""

from __future__ import annotations

import json
import queue
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from aggregator.runner import aggregator_node
from fleet.cli import app as hfl
from fleet.sim.follow import follow
from fleet.sim.inproc import FleetLayout, InProcessFleet
from fleet.sim.simulate import demo_config, fleet_data
from hfl.config import MetricsSection
from hfl.crypto.identity import Identity, Roster
from hfl.runtime.metrics import serve_metrics
from hfl.runtime.mqtt import BrokerSettings, Session
from hfl.runtime.service import serve
from hfl.wire import envelope
from hfl.wire.messages import ModelRequest, ModelSpec, Role
from hfl.wire.topics import Topics

ROUNDS = 3


def observer_config(fleet: InProcessFleet, path: Path, id_: str = "ops") -> Path:
    path.write_text(f'[identity]\nid = "{id_}"\ndir = "{fleet.pki.device(id_).dir}"\n'
                    f'[broker]\nhost = "{fleet.broker.host}"\nport = {fleet.broker.port}\n')
    return path


def forge_update(fleet: InProcessFleet, agent: str) -> None:
    """Publish an update on `agent`'s topic with its TLS certificate, signed by another key."""
    topic = fleet.topics.update("site-1", agent)
    forged = envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                             sender=agent, key=Identity.generate(agent, Role.AGENT).key,
                             tensors={"delta": np.ones(10, np.float32)})
    s = Session(agent, fleet.settings(agent), inbox=queue.Queue())
    s.start()
    try:
        assert s.wait_ready(10)
        s.publish(topic, forged)
        assert s.flush(10)
    finally:
        s.stop()


def cut_off(fleet: InProcessFleet, name: str) -> None:
    """The network drops under a node: no DISCONNECT, so the broker sends its Last Will."""
    node = fleet.nodes.pop(name)
    node.stop_event.set()
    client = node.session._client  # the fault needs paho's socket
    client.loop_stop()
    client.socket().close()


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                  if k not in ("role", "node")))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def wait_for(check, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_status_metrics_jobs_and_models_show_what_the_fleet_did(tmp_path: Path) -> None:
    cfg = demo_config(rounds=ROUNDS, seed=3, private=False)
    groups, held_out = fleet_data(cfg)
    groups["site-1"]["agent-9"] = {}  # enrolled, never started
    fleet = InProcessFleet(FleetLayout(groups, observers=("ops",)), tmp_path, telemetry_s=0.2)
    fleet.enroll()
    del groups["site-1"]["agent-9"]
    fleet.start()
    endpoints = {n: serve_metrics(fleet.telemetry[n]) for n in ("site-1", "coordinator")}
    app = fleet.app("app", models=["model"])
    try:
        app.start()
        forge_update(fleet, "agent-9")
        spec = ModelSpec(**{**cfg.spec(["site-1", "site-2"]).model_dump(), "kappa1": 1,
                            "privacy": {"epsilon": 50.0}})
        jobs = app.request(ModelRequest(request_id="ops", models=[spec]))
        out = follow(app, jobs, fleet.tasks, held_out, timeout=120)
        job = out.status[jobs[0]].meta
        assert job.state == "done" and [r.round for r in out.rows] == [1, 2, 3]
        site1 = sorted(a for a in fleet.layout.groups["site-1"])
        agents = [r.agents for r in out.rows]  # as the app saw each version: both sites
        cut_off(fleet, site1[0])
        stopped = fleet.nodes.pop(site1[1])
        stopped.stop_event.set()
        stopped.stop()
        metrics = {n: scrape(e.port) for n, e in endpoints.items()}
        wait_for(lambda: fleet.telemetry["site-1"].stats.rounds == ROUNDS)
        time.sleep(1.0)  # every node's last telemetry is out (0.2 s apart at most)

        config = observer_config(fleet, tmp_path / "ops.toml")
        run = CliRunner().invoke(hfl, ["status", "--json", "-c", str(config)])
        assert run.exit_code == 0, run.output
        snap = json.loads(run.output)
        text = CliRunner().invoke(hfl, ["status", "--once", "--agents", "-c", str(config)])
        assert text.exit_code == 0, text.output
        listing = {c: CliRunner().invoke(hfl, [c, "--state-dir", str(tmp_path / "coordinator")])
                   for c in ("jobs", "models")}
    finally:
        app.stop()
        for e in endpoints.values():
            e.close()
        fleet.stop()

    # Who is there: site-1 has one agent cut off (lost), one stopped (offline), one online
    # and one never started.
    aggs = {a["id"]: a for a in snap["aggregators"]}
    assert aggs["site-1"]["agents"] == {"enrolled": 4, "online": 1, "offline": 1, "lost": 1,
                                        "unknown": 1}
    assert aggs["site-2"]["agents"]["online"] == 3 and aggs["site-2"]["state"] == "online"
    states = {a["id"]: a["state"] for a in snap["agents"]}
    assert (states[site1[0]], states[site1[1]], states["agent-9"]) == ("lost", "offline",
                                                                        "unknown")
    # The job as the app saw it: state, versions, ε.
    (j,) = snap["jobs"]
    assert (j["job"], j["state"], j["version"], j["rounds"]) == (jobs[0], "done", ROUNDS,
                                                                  ROUNDS)
    assert j["epsilon"] == job.epsilon and 0 < job.epsilon <= 50
    # Rounds and updates: each version is one edge round per site (κ1 = 1); site-1 summed
    # its three agents' updates in each, and the app saw six agents per version.
    assert agents == [6] * ROUNDS
    s1 = aggs["site-1"]
    assert (s1["counts"]["rounds"], s1["counts"]["updates"]) == (ROUNDS, 3 * ROUNDS)
    assert s1["round_s"]["count"] == ROUNDS and s1["activity"]["job"] == jobs[0]
    assert snap["rejections"] == {"bad-signature": {"site-1": 1}}
    coord = snap["coordinators"][0]
    assert coord["counts"]["rounds"] == ROUNDS and coord["epsilon"] == {jobs[0]: job.epsilon}

    # The same numbers on the Prometheus endpoints.
    m = metrics["site-1"]
    assert (m[("hfl_rounds_total", ())], m[("hfl_updates_total", ())]) == (ROUNDS, 3 * ROUNDS)
    assert m[("hfl_rejections_total", (("reason", "bad-signature"),))] == 1
    assert m[("hfl_round_duration_seconds_count", ())] == ROUNDS
    assert m[("hfl_connected", ())] == 1
    assert m[("hfl_received_bytes_total", ())] > m[("hfl_sent_bytes_total", ())] > 0
    c = metrics["coordinator"]
    assert c[("hfl_epsilon_spent", (("job", jobs[0]),))] == job.epsilon
    assert c[("hfl_rounds_total", ())] == ROUNDS

    # The terminal view says the same.
    for expected in ("site-1", "1/4", "1 lost", "1 offline", jobs[0], "done", f"{ROUNDS}/"
                     f"{ROUNDS}", f"{job.epsilon:.2f}", "bad-signature", "never seen"):
        assert expected in text.output, expected
    # The registry's listings: every version with its ε and ONNX file.
    assert listing["jobs"].exit_code == 0 and listing["models"].exit_code == 0
    assert jobs[0] in listing["jobs"].output and f"{job.epsilon:.2f}" in listing["jobs"].output
    assert listing["models"].output.count(".onnx") == ROUNDS


def test_status_names_what_is_wrong(tmp_path: Path) -> None:
    cfg = demo_config(rounds=1, seed=3, private=False)
    groups, _ = fleet_data(cfg)
    fleet = InProcessFleet(FleetLayout({"site-1": groups["site-1"]}, observers=("ops",)),
                           tmp_path)
    fleet.enroll()
    fleet.start_broker()
    try:
        # An app's identity is no observer: the config is refused before connecting.
        wrong = observer_config(fleet, tmp_path / "app.toml", "app")
        run = CliRunner().invoke(hfl, ["status", "--once", "-c", str(wrong)])
        assert run.exit_code == 1
        assert "not enrolled as observer" in run.output
        # No broker where the config says.
        config = observer_config(fleet, tmp_path / "ops.toml")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            free = s.getsockname()[1]
        config.write_text(config.read_text().replace(f"port = {fleet.broker.port}",
                                                     f"port = {free}"))
        run = CliRunner().invoke(hfl, ["status", "--once", "--wait", "1", "-c", str(config)])
        assert run.exit_code == 1 and f"broker 127.0.0.1:{free} not ready" in run.output
        run = CliRunner().invoke(hfl, ["jobs", "--state-dir", str(tmp_path / "nothing")])
        assert run.exit_code == 2 and "no registry under" in run.output
    finally:
        fleet.stop()


def test_a_taken_metrics_port_stops_the_service_with_a_clear_error(caplog) -> None:
    ident = Identity.generate("site-1", Role.AGGREGATOR)
    roster = Roster()
    roster.enroll(ident)
    node, machine = aggregator_node(ident, roster, BrokerSettings(port=1), Topics())
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code = serve(node, machine, timeout=1, metrics=MetricsSection(port=port))
    assert code == 1
    assert f"metrics endpoint 127.0.0.1:{port}" in caplog.text
