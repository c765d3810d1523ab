"""What a service says it is doing (systemd's STATUS=, journal fields), read off the actions
of the real machines over the in-memory network; pure, no systemd needed."""

from __future__ import annotations

import logging

import pytest

from fleet.sim.memnet import MemNet
from hfl.runtime.actions import Note, Send
from hfl.runtime.activity import Activity, JournalContext, journal_fields
from hfl.wire.messages import Kind
from hfl.wire.topics import Topics
from tests.test_machines import build, request, spec

T = Topics()


def test_sent_messages_set_job_round_and_stage() -> None:
    a = Activity("aggregator", "site-a", "site-a")
    assert a.status == "aggregator site-a (site-a): serving, no job yet"
    a = a.after(Send(Kind.ROUND, T.rounds("site-a", "j1"), "j1", 4, "open", {}))
    assert (a.job, a.round, a.block, a.stage) == ("j1", 4, None, "open")
    a = a.after(Send(Kind.PARTIAL, T.partials("site-a"), "j1", 2, "partial", {}))
    assert (a.round, a.block, a.stage) == (4, 2, "partial")  # a block does not move the round
    assert a.status == "aggregator site-a (site-a): job j1, block 2, round 4: partial"


def test_notes_name_what_happened_and_unrelated_actions_change_nothing() -> None:
    a = Activity("agent", "a1", "site-a").after(Note("train", {"job": "j1", "round": 6}))
    assert (a.job, a.round, a.stage) == ("j1", 6, "train")
    same = a.after(Send(Kind.STATUS, T.status("agent", "a1"), "", 0, "online", {}))
    assert same is a
    assert a.after(Note("not_about_a_job", {"x": 1})) is a
    assert a.after(object()) is a
    assert a.after(Note("train", {"job": "j1", "round": 6})) is a


def test_another_job_starts_its_counters_afresh() -> None:
    a = Activity("agent", "a1").after(Note("train", {"job": "j1", "round": 6, "block": 3}))
    b = a.after(Note("train", {"job": "j2", "round": 0}))
    assert (b.job, b.round, b.block) == ("j2", 0, None)


def test_journal_fields_carry_only_what_is_known() -> None:
    idle = Activity("coordinator", "coord")
    assert journal_fields(idle) == {"ROLE": "coordinator", "NODE": "coord"}
    busy = Activity("agent", "a1", "site-a", job="j1", round=0, block=None, stage="train")
    assert journal_fields(busy) == {"ROLE": "agent", "NODE": "a1", "AGG": "site-a",
                                    "JOB": "j1", "ROUND": "0"}


def test_journal_context_stamps_records_and_an_explicit_extra_wins() -> None:
    ctx = JournalContext()
    ctx.fields = {"JOB": "j1", "ROUND": "3"}
    record = logging.LogRecord("hfl", logging.INFO, __file__, 1, "hello", None, None)
    record.ROUND = "9"  # as `log.info(..., extra={"ROUND": "9"})` would set it
    assert ctx.filter(record)
    assert (record.JOB, record.ROUND) == ("j1", "9")


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[object]]:
    """Every action each peer's machine returns, in order (what Node.dispatch sees)."""
    seen: dict[str, list[object]] = {}
    act = MemNet._act

    def record(self: MemNet, peer, actions: list) -> None:
        for a in actions:
            seen.setdefault(peer.identity.id, []).append(a)
            act(self, peer, [a])

    monkeypatch.setattr(MemNet, "_act", record)
    return seen


def statuses(start: Activity, actions: list[object]) -> list[Activity]:
    out = [start]
    for a in actions:
        if (new := out[-1].after(a)) is not out[-1]:
            out.append(new)
    return out


def test_real_machines_report_the_rounds_they_work_on(recorded) -> None:
    net = build()
    request(net, spec(rounds=2))
    opened = [s.round for p, s in net.sent
              if p == "site-a" and s.kind is Kind.ROUND and s.stage == "open"]
    tasks = [s.round for p, s in net.sent if p == "coord" and s.kind is Kind.TASK
             and s.topic == T.tasks("site-a")]
    assert len(opened) == 2 and len(tasks) == 2

    agent = statuses(Activity("agent", "a1", "site-a"), recorded["a1"])
    trained = [a.round for a in agent if a.stage == "train"]
    assert trained == opened  # the agent's status follows its aggregator's rounds
    assert agent[-1].stage == "update_sent" and agent[-1].job == "r1-m"

    agg = statuses(Activity("aggregator", "site-a", "site-a"), recorded["site-a"])
    assert sorted({a.block for a in agg if a.block is not None}) == tasks
    assert [a.round for a in agg if a.stage == "open"] == opened

    coord = statuses(Activity("coordinator", "coord"), recorded["coord"])
    assert coord[-1].job == "r1-m" and coord[-1].stage == "job_ended"
    assert "block 2" in coord[-1].status  # the version the job ended on
