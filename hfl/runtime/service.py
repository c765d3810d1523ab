"""Running one node as a long-lived service, under systemd or not.

`serve()` is what `hfl-agent run`, `hfl-aggregator run` and `hfl-coordinator run` end in:

- READY=1 once the node is connected, its subscriptions granted and its status online;
- STATUS= whenever its job, round or stage changes (read off its actions: hfl.runtime.activity),
  and the same in the journal fields of every log line;
- WATCHDOG=1 from the loop thread at half the watchdog interval: a loop stuck in a handler
  stops pinging and systemd restarts the service (training pings per batch: `Node.alive`);
- on SIGTERM or SIGINT: STOPPING=1 at once, then a clean exit: status "offline" retained,
  DISCONNECT (so the broker's Last Will, "lost", is not published), exit code 0.
"""

from __future__ import annotations

import fcntl
import logging
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from hfl.config import MetricsSection
from hfl.runtime import activity
from hfl.runtime.activity import Activity, journal_fields
from hfl.runtime.node import Machine, Node, Stopped
from hfl.runtime.sdnotify import Notifier
from hfl.runtime.telemetry import instrument
from hfl.wire.messages import Role

log = logging.getLogger("hfl.runtime.service")


class AlreadyServed(OSError):
    """Another process holds the identity's device folder."""


def claim(device_dir: Path) -> int:
    """Hold an exclusive lock on the device folder (the descriptor returned) for the life
    of the process: one connection per identity on a board, since the broker takes the
    client id from the certificate and a second connection would take over the first.
    `AlreadyServed` when another process holds it; OSError when it cannot be opened."""
    fd = os.open(device_dir, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise AlreadyServed(f"another process is connected as the identity in {device_dir} "
                            "(its service, or hfl agent check probing the broker)") from None
    return fd


def serve(node: Node, machine: Machine, *, timeout: float = 30.0,
          device_dir: Path | None = None, notifier: Notifier | None = None,
          metrics: MetricsSection | None = None) -> int:
    """Connect, serve until SIGTERM or SIGINT, leave cleanly; returns the exit code.

    The node publishes its telemetry (hfl.runtime.telemetry) and, with `metrics.port`, serves
    Prometheus metrics. Signal handlers are installed only on the main thread (tests serve
    from others and stop through `node.stop_event`)."""
    sd = notifier or Notifier.from_env()
    who = node.identity.who
    metrics = metrics or MetricsSection()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        log.warning("%s runs as root: give the service its own user (User= in the unit)", who)
    if device_dir is not None:
        try:
            claim(device_dir)  # held until the process exits
        except OSError as e:
            log.error("%s", e)
            return 1
    telemetry, machine = instrument(node, machine, metrics.telemetry_s)
    endpoint = None
    if metrics.port is not None:
        from hfl.runtime.metrics import serve_metrics

        try:
            endpoint = serve_metrics(telemetry, metrics.host, metrics.port)
        except OSError as e:
            log.error("%s: metrics endpoint %s:%d: %s", who, metrics.host, metrics.port, e)
            return 1
        log.info("%s: Prometheus metrics on http://%s:%d/metrics", who, metrics.host,
                 endpoint.port)
    try:
        return _serve(node, machine, sd, who, timeout)
    finally:
        if endpoint is not None:
            endpoint.close()


def _serve(node: Node, machine: Machine, sd: Notifier, who: str, timeout: float) -> int:
    signalled = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("%s: signal %d, stopping", who, signum)
        if not signalled.is_set():
            sd.stopping()  # at once: systemd then knows a slow step is a stop, not a hang
        signalled.set()
        node.stop_event.set()

    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
    track_activity(node, sd)
    node.heartbeat = sd.beat
    try:
        node.start(timeout)
    except (ConnectionError, Stopped) as e:
        node.session.stop()
        if isinstance(e, Stopped):
            return 0  # asked to stop before we were up
        log.error("%s", e)
        return 1
    sd.ready()
    log.info("%s serving", who)
    try:
        tick = 0.2 if sd.watchdog is None else min(0.2, sd.watchdog / 4)
        node.run(machine, tick)
    finally:
        if not signalled.is_set():
            sd.stopping()
        node.stop()
        sd.close()
    log.info("%s stopped", who)
    return 0


def track_activity(node: Node, sd: Notifier) -> None:
    """Keep systemd's status line and the journal fields on what the node is doing."""
    ident = node.identity
    agg = ident.id if ident.role is Role.AGGREGATOR else node.group
    state = Activity(ident.role.value, ident.id, agg)

    def publish(a: Activity) -> None:
        activity.context.fields = journal_fields(a)
        sd.status(a.status)

    def observe(action: object) -> None:
        nonlocal state
        new = state.after(action)
        if new != state:
            publish(new)
            state = new

    publish(state)
    node.observers.append(observe)
