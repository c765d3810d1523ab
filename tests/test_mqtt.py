"""hfl.runtime.mqtt.Session against a real Mosquitto started on a free port."""

from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest

from fleet.ops.broker import Broker
from hfl.runtime import mqtt
from hfl.runtime.mqtt import BrokerSettings, Inbound, Session
from hfl.wire.chunks import Reassembler, split_chunk_topic

pytestmark = pytest.mark.broker

TIMEOUT = 5.0


def settings_for(b: Broker) -> BrokerSettings:
    return BrokerSettings(host=b.host, port=b.port, keepalive=5)


@contextmanager
def session(b: Broker, client_id: str, subscriptions: Sequence[str] = (),
            **kw: object) -> Iterator[tuple[Session, queue.Queue[Inbound]]]:
    inbox: queue.Queue[Inbound] = queue.Queue()
    s = Session(client_id, settings_for(b), inbox=inbox, subscriptions=subscriptions,
                **kw)  # type: ignore[arg-type]
    s.start()
    try:
        assert s.wait_ready(TIMEOUT), f"{client_id} not ready"
        yield s, inbox
    finally:
        s.stop()


def collect(inbox: queue.Queue[Inbound], n: int, timeout: float = TIMEOUT) -> list[Inbound]:
    out: list[Inbound] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        try:
            out.append(inbox.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            break
    return out


def receive_whole(inbox: queue.Queue[Inbound], timeout: float = TIMEOUT) -> bytes:
    """The first message completed: chunked on its topic, or a retained set (frames on
    `{topic}/chunk/{i}`, manifest on the topic)."""
    r = Reassembler(max_message=64 << 20, max_pending_bytes=256 << 20)
    deadline = time.monotonic() + timeout
    while True:
        msg = inbox.get(timeout=max(0.001, deadline - time.monotonic()))
        if not msg.payload:
            continue
        cut = split_chunk_topic(msg.topic)
        whole = (r.feed(msg.topic, msg.payload, time.monotonic()) if cut is None
                 else r.feed_chunk(*cut, msg.payload, time.monotonic()))
        if whole is not None:
            return bytes(whole)


def test_large_payload_is_chunked_and_reassembled(broker: Broker) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    with session(broker, "sub", ["t/big"]) as (_, inbox), session(broker, "pub") as (pub, _):
        assert pub.chunk_limit == 256 * 1024  # our brokers take exactly these chunks whole
        pub.publish("t/big", payload)
        assert pub.flush(TIMEOUT)
        assert receive_whole(inbox) == payload
        assert pub.counters["published"] == 13  # 3 MiB in 256 KiB frames, header included


def test_large_retained_message_reaches_a_late_subscriber_as_a_retained_set(
        mosquitto: str, tmp_path: Path) -> None:
    payload = b"HFL1" + os.urandom(1024 * 1024)
    with Broker(tmp_path, max_packet_size=2 << 20) as b:  # a broker that would take it whole
        with session(b, "pub") as (pub, _):
            pub.publish("t/retained", payload, retain=True)
            assert pub.flush(TIMEOUT)
            # One wire whatever the broker: 5 frames of at most 256 KiB, then the manifest.
            assert pub.counters["published"] == 6
        with session(b, "late", ["t/retained", "t/retained/chunk/+"]) as (_, inbox):
            got = collect(inbox, 6)
            assert all(m.retain for m in got)
            for m in got:
                inbox.put(m)
            assert receive_whole(inbox) == payload
    (manifest,) = [m.payload for m in got if m.topic == "t/retained"]
    assert manifest[:4] == b"HFM1" and len(manifest) == 64


def test_chunk_limit_follows_the_broker_packet_limit(mosquitto: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    payload = os.urandom(1024 * 1024)
    with caplog.at_level(logging.WARNING, logger="hfl.runtime.mqtt"), \
            Broker(tmp_path, max_packet_size=65536) as b, \
            session(b, "sub", ["t/big"]) as (_, inbox), session(b, "pub") as (pub, _):
        assert pub.chunk_limit < 65536
        pub.publish("t/big", payload)
        assert pub.flush(TIMEOUT)
        assert receive_whole(inbox) == payload
        assert pub.counters["disconnects"] == 0  # nothing oversized was sent
    # Said once per session, with what to change.
    said = [r.getMessage() for r in caplog.records if "takes packets of at most" in r.getMessage()]
    assert len(said) == 2, said
    assert (f"pub: broker {b.host}:{b.port} takes packets of at most 65536 bytes, below the "
            f"{mqtt.packet_bound()} that chunks of max_payload 262144 need: it sends chunks "
            f"of {65536 - mqtt.PACKET_HEADROOM} bytes instead") in said[1]


def test_the_packet_bound_covers_a_whole_chunk_on_hfls_longest_topic() -> None:
    from hfl.wire.topics import Topics

    longest = Topics().round_to("a" * 64, "j" * 64, "b" * 64)
    packet = mqtt.DEFAULT_MAX_PAYLOAD + mqtt._PUBLISH_FIXED + len(longest.encode())
    assert packet <= mqtt.packet_bound() < packet + 1024  # it fits, with not much to spare


def test_a_broker_with_the_generated_limit_draws_no_warning(
        broker: Broker, caplog: pytest.LogCaptureFixture) -> None:
    assert f"max_packet_size {mqtt.packet_bound()}" in broker.conf_path.read_text()
    with caplog.at_level(logging.WARNING, logger="hfl.runtime.mqtt"), \
            session(broker, "pub") as (pub, _):
        assert pub.chunk_limit == mqtt.DEFAULT_MAX_PAYLOAD
    assert not [r for r in caplog.records if "takes packets" in r.getMessage()]


def test_a_quiet_tls_socket_is_offered_for_reading_once_per_interval(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenSSL may hold bytes it has not decrypted, which neither select nor pending()
    reports, so the end of a large message waited for the next packet (25 s stalls). The
    session's TLS socket says a byte is pending once per READ_NUDGE_S, and paho reads."""
    clock = [100.0]
    monkeypatch.setattr(mqtt.time, "monotonic", lambda: clock[0])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.sslsocket_class = mqtt._NudgedSSLSocket
    with socket.socket() as raw, context.wrap_socket(raw, server_hostname="broker",
                                                     do_handshake_on_connect=False) as tls:
        assert tls.pending() == 1  # nothing decrypted, but a read is due
        assert tls.pending() == 0  # not again within the interval
        clock[0] += mqtt.READ_NUDGE_S / 2
        assert tls.pending() == 0
        clock[0] += mqtt.READ_NUDGE_S / 2
        assert tls.pending() == 1


def test_a_broker_killed_with_kill_9_keeps_sessions_and_queued_messages(
        mosquitto: str, tmp_path: Path) -> None:
    """Mosquitto saves its persistence database when it stops cleanly and, with autosave,
    every few seconds: a kill -9 now loses at most the last of those seconds."""
    with Broker(tmp_path, persistence=True) as b:
        with session(b, "agent-1", ["q/tasks"]):
            pass  # a persistent session, then away
        with session(b, "pub") as (pub, _):
            pub.publish("q/tasks", b"queued while away")
            assert pub.flush(TIMEOUT)
        queued = time.time()
        db = tmp_path / "data" / "mosquitto.db"
        deadline = time.monotonic() + 5  # autosave_interval 1: saved within ~2 s
        while not (db.exists() and db.stat().st_mtime > queued) and time.monotonic() < deadline:
            time.sleep(0.1)
        b.kill()  # no save on the way out
        b.start()
        with session(b, "agent-1", ["q/tasks"]) as (_, inbox):
            got = collect(inbox, 1)
    assert [m.payload for m in got] == [b"queued while away"]


def test_subscribe_after_connect(broker: Broker) -> None:
    with session(broker, "sub") as (sub, inbox), session(broker, "pub") as (pub, _):
        sub.subscribe("late/#")
        assert sub.wait_ready(TIMEOUT)
        pub.publish("late/x", b"hello")
        assert [(m.topic, m.payload) for m in collect(inbox, 1)] == [("late/x", b"hello")]


def test_persistent_session_gets_what_was_published_while_away(broker: Broker) -> None:
    with session(broker, "agent-1", ["q/tasks"]):
        pass  # subscribed, then disconnected cleanly: the broker keeps the session
    with session(broker, "pub") as (pub, _):
        for i in range(5):
            pub.publish("q/tasks", b"task %d" % i)
        assert pub.flush(TIMEOUT)
    with session(broker, "agent-1", ["q/tasks"]) as (_, inbox):
        got = collect(inbox, 5)
    assert [m.payload for m in got] == [b"task %d" % i for i in range(5)]


DOOMED = """
import queue, sys, time
from hfl.runtime.mqtt import BrokerSettings, Session
s = Session("doomed", BrokerSettings(port=int(sys.argv[1])), inbox=queue.Queue(),
            will=("status/doomed", b"offline", True))
s.start()
assert s.wait_ready(5)
print("ready", flush=True)
time.sleep(60)
"""


def test_last_will_fires_on_a_crash_and_is_retained(broker: Broker) -> None:
    with session(broker, "watcher", ["status/#"]) as (_, inbox):
        proc = subprocess.Popen([sys.executable, "-c", DOOMED, str(broker.port)],
                                stdout=subprocess.PIPE, cwd=Path(__file__).parents[1])
        try:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            os.kill(proc.pid, signal.SIGKILL)  # no DISCONNECT: the socket just closes
        finally:
            proc.kill()
            proc.wait()
        (live,) = collect(inbox, 1)
        assert (live.topic, live.payload, live.retain) == ("status/doomed", b"offline", False)
    with session(broker, "late", ["status/#"]) as (_, inbox):
        (kept,) = collect(inbox, 1)
        assert (kept.topic, kept.payload, kept.retain) == ("status/doomed", b"offline", True)


def test_last_will_does_not_fire_on_a_clean_stop(broker: Broker) -> None:
    with session(broker, "watcher", ["status/#"]) as (_, inbox):
        with session(broker, "polite", will=("status/polite", b"offline", True)):
            pass
        assert collect(inbox, 1, timeout=1.0) == []
    with session(broker, "late", ["status/#"]) as (_, inbox):
        assert collect(inbox, 1, timeout=0.5) == []


@pytest.mark.parametrize("persistence", [False, True])
def test_resubscribes_after_a_broker_restart(mosquitto: str, tmp_path: Path,
                                             persistence: bool) -> None:
    with Broker(tmp_path, persistence=persistence) as b, \
            session(b, "agg-1", ["r/#"]) as (sub, inbox), session(b, "pub") as (pub, _):
        b.restart()  # without persistence the broker forgets every subscription
        deadline = time.monotonic() + 8
        while min(sub.counters["connects"], pub.counters["connects"]) < 2:
            assert time.monotonic() < deadline, "no reconnect"
            time.sleep(0.05)
        assert sub.wait_ready(TIMEOUT) and pub.wait_ready(TIMEOUT)
        pub.publish("r/1", b"after restart")
        assert pub.flush(TIMEOUT)
        assert [m.payload for m in collect(inbox, 1)] == [b"after restart"]


def test_the_birth_message_is_retained_afresh_on_every_connect(mosquitto: str,
                                                               tmp_path: Path) -> None:
    """After a lost connection the broker holds the Last Will; the reconnect replaces it."""
    births: list[bytes] = []

    def birth() -> tuple[str, bytes]:
        births.append(b"online %d" % len(births))
        return "status/agent-1", births[-1]

    with Broker(tmp_path) as b, session(b, "agent-1", will=("status/agent-1", b"lost", True),
                                        birth=birth) as (s, _):
        with session(b, "early", ["status/#"]) as (_, inbox):
            assert [m.payload for m in collect(inbox, 1)] == [b"online 0"]
        b.restart()  # no persistence: the broker forgot the retained birth
        deadline = time.monotonic() + 8
        while s.counters["connects"] < 2:
            assert time.monotonic() < deadline, "no reconnect"
            time.sleep(0.05)
        assert s.flush(TIMEOUT)
        with session(b, "late", ["status/#"]) as (_, inbox):
            assert [m.payload for m in collect(inbox, 1)] == [b"online 1"]  # made anew
