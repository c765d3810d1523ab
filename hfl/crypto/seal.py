"""Sealed bodies: only the named recipients can read them (X25519 + HKDF-SHA256 + AES-256-GCM).

A body is encrypted once under a fresh content key; the content key is wrapped for each
recipient under a key agreed between a per-message ephemeral X25519 key and the
recipient's sealing key. Both layers take the same associated data — the envelope's routing
fields and nonce — so a sealed body cannot be moved under another header, round or topic.

Layout::

    b"HFS1" | ephemeral public key (32) | u16 n | n × (u8 len | id | wrapped key (48))
           | nonce (12) | ciphertext | tag (16)

A wrapping key is used once (fresh ephemeral key per message), so its nonce is fixed.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Mapping

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from hfl.errors import Rejected

MAGIC = b"HFS1"
_WRAPPED = 32 + 16
_NONCE = 12
_ZERO_NONCE = bytes(_NONCE)
MAX_RECIPIENTS = 65_535


def _kek(shared: bytes, eph: bytes, recipient: bytes) -> AESGCM:
    key = HKDF(hashes.SHA256(), 32, salt=None, info=b"hfl/seal/v1" + eph + recipient).derive(
        shared)
    return AESGCM(key)


def seal(plaintext: bytes | bytearray | memoryview, recipients: Mapping[str, X25519PublicKey],
         aad: bytes) -> bytearray:
    """Encrypt `plaintext` so that each recipient (id → sealing key) and nobody else can read it."""
    if not recipients or len(recipients) > MAX_RECIPIENTS:
        raise ValueError(f"seal needs 1..{MAX_RECIPIENTS} recipients, got {len(recipients)}")
    content_key = AESGCM.generate_key(256)
    ephemeral = X25519PrivateKey.generate()
    eph = ephemeral.public_key().public_bytes_raw()
    parts = [MAGIC, eph, struct.pack("<H", len(recipients))]
    for rid, pub in recipients.items():
        name = rid.encode()
        if not 0 < len(name) < 256:
            raise ValueError(f"recipient id {rid!r} must be 1..255 bytes")
        raw = pub.public_bytes_raw()
        wrapped = _kek(ephemeral.exchange(pub), eph, raw).encrypt(_ZERO_NONCE, content_key, aad)
        parts += [bytes([len(name)]), name, wrapped]
    nonce = os.urandom(_NONCE)
    parts.append(nonce)
    # Encrypt straight into the message, after its header: a body may be tens of MB, and
    # this way it is neither copied before encryption nor joined after it.
    head = b"".join(parts)
    out = bytearray(len(head) + len(plaintext) + 16)
    out[: len(head)] = head
    AESGCM(content_key).encrypt_into(nonce, plaintext, aad, memoryview(out)[len(head) :])
    return out


def recipients(blob: bytes | memoryview) -> list[str]:
    """The ids a sealed body is addressed to (no key needed); malformed → Rejected."""
    return [rid for rid, _ in _table(memoryview(blob))[1]]


def _table(view: memoryview) -> tuple[bytes, list[tuple[str, memoryview]], int]:
    """Parse the header of a sealed body: ephemeral key, (id, wrapped key) rows, data offset."""
    if len(view) < len(MAGIC) + 34 or view[: len(MAGIC)] != MAGIC:
        raise Rejected("bad-seal", "not a sealed body")
    pos = len(MAGIC)
    eph = bytes(view[pos : pos + 32])
    (n,) = struct.unpack_from("<H", view, pos + 32)
    pos += 34
    rows = []
    for _ in range(n):
        if pos >= len(view):
            raise Rejected("bad-seal", "truncated recipient table")
        size = view[pos]
        end = pos + 1 + size + _WRAPPED
        if size == 0 or end > len(view):
            raise Rejected("bad-seal", "truncated recipient table")
        try:
            rid = bytes(view[pos + 1 : pos + 1 + size]).decode()
        except UnicodeDecodeError:
            raise Rejected("bad-seal", "recipient id is not UTF-8") from None
        rows.append((rid, view[pos + 1 + size : end]))
        pos = end
    if len(view) - pos < _NONCE + 16:
        raise Rejected("bad-seal", "truncated ciphertext")
    return eph, rows, pos


def open_sealed(blob: bytes | memoryview, my_id: str, my_key: X25519PrivateKey,
                aad: bytes) -> bytes:
    """The plaintext of a body sealed for `my_id`.

    Rejected("not-for-us") when it is addressed to others, Rejected("bad-seal") when it is
    malformed or does not authenticate (tampered, or moved under another header).
    """
    view = memoryview(blob).cast("B")
    eph, rows, pos = _table(view)
    wrapped = next((w for rid, w in rows if rid == my_id), None)
    if wrapped is None:
        raise Rejected("not-for-us", f"sealed for {len(rows)} others")
    try:
        eph_key = X25519PublicKey.from_public_bytes(eph)
        shared = my_key.exchange(eph_key)
        me = my_key.public_key().public_bytes_raw()
        content_key = _kek(shared, eph, me).decrypt(_ZERO_NONCE, wrapped, aad)
        nonce = bytes(view[pos : pos + _NONCE])
        return AESGCM(content_key).decrypt(nonce, view[pos + _NONCE :], aad)  # no copy
    except (InvalidTag, ValueError):
        raise Rejected("bad-seal", "does not authenticate") from None
