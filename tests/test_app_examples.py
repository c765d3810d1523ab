"""The app examples against a real in-process fleet (Mosquitto with TLS and the roster's ACL,
secure aggregation), and the contract against what really travels:

- examples/app_subscriber.py (paho + AppWire) requests a model and scores its version;
- the SDK's App requests another one and `App.models` yields it;
- examples/node/app_subscriber.mjs (Node.js, the mqtt package) opens that version;
- an observer subscribed to everything checks every message against docs/asyncapi.yaml:
  its channel and documented message, header schema, tensors, sender role, QoS and
  retained flag.

The Node.js dependencies come from `make test` (npm ci --prefix examples/node)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions
from sklearn.datasets import load_digits

from application import App
from fleet.sim.inproc import FleetLayout, InProcessFleet
from fleet.sim.simulate import demo_config, fleet_data
from hfl.crypto import seal
from hfl.crypto.pki import Pki
from hfl.wire import envelope
from hfl.wire.messages import KNOWN_TYPES, Role
from hfl.wire.topics import Topics
from tests.contract import (
    WireReassembler,
    body_errors,
    channel_messages,
    channel_of,
    document,
    is_frame,
    message_for,
    resolve,
)

ROOT = Path(__file__).resolve().parents[1]
NODE_EXAMPLE = ROOT / "examples" / "node" / "app_subscriber.mjs"


def _spec(cfg, name: str, site: str) -> dict:
    """A quick job: one version (one block of two edge rounds) on one site."""
    base = cfg.spec([site]).model_dump(mode="json", exclude={"secagg", "privacy"})
    return {**base, "name": name, "rounds": 1, "kappa1": 2, "epochs": 5}


def _toml(fields: dict) -> str:
    """TOML of scalars, arrays and (inline) tables; None is left out, as TOML has no null."""
    def value(v) -> str:
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k} = {value(x)}" for k, x in v.items()
                                   if x is not None) + "}"
        return json.dumps(v)

    return "".join(f"{k} = {value(v)}\n" for k, v in fields.items() if v is not None)


class Spy:
    """An observer on `#` that sees each publisher's QoS and retained flag."""

    def __init__(self, fleet: InProcessFleet) -> None:
        files = fleet.pki.device("ops")
        self.got: list[tuple[str, bytes, bool, int]] = []
        self.ready = threading.Event()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="ops", protocol=mqtt.MQTTv5)
        c.tls_set(ca_certs=str(files.ca), certfile=str(files.cert), keyfile=str(files.tls_key))
        opts = SubscribeOptions(qos=2, retainAsPublished=True)  # QoS as published, up to 2
        c.on_connect = lambda c, *_: c.subscribe(f"{fleet.topics.prefix}/#", options=opts)
        c.on_subscribe = lambda *_: self.ready.set()
        c.on_message = lambda c, u, m: self.got.append((m.topic, m.payload, m.retain, m.qos))
        c.connect(fleet.broker.host, fleet.broker.port)
        c.loop_start()
        self.client = c
        assert self.ready.wait(10)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _need_node() -> None:
    if shutil.which("node") is None or not (NODE_EXAMPLE.parent / "node_modules").is_dir():
        pytest.fail("Node.js and examples/node/node_modules are needed: `make test` installs "
                    "them (npm ci --prefix examples/node)", pytrace=False)


def test_examples_receive_versions_and_the_wire_is_the_documented_contract(tmp_path: Path):
    _need_node()
    cfg = demo_config(seed=3, private=False)
    groups, _ = fleet_data(cfg)
    # A fourth board on site 1 whose data the job does not name: it sits every round out.
    groups["site-1"]["agent-x"] = {"elsewhere": next(iter(groups["site-1"].values()))["data"]}
    fleet = InProcessFleet(FleetLayout(groups, apps=("app", "js-app"), observers=("ops",)),
                           tmp_path)
    fleet.start()
    spy = Spy(fleet)
    host, port = fleet.broker.host, str(fleet.broker.port)
    devices = {i: fleet.pki.device(i).dir for i in ("app", "js-app")}
    (tmp_path / "request.toml").write_text(_toml(_spec(cfg, "digits-py", "site-1")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    py = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "app_subscriber.py"), "--device",
         str(devices["app"]), "--host", host, "--port", port, "--request",
         str(tmp_path / "request.toml"), "--versions", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        # The SDK as the README shows it; the version it gets is for the Node.js example.
        app = App.from_device(devices["js-app"], host, int(port), models=["digits-js"])
        app.start()
        try:
            jobs = app.request(**_spec(cfg, "digits-js", "site-2"))
            version = next(app.models("digits-js", timeout=180))
        finally:
            app.stop()
        out, err = py.communicate(timeout=180)
        node_dir = tmp_path / "node"
        node_dir.mkdir()
        node = subprocess.run(["node", str(NODE_EXAMPLE), str(devices["js-app"]), host, port,
                               "digits-js", "1"], cwd=node_dir, capture_output=True, text=True,
                              timeout=60)
    finally:
        if py.poll() is None:
            py.kill()
        spy.stop()
        fleet.stop()

    # The SDK: the version of the job it asked for, with metrics and no ε (no DP here).
    assert jobs == [version.meta.job] and version.meta.version == 1
    assert version.meta.epsilon is None and version.meta.metrics.eval_samples > 0
    # The board without the data said why, and the job's history (retained, for apps) says it.
    statuses = [json.loads(bytes(p[8:8 + int.from_bytes(p[4:8], "little")]))["meta"]
                for t, p, _, _ in spy.got if "/coord/jobs/" in t and "digits-py" in t and p]
    history = [row for st in statuses for row in st["history"]]
    assert history and all(row["declined"] == {"agent-x": "no-data: no data source data on "
                                                          "this board"} for row in history)

    # The Python example: its score is what the registry's ONNX file gives on the digits.
    assert py.returncode == 0, err
    line = next(s for s in out.splitlines() if " v1: accuracy " in s)
    record = next(v for v in fleet.versions if v.model == "digits-py")
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    sess = ort.InferenceSession(record.onnx.read_bytes(), providers=["CPUExecutionProvider"])
    expected = float(np.mean(sess.run(["output"], {"input": x})[0].argmax(1) == digits.target))
    printed = float(re.search(r"accuracy ([0-9.]+)", line).group(1))
    assert printed == pytest.approx(expected, abs=1e-4) and printed > 0.3

    # The Node.js example: the very ONNX file the SDK received.
    assert node.returncode == 0, node.stderr
    assert "v1: task mlp, agents' accuracy" in node.stdout and node.stderr == ""
    assert (node_dir / "digits-js-v1.onnx").read_bytes() == version.onnx

    _check_wire(fleet, spy.got)


def _check_wire(fleet: InProcessFleet, got: list[tuple[str, bytes, bool, int]]) -> None:
    doc = document()
    sends = {}  # (channel, message) → (roles allowed to send it, documented retain)
    for op in doc["operations"].values():
        if op["action"] == "send":
            channel = op["channel"]["$ref"].split("/")[-1]
            for m in op["messages"]:
                sends[(channel, m["$ref"].split("/")[-1])] = (
                    {t["name"] for t in op["tags"]}, op["bindings"]["mqtt"]["retain"])
    wire = WireReassembler(fleet.topics)
    seen: dict[tuple[str, str], int] = {}
    for topic, payload, retained, qos in got:
        assert qos == 1, topic
        frame = _frame_message(doc, topic, payload)
        if frame is not None:  # a retained set's manifest or frame: documented, retained
            assert retained and sends[frame][1] is True, (frame, topic)
            seen[frame] = seen.get(frame, 0) + 1
        whole = wire.feed(topic, payload)
        if whole is None:
            continue
        topic, data = whole
        env = envelope.decode(data, topic=topic, public_key=fleet.roster.public_key,
                              known_types=KNOWN_TYPES)
        size = int.from_bytes(bytes(data[4:8]), "little")
        header = json.loads(bytes(data[8 : 8 + size]))
        key = message_for(doc, topic, header)
        roles, retain = sends[key]
        assert fleet.roster.get(env.sender).role.value in roles, (key, env.sender)
        assert retained == retain or frame is not None, (key, retained)
        if env.sealed_body is not None:  # open it as one of its recipients would
            rid = seal.recipients(env.sealed_body)[0]
            env = envelope.unseal(env, rid, fleet.identities[rid].seal)
        message = resolve(doc, f"#/components/messages/{key[1]}")
        assert body_errors(message, env.tensors) == [], key
        seen[key] = seen.get(key, 0) + 1
    documented = {(ch, m) for ch in doc["channels"] for m, msg in channel_messages(doc, ch).items()
                  if not is_frame(msg)}
    # Every documented envelope went over the wire, except the plain update (secure
    # aggregation is on): the document describes what the code sends. (This fleet's models
    # are small: no retained set; tests/test_late_subscribers.py has those.)
    envelopes = {k for k in seen if not is_frame(resolve(doc, f"#/components/messages/{k[1]}"))}
    assert envelopes == documented - {("updates", "update")}, seen


def _frame_message(doc: dict, topic: str, payload: bytes) -> tuple[str, str] | None:
    """(channel, message) when `payload` is a retained set's manifest or frame on `topic`."""
    if payload[:4] != b"HFM1" and Topics().chunk_of(topic) is None:
        return None
    channel = channel_of(doc, topic)
    name = "manifest" if payload[:4] == b"HFM1" else "chunk"
    assert name in channel_messages(doc, channel), (channel, name)
    return channel, name


def test_the_examples_refuse_bad_input_before_connecting(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki")
    pki.issue("site-a", Role.AGGREGATOR)
    device = pki.issue("app", Role.APP)
    request = tmp_path / "request.toml"
    request.write_text('name = "digits"\ntask = "res net"\nrounds = 0\n')
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    py = subprocess.run([sys.executable, str(ROOT / "examples" / "app_subscriber.py"),
                         "--device", str(device), "--request", str(request)],
                        capture_output=True, text=True, env=env, timeout=60)
    assert py.returncode == 2
    assert "task: String should match" in py.stderr and "rounds: Input should be" in py.stderr
    _need_node()
    roster = json.loads((device / "roster.json").read_text())
    roster["roster"]["members"][0]["role"] = "coordinator"  # forged: no longer the CA's
    (device / "roster.json").write_text(json.dumps(roster))
    node = subprocess.run(["node", str(NODE_EXAMPLE), str(device), "127.0.0.1", "1", "digits"],
                          capture_output=True, text=True, timeout=60)
    assert node.returncode != 0 and "not signed by the CA" in node.stderr
