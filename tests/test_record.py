"""The declared checkpoint codec (`hfl.runtime.record`): the aggregator's and the
coordinator's records from the code before it (schema 1, tests/data/checkpoints_schema1.*,
made by tests/data/make_schema1_checkpoints.py) restore to the same state, and on states from
real jobs dump → load → dump gives back the same record."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from aggregator.machine import AggregatorMachine, EdgeJob
from coordinator.machine import CoordinatorMachine, Job
from hfl.runtime import record as codec
from hfl.runtime.record import SCHEMA, stored, transient
from hfl.wire.messages import ModelSpec
from tests import test_dp_rounds as dp
from tests.test_machines import build, request, spec

DATA = Path(__file__).parent / "data"


def schema1() -> dict[str, dict]:
    docs = json.loads((DATA / "checkpoints_schema1.json").read_text())
    with np.load(DATA / "checkpoints_schema1.npz") as npz:
        arrays = {n: npz[n] for n in npz.files}
    return {label: {key: (r["doc"], {n: arrays[a].copy() for n, a in r["arrays"].items()})
                    for key, r in recs.items()} for label, recs in docs.items()}


def same(a: codec.Record, b: codec.Record) -> None:
    assert a[0] == b[0]
    assert sorted(a[1]) == sorted(b[1])
    for n in a[1]:
        assert a[1][n].dtype == b[1][n].dtype
        np.testing.assert_array_equal(a[1][n], b[1][n])


def machines(net):
    agg = AggregatorMachine("site-a", lambda: net.roster.group("site-a"), net.topics)
    coord = CoordinatorMachine.of(net.peers["coord"].identity, net.roster, net.topics,
                                  lambda s: (s, np.zeros(6, np.float32)))
    return agg, coord


@pytest.mark.parametrize("label", ["agg-collecting", "agg-partial", "dp-agg-partial",
                                   "coord-acc", "coord-done", "dp-coord-ledger"])
def test_a_schema_1_record_restores_to_the_state_it_was_written_from(label: str) -> None:
    records = schema1()[label]
    net = build()
    agg, coord = machines(net)
    machine = agg if label.replace("dp-", "").startswith("agg") else coord
    machine.restore(records)
    for key, (doc, arrays) in records.items():
        # What the new code writes is the old record plus its schema: nothing lost.
        schema = {"schema": SCHEMA} if key.startswith("job/") else {}  # the codec's records
        same(machine.record(key), ({**doc, **schema}, arrays))
    (job,) = machine.jobs.values()
    doc, arrays = records["job/r1-m"]
    assert job.job == "r1-m" and job.spec == ModelSpec.model_validate(doc["spec"])
    np.testing.assert_array_equal(job.params, arrays["params"])
    if machine is agg:
        assert job.partial is None if doc["partial"] is None else (
            job.partial.meta == doc["partial"] and job.partial.to == (job.coordinator,))
        if "partial" in arrays:
            np.testing.assert_array_equal(job.partial.tensors["sum"], arrays["partial"])
        if "round/r1-m" in records:
            assert job.acc is not None and job.senders == set(
                records["round/r1-m"][0]["senders"])
        assert (doc["clip"] is not None) == ("r1-m" in agg.clips)
    else:
        assert job.reported == set(doc["reported"]) and job.best_loss == doc["best_loss"]
        assert (job.acc is None) == (doc["acc"] is None)
        assert (job.budget is None) == (doc["ledger"] is None)
        assert (job.velocity is None) == ("velocity" not in arrays)
        if job.acc is not None:
            assert job.acc.state()[0] == doc["acc"]


def test_the_schema_1_fixture_covers_every_stored_field() -> None:
    """A stored field the fixture lacks would restore to its default unnoticed."""
    for cls, label in ((EdgeJob, "dp-agg-partial"), (Job, "dp-coord-ledger")):
        doc, arrays = schema1()[label]["job/r1-m"]
        how = [(f, f.metadata.get("hfl.record", codec.Stored())) for f in dataclasses.fields(cls)]
        keys = {s.key or f.name for f, s in how if not s.transient}
        assert keys - {"velocity"} <= set(doc) | set(arrays), keys - set(doc) - set(arrays)


class Dumps:
    """Wraps a machine: after each event, its jobs dumped."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.seen: list[codec.Record] = []

    def handle(self, env, route, now):
        return self._dumped(self.machine.handle(env, route, now))

    def tick(self, now):
        return self._dumped(self.machine.tick(now))

    def _dumped(self, out):
        self.seen += [codec.dump(job) for job in self.machine.jobs.values()]
        return out


def states():
    """The states the machines' jobs pass through, plain with momentum and DP."""
    for build_kw, req in (({}, spec(rounds=2, kappa1=2, server_momentum=0.5)),
                          ({"trainer": dp.trainer(1.0), "groups": dp.GROUPS},
                           dp.spec(False, noise_multiplier=0.2, clip=0.5, adaptive=True,
                                   clip_lr=0.5, epsilon=1e4))):
        net = build(**build_kw)
        agg, coord = Dumps(net.peers["site-a"].machine), Dumps(net.peers["coord"].machine)
        net.peers["site-a"].machine, net.peers["coord"].machine = agg, coord
        request(net, req)
        yield agg, coord


def test_dump_load_dump_is_the_identity_on_real_job_states() -> None:
    n = 0
    for agg, coord in states():
        assert any(r[0]["partial"] for r in agg.seen) and any(r[0]["acc"] for r in coord.seen)
        for rec in agg.seen:
            m = agg.machine
            ej = codec.load(EdgeJob, rec, job="r1-m", topics=m.topics, agg_id=m.id)
            same(codec.dump(ej), rec)
            n += 1
        for rec in coord.seen:
            job = codec.load(Job, rec, job="r1-m", group=coord.machine.group)
            same(codec.dump(job), rec)
            n += 1
    assert n > 20


def test_migration_from_schema_1_is_the_identity_and_the_schema_is_checked() -> None:
    doc, arrays = schema1()["coord-done"]["job/r1-m"]
    assert "schema" not in doc
    assert codec.migrate((doc, arrays), codec.MIGRATIONS) == ({**doc, "schema": 2}, arrays)
    with pytest.raises(ValueError, match="schema 3"):
        codec.load(Job, ({**doc, "schema": 3}, arrays), job="j", group=lambda a: [])
    with pytest.raises(ValueError, match="no migration"):
        codec.migrate((doc, arrays), {})


@dataclasses.dataclass
class Toy:
    name: str = dataclasses.field(metadata=transient)
    weights: np.ndarray
    tags: set[str] = dataclasses.field(default_factory=set)
    spec: ModelSpec | None = None
    extra: np.ndarray | None = None
    n: int = dataclasses.field(default=0, metadata=stored("count"))
    twice: int = dataclasses.field(default=0, metadata=stored(
        dump=lambda v: (v // 2, None), load=lambda v, a, obj, ctx: v * 2 + obj.n * 0))
    live: object = dataclasses.field(default=None, metadata=transient)


def test_the_codec_on_a_declared_toy() -> None:
    toy = Toy("t", np.arange(3, dtype=np.float32), {"b", "a", "c"}, spec(), n=4, twice=6,
              live=object())
    doc, arrays = codec.dump(toy)
    assert doc == {"schema": SCHEMA, "tags": ["a", "b", "c"], "count": 4, "twice": 3,
                   "spec": spec().model_dump(mode="json")}
    assert set(arrays) == {"weights"} and arrays["weights"] is toy.weights
    back = codec.load(Toy, (json.loads(json.dumps(doc)), arrays), name="t")
    assert back == dataclasses.replace(toy, live=None)
    # A record from before a field existed leaves its default.
    old = codec.load(Toy, ({"schema": SCHEMA}, arrays), name="u")
    assert old.tags == set() and old.spec is None and old.n == 0
