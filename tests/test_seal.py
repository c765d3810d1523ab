"""Sealed bodies: only the recipients read them, and a body cannot move under another header."""

from __future__ import annotations

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from hfl.crypto import seal
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.wire import envelope
from hfl.wire.gate import Gate
from hfl.wire.messages import Role
from hfl.wire.topics import Topics

AAD = b"routing fields"


def keys(*ids: str) -> dict[str, X25519PrivateKey]:
    return {i: X25519PrivateKey.generate() for i in ids}


def test_each_recipient_opens_and_nobody_else() -> None:
    ks = keys("app-1", "app-2")
    blob = seal.seal(b"model bytes", {i: k.public_key() for i, k in ks.items()}, AAD)
    assert b"model bytes" not in blob
    assert seal.recipients(blob) == ["app-1", "app-2"]
    for i, k in ks.items():
        assert seal.open_sealed(blob, i, k, AAD) == b"model bytes"
    with pytest.raises(Rejected) as e:
        seal.open_sealed(blob, "app-3", X25519PrivateKey.generate(), AAD)
    assert e.value.reason == "not-for-us"
    # Claiming a recipient's id without its key does not open it either.
    with pytest.raises(Rejected) as e:
        seal.open_sealed(blob, "app-1", X25519PrivateKey.generate(), AAD)
    assert e.value.reason == "bad-seal"


def test_other_associated_data_or_any_flipped_byte_fails() -> None:
    (k,) = keys("a").values()
    blob = seal.seal(b"x" * 1000, {"a": k.public_key()}, AAD)
    with pytest.raises(Rejected, match="bad-seal"):
        seal.open_sealed(blob, "a", k, AAD + b"!")
    for pos in (5, 40, len(blob) // 2, len(blob) - 1):
        bad = bytearray(blob)
        bad[pos] ^= 1
        with pytest.raises(Rejected) as e:
            seal.open_sealed(bytes(bad), "a", k, AAD)
        assert e.value.reason in {"bad-seal", "not-for-us"}


@pytest.mark.parametrize("blob", [b"", b"HFS1", b"XXXX" + bytes(60), b"HFS1" + bytes(32) +
                                  b"\x05\x00" + b"\x01a", b"HFS1" + bytes(34)])
def test_malformed_sealed_bodies_are_rejected(blob: bytes) -> None:
    with pytest.raises(Rejected) as e:
        seal.open_sealed(blob, "a", X25519PrivateKey.generate(), AAD)
    assert e.value.reason in {"bad-seal", "not-for-us"}


def test_sealed_envelope_through_the_gate_and_moved_under_another_header() -> None:
    topics = Topics()
    coord, agg, app = (Identity.generate(i, r) for i, r in
                       (("coord", Role.COORDINATOR), ("site-a", Role.AGGREGATOR),
                        ("app", Role.APP)))
    roster = Roster()
    for ident in (coord, agg, app):
        roster.enroll(ident)
    topic = topics.tasks("site-a")
    params = np.arange(10, dtype=np.float32)
    data = envelope.encode(type="task", topic=topic, job="j", round=3, stage="train",
                           sender="coord", key=coord.key, tensors={"params": params},
                           meta={}, seal_to={"site-a": agg.seal_public})
    assert params.tobytes() not in data
    env, _ = Gate(roster, topics, identity=agg).accept(topic, data, 0.0)
    np.testing.assert_array_equal(env.tensors["params"], params)
    # Another subscriber verifies the envelope but cannot open it: dropped, not a fault.
    other = Gate(roster, topics, identity=app)
    assert other.accept(topic, data, 0.0) is None
    assert other.counters["not_for_us"] == 1 and not other.rejections
    # The coordinator itself re-signs the sealed body under round 4: it no longer opens.
    decoded = envelope.decode(data, topic=topic, public_key=roster.public_key,
                              known_types={"task"})
    moved = envelope.encode(type="task", topic=topic, job="j", round=4, stage="train",
                            sender="coord", key=coord.key, meta={})
    body = bytes(decoded.sealed_body)
    head = moved[: len(moved) - 64]
    # Rebuild by hand: same header fields but round 4, carrying the old sealed body.
    forged = _resign(head, body, coord)
    gate = Gate(roster, topics, identity=agg)
    assert gate.accept(topic, forged, 0.0) is None
    assert gate.rejections == {"bad-seal": 1}


def _resign(signed_empty: bytes, body: bytes, ident: Identity) -> bytes:
    """An envelope with the header of `signed_empty` claiming `body` (sealed), re-signed."""
    import hashlib
    import json

    h = int.from_bytes(signed_empty[4:8], "little")
    header = json.loads(signed_empty[8 : 8 + h])
    header.update(body_len=len(body), digest=hashlib.sha256(body).hexdigest(), sealed=True)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    signed = b"HFL1" + len(raw).to_bytes(4, "little") + raw
    return signed + body + ident.key.sign(signed)
