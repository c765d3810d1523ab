"""Test doubles at the two edges the service talks through: a notify socket that records
what systemd would get, and a bare MQTT 5 server that can hold back its SUBACK."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path


class NotifySocket:
    """A real datagram socket in the test's folder; records (monotonic time, line) of each
    notification, in arrival order."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.lines += [(time.monotonic(), line) for line in data.decode().split("\n")]
                self._cond.notify_all()

    def wait_for(self, line: str, timeout: float) -> float | None:
        """When `line` arrived (waiting up to `timeout`), or None."""
        with self._cond:
            self._cond.wait_for(lambda: any(t == line for _, t in self.lines), timeout)
            return next((at for at, t in self.lines if t == line), None)

    def wait_status(self, part: str, timeout: float) -> str | None:
        with self._cond:
            self._cond.wait_for(lambda: self.status(part) is not None, timeout)
            return self.status(part)

    def status(self, part: str) -> str | None:
        return next((t for _, t in self.lines if t.startswith("STATUS=") and part in t), None)

    def times(self, line: str, since: float = 0.0) -> list[float]:
        with self._cond:
            return [at for at, t in self.lines if t == line and at >= since]

    def texts(self) -> list[str]:
        with self._cond:
            return [t for _, t in self.lines]

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = n >> 7, n & 0x7F
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


class HoldingBroker:
    """Just enough MQTT 5 for one client: CONNACK at once, PUBACK and PINGRESP, and a SUBACK
    only when the test calls `grant()` (with `code`: 0x01 granted QoS 1, 0x87 refused)."""

    def __init__(self) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.subscribed = threading.Event()  # a SUBSCRIBE arrived
        self._grant = threading.Event()
        self.code = 0x01
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def grant(self, code: int = 0x01) -> None:
        self.code = code
        self._grant.set()

    def _serve(self) -> None:
        self.server.settimeout(0.1)
        while not self._stop:
            try:
                conn, _ = self.server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                self._session(conn)

    def _read(self, conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError
            data += chunk
        return data

    def _packet(self, conn: socket.socket) -> tuple[int, bytes]:
        first = self._read(conn, 1)[0]
        length, shift = 0, 0
        while True:
            b = self._read(conn, 1)[0]
            length |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
        return first, self._read(conn, length)

    def _session(self, conn: socket.socket) -> None:
        conn.settimeout(0.1)
        while not self._stop:
            try:
                kind, body = self._packet(conn)
            except TimeoutError:
                continue
            except (ConnectionError, OSError):
                return
            if kind >> 4 == 1:  # CONNECT
                conn.sendall(bytes([0x20, 3, 0, 0, 0]))
            elif kind >> 4 == 8:  # SUBSCRIBE: packet id, properties, filters
                pid = body[:2]
                props_len = body[2]  # short in practice: one byte of varint
                rest, filters = body[3 + props_len:], 0
                while rest:
                    n = int.from_bytes(rest[:2], "big")
                    rest, filters = rest[2 + n + 1:], filters + 1
                self.subscribed.set()
                while not self._grant.wait(0.1):
                    if self._stop:
                        return
                payload = pid + b"\x00" + bytes([self.code]) * filters
                conn.sendall(bytes([0x90]) + _varint(len(payload)) + payload)
            elif kind >> 4 == 3 and (kind >> 1) & 3:  # PUBLISH at QoS 1: PUBACK its id
                n = int.from_bytes(body[:2], "big")
                conn.sendall(bytes([0x40, 2]) + body[2 + n:4 + n])
            elif kind >> 4 == 12:  # PINGREQ
                conn.sendall(bytes([0xD0, 0]))
            elif kind >> 4 == 14:  # DISCONNECT
                return

    def close(self) -> None:
        self._stop = True
        self.server.close()
        self._thread.join()
