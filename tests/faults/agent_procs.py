"""Lightweight agents in a process of their own (`python -m tests.faults.agent_procs SPEC`):
paho's network loop uses select(), which takes no file descriptor above 1023, so a storm of
a thousand connections needs a few processes of a few hundred agents each.

SPEC is a JSON file: {"pki": root, "host": h, "port": p, "aggregator": id,
"agents": [[id, step, samples], ...]}. The process prints `ready <seconds>` once every agent
is connected and subscribed, serves until SIGTERM, then leaves cleanly.
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

from hfl.identity import Identity
from hfl.messages import Role
from hfl.mqtt import BrokerSettings
from hfl.pki import Pki
from hfl.topics import Topics
from tests.faults.harness import Agent


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pki = Pki(Path(spec["pki"]))
    ids = [a for a, _, _ in spec["agents"]]
    fleet = SimpleNamespace(
        identities={a: Identity.load(pki.device(a).dir, a, Role.AGENT) for a in ids},
        roster=pki.roster(), topics=Topics(),
        settings=lambda _id: BrokerSettings(host=spec["host"], port=spec["port"]))
    agents = [Agent(fleet, a, spec["aggregator"], step, samples)  # type: ignore[arg-type]
              for a, step, samples in spec["agents"]]
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(Agent.start, agents))
    print(f"ready {time.monotonic() - t0:.3f}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(Agent.stop, agents))


if __name__ == "__main__":
    main(sys.argv[1])
