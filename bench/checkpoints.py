"""What a durable aggregator writes to its checkpoint store during secure edge rounds.

    .venv/bin/python bench/checkpoints.py             # n ∈ {50, 100, 200}, P = 7,850
    .venv/bin/python bench/checkpoints.py -n 100 400 -P 100000

One group of n agents and its aggregator on the in-memory network (real envelopes, sealing
and SecAgg+ with the automatic degree), the aggregator saved to a real `StateStore` after
every message and tick, as a durable node saves when messages come one at a time (its
worst case: under load it saves once per batch). For a job of one edge round: the bytes the
aggregator received (the baseline: what a log of its inputs would write), the bytes it
wrote to the store (JSON documents and arrays) and their ratio, and the seconds spent
building and writing the records.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.machine import AggregatorMachine  # noqa: E402
from coordinator.machine import CoordinatorMachine, NewVersion  # noqa: E402
from edge_agent.machine import AgentMachine, Train, Update  # noqa: E402
from fleet.sim.memnet import MemNet  # noqa: E402
from hfl.crypto.identity import Identity, Roster  # noqa: E402
from hfl.runtime.actions import Send  # noqa: E402
from hfl.runtime.state import Checkpointer, StateStore  # noqa: E402
from hfl.wire.messages import Kind, Metrics, ModelRequest, ModelSpec, Role  # noqa: E402
from hfl.wire.topics import Topics  # noqa: E402

AGG = "site-a"


class Sink:
    """The app: takes the job's messages and does nothing."""

    def handle(self, env: object, route: object, now: float) -> list:
        return []

    def tick(self, now: float) -> list:
        return []


class Saved:
    """The aggregator machine, saved after every event; counts what went to the store."""

    def __init__(self, machine: AggregatorMachine, store: StateStore) -> None:
        self.machine, self.saver = machine, Checkpointer(machine, store)
        self.written = self.received = 0
        self.seconds = 0.0  # building the records and writing them
        write = store.write

        def counted(records: dict) -> None:
            write(records)
            self.written += sum(len(str(doc)) + sum(a.nbytes for a in arrays.values())
                                for doc, arrays in filter(None, records.values()))

        store.write = counted  # type: ignore[method-assign]

    def _save(self) -> None:
        t = time.perf_counter()
        self.saver.save()
        self.seconds += time.perf_counter() - t

    def handle(self, env, route, now: float) -> list:
        out = self.machine.handle(env, route, now)
        self._save()
        return out

    def tick(self, now: float) -> list:
        out = self.machine.tick(now)
        self._save()
        return out


def one_group(n: int, p: int, store: StateStore) -> tuple[int, int, float]:
    """Bytes received, bytes written and seconds saving in a one-round job."""
    topics, roster = Topics(), Roster()
    ids = {}
    for id_, role, group in [("coord", Role.COORDINATOR, None), ("app", Role.APP, None),
                             (AGG, Role.AGGREGATOR, None),
                             *((f"a{i:03d}", Role.AGENT, AGG) for i in range(n))]:
        ids[id_] = Identity.generate(id_, role)
        roster.enroll(ids[id_], group)
    delta = np.full(p, 1e-3, np.float32)

    def train(agent: str, t: Train) -> Update:
        return Update(delta, Metrics(samples=600))

    net = MemNet(topics, roster, trainer=train, record=False)
    coord = ids["coord"]
    net.add(coord, CoordinatorMachine.of(coord, roster, topics,
                                         lambda s: (s, np.zeros(p, np.float32))),
            topics.coordinator_filters(coord.id))
    net.add(ids["app"], Sink(), topics.app_filters(["m"]))
    agg = Saved(AggregatorMachine(AGG, lambda: roster.group(AGG), topics), store)
    net.add(ids[AGG], agg, topics.aggregator_filters(AGG))
    for a in roster.group(AGG):
        net.add(ids[a], AgentMachine(ids[a], AGG, {"logreg"}, {"d"}, topics, roster),
                topics.agent_filters(AGG, a))
        net.publish(a, Send(Kind.STATUS, topics.status("agent", a), "", 0, "online",
                            {"state": "online", "group": AGG}, retain=True))
    net.run()
    deliver = net._deliver

    def counting(peer, topic: str, payload: bytes) -> None:
        if peer.identity.id == AGG:
            agg.received += len(payload)
        deliver(peer, topic, payload)

    net._deliver = counting  # type: ignore[method-assign]
    spec = ModelSpec(name="m", task="logreg", dataset="d", aggregators=[AGG], rounds=1,
                     min_agents=n, deadline_s=60)
    versions: list[object] = []
    net.handlers[NewVersion] = lambda peer, v: versions.append(v)
    req = ModelRequest(request_id="bench", models=[spec])
    net.publish("app", Send(Kind.REQUEST, topics.app_requests("app"), "", 0, "request",
                            req.model_dump(mode="json")))
    net.run()
    while not versions:
        net.advance(1.0)
    return agg.received, agg.written, agg.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, nargs="+", default=[50, 100, 200], help="group sizes")
    ap.add_argument("-P", type=int, default=7_850, help="parameters (logreg, 10 classes)")
    args = ap.parse_args()
    print(f"## checkpoint writes of a secure edge round ({platform.machine()}, "
          f"{os.cpu_count()} cpus, P = {args.P:,}, saved after every message)\n")
    print("| n | received MiB | written MiB | written ÷ received | save s |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.n:
        with tempfile.TemporaryDirectory(prefix="hfl-ckpt-") as tmp:
            store = StateStore(Path(tmp))
            received, written, seconds = one_group(n, args.P, store)
            store.close()
        print(f"| {n} | {received / 2**20:.2f} | {written / 2**20:.2f} "
              f"| {written / received:.2f} | {seconds:.2f} |", flush=True)


if __name__ == "__main__":
    main()
