"""A connection storm: a thousand agents connect at once to one aggregator (a real process)
and all take part in the same rounds; the global model must be exactly the weighted mean of
their thousand updates, each counted once."""

from __future__ import annotations

import resource
import time
from pathlib import Path

import pytest

from fleet.sim.procs import memory_mib
from tests.faults.harness import FaultFleet, assert_state, expected_state, spec
from tests.faults.test_restarts import no_crash

N = 1000


@pytest.mark.faults
def test_a_thousand_agents_connect_at_once_and_all_count(tmp_path: Path) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4 * N:  # the broker (which inherits it) holds a socket per agent
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8 * N), hard))
    agents = [f"s{i:04d}" for i in range(N)]
    steps = {a: float(i % 7 - 3) / 4 for i, a in enumerate(agents)}  # exact in float32
    samples = {a: 1 + i % 5 for i, a in enumerate(agents)}
    fleet = FaultFleet(tmp_path, {"site-a": agents}, tls=False)
    sp = spec(["site-a"], rounds=2, min_agents=N, deadline_s=300)
    try:
        fleet.spawn("coordinator")
        fleet.spawn("site-a")
        t0 = time.monotonic()
        per_process = fleet.spawn_agents("site-a", steps, samples)
        connect_s = time.monotonic() - t0
        t1 = time.monotonic()
        app, jobs = fleet.request(sp)
        out = fleet.follow(app, jobs, timeout=600)
        job_s = time.monotonic() - t1
        peak = memory_mib(fleet.procs["site-a"].pid)
        fleet.stop("site-a")
    finally:
        fleet.close()
    (job,) = jobs
    assert [r.agents for r in out.rows] == [N, N]
    mean = sum(samples[a] * steps[a] for a in agents) / sum(samples.values())
    assert_state(out.latest[job].state, expected_state(sp, [mean, mean]), atol=1e-5)
    tally = fleet.tally("site-a")
    # Repeats are allowed: on a starved machine keepalives lapse and QoS 1 redelivers
    # (at least once, by design). That each update counted once is the exact mean above.
    assert tally["rejected"] == {}
    no_crash(fleet, "site-a", "coordinator")
    print(f"storm report: {N} agents connected in {connect_s:.1f} s (processes: "
          f"{', '.join(f'{t:.1f}' for t in per_process)} s), 2 rounds of {N} in "
          f"{job_s:.1f} s, aggregator peak RSS {peak:.0f} MiB, tally {tally}")
