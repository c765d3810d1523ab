"""Duplicated, reordered and late messages from a proxy between the agents' broker and the
services' broker: every update arrives twice, in shuffled batches, and every earlier one
arrives again when a new round opens. The aggregator (a real process) must drop each extra
copy, count it, and compute exactly what an undisturbed run computes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.harness import FaultFleet, Proxy, assert_state, expected_state, spec
from tests.faults.test_restarts import SAMPLES, SITE_A, STEPS, fedavg, no_crash


@pytest.mark.faults
@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_duplicated_reordered_and_late_copies_are_dropped_and_counted(
        tmp_path: Path, secure: bool) -> None:
    fleet = FaultFleet(tmp_path, {"site-a": SITE_A}, tls=False, edge=True)
    proxy = Proxy(fleet, "site-a")
    sp = spec(["site-a"], rounds=3, min_agents=6,
              secagg={"enabled": secure, "stage_timeout_s": 20})
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        proxy.start()
        fleet.start_agents("site-a", STEPS, SAMPLES)
        app, jobs = fleet.request(sp)
        out = fleet.follow(app, jobs)
        proxy.stop()
        fleet.stop("site-a")  # logs its tally
    finally:
        fleet.close()
    (job,) = jobs
    assert [r.agents for r in out.rows] == [6, 6, 6]
    m = fedavg(SITE_A)
    assert_state(out.latest[job].state, expected_state(sp, [m, m, m]),
                 atol=1e-5 if secure else 1e-6)
    tally = fleet.tally("site-a")
    per_round = 4 if secure else 1  # messages an agent sends in a round
    assert proxy.forwarded == 3 * 6 * per_round
    assert proxy.extra > proxy.forwarded  # a copy of each, and the late replays
    assert tally["gate"]["duplicates"] == proxy.extra  # every extra copy dropped, counted
    assert tally["rejected"] == {}
    no_crash(fleet, "site-a", "coordinator")
