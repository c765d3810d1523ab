"""systemd's notify protocol, without a dependency: one datagram per state change.

A `Type=notify` unit sets `NOTIFY_SOCKET` (a filesystem path, or `@name` for the abstract
namespace) and, with `WatchdogSec=`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Outside systemd
nothing is set and every call is a no-op. A send that fails (systemd restarted its manager,
a full socket buffer) is logged once and never raises: losing one notification must not
take a service down; losing all of them is what the watchdog is for.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("hfl.runtime.sdnotify")


def _address(value: str) -> str | None:
    """The socket address for `value`: a path, or "\\0name" for an abstract `@name`."""
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock:… and relative paths: not for us


def _watchdog_seconds(env: Mapping[str, str], pid: int) -> float | None:
    usec, owner = env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID")
    if not usec:
        return None
    try:
        if owner and int(owner) != pid:
            return None  # meant for the process that started us, not for us
        seconds = int(usec) / 1e6
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r: not integers", usec, owner)
        return None
    return seconds if seconds > 0 else None


class Notifier:
    """Tells the service manager how we are doing; `from_env()` reads systemd's variables."""

    def __init__(self, address: str | None = None, watchdog: float | None = None) -> None:
        self.address = address
        self.watchdog = watchdog  # seconds systemd waits for a ping, or None: no watchdog
        self._sock: socket.socket | None = None
        self._failed = False
        self._last_ping = float("-inf")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, pid: int | None = None) -> Notifier:
        env = os.environ if env is None else env
        pid = os.getpid() if pid is None else pid
        raw = env.get("NOTIFY_SOCKET", "")
        address = _address(raw) if raw else None
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or an abstract @name: not notifying",
                        raw)
        return cls(address, _watchdog_seconds(env, pid) if address else None)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, *assignments: str) -> bool:
        """Send `KEY=value` lines as one datagram; False when not sent (never raises)."""
        if self.address is None:
            return False
        data = "\n".join(assignments).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(data, self.address)
        except OSError as e:
            if not self._failed:  # once: a dead socket would otherwise log every ping
                log.warning("systemd notification to %r failed: %s", self.address, e)
            self._failed = True
            return False
        return True

    def ready(self) -> bool:
        return self.send("READY=1")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """A one-line status for `systemctl status` (newlines would end the field)."""
        return self.send("STATUS=" + " ".join(text.split()))

    def ping(self) -> bool:
        """One watchdog keep-alive; nothing when no watchdog is set for us."""
        return self.watchdog is not None and self.send("WATCHDOG=1")

    def beat(self, now: float | None = None) -> bool:
        """Ping when half the watchdog interval has passed since the last ping: cheap enough
        to call from every loop turn or training batch."""
        if self.watchdog is None:
            return False
        now = time.monotonic() if now is None else now
        if now - self._last_ping < self.watchdog / 2:
            return False
        self._last_ping = now
        return self.ping()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
