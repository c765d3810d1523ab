"""The notify protocol over real datagram sockets: path and abstract, watchdog ownership,
nothing outside systemd, and a dead socket that must not raise."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl.runtime.sdnotify import Notifier


def receive(sock: socket.socket, timeout: float = 2.0) -> str:
    sock.settimeout(timeout)
    return sock.recv(4096).decode()


def nothing_on(sock: socket.socket) -> bool:
    sock.settimeout(0.2)
    try:
        sock.recv(4096)
    except TimeoutError:
        return True
    return False


@pytest.fixture
def path_socket(tmp_path: Path) -> Iterator[tuple[str, socket.socket]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify")
    sock.bind(path)
    yield path, sock
    sock.close()


def test_path_socket_gets_each_state(path_socket) -> None:
    path, sock = path_socket
    sd = Notifier.from_env({"NOTIFY_SOCKET": path})
    assert sd.enabled and sd.watchdog is None
    assert sd.ready() and receive(sock) == "READY=1"
    assert sd.status("agent a1: job j1,\nround 3")  # a newline would end the field
    assert receive(sock) == "STATUS=agent a1: job j1, round 3"
    assert sd.stopping() and receive(sock) == "STOPPING=1"
    assert not sd.ping() and nothing_on(sock)  # no watchdog asked for


def test_abstract_socket() -> None:
    name = f"hfl-test-{os.getpid()}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    try:
        sd = Notifier.from_env({"NOTIFY_SOCKET": "@" + name})
        assert sd.ready()
        assert receive(sock) == "READY=1"
    finally:
        sock.close()


def test_watchdog_for_our_pid_pings_at_half_the_interval(path_socket) -> None:
    path, sock = path_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "4000000", "WATCHDOG_PID": str(os.getpid())}
    sd = Notifier.from_env(env)
    assert sd.watchdog == 4.0
    assert sd.beat(now=100.0) and receive(sock) == "WATCHDOG=1"
    assert not sd.beat(now=101.9)  # less than half of 4 s since the last ping
    assert sd.beat(now=102.0) and receive(sock) == "WATCHDOG=1"
    assert nothing_on(sock)


def test_watchdog_meant_for_another_pid_is_not_ours(path_socket) -> None:
    path, sock = path_socket
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
    sd = Notifier.from_env(env, pid=4242)
    assert sd.watchdog is None
    assert not sd.ping() and not sd.beat()
    assert nothing_on(sock)
    assert sd.ready() and receive(sock) == "READY=1"  # notifications still go


def test_without_notify_socket_everything_is_a_no_op(path_socket) -> None:
    _, sock = path_socket
    sd = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not sd.enabled and sd.watchdog is None
    assert not sd.ready() and not sd.status("x") and not sd.stopping() and not sd.ping()
    assert nothing_on(sock)


@pytest.mark.parametrize("value", ["relative/path", "vsock:2:1234", "@"])
def test_an_address_we_cannot_use_disables_notifications(value: str) -> None:
    sd = Notifier.from_env({"NOTIFY_SOCKET": value})
    assert not sd.enabled and not sd.ready()


def test_a_bad_watchdog_value_is_ignored(path_socket) -> None:
    path, _ = path_socket
    assert Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "soon"}).watchdog is None
    assert Notifier.from_env({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "0"}).watchdog is None


def test_a_send_failure_does_not_raise_and_is_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = tmp_path / "gone"  # nobody listens: every send fails
    sd = Notifier.from_env({"NOTIFY_SOCKET": str(gone), "WATCHDOG_USEC": "1000000",
                            "WATCHDOG_PID": str(os.getpid())})
    with caplog.at_level(logging.WARNING, logger="hfl.runtime.sdnotify"):
        assert not sd.ready()
        assert not sd.ping()
        assert not sd.status("still fine")
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 1
    # The socket comes back (systemd re-executed): notifications flow again.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(gone))
    try:
        assert sd.ready() and receive(sock) == "READY=1"
    finally:
        sock.close()
