"""Keeping every node's roster current: revocation takes effect without a restart.

The operator re-issues the CA-signed roster (`hfl pki revoke`) and installs it on the
coordinator; the coordinator notices the file changed and publishes it, retained, on the
roster topic; every node verifies the CA's signature and takes it if its serial is newer.
A roster that does not verify, or an older one replayed, changes nothing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hfl.crypto.identity import Roster
from hfl.crypto.pki import verify_roster
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.wire.messages import Kind
from hfl.wire.topics import Topics

if TYPE_CHECKING:
    from cryptography import x509

    from hfl.wire.envelope import Envelope

log = logging.getLogger("hfl.roster")

POLL_S = 5.0
MAX_ROSTER = 16 << 20


class RosterFeed:
    def __init__(self, roster: Roster, ca: x509.Certificate, topics: Topics,
                 path: Path | None = None, publish: bool = False) -> None:
        self.roster, self.ca, self.topics = roster, ca, topics
        self.path, self.publish = path, publish
        self._mtime: float | None = None
        self._next_poll = 0.0

    def take(self, data: bytes, where: str) -> bool:
        """Adopt the signed roster `data` if it verifies and is newer; True if adopted."""
        try:
            new = verify_roster(data, self.ca)
        except ValueError as e:
            raise Rejected("bad-roster", str(e)[:200]) from None
        if new.serial <= self.roster.serial:
            return False
        log.info("roster serial %d → %d from %s (%d members)", self.roster.serial, new.serial,
                 where, len(new))
        self.roster.replace(new)
        return True

    def on_message(self, env: Envelope) -> None:
        """A roster published on the roster topic (the gate verified who sent it)."""
        data = env.tensors.get("roster")
        if data is None or data.dtype != np.uint8 or data.ndim != 1:
            raise Rejected("bad-shape", "a roster message carries a uint8 vector `roster`")
        if data.size > MAX_ROSTER:
            raise Rejected("too-large", "roster")
        self.take(data.tobytes(), env.sender)

    def poll(self, now: float, force: bool = False) -> list[Send]:
        """Re-read the local roster file when it changed; the coordinator republishes it."""
        if self.path is None or (now < self._next_poll and not force):
            return []
        self._next_poll = now + POLL_S
        try:
            mtime = self.path.stat().st_mtime
            if mtime == self._mtime and not force:
                return []
            self._mtime = mtime
            data = self.path.read_bytes()
            self.take(data, str(self.path))
        except (OSError, Rejected) as e:
            log.error("roster file %s not taken: %s", self.path, e)
            return []
        if not self.publish:
            return []
        return [Send(Kind.ROSTER, self.topics.roster(), "", self.roster.serial, "roster",
                     {"serial": self.roster.serial},
                     {"roster": np.frombuffer(data, np.uint8)}, retain=True)]
