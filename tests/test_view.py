"""The operator's view of the fleet, free of I/O: signed status, telemetry and job messages
through a real gate into a FleetView; the snapshot it gives and the tables it renders."""

from __future__ import annotations

import pytest
from rich.console import Console

from fleet.ops.view import FleetView, human_bytes, render, summary
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.runtime.node import encode_send
from hfl.wire.gate import Gate
from hfl.wire.messages import (
    ActivityMeta,
    Counts,
    JobMeta,
    Kind,
    Role,
    RoundTimes,
    StatusMeta,
    TelemetryMeta,
)
from hfl.wire.topics import Topics

T = Topics()
MEMBERS = (("coord", Role.COORDINATOR, None), ("site-a", Role.AGGREGATOR, None),
           ("site-b", Role.AGGREGATOR, None), ("a1", Role.AGENT, "site-a"),
           ("a2", Role.AGENT, "site-a"), ("a3", Role.AGENT, "site-a"),
           ("a4", Role.AGENT, "site-a"), ("b1", Role.AGENT, "site-b"))


class Fleet:
    """Enrolled identities, an observer's gate and its view."""

    def __init__(self) -> None:
        self.roster, self.ids = Roster(), {}
        for id_, role, group in MEMBERS:
            self.ids[id_] = Identity.generate(id_, role)
            self.roster.enroll(self.ids[id_], group)
        self.gate = Gate(self.roster, T)
        self.view = FleetView(self.roster)

    def deliver(self, sender: str, send: Send, now: float = 1000.0) -> None:
        accepted = self.gate.accept(send.topic, encode_send(send, self.ids[sender], self.roster,
                                                            now=now), now)
        assert accepted is not None, dict(self.gate.rejections)
        self.view.apply(*accepted)

    def status(self, id_: str, state: str) -> None:
        role = self.ids[id_].role.value
        self.deliver(id_, Send(Kind.STATUS, T.status(role, id_), "", 0, state,
                               StatusMeta(state=state).model_dump(mode="json"), retain=True))

    def telemetry(self, id_: str, now: float = 1000.0, **kw) -> None:
        counts = dict.fromkeys(Counts.model_fields, 0) | kw.pop("counts", {})
        meta = TelemetryMeta(uptime_s=60, activity=ActivityMeta(**kw.pop("activity", {})),
                             counts=Counts(**counts), round_s=RoundTimes(**kw.pop("round_s", {})),
                             **kw)
        role = self.ids[id_].role.value
        self.deliver(id_, Send(Kind.TELEMETRY, T.telemetry(role, id_), "", 0, "telemetry",
                               meta.model_dump(mode="json"), retain=True), now)

    def job(self, version: int, state: str = "running", epsilon: float | None = None) -> None:
        history = [{"version": v, "eval_samples": 5, "eval_loss": 1.0,
                    "eval_metrics": {"accuracy": 0.5 + v / 10}} for v in range(1, version + 1)]
        meta = JobMeta(job="r1-m", app="app", model="m", state=state, version=version,
                       rounds=5, epsilon=epsilon, history=history)
        self.deliver("coord", Send(Kind.JOB, T.job("r1-m"), "r1-m", version, state,
                                   meta.model_dump(mode="json"), retain=True))


def test_who_is_online_offline_lost_or_never_seen() -> None:
    f = Fleet()
    for id_, state in (("coord", "online"), ("site-a", "online"), ("site-b", "lost"),
                       ("a1", "online"), ("a2", "offline"), ("a3", "online"), ("a3", "lost"),
                       ("b1", "online")):
        f.status(id_, state)
    snap = f.view.snapshot(1010.0)
    aggs = {a["id"]: a for a in snap["aggregators"]}
    assert aggs["site-a"]["state"] == "online" and aggs["site-b"]["state"] == "lost"
    assert aggs["site-a"]["agents"] == {"enrolled": 4, "online": 1, "offline": 1, "lost": 1,
                                        "unknown": 1}
    assert aggs["site-b"]["agents"] == {"enrolled": 1, "online": 1, "offline": 0, "lost": 0,
                                        "unknown": 0}
    assert [c["state"] for c in snap["coordinators"]] == ["online"]
    assert {a["id"]: a["group"] for a in snap["agents"]}["a4"] == "site-a"
    assert summary(snap).plain == ("coordinator coord online · aggregators 1/2 online · agents "
                                   "2/5 online (1 offline, 1 lost, 1 never seen) · roster "
                                   "serial 1")


def test_telemetry_rejections_and_jobs_in_the_snapshot() -> None:
    f = Fleet()
    f.telemetry("site-a", now=995.0, activity={"job": "r1-m", "block": 2, "round": 9,
                                               "stage": "masked"},
                counts={"rounds": 9, "updates": 27, "bytes_in": 3 << 20},
                round_s={"count": 9, "total_s": 18.0, "last_s": 1.5},
                rejections={"bad-signature": 2})
    f.telemetry("site-b", counts={"checkpoint_errors": 2})
    f.telemetry("a1", rejections={"bad-origin": 1})
    f.telemetry("coord", epsilon={"r1-m": 3.5})
    f.job(2, epsilon=3.5)
    f.job(3, epsilon=4.0)
    f.job(2, epsilon=3.5)  # a late copy of an older state changes nothing
    snap = f.view.snapshot(1000.0)
    site_a = next(a for a in snap["aggregators"] if a["id"] == "site-a")
    assert site_a["activity"] == {"job": "r1-m", "block": 2, "round": 9, "stage": "masked"}
    assert (site_a["counts"]["updates"], site_a["seen_s"]) == (27, 5.0)
    assert snap["rejections"] == {"bad-origin": {"a1": 1}, "bad-signature": {"site-a": 2}}
    (job,) = snap["jobs"]
    assert (job["version"], job["epsilon"], job["evaluation"]) == (3, 4.0,
                                                                  "loss 1, accuracy 0.8")
    assert snap["coordinators"][0]["epsilon"] == {"r1-m": 3.5}
    site_b = next(a for a in snap["aggregators"] if a["id"] == "site-b")
    assert site_b["counts"]["checkpoint_errors"] == 2 and site_b["state"] == "unknown"

    snap["refused"] = {"wrong-sender": 1}  # what the observer's own gate refused (Watch)
    console = Console(record=True, width=220)
    console.print(render(snap, agents=True))
    text = console.export_text()
    for expected in ("r1-m", "3/5", "4.00", "accuracy 0.8", "masked", "1.5 / 2.0",
                     "3.0 MiB", "5 s ago", "no telemetry", "bad-signature", "site-a 2",
                     "checkpoint errors 2",
                     "never seen", "agents", "this observer refused: wrong-sender 1"):
        assert expected in text, expected


def test_a_message_the_view_does_not_watch_is_refused() -> None:
    f = Fleet()
    send = Send(Kind.MODEL, T.model("m"), "r1-m", 1, "model", {}, retain=True)
    env, route = f.gate.accept(send.topic, encode_send(send, f.ids["coord"], f.roster), 1.0)
    with pytest.raises(Rejected, match="unexpected-type"):
        f.view.apply(env, route)
    bad = Send(Kind.STATUS, T.status("agent", "a1"), "", 0, "online", {"state": "asleep"},
               retain=True)
    env, route = f.gate.accept(bad.topic, encode_send(bad, f.ids["a1"], f.roster), 1.0)
    with pytest.raises(Rejected, match="bad-meta"):
        f.view.apply(env, route)


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (0, 1023, 1024, 5 << 20, 3 << 40)] == [
        "0 B", "1023 B", "1.0 KiB", "5.0 MiB", "3072.0 GiB"]


# ---------------------------------------------------------------- what is wrong, said


def _render(snap: dict, agents: bool = False) -> str:
    console = Console(record=True, width=400)
    console.print(render(snap, agents=agents))
    return console.export_text()


def test_an_online_node_whose_telemetry_is_too_old_is_stale_not_online() -> None:
    f = Fleet()
    for id_ in ("coord", "site-a", "site-b", "a1"):
        f.status(id_, "online")
    f.telemetry("coord", now=972.0, every_s=5.0)  # 28 s old at 1000: > 3 × 5 s
    f.telemetry("site-a", now=990.0, every_s=5.0)  # 10 s old: within 15 s
    f.telemetry("site-b", now=900.0)  # an older service, no period: cannot be judged
    f.telemetry("a1", now=900.0, every_s=60.0)  # an agent's period: 100 s < 180 s
    snap = f.view.snapshot(1000.0)
    coord, (site_a, site_b) = snap["coordinators"][0], snap["aggregators"]
    assert (coord["stale"], coord["seen_s"], coord["state"]) == (True, 28.0, "online")
    assert not site_a["stale"] and not site_b["stale"]
    assert not snap["agents"][0]["stale"]
    assert not f.view.snapshot(986.0)["coordinators"][0]["stale"]  # 14 s: not yet
    # Offline or lost nodes' telemetry is old by nature: their state says it all.
    f.status("coord", "lost")
    assert not f.view.snapshot(1000.0)["coordinators"][0]["stale"]
    f.status("coord", "online")
    text = _render(f.view.snapshot(1000.0))
    assert "coordinator coord stale (28 s)" in text
    assert "aggregators 2/2 online" in text
    f.telemetry("site-a", now=900.0, every_s=5.0)  # a late copy of an older message: ignored
    assert f.view.snapshot(1000.0)["aggregators"][0]["seen_s"] == 10.0
    assert "aggregators 1/2 online (1 stale)" in _render(f.view.snapshot(1010.0))


def test_a_failing_site_says_why_and_since_when_and_jobs_name_the_sites_missing() -> None:
    f = Fleet()
    for id_ in ("coord", "site-a", "site-b"):
        f.status(id_, "online")
    why = "secure group too small: 2 agents available, secure aggregation needs n >= 3"
    f.telemetry("site-a", now=999.0, every_s=5.0,
                failing={"reason": why, "since": 700.0, "count": 13, "job": "r1-m"},
                counts={"failures": 13})
    f.telemetry("site-b", now=999.0, every_s=5.0)
    rows = [{"version": v, "missing": {"site-a": why}} for v in (1, 2)]
    meta = JobMeta(job="r1-m", app="app", model="m", state="running", version=2, rounds=5,
                   history=rows)
    f.deliver("coord", Send(Kind.JOB, T.job("r1-m"), "r1-m", 2, "running",
                            meta.model_dump(mode="json"), retain=True))
    snap = f.view.snapshot(1000.0)
    site_a, site_b = snap["aggregators"]
    assert site_a["failing"] == {"reason": why, "since": 700.0, "count": 13, "job": "r1-m",
                                 "job_state": "running"}
    assert site_a["problems"] == [f"blocks failing for 5 min (13 in a row, job r1-m): {why}"]
    assert site_a["missing"] == [{"job": "r1-m", "version": 2, "reason": why}]
    assert site_b["problems"] == [] and site_b["missing"] == []
    assert snap["jobs"][0]["missing"] == {"site-a": why}
    text = _render(snap)
    assert f"site-a: {why}" in text  # the jobs table's missing sites
    assert "blocks failing for 5 min (13 in a row, job r1-m)" in text
    assert "aggregators 2/2 online (1 failing)" in text
    # Its own telemetry silent on it (an older aggregator, or none at all): the job says so.
    f.telemetry("site-a", now=999.5, every_s=5.0)
    (site_a, _) = f.view.snapshot(1000.0)["aggregators"]
    assert site_a["problems"] == [f"missing from r1-m v2: {why}"]
    # A job that ended keeps its rows (jobs table) but no longer marks the site as missing;
    # the site's own failing streak is told as what it was, not as failing now.
    f.deliver("coord", Send(Kind.JOB, T.job("r1-m"), "r1-m", 2, "done", meta.model_copy(
        update={"state": "done"}).model_dump(mode="json"), retain=True))
    snap = f.view.snapshot(1000.0)
    assert snap["aggregators"][0]["problems"] == [] and snap["jobs"][0]["missing"]
    f.telemetry("site-a", now=999.7, every_s=5.0,
                failing={"reason": why, "since": 700.0, "count": 13, "job": "r1-m"})
    snap = f.view.snapshot(1000.0)
    assert snap["aggregators"][0]["problems"] == [
        f"its last 13 blocks failed (job r1-m, now done): {why}"]
    assert "aggregators 2/2 online ·" in _render(snap)


def test_failing_saves_and_restarts_are_shown_for_what_they_are() -> None:
    f = Fleet()
    f.status("coord", "online")
    f.telemetry("coord", now=999.0, every_s=5.0, counts={"checkpoint_errors": 28},
                saves_failing={"reason": "cannot write the state in /s: database or disk "
                               "is full", "since": 972.0, "count": 28},
                started=900.0, restarts=2)
    snap = f.view.snapshot(1000.0)
    (coord,) = snap["coordinators"]
    assert coord["problems"] == [
        "state saves failing for 28 s (28 tries): cannot write the state in /s: database or "
        "disk is full", "checkpoint errors 28"]
    assert (coord["restarts"], coord["started"]) == (2, 900.0)
    assert coord["restarted"] == "restarted 1 min ago (start 3): counters from then"
    text = _render(snap)
    assert "state saves failing for 28 s" in text and "start 3" in text
    # A node without a state folder (restarts None) seen starting again while watched.
    f.status("a1", "online")
    f.telemetry("a1", now=999.0, started=900.0, counts={"rounds": 9})
    assert f.view.snapshot(1000.0)["agents"][0]["restarted"] == ""
    f.telemetry("a1", now=1005.0, started=1003.0, counts={"rounds": 0})
    a1 = f.view.snapshot(1010.0)["agents"][0]
    assert a1["resets_seen"] == 1
    assert a1["restarted"] == "restarted 1 min ago (seen restarting): counters from then"


def test_older_and_newer_telemetry_both_read() -> None:
    f = Fleet()
    old = {"uptime_s": 5, "activity": {}, "round_s": {},
           "counts": dict.fromkeys(Counts.model_fields, 0)}
    meta = TelemetryMeta.model_validate(old)  # what a service before these fields sent
    assert (meta.started, meta.restarts, meta.every_s, meta.failing) == (None,) * 4
    newer = {**old, "some_later_field": {"x": 1}, "counts": {**old["counts"], "later": 3}}
    assert TelemetryMeta.model_validate(newer).counts.rounds == 0  # ignored, not refused
    f.status("site-a", "online")
    f.deliver("site-a", Send(Kind.TELEMETRY, T.telemetry("aggregator", "site-a"), "", 0,
                             "telemetry", newer, retain=True))
    site_a = f.view.snapshot(1000.0)["aggregators"][0]
    assert site_a["counts"]["rounds"] == 0 and site_a["problems"] == []
    assert not site_a["stale"] and site_a["restarted"] == ""
