"""Hostile input at the aggregator and the coordinator while a job runs, on the in-memory
network (real envelopes, signatures, gates and machines): every fuzzed message is refused
with a counted reason or counted as a repeat, none raises, the memory held for incomplete
chunked messages stays within its bound, and the job ends with the model it would have
computed anyway. `make faults` sends ≥ 10,000 of them over MQTT to the real services."""

from __future__ import annotations

from collections import Counter

import numpy as np

from fleet.sim.memnet import MemNet
from tests.faults.fuzz import Target, accounted, cases, draw_cases
from tests.test_machines import GROUPS, build, fedavg, request, spec, versions

PER_NODE = 500


def targets(net: MemNet, templates: list[tuple[str, bytes]]) -> dict[str, Target]:
    t, ids = net.topics, {p: net.peers[p].identity for p in net.peers}
    updates = {t.update("site-a", a): ids[a] for a in GROUPS["site-a"]}
    agg = Target(topics=[*updates, t.tasks("site-a"), t.status("agent", "a1")],
                 signers={**updates, t.tasks("site-a"): ids["coord"]},
                 templates=[c for c in templates if "/agg/site-a/updates/" in c[0]],
                 seal_for=ids["site-a"], roster=net.roster)
    coord = Target(topics=[t.app_requests("app"), t.partials("site-a"), t.partials("site-b"),
                           t.status("aggregator", "site-b")],
                   signers={t.app_requests("app"): ids["app"],
                            t.partials("site-b"): ids["site-b"]},
                   templates=[c for c in templates if "/coord/partials/" in c[0]],
                   seal_for=ids["coord"], roster=net.roster)
    return {"site-a": agg, "coord": coord}


def tally(net: MemNet, peer: str) -> dict:
    gate = net.peers[peer].gate
    held, held_bytes = gate.pending
    return {"gate": dict(gate.counters), "rejected": dict(gate.rejections),
            "pending": {"messages": held, "bytes": held_bytes}}


def test_fuzzed_messages_during_a_job_are_each_refused_and_counted() -> None:
    captured: list[tuple[str, bytes]] = []
    first = build(fault=lambda topic, data: captured.append((topic, data)) or [data])
    request(first, spec(rounds=1))  # genuine messages, to mangle

    pending: list[tuple[str, bytes]] = []
    net = build(fault=lambda topic, data: [data])
    # The job runs on site-a only: site-b's signed partials come from a member it excludes.
    tgt = targets(net, captured)
    fuzz = {name: draw_cases(cases(t), PER_NODE, seed=i) for i, (name, t) in
            enumerate(sorted(tgt.items()))}
    for name in fuzz:
        pending += fuzz[name]
    # Half arrive before the job starts, the rest in between its messages.
    early, late = pending[::2], pending[1::2]
    for topic, data in early:
        net.queue.append((topic, data))

    def interleave(topic: str, data: bytes) -> list[bytes]:
        for _ in range(10):
            if late:
                net.queue.append(late.pop())
        return [data]

    net.fault = interleave
    request(net, spec(aggregators=["site-a"], rounds=3))
    while late:  # whatever is left, after the job
        net.queue.append(late.pop())
    net.run()

    everyone = GROUPS["site-a"]
    vs = versions(net)
    assert [v.version for v in vs] == [1, 2, 3]
    np.testing.assert_allclose(vs[-1].params, 3 * fedavg(everyone), rtol=1e-6)
    for name in ("site-a", "coord"):
        t = tally(net, name)
        assert accounted(t) == PER_NODE, (name, t)
        gate = net.peers[name].gate
        assert gate.pending[1] <= gate._reassembler.max_pending_bytes
    reasons = Counter()
    for name in ("site-a", "coord"):
        reasons.update(tally(net, name)["rejected"])
    # The fuzz reached every layer: framing, signatures, routing and both machines.
    for reason in ("malformed", "bad-signature", "malformed-chunk", "wrong-topic",
                   "stale-round", "bad-request"):
        assert reasons[reason] > 0, reasons
