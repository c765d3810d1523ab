"""Late subscribers get the current retained message whole, whatever the broker's packet limit.

A broker keeps one retained message per topic: a model version sent as chunk frames on its
topic left an app that subscribed afterwards the last frame only. A retained message too
large for one packet is now a retained set (hfl.wire.chunks): each frame retained on
`{topic}/chunk/{i}`, then a manifest on the topic. Here, over a real Mosquitto with TLS, the
roster's ACL and `max_packet_size 300000`: the SDK's App and the Node.js example arriving
after the publish; a newer version replacing an older one; and, without a broker, what the
receiving side makes of manifests and frames that are bad, stale or out of order.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import queue
import random
import shutil
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from application import App, AppWire, ModelVersion
from fleet.ops.broker import Broker, BrokerTls
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.runtime.mqtt import Inbound, Session
from hfl.runtime.node import Node, encode_send
from hfl.wire.chunks import (
    MANIFEST_MAGIC,
    MANIFEST_SIZE,
    Manifest,
    Reassembler,
    chunk_topic,
    parse_manifest,
    reserved,
    retained_set,
    split_chunk_topic,
)
from hfl.wire.messages import Kind, ModelMeta, Role
from hfl.wire.topics import Topics

ROOT = Path(__file__).resolve().parents[1]
NODE_EXAMPLE = ROOT / "examples" / "node" / "app_subscriber.mjs"
T = Topics()
PACKET_LIMIT = 300_000  # below a 3 MB model, above one 256 KiB chunk
TIMEOUT = 30.0


def _meta(model: str, version: int, job: str = "r1-big") -> dict:
    return ModelMeta(model=model, job=job, version=version, task="mlp", task_version="1",
                     layout="0" * 64, inputs=[[4]], num_params=1, agents=3,
                     metrics={"samples": 30, "eval_samples": 6,
                              "eval_metrics": {"accuracy": 0.5}}).model_dump(mode="json")


def _tensors(seed: int, floats: int) -> dict[str, np.ndarray]:
    """A version's tensors: `floats` float32 parameters and an 'ONNX file' of random bytes
    (the app only hands it on)."""
    rng = np.random.default_rng(seed)
    return {"w": rng.standard_normal(floats, dtype=np.float32),
            "onnx": rng.integers(0, 256, 100_000 + seed, dtype=np.uint8)}


def _model_send(model: str, version: int, tensors: dict[str, np.ndarray], app: str = "app",
                job: str = "r1-big") -> Send:
    """What the coordinator's Publisher sends for a version (coordinator.runner)."""
    return Send(Kind.MODEL, T.model(model), job, version, "model", _meta(model, version, job),
                tensors, retain=True, to=(app,))


# ---------------------------------------------------------------- a TLS broker with a small limit


@pytest.fixture(scope="module")
def fleet(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Pki, Broker]]:
    """A fleet CA (a coordinator, two apps, an observer) and a TLS broker enforcing its ACL,
    taking packets of at most PACKET_LIMIT bytes."""
    root = tmp_path_factory.mktemp("late")
    pki = Pki.init(root / "pki")
    pki.issue("coord", "coordinator")
    pki.issue("app", "app")
    pki.issue("js-app", "app")
    pki.issue("obs", "observer")
    tls = BrokerTls.from_pki(pki, "broker", root / "broker", T)
    with Broker(root / "broker", tls=tls, max_packet_size=PACKET_LIMIT) as broker:
        assert f"max_packet_size {PACKET_LIMIT}" in broker.conf_path.read_text()
        yield pki, broker


@contextlib.contextmanager
def coordinator(pki: Pki, broker: Broker) -> Iterator[Node]:
    """The coordinator's node (its Session is what publishes every version)."""
    files = pki.device("coord")
    node = Node(Identity.load(files.dir, "coord", Role.COORDINATOR), pki.roster(),
                files.broker_settings(broker.host, broker.port), T, [])
    node.start(TIMEOUT)
    try:
        yield node
    finally:
        node.stop()


def publish(node: Node, send: Send) -> int:
    """Publish one version and wait for the broker's acknowledgements; its size on the wire."""
    before = node.counters["bytes_sent"]
    node.send(send)
    assert node.session.flush(TIMEOUT)
    assert node.session.counters.get("publish_refused", 0) == 0  # the ACL let every one through
    return node.counters["bytes_sent"] - before


@contextlib.contextmanager
def late_app(pki: Pki, broker: Broker, model: str) -> Iterator[App]:
    app = App.from_device(pki.device("app").dir, broker.host, broker.port, models=[model])
    app.start(TIMEOUT)
    try:
        yield app
    finally:
        app.stop()


def retained_under(pki: Pki, broker: Broker, topic: str) -> dict[str, bytes]:
    """Every retained message on `topic` and its chunk subtopics (as an observer)."""
    files = pki.device("obs")
    inbox: queue.Queue[Inbound] = queue.Queue()
    s = Session("obs", files.broker_settings(broker.host, broker.port), inbox=inbox,
                subscriptions=[topic, T.chunks(topic)], clean_start=True)
    s.start()
    try:
        assert s.wait_ready(TIMEOUT)
        got: dict[str, bytes] = {}
        while True:
            try:
                m = inbox.get(timeout=1.0)  # MQTT marks no end of the retained messages
            except queue.Empty:
                return got
            assert m.retain
            got[m.topic] = m.payload
    finally:
        s.stop()


def _same(v: ModelVersion, tensors: dict[str, np.ndarray]) -> bool:
    return v.onnx == tensors["onnx"].tobytes() and set(v.state) == {"w"} and \
        np.array_equal(v.state["w"], tensors["w"])


def test_a_late_app_gets_a_model_larger_than_the_brokers_packet_limit(fleet) -> None:
    pki, broker = fleet
    tensors = _tensors(1, 750_000)  # 3 MB
    with coordinator(pki, broker) as coord:
        size = publish(coord, _model_send("big", 1, tensors))
    assert size > 10 * PACKET_LIMIT
    # Subscribed after the publish: what it gets is only what the broker retained.
    with late_app(pki, broker, "big") as app:
        started = time.monotonic()
        v = next(app.models("big", timeout=TIMEOUT), None)
        took = time.monotonic() - started
        rejections = dict(app.node.gate.rejections)
    assert v is not None, "the late app got no version"
    assert v.meta.version == 1 and _same(v, tensors)
    assert rejections == {}
    assert took < 10, took
    retained = retained_under(pki, broker, T.model("big"))
    frames = [t for t in retained if t != T.model("big")]
    assert len(frames) == -(-size // (256 * 1024 - 36)) and all(
        split_chunk_topic(t) is not None for t in frames)
    assert retained[T.model("big")][:4] == MANIFEST_MAGIC


def test_an_app_already_subscribed_gets_each_version_as_it_is_published(fleet) -> None:
    pki, broker = fleet
    with late_app(pki, broker, "live") as app, coordinator(pki, broker) as coord:
        for version in (1, 2):
            tensors = _tensors(10 + version, 400_000)
            publish(coord, _model_send("live", version, tensors))
            v = next(app.models("live", timeout=TIMEOUT), None)
            assert v is not None and v.meta.version == version and _same(v, tensors)
        assert dict(app.node.gate.rejections) == {}


def test_a_newer_version_replaces_an_older_one_and_a_late_app_gets_only_it(fleet) -> None:
    pki, broker = fleet
    old, new = _tensors(21, 1_000_000), _tensors(22, 300_000)  # 4 MB, then 1.2 MB
    topic = T.model("shrinks")
    with coordinator(pki, broker) as coord:
        publish(coord, _model_send("shrinks", 1, old))
        retained_old = retained_under(pki, broker, topic)
        publish(coord, _model_send("shrinks", 2, new))
    retained = retained_under(pki, broker, topic)
    # The old version's frames past the new count were cleared, none is left behind.
    assert len(retained) < len(retained_old)
    manifest = parse_manifest(retained[topic], 1 << 30)
    assert sorted(retained) == sorted([topic, *(chunk_topic(topic, i)
                                                for i in range(manifest.count))])
    ids = {bytes(p[4:20]) for t, p in retained.items() if t != topic}
    assert ids == {manifest.msg_id}  # every frame left is the new version's
    with late_app(pki, broker, "shrinks") as app:
        got = list(app.events(timeout=3))
        rejections = dict(app.node.gate.rejections)
    versions = [e for e in got if isinstance(e, ModelVersion)]
    assert [v.meta.version for v in versions] == [2] and _same(versions[0], new)
    assert rejections == {}


def test_a_restarted_publisher_leaves_stale_frames_that_never_mix_in(fleet) -> None:
    """A coordinator that restarts does not know how many frames its predecessor retained:
    a smaller version then leaves some of the older one's frames. A late app still gets
    the new version alone; the stale frames wait, held within the bounds, until they
    expire."""
    pki, broker = fleet
    old, new = _tensors(31, 1_000_000), _tensors(32, 300_000)
    topic = T.model("restarts")
    with coordinator(pki, broker) as coord:
        publish(coord, _model_send("restarts", 1, old))
    with coordinator(pki, broker) as coord:  # a fresh session: the old count is unknown
        publish(coord, _model_send("restarts", 2, new))
    retained = retained_under(pki, broker, topic)
    assert len({bytes(p[4:20]) for t, p in retained.items() if t != topic}) == 2  # stale ones
    with late_app(pki, broker, "restarts") as app:
        got = list(app.events(timeout=3))
        pending, _ = app.node.gate.pending
        assert app.node.gate.expire(time.time() + 3600) is None
        rejections = dict(app.node.gate.rejections)
    versions = [e for e in got if isinstance(e, ModelVersion)]
    assert [v.meta.version for v in versions] == [2] and _same(versions[0], new)
    assert pending == 1 and rejections == {"chunks-expired": 1}


def test_the_node_example_follows_the_manifest_as_a_late_subscriber(fleet,
                                                                    tmp_path: Path) -> None:
    """examples/node/app_subscriber.mjs, written from docs/asyncapi.yaml, gets a version
    that only a retained set can hold."""
    if shutil.which("node") is None or not (NODE_EXAMPLE.parent / "node_modules").is_dir():
        pytest.fail("Node.js and examples/node/node_modules are needed: `make test` installs "
                    "them (npm ci --prefix examples/node)", pytrace=False)
    pki, broker = fleet
    tensors = _tensors(41, 500_000)  # 2 MB
    with coordinator(pki, broker) as coord:
        publish(coord, _model_send("js-big", 1, tensors, app="js-app"))
    node = subprocess.run(["node", str(NODE_EXAMPLE), str(pki.device("js-app").dir),
                           broker.host, str(broker.port), "js-big", "1"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert node.returncode == 0, node.stderr
    assert node.stderr == "" and "r1-big v1: task mlp, agents' accuracy 0.500" in node.stdout
    assert (tmp_path / "js-big-v1.onnx").read_bytes() == tensors["onnx"].tobytes()


# ---------------------------------------------------------------- the receiving side, no broker


def _set(payload: bytes, max_payload: int = 1000) -> tuple[bytes, list[bytes]]:
    return retained_set(payload, max_payload)


def _feed(r: Reassembler, key: str, manifest: bytes | None, frames: list[tuple[int, bytes]],
          now: float = 0.0) -> list[bytes]:
    out = []
    for i, f in frames:
        if (got := r.feed_chunk(key, i, f, now)) is not None:
            out.append(bytes(got))
    if manifest is not None and (got := r.feed(key, manifest, now)) is not None:
        out.append(bytes(got))
    return out


def test_a_retained_set_is_delivered_once_in_any_order() -> None:
    payload = os.urandom(10_000)
    manifest, frames = _set(payload)
    assert len(frames) == 11 and len(manifest) == MANIFEST_SIZE
    m = parse_manifest(manifest, 1 << 20)
    assert (m.count, m.total, m.digest) == (11, 10_000, hashlib.sha256(payload).digest())
    rng = random.Random(5)
    for _ in range(20):
        r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
        items: list[tuple[int | None, bytes]] = [*enumerate(frames), (None, manifest)]
        items += rng.sample(items, 4)  # some twice (a new subscription, a redelivery)
        rng.shuffle(items)
        out = [bytes(got) for i, p in items
               if (got := (r.feed("t", p, 0.0) if i is None else r.feed_chunk("t", i, p, 0.0)))
               is not None]
        assert out == [payload] and r.pending_bytes == 0
        # The whole set again, retained copies on a later subscription: repeats, dropped.
        assert _feed(r, "t", manifest, list(enumerate(frames))) == []


def test_a_complete_set_waits_for_the_manifest_that_names_it() -> None:
    payload = os.urandom(5000)
    manifest, frames = _set(payload)
    other, _ = _set(os.urandom(5000))  # the manifest of another version
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    assert _feed(r, "t", other, list(enumerate(frames))) == []  # complete, but not named
    assert r.pending == 1
    assert _feed(r, "t", manifest, []) == [payload]
    assert r.pending == 0 and r.stale == 0


def test_two_versions_never_mix_and_the_replaced_one_is_dropped() -> None:
    """A late subscriber while version 2 is being published: the broker holds version 1's
    manifest, version 2's first frames and version 1's last ones."""
    v1, v2 = os.urandom(8000), os.urandom(8000)
    m1, f1 = _set(v1)
    m2, f2 = _set(v2)
    assert len(f1) == len(f2) == 9
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    retained = [*enumerate(f2[:4]), *((i, f1[i]) for i in range(4, 9))]
    assert _feed(r, "t", m1, retained) == []  # neither is complete: nothing, never a mix
    assert r.pending == 2
    assert _feed(r, "t", m2, list(enumerate(f2))[4:]) == [v2]  # the rest of v2, live
    assert r.stale == 1 and r.pending == 0  # v1's frames: dropped when v2 replaced it
    assert _feed(r, "t", None, list(enumerate(f1))) == []  # v1's frames again: not named
    assert r.pending == 1  # waits (it may be a newer version's) until it expires
    assert r.expire(1000.0) == 1 and r.pending_bytes == 0


def test_frames_of_a_newer_version_before_its_manifest_are_kept() -> None:
    """Version 2's frames arrive while version 1's manifest is the newest: they are the
    next version, not stale."""
    v1, v2 = os.urandom(3000), os.urandom(3000)
    m1, f1 = _set(v1)
    m2, f2 = _set(v2)
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    assert _feed(r, "t", m1, list(enumerate(f1))) == [v1]
    assert _feed(r, "t", None, list(enumerate(f2))) == []
    assert _feed(r, "t", m2, []) == [v2] and r.stale == 0


def _manifest(count: int = 3, total: int = 30, digest: bytes = bytes(32),
              magic: bytes = MANIFEST_MAGIC, msg_id: bytes = bytes(16)) -> bytes:
    return magic + msg_id + struct.pack("<IQ", count, total) + digest


BAD_MANIFESTS = {
    "empty": (b"", "bad-manifest"),
    "short": (_manifest()[:-1], "bad-manifest"),
    "long": (_manifest() + b"\0", "bad-manifest"),
    "count 0": (_manifest(count=0), "bad-manifest"),
    "total 0": (_manifest(total=0), "bad-manifest"),
    "count > total": (_manifest(count=6, total=5), "bad-manifest"),
    "chunks that cannot all hold data": (_manifest(count=4, total=5), "bad-manifest"),
    "over max_message": (_manifest(count=3, total=2**40), "too-large"),
}


@pytest.mark.parametrize("case", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_rejected(case: str) -> None:
    data, reason = BAD_MANIFESTS[case]
    with pytest.raises(Rejected) as e:
        parse_manifest(data, 1 << 20)
    assert e.value.reason == reason
    if data[:4] == MANIFEST_MAGIC:  # the reassembler refuses it the same way, holding nothing
        r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
        with pytest.raises(Rejected) as e:
            r.feed("t", data, 0.0)
        assert e.value.reason == reason and r.pending_bytes == 0


def test_a_manifest_that_disagrees_with_its_frames_is_rejected() -> None:
    payload = os.urandom(5000)
    manifest, frames = _set(payload)
    m = parse_manifest(manifest, 1 << 20)
    cases = {
        "chunk-digest": Manifest(m.msg_id, m.count, m.total, bytes(32)).encode(),
        "bad-manifest": Manifest(m.msg_id, m.count + 1, m.total, m.digest).encode(),
    }
    for reason, bad in cases.items():
        for manifest_first in (True, False):
            r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
            with pytest.raises(Rejected) as e:
                if manifest_first:
                    r.feed("t", bad, 0.0)
                _feed(r, "t", None if manifest_first else bad, list(enumerate(frames)))
            assert e.value.reason == reason and r.pending_bytes == 0


def test_a_frame_on_another_subtopic_or_not_a_frame_is_rejected() -> None:
    _, frames = _set(os.urandom(3000))
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    for index, payload in ((1, frames[0]), (0, b"HFL1 a whole envelope"), (0, b"\0" * 50)):
        with pytest.raises(Rejected) as e:
            r.feed_chunk("t", index, payload, 0.0)
        assert e.value.reason == "malformed-chunk"
    # Frames of one message both on the topic and on its subtopics: refused too.
    assert r.feed("t", frames[0], 0.0) is None
    with pytest.raises(Rejected, match="malformed-chunk"):
        r.feed_chunk("t", 1, frames[1], 0.0)


def test_sets_held_for_their_manifest_stay_within_the_bounds() -> None:
    bound = 4 * reserved(20_000, 21)
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20, max_key_bytes=bound)
    for k in range(10):  # complete sets no manifest ever names, on one topic
        _, frames = _set(os.urandom(20_000))
        assert _feed(r, "t", None, list(enumerate(frames)), now=float(k)) == []
        assert r.pending_bytes <= bound
    assert r.evicted == 6 and r.pending == 4


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=MANIFEST_SIZE - 4, max_size=MANIFEST_SIZE - 4), st.binary(max_size=80))
def test_fuzzed_manifests_and_frames_only_reject(tail: bytes, frame: bytes) -> None:
    r = Reassembler(max_message=1 << 16, max_pending_bytes=1 << 20)
    with contextlib.suppress(Rejected):  # anything else escapes and fails the test
        assert r.feed("t", MANIFEST_MAGIC + tail, 0.0) is None
    with contextlib.suppress(Rejected):
        assert r.feed_chunk("t", 0, b"HFC1" + frame, 0.0) is None  # no manifest names it
    assert r.pending_bytes <= 1 << 20


def test_chunk_subtopics_are_those_of_retained_topics_only() -> None:
    model, rounds = T.model("m"), T.rounds("site-a", "j1")
    assert T.chunk_of(chunk_topic(model, 3)) == (model, 3)
    assert T.chunk_of(chunk_topic(rounds, 0)) == (rounds, 0)
    assert T.chunk_of(chunk_topic(T.roster(), 12)) == (T.roster(), 12)
    assert T.chunk_of(chunk_topic(T.job("r1-m"), 1)) == (T.job("r1-m"), 1)
    for topic in (
        T.round_to("site-a", "chunk", "5"),  # a round topic's own level (job `chunk`)
        model + "/chunk/03",  # not canonical
        model + "/chunk/-1", model + "/chunk/x", model + "/chunk/99999999999", model + "/chunk",
        chunk_topic(T.status("agent", "a1"), 0),  # always whole
        chunk_topic(T.update("site-a", "a1"), 0),  # never retained
        chunk_topic("other/tree/m", 0),
    ):
        assert T.chunk_of(topic) is None, topic


@pytest.fixture
def ids() -> dict[str, Identity]:
    return {i: Identity.generate(i, r) for i, r in [
        ("coordinator", Role.COORDINATOR), ("app", Role.APP)]}


def _roster(ids: dict[str, Identity]) -> Roster:
    roster = Roster()
    for identity in ids.values():
        roster.enroll(identity)
    return roster


def test_the_app_wire_takes_retained_sets_and_counts_bad_input(ids) -> None:
    roster = _roster(ids)
    wire = AppWire(ids["app"], roster)
    assert T.chunks(T.model("m")) in wire.subscriptions(["m"])
    tensors = _tensors(51, 20_000)
    data = encode_send(_model_send("m", 1, tensors), ids["coordinator"], roster)
    manifest, frames = retained_set(data, 16 * 1024)
    topic = T.model("m")
    got = [e for i, f in enumerate(frames) for e in wire.feed(chunk_topic(topic, i), f)]
    assert got == []  # complete, waiting for the manifest published after the frames
    (v,) = wire.feed(topic, manifest)
    assert isinstance(v, ModelVersion) and _same(v, tensors)
    assert wire.rejections == {}
    # Refused and counted, never raised: a bad manifest, a frame on the wrong subtopic, a
    # set from the wrong topic (its envelope names another one) and one not signed.
    wire.feed(topic, manifest[:-1])
    wire.feed(chunk_topic(topic, 0), frames[1])
    other = T.model("other")
    for i, f in enumerate(frames):
        wire.feed(chunk_topic(other, i), f)
    wire.feed(other, manifest)
    forged = bytearray(data)
    forged[-1] ^= 1
    m2, f2 = retained_set(bytes(forged), 16 * 1024)
    for i, f in enumerate(f2):
        wire.feed(chunk_topic(topic, i), f)
    assert wire.feed(topic, m2) == []
    assert wire.rejections == {"bad-manifest": 1, "malformed-chunk": 1, "wrong-topic": 1,
                               "bad-signature": 1}
    # What no manifest names is held only until it expires.
    _, f3 = retained_set(encode_send(_model_send("m", 3, tensors), ids["coordinator"],
                                     roster), 16 * 1024)
    for i, f in enumerate(f3):
        wire.feed(chunk_topic(topic, i), f, now=time.time())
    assert wire.gate.pending[0] == 1
    wire.gate.expire(time.time() + 3600)
    assert wire.gate.pending == (0, 0) and wire.rejections["chunks-expired"] == 1
