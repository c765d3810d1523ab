"""Running one node as a long-lived service: signals in, a clean stop out."""

from __future__ import annotations

import logging
import signal
from types import FrameType

from hfl.node import Machine, Node

log = logging.getLogger("hfl.service")


def serve(node: Node, machine: Machine, *, timeout: float = 30.0) -> int:
    """Connect, serve until SIGTERM or SIGINT, leave cleanly; returns the exit code."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("signal %d: stopping", signum)
        node.stop_event.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    try:
        node.start(timeout)
    except ConnectionError as e:
        log.error("%s", e)
        return 1
    log.info("%s %s serving", node.identity.role.value, node.identity.id)
    try:
        node.run(machine)
    finally:
        node.stop()
    return 0
