"""Launch a real Mosquitto for the demo, the simulator and the tests.

One broker per run directory, on a port of its own (never the system broker's 1883):
plain TCP, or TLS with client certificates from the fleet CA and the roster's ACL
(`BrokerTls`). `hfl pki broker-config` writes a production config with the same function.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from fleet.ops.acl import acl, listener_tls
from hfl.crypto.identity import write_private
from hfl.crypto.pki import BROKER, Pki, uncovered_hosts
from hfl.runtime.mqtt import packet_bound
from hfl.wire.topics import Topics

FALLBACK_PATHS = ("/usr/sbin/mosquitto",)
INSTALL_HINT = "install it with `sudo apt-get install mosquitto` (or run `make demo`, which does)"
START_TIMEOUT = 5.0
STOP_TIMEOUT = 5.0
RELOAD_TIMEOUT = 5.0
RELOADING = "Reloading config."  # what Mosquitto logs on SIGHUP
LOCAL_HOSTS = ("127.0.0.1", "localhost")
# Every hfl packet is a chunk of at most max_payload (256 KiB) plus headers: a larger one is
# a peer's mistake or attack, which the broker refuses (it disconnects the sender) before it
# holds it or hands it to a subscriber (a 255 MB publish took Mosquitto to 1,078 MiB and an
# aggregator to 1,143 MiB without a limit).
MAX_PACKET_SIZE = packet_bound()
MIN_PACKET_SIZE = packet_bound(4096)  # for the smallest max_payload a service accepts
# Seconds between saves of Mosquitto's persistence database (autosave_interval; 0: only on a
# clean stop, which lost every session and queued message to a kill -9 or a power cut). It
# saves once `now > last + interval` in whole seconds, so 1 loses at most the last ~2 s. Each
# save rewrites the whole database (docs/reliability.md has what that costs).
AUTOSAVE_S = 1


@dataclass(frozen=True)
class BrokerTls:
    """The broker's security files: its certificate and key, the fleet CA that client
    certificates must chain to, the ACL and the CRL."""

    ca: Path
    cert: Path
    key: Path
    acl_file: Path
    crl: Path | None = None

    @classmethod
    def from_pki(cls, pki: Pki, name: str, dir: Path, topics: Topics,
                 hosts: Sequence[str] = LOCAL_HOSTS) -> BrokerTls:
        """Write ca.crt, crl.pem, acl, {name}.crt and {name}.tls.key (0600) into `dir`,
        issuing the broker's certificate for `hosts` when it has none. Run it again after
        `Pki.revoke`, then `Broker.reload()`, to apply a revocation."""
        current = {i.id: i for i in pki.issued()}.get(name)
        if current is None or current.revoked:
            pki.issue_broker(name, hosts)
        elif current.role != BROKER:
            raise ValueError(f"{name} is issued as a {current.role}, not a broker: pick another "
                             "broker name")
        files = pki.device(name)
        missing = uncovered_hosts(pki.cert(name), hosts)
        if missing:
            raise ValueError(f"the certificate of broker {name} does not cover "
                             f"{', '.join(missing)}: re-issue it with hfl pki issue {pki.root} "
                             f"{name} --role broker --force --host ... (every host)")
        dir = Path(dir)
        dir.mkdir(parents=True, exist_ok=True)
        crl = dir / "crl.pem"
        tls = cls(dir / "ca.crt", dir / f"{name}.crt", dir / f"{name}.tls.key", dir / "acl", crl)
        _copy(pki.ca_path, tls.ca)
        _copy(files.cert, tls.cert)
        write_private(tls.key, files.tls_key.read_bytes())
        tls.acl_file.write_text(acl(pki.roster(), topics))
        _copy(pki.crl_path, crl)
        return tls

    def under(self, dir: Path) -> BrokerTls:
        """The same files installed in `dir` (where Ansible puts them on the broker host)."""
        dir = Path(dir)
        return BrokerTls(dir / self.ca.name, dir / self.cert.name, dir / self.key.name,
                         dir / self.acl_file.name, dir / self.crl.name if self.crl else None)


def _copy(src: Path, dst: Path) -> None:
    dst.write_bytes(src.read_bytes())


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
                     max_packet_size: int | None = MAX_PACKET_SIZE, autosave_s: int = AUTOSAVE_S,
                     user: str | None = None, tls: BrokerTls | None = None,
                     extra: str = "") -> str:
    """A mosquitto.conf for one listener: TLS with client certificates and the ACL when `tls`
    is given, else plain and anonymous. `max_packet_size` None: Mosquitto's own (no limit).
    `extra` lines go at the end."""
    if tls is None:
        listener = [f"listener {port} {host}", "allow_anonymous true"]
    else:
        listener = listener_tls(port, host, tls.ca, tls.cert, tls.key, tls.acl_file,
                                tls.crl).splitlines()
    lines = [
        "per_listener_settings false",
        *listener,
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
        lines += ["persistence true", f"persistence_location {str(persistence_dir).rstrip('/')}/",
                  "autosave_on_changes false", f"autosave_interval {autosave_s}"]
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
                 persistence: bool = False, max_packet_size: int | None = MAX_PACKET_SIZE,
                 autosave_s: int = AUTOSAVE_S, tls: BrokerTls | None = None,
                 extra: str = "") -> None:
        self._tmp = None if run_dir is not None else tempfile.TemporaryDirectory(prefix="hfl-mq-")
        self.run_dir = Path(run_dir if run_dir is not None else self._tmp.name)  # type: ignore[union-attr]
        self.host = "127.0.0.1"
        self.port = port or free_port(self.host)
        self.persistence = persistence
        self.max_packet_size = max_packet_size
        self.autosave_s = autosave_s
        self.tls = tls
        self.extra = extra
        self.log_path = self.run_dir / "mosquitto.log"
        self.conf_path = self.run_dir / "mosquitto.conf"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The mosquitto process's id while it runs (to read its CPU time and memory)."""
        return self._proc.pid if self.running else None  # type: ignore[union-attr]

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
            max_packet_size=self.max_packet_size, autosave_s=self.autosave_s,
            user=pwd.getpwuid(os.geteuid()).pw_name,
            tls=self.tls, extra=self.extra))
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

    def kill(self) -> None:
        """kill -9: Mosquitto saves nothing on the way out (only what autosave wrote stays)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()

    def reload(self) -> None:
        """SIGHUP: Mosquitto re-reads the ACL file, the CRL and its own certificate (connected
        clients get the new ACL at once). Returns once the broker has begun reloading: it
        handles no client in between, so whatever the caller does next sees the new files."""
        if not self.running:
            raise RuntimeError("the broker is not running")
        assert self._proc is not None
        offset = self.log_path.stat().st_size
        self._proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + RELOAD_TIMEOUT
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                if RELOADING.encode() in f.read():
                    return
            if time.monotonic() > deadline or not self.running:
                raise RuntimeError(f"mosquitto did not reload within {RELOAD_TIMEOUT:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.01)

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
