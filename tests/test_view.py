"""The operator's view of the fleet, free of I/O: signed status, telemetry and job messages
through a real gate into a FleetView; the snapshot it gives and the tables it renders."""

from __future__ import annotations

import pytest
from rich.console import Console

from fleet.view import FleetView, human_bytes, render, summary
from hfl.actions import Send
from hfl.errors import Rejected
from hfl.gate import Gate
from hfl.identity import Identity, Roster
from hfl.messages import (
    ActivityMeta,
    Counts,
    JobMeta,
    Kind,
    Role,
    RoundTimes,
    StatusMeta,
    TelemetryMeta,
)
from hfl.node import encode_send
from hfl.topics import Topics

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
