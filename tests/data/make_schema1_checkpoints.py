"""Writes checkpoints_schema1.{json,npz}: the aggregator's and the coordinator's records as the
code before the declared checkpoint codec (`hfl.runtime.record`) wrote them, with no "schema"
key (schema 1), taken from real jobs on the in-memory network. Run once, from the repository
root, on that code (commit 8842a49): `python -m tests.data.make_schema1_checkpoints`.
tests/test_record.py restores them with today's code."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests import test_dp_rounds as dp
from tests.test_machines import build, request, spec

HERE = Path(__file__).parent


class Snap:
    """Wraps a machine: after each event, the records of its jobs as `record` builds them."""

    def __init__(self, machine, keys) -> None:
        self.machine, self.keys = machine, keys
        self.seen: list[dict] = []

    def handle(self, env, route, now):
        out = self.machine.handle(env, route, now)
        self._snap()
        return out

    def tick(self, now):
        out = self.machine.tick(now)
        self._snap()
        return out

    def _snap(self) -> None:
        recs = {}
        for job in self.machine.jobs:
            for k in self.keys:
                rec = self.machine.record(f"{k}/{job}")
                if rec is not None:
                    doc, arrays = rec
                    recs[f"{k}/{job}"] = (json.loads(json.dumps(doc)),
                                          {n: np.array(a) for n, a in arrays.items()})
        self.seen.append(recs)


def first(snaps: list[dict], test) -> dict:
    return next(s for s in snaps if s and test(s))


def main() -> None:
    picked: dict[str, dict] = {}
    # Plain FedAvg with server momentum, 2 blocks.
    net = build()
    agg = Snap(net.peers["site-a"].machine, ["job", "round"])
    coord = Snap(net.peers["coord"].machine, ["job"])
    net.peers["site-a"].machine, net.peers["coord"].machine = agg, coord
    request(net, spec(rounds=2, server_momentum=0.5))
    picked["agg-collecting"] = first(agg.seen, lambda s: "round/r1-m" in s and s[
        "round/r1-m"][0]["senders"])
    picked["agg-partial"] = first(agg.seen, lambda s: s["job/r1-m"][0]["partial"] is not None)
    picked["coord-acc"] = first(coord.seen, lambda s: s["job/r1-m"][0]["acc"] is not None)
    picked["coord-done"] = coord.seen[-1]
    # DP, adaptive clipping, edge noise: the ledger, the clip bound and the releases.
    net = build(trainer=dp.trainer(1.0), groups=dp.GROUPS)
    agg = Snap(net.peers["site-a"].machine, ["job", "round"])
    coord = Snap(net.peers["coord"].machine, ["job"])
    net.peers["site-a"].machine, net.peers["coord"].machine = agg, coord
    request(net, dp.spec(False, noise_multiplier=0.2, clip=0.5, adaptive=True, clip_lr=0.5,
                         epsilon=1e4).model_copy(update={"rounds": 2}))
    picked["dp-agg-partial"] = first(agg.seen, lambda s: s["job/r1-m"][0]["partial"] is not None
                                     and s["job/r1-m"][0]["releases"])
    picked["dp-coord-ledger"] = first(coord.seen, lambda s: s["job/r1-m"][0]["acc"] is not None
                                      and s["job/r1-m"][0]["ledger"] is not None)
    docs: dict = {}
    arrays: dict[str, np.ndarray] = {}
    for label, recs in picked.items():
        docs[label] = {}
        for key, (doc, arrs) in recs.items():
            names = {}
            for n, a in arrs.items():
                names[n] = f"a{len(arrays)}"
                arrays[names[n]] = a
            docs[label][key] = {"doc": doc, "arrays": names}
    (HERE / "checkpoints_schema1.json").write_text(json.dumps(docs, indent=1, sort_keys=True))
    np.savez(HERE / "checkpoints_schema1.npz", **arrays)


if __name__ == "__main__":
    main()
