"""Identities and the roster of enrolled devices.

Each device holds two private keys, both created by `hfl pki issue` (files mode 0600):
`{id}.key` (Ed25519, PKCS#8 PEM) signs everything it sends, and `{id}.seal.key` (X25519)
opens what is sealed for it. The roster lists every member's id, role, group (an agent's
aggregator) and both public keys; it is signed by the fleet CA (`hfl.crypto.pki`) and carries a
serial, so a re-issued roster (revocation) replaces an older one and never the reverse.
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from hfl.wire.messages import Role
from hfl.wire.topics import check_id

ROSTER_VERSION = 2


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def unb64(text: str, size: int | None = None, what: str = "value") -> bytes:
    """Strict base64 (of exactly `size` bytes when given); ValueError otherwise."""
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (ValueError, AttributeError) as e:
        raise ValueError(f"{what} is not base64: {e}") from None
    if size is not None and len(raw) != size:
        raise ValueError(f"{what} has {len(raw)} bytes, want {size}")
    return raw


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _pem(key: Ed25519PrivateKey | X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_pem(path: Path, kind: type, what: str) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} not found (issue it: hfl pki issue)")
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except ValueError as e:
        raise ValueError(f"{path} is not a PEM private key: {e}") from None
    if not isinstance(key, kind):
        raise ValueError(f"{path} is not an {what}")
    return key


@dataclass(frozen=True)
class Identity:
    id: str
    role: Role
    key: Ed25519PrivateKey  # signs
    seal: X25519PrivateKey  # opens sealed bodies

    @classmethod
    def generate(cls, id: str, role: Role | str) -> Identity:
        return cls(check_id(id), Role(role), Ed25519PrivateKey.generate(),
                   X25519PrivateKey.generate())

    @property
    def who(self) -> str:
        """Role and id, as logs and errors name a node: "aggregator site-a"."""
        return f"{self.role.value} {self.id}"

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def seal_public(self) -> X25519PublicKey:
        return self.seal.public_key()

    @staticmethod
    def paths(directory: Path, id: str) -> tuple[Path, Path]:
        return Path(directory) / f"{id}.key", Path(directory) / f"{id}.seal.key"

    def save(self, directory: Path) -> None:
        sign_path, seal_path = self.paths(directory, self.id)
        write_private(sign_path, _pem(self.key))
        write_private(seal_path, _pem(self.seal))

    @classmethod
    def load(cls, directory: Path, id: str, role: Role | str) -> Identity:
        sign_path, seal_path = cls.paths(directory, check_id(id))
        return cls(id, Role(role), _load_pem(sign_path, Ed25519PrivateKey, "Ed25519 key"),
                   _load_pem(seal_path, X25519PrivateKey, "X25519 key"))


@dataclass(frozen=True)
class Member:
    id: str
    role: Role
    public_key: Ed25519PublicKey
    seal_key: X25519PublicKey
    group: str | None = None  # an agent's aggregator

    @classmethod
    def of(cls, identity: Identity, group: str | None = None) -> Member:
        return cls(identity.id, identity.role, identity.public_key, identity.seal_public, group)

    def to_doc(self) -> dict[str, Any]:
        return {"id": self.id, "role": self.role.value, "group": self.group,
                "ed25519": b64(self.public_key.public_bytes_raw()),
                "x25519": b64(self.seal_key.public_bytes_raw())}

    @classmethod
    def from_doc(cls, r: dict[str, Any]) -> Member:
        return cls(r["id"], Role(r["role"]),
                   Ed25519PublicKey.from_public_bytes(unb64(r["ed25519"], 32, "ed25519")),
                   X25519PublicKey.from_public_bytes(unb64(r["x25519"], 32, "x25519")),
                   r.get("group"))


class Roster:
    """Who may send, and to whom a body can be sealed: id → role, group and public keys."""

    def __init__(self, members: list[Member] | None = None, serial: int = 1) -> None:
        self.serial = serial
        self._members: dict[str, Member] = {}
        for m in members or []:
            self.add(m)

    def add(self, m: Member) -> None:
        check_id(m.id)
        if m.role is Role.AGENT and not m.group:
            raise ValueError(f"agent {m.id} needs an aggregator (group)")
        if m.group:
            check_id(m.group, "aggregator")
        self._members[m.id] = m

    def enroll(self, identity: Identity, group: str | None = None) -> None:
        self.add(Member.of(identity, group))

    def remove(self, id: str) -> None:
        self._members.pop(id, None)

    def replace(self, other: Roster) -> None:
        """Take a newer roster's members in place (every holder of this object sees them)."""
        self.serial, self._members = other.serial, dict(other._members)

    def get(self, id: str) -> Member | None:
        return self._members.get(id)

    def public_key(self, id: str) -> Ed25519PublicKey | None:
        m = self._members.get(id)
        return m.public_key if m else None

    def seal_key(self, id: str) -> X25519PublicKey | None:
        m = self._members.get(id)
        return m.seal_key if m else None

    def group(self, aggregator: str) -> list[str]:
        """The agents enrolled under `aggregator`, sorted."""
        return sorted(
            m.id for m in self._members.values() if m.role is Role.AGENT and m.group == aggregator
        )

    def check_member(self, identity: Identity, where: str = "the roster") -> None:
        """ValueError unless `identity` is enrolled under its role with exactly its keys."""
        m = self._members.get(identity.id)
        if m is None or m.role is not identity.role:
            raise ValueError(f"{identity.id} is not enrolled as {identity.role.value} in "
                             f"{where} (hfl pki issue PKI {identity.id} --role "
                             f"{identity.role.value})")
        if (m.public_key.public_bytes_raw() != identity.public_key.public_bytes_raw()
                or m.seal_key.public_bytes_raw() != identity.seal_public.public_bytes_raw()):
            raise ValueError(f"the keys of {identity.id} do not match its keys in {where}")

    def by_role(self, role: Role) -> list[str]:
        return sorted(m.id for m in self._members.values() if m.role is role)

    def members(self) -> list[Member]:
        return sorted(self._members.values(), key=lambda m: m.id)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, id: object) -> bool:
        return id in self._members

    def to_doc(self) -> dict[str, Any]:
        return {"version": ROSTER_VERSION, "serial": self.serial,
                "members": [m.to_doc() for m in self.members()]}

    @classmethod
    def from_doc(cls, doc: Any) -> Roster:
        """Parse a roster document; anything malformed is a ValueError saying what."""
        try:
            if doc.get("version") != ROSTER_VERSION or not isinstance(doc.get("members"), list):
                raise ValueError(f"expected {{'version': {ROSTER_VERSION}, 'serial': n, "
                                 "'members': [...]}")
            serial = doc.get("serial")
            if not isinstance(serial, int) or isinstance(serial, bool) or serial < 1:
                raise ValueError("serial must be a positive integer")
            return cls([Member.from_doc(r) for r in doc["members"]], serial)
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"malformed roster: {e}") from None
