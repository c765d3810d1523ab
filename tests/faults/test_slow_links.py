"""Slow links: half the agents sit in a network namespace behind a veth pair whose both ends
are throttled with tbf (256 kbit/s; this kernel has no netem, so no added delay or loss), the
other half on loopback. Rounds carry a 7,850-parameter model (31 KiB each way per agent) and
must give the exact result, slow agents included. Needs root (ip netns, tc)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.harness import FaultFleet, assert_state, expected_state, spec
from tests.faults.test_restarts import no_crash

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0, reason="ip netns and tc need root")]

RATE = "256kbit"


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True)


@contextlib.contextmanager
def slow_link(rate: str) -> Iterator[tuple[str, str]]:
    """A network namespace reached over a veth pair throttled both ways; yields the
    namespace and the host's address on the link."""
    k = os.getpid() % 200
    ns, near, far = f"hfl-slow-{k}", f"hflh{k}", f"hfln{k}"
    host, peer = f"10.{77 + k % 100}.{k}.1", f"10.{77 + k % 100}.{k}.2"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "link", "add", near, "type", "veth", "peer", "name", far, "netns", ns)
        sh("ip", "addr", "add", f"{host}/24", "dev", near)
        sh("ip", "link", "set", near, "up")
        sh("ip", "-n", ns, "addr", "add", f"{peer}/24", "dev", far)
        sh("ip", "-n", ns, "link", "set", far, "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        tbf = ["root", "tbf", "rate", rate, "burst", "32kbit", "latency", "2s"]
        sh("tc", "qdisc", "add", "dev", near, *tbf)
        sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", far, *tbf)
        yield ns, host
        # The shaper did hold packets back, both ways.
        for cmd in (["tc", "-s", "qdisc", "show", "dev", near],
                    ["ip", "netns", "exec", ns, "tc", "-s", "qdisc", "show", "dev", far]):
            stats = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            assert int(re.search(r"overlimits (\d+)", stats).group(1)) > 0, stats
    finally:
        subprocess.run(["ip", "link", "del", near], check=False, capture_output=True)
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "secagg"])
def test_agents_on_a_throttled_link_count_like_the_others(tmp_path: Path, secure: bool) -> None:
    fast = [f"f{i}" for i in range(3)]
    slow = [f"s{i}" for i in range(3)]
    steps = {a: float(i % 3 - 1) / 8 for i, a in enumerate(fast + slow)}
    samples = {a: 10 + i for i, a in enumerate(fast + slow)}
    sp = spec(["site-a"], rounds=2, min_agents=6, deadline_s=120,
              options={"input_shape": [1, 28, 28], "num_classes": 10},
              secagg={"enabled": secure, "stage_timeout_s": 60})
    with slow_link(RATE) as (ns, host):
        fleet = FaultFleet(tmp_path, {"site-a": fast + slow}, tls=False, listen=host)
        try:
            fleet.spawn("coordinator")
            fleet.spawn("site-a")
            fleet.spawn_agents("site-a", steps, samples, ids=fast)
            fleet.spawn_agents("site-a", steps, samples, ids=slow, netns=ns)
            t0 = time.monotonic()
            app, jobs = fleet.request(sp)
            out = fleet.follow(app, jobs, timeout=600)
            took = time.monotonic() - t0
        finally:
            fleet.close()
    (job,) = jobs
    assert [r.agents for r in out.rows] == [6, 6]
    mean = sum(samples[a] * steps[a] for a in steps) / sum(samples.values())
    assert_state(out.latest[job].state, expected_state(sp, [mean, mean]),
                 atol=1e-5 if secure else 1e-6)
    no_crash(fleet, "site-a", "coordinator")
    print(f"slow links ({RATE}, {'secagg' if secure else 'plain'}): 2 rounds in {took:.1f} s")
