"""Agents that drop out of a secure round at each SecAgg+ stage, a round that falls below
the threshold, and a straggler past the deadline; aggregator and coordinator are real
processes on a real Mosquitto. Six agents: k = 5 neighbours, threshold t = 4."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from aggregator.machine import round_id
from tests.faults.harness import FaultFleet, assert_state, expected_state, spec, wait_for
from tests.faults.test_restarts import SAMPLES, SITE_A, STEPS, fedavg, no_crash

TOL = 1e-5  # fixed point over six agents


def run(tmp_path: Path, sp, silent: dict[str, str], rounds: set[int] | None = None):
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A})
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        agents = fleet.start_agents("site-a", STEPS, SAMPLES, silent=silent, rounds=rounds)
        app, jobs = fleet.request(sp)
        out = fleet.follow(app, jobs)
    finally:
        fleet.close()
    no_crash(fleet, "site-a", "coordinator")
    return fleet, agents, out.latest[jobs[0]], out


def secure_spec(**kw):
    return spec(["site-a"], rounds=1, min_agents=3, deadline_s=6,
                secagg={"threshold": 0.55, "stage_timeout_s": 3}, **kw)


@pytest.mark.faults
@pytest.mark.parametrize(("silent", "counted", "recovered"), [
    ({"a6": "advert"}, SITE_A[:5], 0),  # never in the round: left out at the deadline
    ({"a6": "shares"}, SITE_A[:5], 0),  # advertised, shared nothing: nobody masks with it
    ({"a5": "masked", "a6": "masked"}, SITE_A[:4], 2),  # shared keys: masks recovered
    ({"a6": "unshares"}, SITE_A, 0),  # its input is in; the others' shares unmask the sum
], ids=["advert", "shares", "masked", "unshares"])
def test_agents_dropping_at_a_stage_leave_the_exact_sum_of_the_others(
        tmp_path: Path, silent: dict[str, str], counted: list[str], recovered: int) -> None:
    sp = secure_spec()
    fleet, agents, version, _ = run(tmp_path, sp, silent)
    assert version.meta.agents == len(counted)
    assert version.meta.dropped == recovered
    assert_state(version.state, expected_state(sp, [fedavg(counted)]), atol=TOL)
    assert all(a.withheld for a in agents if a.id in silent)


@pytest.mark.faults
def test_below_threshold_the_round_aborts_and_its_retry_counts_everyone(tmp_path: Path) -> None:
    sp = secure_spec()
    first = round_id(sp, 0, 0, 0)
    silent = {"a4": "masked", "a5": "masked", "a6": "masked"}  # 3 survivors < t = 4
    fleet, _, version, _ = run(tmp_path, sp, silent, rounds={first})
    log = fleet.log("site-a")
    assert "round_retry" in log and "secagg-too-few" in log
    assert version.meta.agents == 6
    assert_state(version.state, expected_state(sp, [fedavg(SITE_A)]), atol=TOL)


@pytest.mark.faults
def test_a_straggler_past_the_deadline_is_left_out_and_its_late_update_refused(
        tmp_path: Path) -> None:
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A})
    sp = spec(["site-a"], rounds=2, min_agents=5, deadline_s=4)
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        agents = fleet.start_agents("site-a", STEPS, SAMPLES, hold=True)
        app, jobs = fleet.request(sp)
        wait_for("every agent asked to train", lambda: all(a.asked.is_set() for a in agents))
        for a in agents[:5]:
            a.release()
        wait_for("the round closed without a6", lambda: "round_closed" in fleet.log("site-a"),
                 timeout=20)
        time.sleep(0.5)
        agents[5].release()  # too late: its update is for a closed round
        out = fleet.follow(app, jobs)
    finally:
        fleet.close()
    (job,) = jobs
    assert [r.agents for r in out.rows] == [5, 6]
    expect = expected_state(sp, [fedavg(SITE_A[:5]), fedavg(SITE_A)])
    assert_state(out.latest[job].state, expect)
    assert "rejected" in fleet.log("site-a") and "stale-round" in fleet.log("site-a")
    no_crash(fleet, "site-a", "coordinator")
