"""Launch a real Mosquitto for the demo, the simulator and the tests.

One broker per run directory, on a port of its own (never the system broker's 1883).
TLS and ACLs come through `extra` config lines, so this stays the one launcher.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

FALLBACK_PATHS = ("/usr/sbin/mosquitto",)
INSTALL_HINT = "install it with `sudo apt-get install mosquitto` (or run `make demo`, which does)"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0


def find_mosquitto() -> str:
    """Path of the mosquitto binary; RuntimeError with an install hint when there is none."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for path in FALLBACK_PATHS:
        if os.access(path, os.X_OK):
            return path
    raise RuntimeError(f"mosquitto not found on PATH or in {', '.join(FALLBACK_PATHS)}: "
                       f"{INSTALL_HINT}")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def mosquitto_config(*, port: int, host: str = "127.0.0.1", persistence_dir: Path | None = None,
                     max_packet_size: int | None = None, user: str | None = None,
                     extra: str = "") -> str:
    """A mosquitto.conf for one listener; `extra` lines (TLS, ACL) go at the end."""
    lines = [
        "per_listener_settings false",
        f"listener {port} {host}",
        "allow_anonymous true",
        # Mosquitto's default of 1000 queued messages per client silently dropped 35-64 % of
        # 10,000 small QoS 1 messages to a slow subscriber: a round must lose nothing.
        "max_queued_messages 100000",
        f"max_queued_bytes {1 << 30}",
        "max_inflight_messages 100",
        "set_tcp_nodelay true",
        "log_dest stderr",
    ]
    if user:
        # Started as root, Mosquitto drops to user `mosquitto`, which cannot write our run dir.
        lines.append(f"user {user}")
    if persistence_dir is not None:
        lines += ["persistence true", f"persistence_location {str(persistence_dir).rstrip('/')}/"]
    else:
        lines.append("persistence false")
    if max_packet_size is not None:
        lines.append(f"max_packet_size {max_packet_size}")
    if extra:
        lines.append(extra.strip())
    return "\n".join(lines) + "\n"


class Broker:
    """A Mosquitto child process; a context manager that starts and stops it."""

    def __init__(self, run_dir: Path | None = None, *, port: int | None = None,
                 persistence: bool = False, max_packet_size: int | None = None,
                 extra: str = "") -> None:
        self._tmp = None if run_dir is not None else tempfile.TemporaryDirectory(prefix="hfl-mq-")
        self.run_dir = Path(run_dir if run_dir is not None else self._tmp.name)  # type: ignore[union-attr]
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.persistence = persistence
        self.max_packet_size = max_packet_size
        self.extra = extra
        self.log_path = self.run_dir / "mosquitto.log"
        self.conf_path = self.run_dir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Broker:
        """Write the config, spawn mosquitto, return once the port accepts connections."""
        if self.running:
            return self
        self.run_dir.mkdir(parents=True, exist_ok=True)
        data_dir = self.run_dir / "data" if self.persistence else None
        if data_dir is not None:
            data_dir.mkdir(exist_ok=True)
        self.conf_path.write_text(mosquitto_config(
            port=self.port, host=self.host, persistence_dir=data_dir,
            max_packet_size=self.max_packet_size, user=pwd.getpwuid(os.geteuid()).pw_name,
            extra=self.extra))
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen([find_mosquitto(), "-c", str(self.conf_path)],
                                          stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        self._wait_listening()
        return self

    def _wait_listening(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._proc.returncode}:\n"
                                   f"{self.log_tail()}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port),
                                                                        timeout=0.2):
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within "
                           f"{START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """Terminate (Mosquitto saves its persistence database on SIGTERM); kill if stuck."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def restart(self) -> None:
        """Stop and start on the same port (sessions survive when `persistence`)."""
        self.stop()
        self.start()

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
