"""DP-FedAvg through the three machines on the in-memory network: clipping, noise in both
modes, calibration, refusal of an impossible target, the budget stop and ε published."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edge_agent.machine import Update
from hfl.privacy.accounting import epsilon
from hfl.wire.messages import Kind, Metrics, ModelSpec
from tests.test_machines import build, request, versions

P = 6
GROUPS = {"site-a": [f"a{i}" for i in range(5)], "site-b": [f"b{i}" for i in range(5)]}
AGENTS = sum(GROUPS.values(), [])


def trainer(step: float = 1.0):
    """Every agent moves every coordinate by `step`: the delta's norm is step·√P."""
    def train(agent, t):
        return Update(np.full(P, step, np.float32), Metrics(samples=10 + AGENTS.index(agent)))
    return train


def spec(secure: bool, **privacy) -> ModelSpec:
    p = {"epsilon": 50.0, "clip": 0.5, "mode": "edge", **privacy}
    return ModelSpec(name="m", task="logreg", dataset="d", aggregators=sorted(GROUPS),
                     rounds=2, min_agents=3, deadline_s=10, max_retries=1,
                     secagg={"enabled": secure}, privacy=p)


def job_status(net) -> dict:
    return [s for _, s in net.sent if s.kind is Kind.JOB][-1].meta


@pytest.mark.parametrize("secure", [False, True])
def test_clipped_updates_count_equally_and_versions_carry_epsilon(secure: bool) -> None:
    # Little noise (std 0.0035 on each coordinate of the mean): the mean is the clipped
    # delta, of norm 0.5 whatever the sample counts.
    net = build(trainer=trainer(1.0), groups=GROUPS)
    request(net, spec(secure, noise_multiplier=0.05, epsilon=1e4))
    vs = versions(net)
    assert [v.version for v in vs] == [1, 2]
    per_round = 0.5 / math.sqrt(P)
    np.testing.assert_allclose(vs[0].params, per_round, atol=0.03)
    np.testing.assert_allclose(vs[1].params, 2 * per_round, atol=0.03)
    assert 0 < vs[0].epsilon < vs[1].epsilon
    assert job_status(net)["epsilon"] == pytest.approx(vs[1].epsilon)


@pytest.mark.parametrize("mode,secure", [("edge", False), ("distributed", False),
                                         ("distributed", True)])
def test_noise_of_the_configured_size_reaches_the_model(mode: str, secure: bool) -> None:
    z, clip = 2.0, 0.5
    net = build(trainer=trainer(0.0), groups=GROUPS)  # zero updates: what moves is noise
    request(net, spec(secure, noise_multiplier=z, clip=clip, mode=mode, epsilon=1e4)
            .model_copy(update={"rounds": 1}))
    (v,) = versions(net)
    # Each site's mean gets N(0, (zS)²/5²) at least; the coordinator averages the two sites.
    std = z * clip / 5 / math.sqrt(2)
    assert np.std(v.params) > 0
    assert np.all(np.abs(v.params) < 8 * std)
    assert np.mean(np.abs(v.params)) > 0.05 * std


def test_a_job_stops_before_the_block_that_would_exceed_its_budget() -> None:
    z, target = 1.0, 10.0  # ε after 1, 2, 3, 4 rounds: 4.73, 7.08, 9.01, 10.7
    net = build(trainer=trainer(0.1), groups=GROUPS)
    request(net, spec(False, noise_multiplier=z, epsilon=target)
            .model_copy(update={"rounds": 50}))
    status = job_status(net)
    assert status["state"] == "stopped" and "privacy budget" in status["reason"]
    vs = versions(net)
    assert len(vs) == 3
    # Within budget, and one more round would not have been: q = 1 (C = 1), one round a block.
    assert vs[-1].epsilon <= target
    assert epsilon(z, len(vs) + 1, 1e-5, 1.0) > target
    assert vs[-1].epsilon == pytest.approx(epsilon(z, len(vs), 1e-5, 1.0), rel=1e-6)


def test_the_noise_is_calibrated_when_the_request_gives_none() -> None:
    net = build(trainer=trainer(0.1), groups=GROUPS)
    request(net, spec(False, epsilon=8.0).model_copy(update={"rounds": 5}))
    tasks = [s for _, s in net.sent if s.kind is Kind.TASK]
    z = tasks[0].meta["spec"]["privacy"]["noise_multiplier"]
    assert z is not None and z > 0
    assert epsilon(z, 5, 1e-5, 1.0) <= 8.0 + 1e-6
    assert job_status(net)["state"] == "done"
    assert versions(net)[-1].epsilon <= 8.0 + 1e-6


def test_an_impossible_target_is_refused_with_a_clear_error() -> None:
    net = build(trainer=trainer(0.1), groups=GROUPS)
    request(net, spec(False, epsilon=1e-4, delta=1e-9).model_copy(update={"rounds": 10_000}))
    status = job_status(net)
    assert status["state"] == "failed" and "cannot be met" in status["reason"]
    assert not [s for _, s in net.sent if s.kind is Kind.TASK]


@pytest.mark.parametrize("secure,start,grows", [(False, 0.5, True), (True, 0.5, True),
                                                (False, 8.0, False)])
def test_adaptive_clipping_moves_each_groups_bound_toward_the_norms(
        secure: bool, start: float, grows: bool) -> None:
    # Every delta has norm √6 ≈ 2.45: from 0.5 the bound must rise, from 8 it must fall,
    # by about exp(η/2) per round (γ = 0.5, b̄ ≈ 0 or 1; the bit noise is small here).
    net = build(trainer=trainer(1.0), groups=GROUPS)
    request(net, spec(secure, noise_multiplier=0.2, clip=start, adaptive=True, clip_lr=0.5,
                      epsilon=1e4).model_copy(update={"rounds": 4}))
    opens = [s for p, s in net.sent if p == "site-a" and s.stage == "open"]
    bounds = [s.meta["spec"]["privacy"]["clip"] for s in opens]
    assert len(bounds) == 4 and bounds[0] == start
    ratios = np.array(bounds[1:]) / np.array(bounds[:-1])
    if grows:
        assert np.all((ratios > 1.15) & (ratios < 1.45)), bounds
    else:
        assert np.all((ratios > 1 / 1.45) & (ratios < 1 / 1.15)), bounds
    assert job_status(net)["state"] == "done"
