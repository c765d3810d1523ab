"""A real Mosquitto with TLS client certificates and the roster's ACL, real paho clients.

Observed with Mosquitto 2.0.11: a publish the ACL refuses gets PUBACK 0x87 "Not authorized"
and reaches nobody (an accepted one gets 0x00, or 0x10 when nobody subscribes); a
subscription the ACL does not cover is granted (SUBACK QoS 1) but delivers nothing; SIGHUP
re-reads the ACL (applied to connected clients at once) and the CRL.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from fleet.ops.acl import ANY, pattern
from fleet.ops.broker import Broker, BrokerTls
from fleet.sim.procs import memory_mib
from hfl.crypto.pki import DeviceFiles, Pki
from hfl.runtime.mqtt import DEFAULT_MAX_PAYLOAD, packet_bound
from hfl.wire.topics import Topics

pytestmark = pytest.mark.broker

T = Topics()
TIMEOUT = 5.0
NOT_AUTHORIZED = 0x87
NO_SUBSCRIBERS = 0x10


class Client:
    """A bare paho MQTT 5 client over TLS; every wait is bounded."""

    def __init__(self, broker: Broker, files: DeviceFiles | None, ca: Path, client_id: str,
                 with_cert: bool = True) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.acks: dict[int, ReasonCode | list[ReasonCode]] = {}
        self.connack: ReasonCode | None = None
        self.outcome = threading.Event()  # set by the first CONNACK, failure or disconnect
        self.lost = threading.Event()
        self._acked = threading.Condition()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        cert = str(files.cert) if files and with_cert else None
        key = str(files.tls_key) if files and with_cert else None
        c.tls_set(ca_certs=str(ca), certfile=cert, keyfile=key)
        c.on_connect = self._on_connect
        c.on_connect_fail = lambda *_: self.outcome.set()
        c.on_disconnect = self._on_disconnect
        c.on_message = lambda _c, _u, m: self.inbox.put((m.topic, m.payload))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._ack(mid, rc)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._ack(mid, rcs)
        c.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]  # close() waits one delay
        self.c = c
        c.connect_async(broker.host, broker.port, keepalive=30)
        c.loop_start()

    def _on_connect(self, _c, _u, _f, rc: ReasonCode, _p) -> None:
        self.connack = rc
        self.outcome.set()

    def _on_disconnect(self, *_args: object) -> None:
        self.lost.set()
        self.outcome.set()

    def _ack(self, mid: int, rc: ReasonCode | list[ReasonCode]) -> None:
        with self._acked:
            self.acks[mid] = rc
            self._acked.notify_all()

    def connected(self) -> bool:
        """Whether the broker accepted us (waits for the first outcome)."""
        assert self.outcome.wait(TIMEOUT), "no CONNACK, failure or disconnect in time"
        return self.connack is not None and not self.connack.is_failure and not self.lost.is_set()

    def _wait_ack(self, mid: int) -> ReasonCode | list[ReasonCode]:
        with self._acked:
            assert self._acked.wait_for(lambda: mid in self.acks, TIMEOUT), f"no ack for {mid}"
            return self.acks[mid]

    def publish(self, topic: str, payload: bytes) -> ReasonCode:
        """Publish at QoS 1 and return the PUBACK's reason code."""
        rc = self._wait_ack(self.c.publish(topic, payload, qos=1).mid)
        assert isinstance(rc, ReasonCode)
        return rc

    def subscribe(self, topic: str) -> ReasonCode:
        rcs = self._wait_ack(self.c.subscribe(topic, qos=1)[1])
        assert isinstance(rcs, list)
        return rcs[0]

    def receive(self) -> tuple[str, bytes]:
        return self.inbox.get(timeout=TIMEOUT)

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


@pytest.fixture(scope="module")
def fleet(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Pki, Broker]]:
    """A fleet CA (site-a: a1, a2, a3; site-b: b1) and a TLS broker enforcing its ACL."""
    root = tmp_path_factory.mktemp("fleet")
    pki = Pki.init(root / "pki")
    pki.issue("coord", "coordinator")
    for agg, agents in {"site-a": ["a1", "a2", "a3"], "site-b": ["b1"]}.items():
        pki.issue(agg, "aggregator")
        for a in agents:
            pki.issue(a, "agent", group=agg)
    pki.issue("obs", "observer")
    tls = BrokerTls.from_pki(pki, "broker", root / "broker", T)
    with Broker(root / "broker", tls=tls) as broker:
        yield pki, broker


@pytest.fixture
def connect(fleet: tuple[Pki, Broker]) -> Iterator:
    pki, broker = fleet
    opened: list[Client] = []

    def open_(id: str, client_id: str | None = None, pki_: Pki | None = None,
              with_cert: bool = True) -> Client:
        files = (pki_ or pki).device(id)
        c = Client(broker, files, pki.ca_path, client_id or id, with_cert)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


def test_a_valid_certificate_round_trips_qos1_on_its_own_topics(connect) -> None:
    agg, a1 = connect("site-a"), connect("a1")
    assert agg.connected() and a1.connected()
    assert a1.subscribe(pattern(T.rounds, "site-a", ANY)).value == 1  # granted QoS 1
    assert agg.subscribe(pattern(T.update, "site-a", ANY)).value == 1
    assert agg.publish(T.rounds("site-a", "j1"), b"round 1").value == 0
    assert a1.receive() == (T.rounds("site-a", "j1"), b"round 1")
    assert a1.publish(T.update("site-a", "a1"), b"update").value == 0
    assert agg.receive() == (T.update("site-a", "a1"), b"update")


def test_no_certificate_cannot_connect(connect) -> None:
    assert not connect("a1", with_cert=False).connected()


def test_a_certificate_from_another_ca_cannot_connect(connect, tmp_path: Path) -> None:
    rogue = Pki.init(tmp_path / "rogue")
    rogue.issue("site-a", "aggregator")
    rogue.issue("a1", "agent", group="site-a")  # the same CN as the real a1
    assert not connect("a1", pki_=rogue).connected()


def test_an_agent_cannot_publish_as_another_agent(connect) -> None:
    obs, a1 = connect("obs"), connect("a1")
    assert obs.connected() and a1.connected()
    assert obs.subscribe("#").value == 1
    forged = a1.publish(T.update("site-a", "a2"), b"forged")
    assert forged.value == NOT_AUTHORIZED, forged
    assert a1.publish(T.update("site-b", "a1"), b"wrong site").value == NOT_AUTHORIZED
    # Messages from one client arrive in order: the marker proves nothing came before it.
    assert a1.publish(T.update("site-a", "a1"), b"marker").value == 0
    assert obs.receive() == (T.update("site-a", "a1"), b"marker")


def test_an_agent_cannot_read_another_sites_rounds(connect) -> None:
    a1, site_a, site_b, obs = connect("a1"), connect("site-a"), connect("site-b"), connect("obs")
    assert all(c.connected() for c in (a1, site_a, site_b, obs))
    assert obs.subscribe(pattern(T.rounds, ANY, ANY)).value == 1
    # Mosquitto grants the subscription; the ACL filters what it delivers.
    assert a1.subscribe(pattern(T.rounds, "site-b", ANY)).value == 1
    assert a1.subscribe(pattern(T.rounds, "site-a", ANY)).value == 1
    assert site_b.publish(T.rounds("site-b", "j1"), b"site-b round").value == 0
    assert obs.receive() == (T.rounds("site-b", "j1"), b"site-b round")  # it was published
    assert site_a.publish(T.rounds("site-a", "j1"), b"marker").value == 0
    assert a1.receive() == (T.rounds("site-a", "j1"), b"marker")  # and a1 got only this


def test_an_agent_reads_only_its_own_shares_and_cannot_forge_them(connect) -> None:
    a1, a2, site_a, obs = connect("a1"), connect("a2"), connect("site-a"), connect("obs")
    assert all(c.connected() for c in (a1, a2, site_a, obs))
    assert obs.subscribe(pattern(T.round_to, ANY, ANY, ANY)).value == 1
    # a1 asks for every agent's level of its group's rounds; the ACL lets through its own.
    assert a1.subscribe(pattern(T.round_to, "site-a", ANY, ANY)).value == 1
    assert a2.subscribe(pattern(T.round_to, "site-a", ANY, "a2")).value == 1
    assert site_a.publish(T.round_to("site-a", "j1", "a2"), b"a2's shares").value == 0
    assert obs.receive() == (T.round_to("site-a", "j1", "a2"), b"a2's shares")
    assert a2.receive() == (T.round_to("site-a", "j1", "a2"), b"a2's shares")
    # Neither an agent nor another site's aggregator may write an agent's shares.
    assert a2.publish(T.round_to("site-a", "j1", "a1"), b"forged").value == NOT_AUTHORIZED
    forged = connect("site-b").publish(T.round_to("site-a", "j1", "a1"), b"forged")
    assert forged.value == NOT_AUTHORIZED
    assert site_a.publish(T.round_to("site-a", "j1", "a1"), b"marker").value == 0
    assert a1.receive() == (T.round_to("site-a", "j1", "a1"), b"marker")  # and only this


def test_acknowledgements_reach_only_their_addressee_from_their_own_sender(connect) -> None:
    a1, a2, site_a, coord, obs = (connect(i) for i in ("a1", "a2", "site-a", "coord", "obs"))
    assert all(c.connected() for c in (a1, a2, site_a, coord, obs))
    assert obs.subscribe(pattern(T.ack, ANY, ANY)).value == 1
    # a1 asks for every ack of its aggregator; the ACL lets through those addressed to it.
    assert a1.subscribe(pattern(T.ack, "site-a", ANY)).value == 1
    assert site_a.subscribe(pattern(T.ack, ANY, "site-a")).value == 1
    assert site_a.publish(T.ack("site-a", "a2"), b"a2's ack").value == 0
    assert obs.receive() == (T.ack("site-a", "a2"), b"a2's ack")  # it was published
    # Nobody acknowledges in another's name: an agent, another site, the coordinator as a site.
    assert a2.publish(T.ack("site-a", "a1"), b"forged").value == NOT_AUTHORIZED
    assert connect("site-b").publish(T.ack("site-a", "a1"), b"forged").value == NOT_AUTHORIZED
    assert coord.publish(T.ack("site-a", "a1"), b"forged").value == NOT_AUTHORIZED
    assert coord.publish(T.ack("coord", "site-a"), b"partial acked").value == 0
    assert site_a.receive() == (T.ack("coord", "site-a"), b"partial acked")
    assert site_a.publish(T.ack("site-a", "a1"), b"marker").value == 0
    assert a1.receive() == (T.ack("site-a", "a1"), b"marker")  # and a1 got only this


def test_a_device_cannot_take_another_devices_client_id(connect) -> None:
    a2 = connect("a2")
    assert a2.connected()
    impostor = connect("a1", client_id="a2")
    assert impostor.connected()  # admitted, but as client id a1 (its certificate's CN)
    assert impostor.publish(T.update("site-a", "a2"), b"x").value == NOT_AUTHORIZED
    assert not a2.publish(T.update("site-a", "a2"), b"still here").is_failure
    assert not a2.lost.is_set()  # a2's session was not taken over


def test_a_revoked_device_is_cut_off_after_reload(fleet, connect) -> None:
    pki, broker = fleet
    before = connect("a3")
    assert before.connected()
    # 0x10 "No matching subscribers": accepted, nobody listens.
    assert before.publish(T.update("site-a", "a3"), b"ok").value == NO_SUBSCRIBERS
    pki.revoke("a3")
    BrokerTls.from_pki(pki, "broker", broker.run_dir, T)  # the new ACL and CRL
    broker.reload()
    # Its open connection stays, but the reloaded ACL no longer lets it do anything...
    assert before.publish(T.update("site-a", "a3"), b"after").value == NOT_AUTHORIZED
    # ...and the reloaded CRL refuses a new connection.
    assert not connect("a3").connected()
    assert connect("a1").connected()  # others are unaffected


# An aggregator's MQTT session (hfl.runtime.mqtt) in a process of its own, so that its memory is its
# own: it says what it received, one line per message.
NODE = textwrap.dedent("""
    import queue, sys
    from pathlib import Path
    from hfl.runtime.mqtt import Session
    from hfl.crypto.pki import DeviceFiles
    folder, host, port, topic = sys.argv[1:]
    inbox = queue.Queue()
    s = Session("site-a", DeviceFiles(Path(folder), "site-a").broker_settings(host, int(port)),
                inbox=inbox, subscriptions=[topic])
    s.start()
    assert s.wait_ready(10)
    print("ready", s.chunk_limit, flush=True)
    while True:
        m = inbox.get()
        print(m.topic, len(m.payload), flush=True)
""")


def test_an_oversized_publish_is_refused_by_the_broker_and_reaches_no_node(fleet,
                                                                            connect) -> None:
    """The generated config bounds packets just above hfl's largest chunk: a 16 MiB publish
    on an agent's own update topic (which its ACL allows) gets the agent disconnected, and
    neither the broker nor the aggregator subscribed there holds it."""
    pki, broker = fleet
    assert f"max_packet_size {packet_bound()}" in broker.conf_path.read_text().splitlines()
    node = subprocess.Popen(
        [sys.executable, "-c", NODE, str(pki.device("site-a").dir), broker.host,
         str(broker.port), pattern(T.update, "site-a", ANY)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[1])
    try:
        assert node.stdout is not None
        # The broker's limit lets it send its chunks whole.
        assert node.stdout.readline().split() == ["ready", str(DEFAULT_MAX_PAYLOAD)]
        watched = {"node": node.pid, "broker": broker.pid}
        before = {k: memory_mib(pid, "VmHWM") for k, pid in watched.items()}
        a1 = connect("a1")
        assert a1.connected()
        refused: list[ReasonCode] = []

        def on_disconnect(_c, _u, _f, rc: ReasonCode, _p) -> None:
            refused.append(rc)
            a1.lost.set()

        a1.c.on_disconnect = on_disconnect
        a1.c.publish(T.update("site-a", "a1"), bytes(16 << 20), qos=1)
        assert a1.lost.wait(TIMEOUT), "the broker kept the oversized sender"
        a1.close()  # before paho reconnects and sends it again
        again = connect("a1")
        assert again.connected()
        assert again.publish(T.update("site-a", "a1"), b"after").value == 0
        # The first thing the aggregator received is the message after.
        assert node.stdout.readline().split() == [T.update("site-a", "a1"), "5"]
        after = {k: memory_mib(pid, "VmHWM") for k, pid in watched.items()}
    finally:
        node.kill()
        node.wait()
    assert refused  # disconnected (paho sees the connection drop mid-write)
    assert "Client a1 disconnected due to oversize packet." in broker.log_tail(50)
    for k in watched:  # neither took the 16 MiB in: their peak memory did not move
        assert after[k] - before[k] < 2, (k, before[k], after[k])
