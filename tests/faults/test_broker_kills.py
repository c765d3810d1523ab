"""`kill -9` of the broker, five times in one job, with real processes: the coordinator and two
aggregators (`hfl-coordinator run`, `hfl-aggregator run`, each with its state), two sites of
three agents (real agent machines answering with fixed deltas after 0.3 s of "training"), TLS
with client certificates and the roster's ACL, SecAgg+ on, 20 versions. Mosquitto is killed
with SIGKILL at spread-out moments of the job and started again on the same port 2 s later,
as a supervisor would; the receivers of what is under way come back 1.5 s after the senders
(paused across the outage: a service busy exporting a model, swapping, or further into its
reconnect back-off), which is when a message sent again at once finds no subscriber. With
its persistence (the
generated config: a save every ~2 s, so it comes back with what it saved last) and without
(it comes back with nothing: no session, no subscription, no queued or retained message).

Nothing may be lost: every version has every agent of both sites (the coordinator's own
record of the job: agents, aggregators, dropouts per version) and the final model is exactly
what an undisturbed run computes from the agents' steps and weights (fixed point: 1e-5)."""

from __future__ import annotations

import re
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from hfl.models.tasks import TaskSet
from tests.faults.harness import FaultFleet, spec, wait_for
from tests.faults.test_restarts import STEPS, no_crash

SAMPLES = {"a1": 10, "a2": 20, "a3": 30, "b1": 8, "b2": 16, "b3": 40}
SITES = {"site-a": ["a1", "a2", "a3"], "site-b": ["b1", "b2", "b3"]}
EVERYONE = SITES["site-a"] + SITES["site-b"]
# When to kill: once the coordinator has saved version v, at the first moment (within 2 s)
# that the services' saved state shows `target` under way, so that the kills land at
# different moments of a block: agents training (the adverts), a partial in flight (one
# site heard from), the SecAgg+ key exchange, the masked inputs, the unmasking.
# Each with the services that come back late (the receivers of what is under way).
KILLS = [(2, "advert", ("site-a", "site-b")), (5, "one site", ("coordinator",)),
         (9, "shares", ("site-a",)), (12, "masked", ("site-b",)),
         (15, "unshares", ("coordinator", "site-a"))]
TARGET_S = 2.0
DOWN_S = 2.0  # the broker stays down this long (a restart by systemd takes a few seconds)
LATE_S = 1.5  # the late services come back this long after the broker
TRAIN_S = 0.3  # each agent's "training": boards go on training while the broker is down


@dataclass
class Outcome:
    history: list[dict]  # the coordinator's rows, one per version
    params: np.ndarray  # its final global model
    expected: np.ndarray  # what an undisturbed run computes
    kills: list[dict] = field(default_factory=list)  # when each kill came, what was under way
    seconds: float = 0.0
    tallies: dict[str, dict] = field(default_factory=dict)
    logs: dict[str, str] = field(default_factory=dict)


def fedavg(agents: list[str]) -> float:
    return sum(SAMPLES[a] * STEPS[a] for a in agents) / sum(SAMPLES[a] for a in agents)


def expected_params(sp, versions: int) -> np.ndarray:
    sp, p = TaskSet.everything_installed().resolve(sp)
    params = p.init_params(sp.seed)
    for _ in range(versions):
        params = params + np.float32(fedavg(EVERYONE))
    return params


def saved_job(fleet: FaultFleet, job: str = "r1-m") -> tuple[dict, dict] | None:
    return fleet.state("coordinator").get(f"job/{job}")


def under_way(fleet: FaultFleet, job: str = "r1-m") -> dict:
    """What each service had saved when the broker was killed: the coordinator's version
    and the sites it heard from, each aggregator's round and SecAgg+ stage (or its sent
    partial)."""
    doc = (saved_job(fleet, job) or ({},))[0]
    out = {"version": doc.get("version"), "reported": doc.get("reported")}
    for agg in SITES:
        state = fleet.state(agg)
        block = state.get(f"job/{job}", ({},))[0]
        rnd = state.get(f"round/{job}", ({},))[0]
        out[agg] = ("partial sent" if block.get("partial") is not None
                    else rnd.get("secure", {}).get("stage", "between rounds"))
    return out


def at(target: str, now: dict) -> bool:
    if target == "one site":
        return len(now["reported"] or ()) == 1 or any(
            now[agg] == "partial sent" for agg in SITES)
    return any(now[agg] == target for agg in SITES)


def run(tmp_path: Path, *, rounds: int, kills: list[tuple[int, str, tuple[str, ...]]],
        persistence: bool,
        secure: bool = True, timeout: float = 300.0) -> Outcome:
    fleet = FaultFleet(tmp_path, SITES, persistence=persistence)  # TLS and the ACL
    # A quorum below the site's size, as in a real fleet: a round goes on without an agent
    # whose answer is lost (a dropout whose masks the others recover), rather than retry.
    sp = spec(list(SITES), rounds=rounds, min_agents=2, deadline_s=30, max_retries=2,
              secagg={"enabled": secure, "stage_timeout_s": 15})
    landed = []
    try:
        for id_ in ("coordinator", *SITES):
            fleet.spawn(id_)
        for agg in SITES:
            fleet.start_agents(agg, STEPS, SAMPLES, train_s=TRAIN_S)
        started = time.monotonic()
        app, jobs = fleet.request(sp)
        for version, target, late in kills:
            wait_for(f"version {version} saved", lambda v=version: (
                saved_job(fleet) or ({"version": 0},))[0]["version"] >= v, timeout=120)
            deadline = time.monotonic() + TARGET_S
            while not at(target, now := under_way(fleet)) and time.monotonic() < deadline:
                pass
            landed.append({"target": target, **now, "late": late})
            for id_ in late:
                fleet.procs[id_].send_signal(signal.SIGSTOP)
            fleet.broker.kill()  # SIGKILL: no goodbye, nothing saved on the way out
            time.sleep(DOWN_S)
            fleet.broker.start()  # on the same port
            time.sleep(LATE_S)
            for id_ in late:
                fleet.procs[id_].send_signal(signal.SIGCONT)
        fleet.follow(app, jobs, timeout=timeout)
        seconds = time.monotonic() - started
        alive = {id_: p.poll() is None for id_, p in fleet.procs.items()}
        for id_ in ("coordinator", *SITES):
            fleet.stop(id_)  # logs its tally
    finally:
        fleet.close()
    assert alive == dict.fromkeys(("coordinator", *SITES), True)
    doc, arrays = saved_job(fleet)
    out = Outcome(doc["history"], arrays["params"], expected_params(sp, rounds), landed,
                  seconds)
    for id_ in ("coordinator", *SITES):
        out.tallies[id_] = fleet.tally(id_)
        out.logs[id_] = fleet.log(id_)
    no_crash(fleet, "coordinator", *SITES)
    return out


def check(out: Outcome, rounds: int, kills: int) -> None:
    """Nothing lost: every version from both sites and all six agents, none dropped, and the
    exact model of an undisturbed run; every service reconnected after each kill."""
    rows = [(r["version"], r["agents"], r["aggregators"], r["dropped"]) for r in out.history]
    assert rows == [(v, 6, 2, 0) for v in range(1, rounds + 1)]
    assert retries(out) == 0  # nothing lost, so no round or block had to be tried again
    np.testing.assert_allclose(out.params, out.expected, rtol=0, atol=1e-5)
    for id_, log in out.logs.items():
        connected = len(re.findall(r"connected to \S+ \(session present", log))
        assert connected >= kills + 1, (id_, connected)
        assert out.tallies[id_]["rejected"] == {}, (id_, out.tallies[id_]["rejected"])


def retries(out: Outcome) -> int:
    """Edge rounds retried (an aggregator's `round_retry`) and blocks retried."""
    return sum(log.count("round_retry") + log.count("block_retry") for log in out.logs.values())


def figures(out: Outcome) -> str:
    agents = [r["agents"] for r in out.history]
    sites = [r["aggregators"] for r in out.history]
    short = [(r["version"], r["agents"], r["aggregators"], r["dropped"]) for r in out.history
             if (r["agents"], r["aggregators"], r["dropped"]) != (6, 2, 0)]
    sent = {id_: t["node"].get("reconnects", 0) for id_, t in out.tallies.items()}
    return (f"{len(out.history)} versions in {out.seconds:.1f} s; agents per version "
            f"{min(agents)}-{max(agents)}, sites {min(sites)}-{max(sites)}; short versions "
            f"(version, agents, sites, dropped) {short}; retries {retries(out)}; max |model - "
            f"undisturbed| {float(abs(out.params - out.expected).max()):.2g}; reconnects {sent}; "
            f"kills landed at {out.kills}")


@pytest.mark.faults
@pytest.mark.parametrize("persistence", [True, False], ids=["autosave", "no-persistence"])
def test_five_broker_kills_lose_no_update_and_no_site(tmp_path: Path,
                                                      persistence: bool) -> None:
    out = run(tmp_path, rounds=20, kills=KILLS, persistence=persistence)
    print(figures(out))
    check(out, 20, len(KILLS))
