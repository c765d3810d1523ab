"""Crashes and restarts with real processes over a real Mosquitto: `kill -9` of an aggregator
while it collects updates (plain and secure rounds), of the coordinator between partials, and
a broker restart in the middle of a round. Each job must end with exactly the global model
an unfailed run computes (from the agents' fixed steps and weights), every agent counted
once."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from tests.faults.harness import FaultFleet, assert_state, expected_state, spec, wait_for

STEPS = {"a1": 1.0, "a2": 2.0, "a3": 3.0, "a4": -1.0, "a5": 0.5, "a6": 4.0,
         "b1": -2.0, "b2": 0.25, "b3": 1.5}
SAMPLES = {"a1": 10, "a2": 20, "a3": 30, "a4": 5, "a5": 5, "a6": 50,
           "b1": 8, "b2": 16, "b3": 40}
SITE_A = ["a1", "a2", "a3", "a4", "a5", "a6"]
SITE_B = ["b1", "b2", "b3"]


def fedavg(agents: list[str]) -> float:
    return sum(SAMPLES[a] * STEPS[a] for a in agents) / sum(SAMPLES[a] for a in agents)


def no_crash(fleet: FaultFleet, *ids: str) -> None:
    for id_ in ids:
        log = fleet.log(id_)
        assert "Traceback" not in log, log[-3000:]


def saved_round(fleet: FaultFleet, agg: str, job: str = "r1-m") -> dict | None:
    rec = fleet.state(agg).get(f"round/{job}") if fleet.state_dir(agg).exists() else None
    return rec[0] if rec else None


@pytest.mark.faults
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_aggregator_killed_while_collecting_resumes_and_counts_nobody_twice(
        tmp_path: Path, secure: bool) -> None:
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A})
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        agents = fleet.start_agents("site-a", STEPS, SAMPLES, hold=True)
        sp = spec(["site-a"], min_agents=6,
                  secagg={"enabled": secure, "stage_timeout_s": 20})
        app, jobs = fleet.request(sp)
        wait_for("every agent asked to train", lambda: all(a.asked.is_set() for a in agents))
        for a in agents[:3]:
            a.release()

        def three_saved() -> bool:
            doc = saved_round(fleet, "site-a")
            if doc is None:
                return False
            got = doc["secure"]["got"] if secure else doc["senders"]
            return len(got) == 3

        wait_for("3 contributions saved", three_saved)
        fleet.kill("site-a")
        for a in agents[3:]:
            a.release()  # their updates (adverts) wait at the broker for site-a's session
        time.sleep(0.5)
        fleet.spawn("site-a", wait=False)
        out = fleet.follow(app, jobs)
    finally:
        fleet.close()
    (job,) = jobs
    assert [r.round for r in out.rows] == [1, 2]
    assert all(r.agents == 6 for r in out.rows)
    m = fedavg(SITE_A)
    assert_state(out.latest[job].state, expected_state(sp, [m, m]),
                 atol=1e-5 if secure else 1e-6)
    log = fleet.log("site-a")
    assert "resuming 1 job(s)" in log
    no_crash(fleet, "site-a", "coordinator")


@pytest.mark.faults
def test_coordinator_killed_between_partials_publishes_the_same_global_model(
        tmp_path: Path) -> None:
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A[:3], "site-b": SITE_B})
    try:
        for id_ in ("coordinator", "site-a", "site-b"):
            fleet.spawn(id_)
        fleet.start_agents("site-a", STEPS, SAMPLES)
        late = fleet.start_agents("site-b", STEPS, SAMPLES, hold=True)
        sp = spec(["site-a", "site-b"], min_agents=3)
        app, jobs = fleet.request(sp)

        def a_counted() -> bool:
            rec = fleet.state("coordinator").get("job/r1-m")
            return rec is not None and rec[0]["reported"] == ["site-a"]

        wait_for("site-a's partial saved by the coordinator", a_counted)
        fleet.kill("coordinator")
        for a in late:
            a.release()

        def b_sent() -> bool:
            rec = fleet.state("site-b").get("job/r1-m")
            return rec is not None and rec[0]["partial"] is not None

        wait_for("site-b's partial sent while the coordinator is down", b_sent)
        fleet.spawn("coordinator", wait=False)
        out = fleet.follow(app, jobs)
    finally:
        fleet.close()
    (job,) = jobs
    everyone = SITE_A[:3] + SITE_B
    assert [r.round for r in out.rows] == [1, 2]
    assert all(r.agents == 6 for r in out.rows)
    m = fedavg(everyone)
    assert_state(out.latest[job].state, expected_state(sp, [m, m]))
    assert "resuming 1 job(s)" in fleet.log("coordinator")
    no_crash(fleet, "coordinator", "site-a", "site-b")


@pytest.mark.faults
def test_broker_restarted_mid_round_loses_nothing(tmp_path: Path) -> None:
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A})
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        agents = fleet.start_agents("site-a", STEPS, SAMPLES, hold=True)
        sp = spec(["site-a"], min_agents=6)
        app, jobs = fleet.request(sp)
        wait_for("every agent asked to train", lambda: all(a.asked.is_set() for a in agents))
        for a in agents[:3]:
            a.release()
        wait_for("3 updates saved", lambda: len((saved_round(fleet, "site-a") or {}).get(
            "senders", [])) == 3)
        fleet.broker.stop()  # SIGTERM: Mosquitto saves its persistence database
        for a in agents[3:]:
            a.release()  # published while the broker is down: queued in the agents' clients
        time.sleep(1.0)
        fleet.broker.start()
        out = fleet.follow(app, jobs)
        alive = {id_: p.poll() is None for id_, p in fleet.procs.items()}
    finally:
        fleet.close()
    (job,) = jobs
    assert alive == {"coordinator": True, "site-a": True}
    assert [r.round for r in out.rows] == [1, 2]
    assert all(r.agents == 6 for r in out.rows)
    m = fedavg(SITE_A)
    assert_state(out.latest[job].state, expected_state(sp, [m, m]))
    # Both services reconnected to the same session (no restart, nothing to resume).
    for id_ in ("coordinator", "site-a"):
        assert len(re.findall(r"connected to .*session present: True", fleet.log(id_))) >= 1
    no_crash(fleet, "coordinator", "site-a")
