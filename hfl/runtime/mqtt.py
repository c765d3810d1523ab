"""The one MQTT session wrapper every runner uses (paho-mqtt 2.x, MQTT 5, QoS 1).

Paho's network thread only hands inbound messages to a queue; everything else (chunk
reassembly, decoding) happens on the runner's thread. The session is persistent (session
expiry), resubscribes on every connect, and splits payloads to fit both `max_payload` and the
broker's Maximum Packet Size, which paho reads from CONNACK but does not enforce: an oversized
QoS 1 publish gets the client disconnected, then resent on reconnect, forever.

Paho keeps a persistent session's unacknowledged outgoing messages in memory only: a
process that dies loses them (the protocol above retries rounds, so that is acceptable).

With `leave_unacked`, an inbound QoS 1 message is acknowledged only when the runner says so
(`ack`), or never (a probe that must not take a device's messages): a service that
checkpoints acknowledges once what the message changed is on disk, so after a `kill -9` the
broker delivers again whatever was not.
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from hfl.wire import chunks

log = logging.getLogger("hfl.runtime.mqtt")

QOS = 1
DEFAULT_MAX_PAYLOAD = 256 * 1024  # what a chunk frame (header included) may be
PACKET_HEADROOM = 1024  # room under the broker's packet limit for header, topic, properties
_PUBLISH_FIXED = 1 + 4 + 2 + 2 + 4  # type byte, length (<= 4), topic length, packet id, props
READ_NUDGE_S = 1.0  # how often a quiet TLS connection is read anyway (see _NudgedSSLSocket)


def packet_bound(max_payload: int = DEFAULT_MAX_PAYLOAD) -> int:
    """The broker's Maximum Packet Size a node needs to send chunks of `max_payload` bytes
    whole: the frame (HFC1 header included) and PACKET_HEADROOM for the PUBLISH header
    (_PUBLISH_FIXED) and the topic (the prefix + at most 206 bytes with hfl's 64-character
    ids; a chunk subtopic adds at most 17), with room to spare. Under it the node sends
    smaller chunks."""
    return max_payload + PACKET_HEADROOM


class _NudgedSSLSocket(ssl.SSLSocket):
    """A TLS socket that paho tries to read at least every READ_NUDGE_S.

    Paho reads when `select` says the socket is readable or `pending()` counts decrypted
    bytes left in the TLS layer. OpenSSL can also hold bytes it has read but not decrypted,
    which neither sees: the end of a large message then waits for the next packet to
    arrive, up to a keepalive (measured: 6.6 MB round models 25 s late in 5 of 12 runs).
    Claiming a pending byte now and then makes paho try a read, which costs one SSL_read
    that finds nothing when nothing is there."""

    _nudge_at = 0.0

    def pending(self) -> int:
        n = super().pending()
        now = time.monotonic()
        if n or now < self._nudge_at:
            return n
        self._nudge_at = now + READ_NUDGE_S
        return 1


def tls_context(ca: str, cert: str | None = None, key: str | None = None) -> ssl.SSLContext:
    """What paho's `tls_set` builds (TLS client, the broker's certificate and host name
    checked against `ca`), with our socket class."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(ca)
    if cert is not None:
        context.load_cert_chain(cert, key)
    context.sslsocket_class = _NudgedSSLSocket
    return context


@dataclass(frozen=True)
class BrokerSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    keepalive: int = 30
    session_expiry: int = 3600
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    username: str | None = None
    password: str | None = None


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes
    retain: bool  # True only for a retained message the broker replays on subscribe
    mid: int = 0  # packet id and QoS, to acknowledge it (leave_unacked)
    qos: int = 0
    connection: int = 0  # which connection it came on: an ack is only good on that one


class _Acks:
    """Packet ids awaiting an ack; tolerates the ack arriving before the id is registered.

    Paho may process the ack on its network thread before `publish()` / `subscribe()`
    returns the id to us, so an early ack is parked until its id shows up.
    """

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._waiting: set[int] = set()
        self._early: set[int] = set()

    def add(self, mid: int) -> None:
        with self._cond:
            if mid in self._early:
                self._early.discard(mid)
            else:
                self._waiting.add(mid)

    def ack(self, mid: int) -> None:
        with self._cond:
            if mid in self._waiting:
                self._waiting.discard(mid)
            else:
                self._early.add(mid)
            self._cond.notify_all()

    def clear(self) -> None:
        with self._cond:
            self._waiting.clear()
            self._early.clear()

    @property
    def empty(self) -> bool:
        return not self._waiting


class Session:
    """A persistent MQTT 5 session: QoS 1, chunked publishes, inbound into `inbox`."""

    def __init__(self, client_id: str, settings: BrokerSettings, *, inbox: queue.Queue[Inbound],
                 subscriptions: Sequence[str] = (), will: tuple[str, bytes, bool] | None = None,
                 birth: Callable[[], tuple[str, bytes]] | None = None,
                 clean_start: bool = False, max_payload: int = DEFAULT_MAX_PAYLOAD,
                 leave_unacked: bool = False) -> None:
        self.client_id = client_id
        # Retained on every connect, freshly made (receivers drop an exact repeat): after a
        # reconnect it replaces the Last Will the broker published for the lost connection.
        self.birth = birth
        self.leave_unacked = leave_unacked
        self.settings = settings
        self.inbox = inbox
        self.max_payload = max_payload
        self.chunk_limit = max_payload
        self.connected = False
        self.refusal: str | None = None  # the broker's last refusal (CONNACK or SUBACK)
        self.counters: dict[str, int] = dict.fromkeys(
            ("connects", "disconnects", "published", "received", "bytes_received",
             "dropped_callback_errors"), 0)
        self._filters: list[str] = list(dict.fromkeys(subscriptions))
        self._broker_max: int | None = None
        self._warned_limit: int | None = None
        self._retained_sets: dict[str, int] = {}  # topic → chunks of the retained set left there
        self._cond = threading.Condition()
        self._subacks = _Acks(self._cond)
        self._pubacks = _Acks(self._cond)
        # A probe connecting as a device acks nothing it receives (the broker then keeps those
        # messages for the device itself); a durable node acks what it has saved (`ack`).
        self._client = self._make_client(will, clean_start, manual_ack=leave_unacked)

    # ------------------------------------------------------------------ setup

    def _make_client(self, will: tuple[str, bytes, bool] | None, clean_start: bool,
                     manual_ack: bool) -> mqtt.Client:
        s = self.settings
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                        protocol=mqtt.MQTTv5, manual_ack=manual_ack)
        c.enable_logger(logging.getLogger("hfl.runtime.mqtt.paho"))
        if s.ca:
            c.tls_set_context(tls_context(s.ca, s.cert, s.key))
        if s.username is not None:
            c.username_pw_set(s.username, s.password)
        if will is not None:
            topic, payload, retain = will
            c.will_set(topic, payload, qos=QOS, retain=retain)
        c.max_queued_messages_set(0)  # unbounded: a dropped QoS 1 publish would be silent
        c.reconnect_delay_set(1, 30)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_subscribe = self._on_subscribe
        c.on_publish = self._on_publish
        c.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = s.session_expiry
        # A clean start on every reconnect would throw away what the broker queued for us.
        self._connect_args: dict[str, Any] = {
            "clean_start": mqtt.MQTT_CLEAN_START_FIRST_ONLY if clean_start else False,
            "properties": props,
        }
        return c

    def start(self) -> None:
        """Connect in the background; paho reconnects with back-off from then on."""
        s = self.settings
        self._client.connect_async(s.host, s.port, s.keepalive, **self._connect_args)
        self._client.loop_start()

    def stop(self) -> None:
        """Disconnect cleanly (so the Last Will does not fire) and stop the network thread."""
        # paho's thread may run its loop once more on the closed socket and log that as an
        # error ("Client is not connected"): a stop is not a fault, so its logger goes first.
        self._client.disable_logger()
        self._client.disconnect()
        self._client.loop_stop()
        self.connected = False

    # ------------------------------------------------------------------ API

    def wait_ready(self, timeout: float) -> bool:
        """True once connected and every subscription is acknowledged."""
        with self._cond:
            return self._cond.wait_for(self._ready, timeout)

    def _ready(self) -> bool:
        return self.connected and self._subacks.empty

    def subscribe(self, topic_filter: str) -> None:
        """Remember `topic_filter` (resubscribed on every connect); subscribe now if connected."""
        with self._cond:
            if topic_filter in self._filters:
                return
            self._filters.append(topic_filter)
            connected = self.connected
        if connected:
            self._send_subscribe([topic_filter])

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> None:
        """QoS 1; split into chunks that fit `chunk_limit` and the broker's packet limit.

        A retained message that does not fit one packet is a retained set (hfl.wire.chunks):
        each frame retained on its own chunk subtopic, then a manifest on the topic, so a
        late subscriber gets the whole message whatever the broker's packet limit (a broker
        keeps one retained message per topic: frames on the topic itself would leave it the
        last one). Whether or not the broker would take it whole: one wire for every broker,
        and paho handles large payloads slowly (DESIGN.md §8). What fits stays one message:
        a status is also a Last Will, which cannot be a set, and a set costs two messages.
        """
        if retain:
            self._publish_retained(topic, payload)
            return
        for frame in chunks.split(payload, self._limit(topic)):
            self._send(topic, frame, retain=False)

    def _limit(self, topic: str) -> int:
        """The largest payload to send on `topic`: `chunk_limit`, and below the broker's
        packet limit when it says one."""
        if self._broker_max is None:
            return self.chunk_limit
        return min(self.chunk_limit, self._broker_max - _PUBLISH_FIXED - len(topic.encode()))

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Chunk subtopics first, the topic last: a subscriber that gets a manifest finds
        its chunks already retained. The subtopics of an earlier, longer set that the new
        message does not overwrite are cleared (an empty retained message), so no stale
        chunk lingers; this session remembers how many it left on each topic (a restarted
        publisher does not know its predecessor's: receivers drop what no manifest names)."""
        with self._cond:
            old = self._retained_sets.pop(topic, 0)
        frames: list[bytes] = []
        head = payload
        if not chunks.whole(payload, self._limit(topic)):
            longest = chunks.chunk_topic(topic, 2**32 - 1)
            head, frames = chunks.retained_set(payload, self._limit(longest))
            for i, frame in enumerate(frames):
                self._send(chunks.chunk_topic(topic, i), frame, retain=True)
            with self._cond:
                self._retained_sets[topic] = len(frames)
        for i in range(len(frames), old):
            self._send(chunks.chunk_topic(topic, i), b"", retain=True)
        self._send(topic, head, retain=True)

    def _send(self, topic: str, payload: bytes, *, retain: bool) -> None:
        info = self._client.publish(topic, payload, qos=QOS, retain=retain)
        self._pubacks.add(info.mid)
        self._bump("published")

    def ack(self, messages: list[Inbound]) -> None:
        """Acknowledge (leave_unacked) what came on the current connection; the broker sends
        what came on an earlier one again anyway, and its packet id means nothing now."""
        if not self.leave_unacked:
            return
        current = self.counters["connects"]
        for m in messages:
            if m.qos > 0 and m.connection == current:
                self._client.ack(m.mid, m.qos)

    def flush(self, timeout: float) -> bool:
        """Wait until every publish so far is acknowledged by the broker (PUBACK)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pubacks.empty, timeout)

    # ------------------------------------------------------------------ callbacks
    # Paho's network thread runs these; an exception escaping one would kill it.

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        try:
            if reason_code.is_failure:
                self.refusal = f"connection refused: {reason_code}"
                log.warning("%s: broker refused the connection: %s", self.client_id,
                            reason_code)
                return
            self.refusal = None
            self._apply_packet_limit(getattr(properties, "MaximumPacketSize", None))
            self._subacks.clear()
            with self._cond:
                filters = list(self._filters)
            if filters:  # before `connected`, so wait_ready cannot see a moment with no acks due
                self._send_subscribe(filters)
            with self._cond:
                self.connected = True
                added = self._filters[len(filters):]  # by subscribe() in the meantime
                self._cond.notify_all()
            if added:
                self._send_subscribe(added)
            if self.birth is not None:
                topic, payload = self.birth()
                self.publish(topic, payload, retain=True)
            self._bump("connects")
            log.info("%s connected to %s:%s (session present: %s)", self.client_id,
                     self.settings.host, self.settings.port, flags.session_present)
        except Exception:
            self._callback_error("on_connect")

    def _apply_packet_limit(self, broker_max: int | None) -> None:
        self._broker_max = broker_max
        self.chunk_limit = self.max_payload
        if broker_max is not None:
            self.chunk_limit = min(self.max_payload, broker_max - PACKET_HEADROOM)
        need = packet_bound(self.max_payload)
        if broker_max is not None and broker_max < need and broker_max != self._warned_limit:
            self._warned_limit = broker_max  # once per limit, not on every reconnect
            s = self.settings
            log.warning("%s: broker %s:%s takes packets of at most %d bytes, below the %d "
                        "that chunks of max_payload %d need: it sends chunks of %d bytes "
                        "instead (raise the broker's max_packet_size to %d, or lower "
                        "max_payload)", self.client_id, s.host, s.port, broker_max, need,
                        self.max_payload, self.chunk_limit, need)

    def _send_subscribe(self, filters: list[str]) -> None:
        opts = SubscribeOptions(qos=QOS)
        rc, mid = self._client.subscribe([(f, opts) for f in filters])
        if rc == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._subacks.add(mid)  # otherwise the next on_connect subscribes again

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int,
                      reason_codes: list[ReasonCode], properties: Properties | None) -> None:
        try:
            refused = [str(rc) for rc in reason_codes if rc.is_failure]
            if refused:
                # Left unacknowledged on purpose: a service must not report ready without
                # the subscriptions it needs (an ACL mistake, typically).
                self.refusal = f"subscription refused: {', '.join(refused)}"
                log.error("%s: subscription refused: %s", self.client_id, ", ".join(refused))
                self._bump("subscribe_refused")
                return
            self._subacks.ack(mid)
        except Exception:
            self._callback_error("on_subscribe")

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int,
                    reason_code: ReasonCode, properties: Properties | None) -> None:
        try:
            if reason_code.is_failure:
                log.warning("%s: publish %d refused: %s", self.client_id, mid, reason_code)
                self._bump("publish_refused")
            self._pubacks.ack(mid)
        except Exception:
            self._callback_error("on_publish")

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            # paho's payload is bytes, typed as bytes | bytearray: bytes() of bytes is no copy
            self.inbox.put(Inbound(msg.topic, bytes(msg.payload), bool(msg.retain), msg.mid,
                                   msg.qos,
                                   self.counters["connects"]))
            self._bump("received")
            self._bump("bytes_received", len(msg.payload))
        except Exception:
            self._callback_error("on_message")

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any,
                       reason_code: ReasonCode, properties: Properties | None) -> None:
        try:
            with self._cond:
                self.connected = False
                self._cond.notify_all()
            self._bump("disconnects")
            log.info("%s disconnected: %s", self.client_id, reason_code)
        except Exception:
            self._callback_error("on_disconnect")

    def _callback_error(self, where: str) -> None:
        self._bump("dropped_callback_errors")
        log.exception("%s: error in %s (dropped)", self.client_id, where)

    def _bump(self, name: str, n: int = 1) -> None:
        with self._cond:
            self.counters[name] = self.counters.get(name, 0) + n
