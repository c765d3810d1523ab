"""Identities (an Ed25519 signing key per device) and the roster of enrolled senders.

Key files: `{id}.key` (PKCS#8 PEM, mode 0600) and `{id}.pub` (raw public key, base64).
The roster is a JSON file listing every member's id, role, group (an agent's aggregator)
and public key; every role loads it and drops messages from anyone not on it.
"""

from __future__ import annotations

import base64
import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from hfl.messages import Role
from hfl.topics import check_id


def _b64(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def public_from_b64(text: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as e:
        raise ValueError(f"not a base64 Ed25519 public key: {e}") from None


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file created 0600 from the start (no window where it is world-readable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


@dataclass(frozen=True)
class Identity:
    id: str
    role: Role
    key: Ed25519PrivateKey

    @classmethod
    def generate(cls, id: str, role: Role | str) -> Identity:
        return cls(check_id(id), Role(role), Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.key.public_key()

    @property
    def public_b64(self) -> str:
        return _b64(self.public_key)

    def save(self, directory: Path) -> Path:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path = Path(directory) / f"{self.id}.key"
        write_private(path, pem)
        (Path(directory) / f"{self.id}.pub").write_text(self.public_b64 + "\n")
        return path

    @classmethod
    def load(cls, path: Path, id: str, role: Role | str) -> Identity:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"identity key {path} not found (create it: hfl keys init)")
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError(f"{path} is not an Ed25519 private key")
        return cls(check_id(id), Role(role), key)


@dataclass(frozen=True)
class Member:
    id: str
    role: Role
    public_key: Ed25519PublicKey
    group: str | None = None  # an agent's aggregator


class Roster:
    """Who may send: id → role, group and public key."""

    def __init__(self, members: list[Member] | None = None) -> None:
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
        self.add(Member(identity.id, identity.role, identity.public_key, group))

    def remove(self, id: str) -> None:
        self._members.pop(id, None)

    def get(self, id: str) -> Member | None:
        return self._members.get(id)

    def public_key(self, id: str) -> Ed25519PublicKey | None:
        m = self._members.get(id)
        return m.public_key if m else None

    def group(self, aggregator: str) -> list[str]:
        """The agents enrolled under `aggregator`, sorted."""
        return sorted(
            m.id for m in self._members.values() if m.role is Role.AGENT and m.group == aggregator
        )

    def by_role(self, role: Role) -> list[str]:
        return sorted(m.id for m in self._members.values() if m.role is role)

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, id: object) -> bool:
        return id in self._members

    def to_json(self) -> str:
        rows = [
            {"id": m.id, "role": m.role.value, "group": m.group, "ed25519": _b64(m.public_key)}
            for m in sorted(self._members.values(), key=lambda m: m.id)
        ]
        return json.dumps({"version": 1, "members": rows}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> Roster:
        try:
            doc = json.loads(text)
            if doc.get("version") != 1 or not isinstance(doc.get("members"), list):
                raise ValueError("expected {'version': 1, 'members': [...]}")
            return cls([
                Member(r["id"], Role(r["role"]), public_from_b64(r["ed25519"]), r.get("group"))
                for r in doc["members"]
            ])
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise ValueError(f"malformed roster: {e}") from None

    def save(self, path: Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Roster:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"roster {path} not found (create it: hfl keys enroll)")
        return cls.from_json(path.read_text())
