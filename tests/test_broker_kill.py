"""The fast case of tests/faults/test_broker_kills.py, in `make test`: two `kill -9` of a
broker without persistence (it comes back with nothing: no session, no subscription, no
queued or retained message) during a 5-version job of two sites, TLS and SecAgg+ on, real
coordinator and aggregator processes; the receivers of what is under way (the coordinator,
an aggregator) come back after their senders. Every version must have both sites and all six
agents, and the final model be exactly an undisturbed run's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.faults.test_broker_kills import check, figures, run


@pytest.mark.broker
def test_two_kills_of_a_broker_that_forgets_everything_lose_nothing(tmp_path: Path) -> None:
    kills = [(1, "one site", ("coordinator",)), (3, "masked", ("site-a",))]
    out = run(tmp_path, rounds=5, kills=kills, persistence=False, timeout=120)
    print(figures(out))
    check(out, 5, len(kills))
