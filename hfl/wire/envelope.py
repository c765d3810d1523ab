"""The signed envelope: every MQTT payload in hfl is one.

Wire format::

    b"HFL1" | u32 LE H | header: H bytes of UTF-8 JSON | body: safetensors | Ed25519 sig (64)

The signature covers magic, H and the header only; the header carries the body's SHA-256,
so it covers the body too at a quarter of the cost (Ed25519 over 4 MB takes 12 ms, SHA-256
3 ms). The header also names the topic the message was published on, so a signed message
cannot be replayed on another topic.

A sealed envelope (`sealed: true`) carries its safetensors body encrypted for named
recipients (`hfl.crypto.seal`), with the routing fields and nonce as associated data; `decode`
verifies it as it is and `unseal` opens it for one recipient.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hfl.crypto import seal as _seal
from hfl.errors import Rejected
from hfl.wire import tensors as _tensors

MAGIC = b"HFL1"
VERSION = 1
SIGNATURE_LEN = 64
MAX_HEADER = 64 * 1024
DEFAULT_MAX_MESSAGE = 128 * 1024 * 1024  # a 16M-parameter version: its tensors and ONNX

_PREFIX = len(MAGIC) + 4  # magic and the u32 header length


class _HeaderModel(BaseModel):
    """The header schema; strict, so JSON types are taken as they are (no bool for int)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    v: int = Field(description="envelope version")
    type: str = Field(description="the message type")
    topic: str = Field(description="the MQTT topic it is published on")
    job: str = Field(description="the job it belongs to (empty for none)")
    round: int = Field(ge=0, description="a number whose meaning depends on the type")
    stage: str = Field(description="the step of the protocol it is")
    sender: str = Field(description="the id of the device that signed it")
    nonce: str = Field(pattern=r"^[0-9a-f]{32}$",
                       description="16 random bytes in hex: (sender, nonce) names a message")
    created: float = Field(allow_inf_nan=False,
                           description="the sender's clock, Unix seconds (informative)")
    body_len: int = Field(ge=0, description="the body's length in bytes")
    digest: str = Field(pattern=r"^[0-9a-f]{64}$",
                        description="SHA-256 of the body (as sent), lower-case hex")
    sealed: bool = Field(default=False, description="the body is sealed (HFS1)")
    meta: dict[str, Any] = Field(description="the type's fields: see each message")


@dataclass(frozen=True)
class Header:
    """A verified header: the routing and replay fields every handler needs."""

    v: int
    type: str
    topic: str
    job: str
    round: int
    stage: str
    sender: str
    nonce: str
    created: float
    body_len: int
    digest: str
    sealed: bool
    meta: dict[str, Any]

    @property
    def aad(self) -> bytes:
        return _aad(self.type, self.topic, self.job, self.round, self.stage, self.sender,
                    self.nonce)


def _aad(type: str, topic: str, job: str, round: int, stage: str, sender: str,
         nonce: str) -> bytes:
    """What a sealed body is bound to: its message's routing fields and nonce."""
    return "\0".join(("hfl/aad/v1", type, topic, job, str(round), stage, sender,
                      nonce)).encode()


# eq=False: tensors are arrays, whose == is elementwise, and the dict makes it unhashable.
@dataclass(frozen=True, eq=False)
class Envelope:
    """A decoded, verified message: its header and its tensors."""

    header: Header
    tensors: dict[str, np.ndarray]  # zero-copy views into the decoded message
    sealed_body: memoryview | None = None  # a sealed body not opened yet (tensors empty)

    @property
    def type(self) -> str:
        return self.header.type

    @property
    def topic(self) -> str:
        return self.header.topic

    @property
    def job(self) -> str:
        return self.header.job

    @property
    def round(self) -> int:
        return self.header.round

    @property
    def stage(self) -> str:
        return self.header.stage

    @property
    def sender(self) -> str:
        return self.header.sender

    @property
    def meta(self) -> dict[str, Any]:
        return self.header.meta

    @property
    def nonce(self) -> str:
        return self.header.nonce

    @property
    def created(self) -> float:
        return self.header.created


# ---------------------------------------------------------------------- encoding


def encode(
    *,
    type: str,
    topic: str,
    job: str,
    round: int,
    stage: str,
    sender: str,
    key: Ed25519PrivateKey,
    tensors: Mapping[str, np.ndarray] | None = None,
    meta: Mapping[str, Any] | None = None,
    now: float | None = None,
    nonce: bytes | None = None,
    seal_to: Mapping[str, X25519PublicKey] | None = None,
) -> bytes:
    """Build and sign one envelope, its body sealed for `seal_to` (id → sealing key) if given.
    Bad arguments (a programmer error) raise ValueError."""
    body = _tensors.dump(tensors or {})
    if nonce is None:
        nonce = os.urandom(16)
    elif not isinstance(nonce, bytes) or len(nonce) != 16:
        raise ValueError("nonce must be 16 bytes")
    if seal_to is not None:
        body = _seal.seal(body, seal_to, _aad(type, topic, job, round, stage, sender, nonce.hex()))
    fields = {
        "v": VERSION,
        "type": type,
        "topic": topic,
        "job": job,
        "round": round,
        "stage": stage,
        "sender": sender,
        "nonce": nonce.hex(),
        "created": float(time.time() if now is None else now),
        "body_len": len(body),
        "digest": hashlib.sha256(body).hexdigest(),
        "sealed": seal_to is not None,
        "meta": dict(meta or {}),
    }
    _HeaderModel.model_validate(fields)  # ValidationError is a ValueError
    try:  # allow_nan=False: decode refuses NaN, so never send it
        header = json.dumps(fields, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except TypeError as e:
        raise ValueError(f"meta is not JSON-serializable: {e}") from None
    # Trailing spaces (still valid JSON) start the body on an 8-byte boundary, so the
    # tensors, whose offsets `tensors.dump` aligns within the body, are aligned in memory.
    header += b" " * (-len(header) % 8)
    if len(header) > MAX_HEADER:
        raise ValueError(f"header of {len(header)} bytes exceeds {MAX_HEADER}")
    signed = MAGIC + len(header).to_bytes(4, "little") + header
    return b"".join((signed, body, key.sign(signed)))


# ---------------------------------------------------------------------- decoding


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise Rejected("malformed-header", "duplicate key")
    return obj


def _no_constants(name: str) -> Any:
    raise Rejected("malformed-header", f"non-standard JSON constant {name}")


def _parse_header(raw: memoryview) -> Header:
    """JSON and schema checks: anything off is `malformed-header`."""
    try:
        obj = json.loads(
            bytes(raw).decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_no_constants,
        )
        # Lone surrogates (a "\ud800" escape) parse fine but are not text; refuse them here
        # rather than in whatever later logs or re-encodes the strings.
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as e:  # bad UTF-8, bad JSON, absurd ints or nesting
        raise Rejected("malformed-header", f"not valid JSON: {type(e).__name__}") from None
    if not isinstance(obj, dict):
        raise Rejected("malformed-header", f"{type(obj).__name__}, not an object")
    try:
        model = _HeaderModel.model_validate(obj)
    except ValidationError as e:
        raise Rejected("malformed-header", _summary(e)) from None
    return Header(**{name: getattr(model, name) for name in _HeaderModel.model_fields})


def _summary(e: ValidationError) -> str:
    """The first schema error, short: the values are a peer's and may be large."""
    err = e.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(p) for p in err["loc"])[:64]
    more = e.error_count() - 1
    return f"{where}: {err['msg']}" + (f" (+{more} more)" if more else "")


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    try:
        return memoryview(data).cast("B")
    except TypeError as e:  # not a buffer, or not C-contiguous
        raise Rejected("malformed", f"unusable buffer: {e}") from None


def _split(view: memoryview, max_size: int) -> tuple[memoryview, memoryview, memoryview]:
    """Size, magic and framing checks; return the signed prefix, body and signature."""
    if len(view) > max_size:
        raise Rejected("too-large", f"{len(view)} bytes > {max_size}")
    if view[: len(MAGIC)] != MAGIC:
        raise Rejected("bad-magic")
    if len(view) < _PREFIX:
        raise Rejected("malformed", "truncated before the header length")
    h = int.from_bytes(view[len(MAGIC) : _PREFIX], "little")
    if h > MAX_HEADER:
        raise Rejected("malformed", f"header length {h} > {MAX_HEADER}")
    if _PREFIX + h + SIGNATURE_LEN > len(view):
        raise Rejected("malformed", f"truncated: {len(view)} bytes for a {h}-byte header")
    end = len(view) - SIGNATURE_LEN
    return view[: _PREFIX + h], view[_PREFIX + h : end], view[end:]


def decode(
    data: bytes | bytearray | memoryview,
    *,
    topic: str,
    public_key: Callable[[str], Ed25519PublicKey | None],
    known_types: Collection[str],
    max_size: int = DEFAULT_MAX_MESSAGE,
) -> Envelope:
    """Verify and parse one envelope received on `topic`; any fault raises `Rejected`.

    The returned tensors are views into `data` (read-only when it is `bytes`).
    """
    signed, body, signature = _split(_as_bytes_view(data), max_size)
    header = _parse_header(signed[_PREFIX:])
    if header.v != VERSION:
        raise Rejected("bad-version", str(header.v)[:20])
    if header.type not in known_types:
        raise Rejected("unknown-type", header.type[:64])
    if header.topic != topic:
        raise Rejected("wrong-topic", f"signed for {header.topic[:200]!r}")
    key = public_key(header.sender)
    if key is None:
        raise Rejected("unknown-sender", header.sender[:64])
    if len(body) != header.body_len:
        raise Rejected("malformed", f"body of {len(body)} bytes, header says {header.body_len}")
    try:
        key.verify(bytes(signature), bytes(signed))
    except InvalidSignature:
        raise Rejected("bad-signature", header.sender[:64]) from None
    if not hmac.compare_digest(hashlib.sha256(body).hexdigest(), header.digest):
        raise Rejected("bad-digest")
    if header.sealed:
        return Envelope(header=header, tensors={}, sealed_body=body)
    return Envelope(header=header, tensors=_load_body(body))


def _load_body(body: bytes | memoryview) -> dict[str, np.ndarray]:
    arrays = _tensors.load(body)  # its faults are already Rejected("malformed-body")
    if not _tensors.all_finite(arrays):
        raise Rejected("non-finite", "NaN or infinity in a float tensor")
    return arrays


def unseal(env: Envelope, my_id: str, my_key: X25519PrivateKey) -> Envelope:
    """Open a verified sealed envelope addressed to `my_id`; its tensors are then available.

    Rejected("not-for-us") when addressed to others, "bad-seal" when it does not open."""
    if env.sealed_body is None:
        return env
    plaintext = _seal.open_sealed(env.sealed_body, my_id, my_key, env.header.aad)
    return Envelope(header=env.header, tensors=_load_body(plaintext))
