"""Privacy accounting against dp-accounting itself (no mocks): ε, calibration, the ledger."""

from __future__ import annotations

import json
import math
import time

import dp_accounting
import pytest

from hfl.privacy.accounting import (
    PLD_INTERVAL,
    PLD_RDP_LIMIT,
    Ledger,
    calibrate,
    epsilon,
    epsilon_curve,
    step_event,
)

DELTA = 1e-5


def rdp_direct(event: dp_accounting.DpEvent, delta: float = DELTA) -> float:
    return dp_accounting.rdp.RdpAccountant().compose(event).get_epsilon(delta)


def test_epsilon_is_dp_accountings_rdp() -> None:
    direct = rdp_direct(dp_accounting.SelfComposedDpEvent(dp_accounting.PoissonSampledDpEvent(
        0.1, dp_accounting.GaussianDpEvent(1.0)), 100))
    ours = epsilon(1.0, 100, DELTA, 0.1, "rdp")
    assert ours == pytest.approx(direct, rel=1e-12)
    assert ours == pytest.approx(7.9039, abs=1e-3)  # 7.903850223578231 with dp-accounting 0.6.0


def test_pld_is_tighter_and_its_coarser_grid_barely_moves_it() -> None:
    rdp, pld = epsilon(1.0, 100, DELTA, 0.1, "rdp"), epsilon(1.0, 100, DELTA, 0.1, "pld")
    assert pld < rdp
    assert pld == pytest.approx(7.0466, abs=1e-3)  # 7.046628942745438 with dp-accounting 0.6.0
    event = step_event(0.1, 1.0, 100)
    coarse = dp_accounting.pld.PLDAccountant(value_discretization_interval=PLD_INTERVAL)
    assert pld == pytest.approx(coarse.compose(event).get_epsilon(DELTA), rel=1e-9)
    fine = dp_accounting.pld.PLDAccountant().compose(event).get_epsilon(DELTA)  # 1e-4 grid
    assert fine <= pld <= fine * (1 + 1e-3)  # pessimistic: coarser rounds up, by very little


def test_epsilon_edge_cases() -> None:
    assert epsilon(1.0, 0, DELTA, 0.1) == 0.0
    assert epsilon(0.0, 3, DELTA, 0.1) == math.inf
    plain = rdp_direct(dp_accounting.SelfComposedDpEvent(dp_accounting.GaussianDpEvent(1.5), 10))
    # q = 1 is no amplification: the plain Gaussian mechanism.
    assert epsilon(1.5, 10, DELTA, 1.0) == pytest.approx(plain, rel=1e-12)
    assert epsilon(1.0, 10, DELTA, 0.05) < epsilon(1.0, 10, DELTA, 0.2) < epsilon(1.0, 10, DELTA)
    for bad in [dict(delta=0.0), dict(delta=1.0), dict(sampling_rate=1.5), dict(steps=-1),
                dict(noise_multiplier=-1.0), dict(noise_multiplier=math.nan),
                dict(accountant="gdp")]:
        args = dict(noise_multiplier=1.0, steps=10, delta=DELTA, sampling_rate=0.1,
                    accountant="rdp") | bad
        with pytest.raises(ValueError):
            epsilon(**args)


def test_pld_falls_back_to_rdp_where_its_grid_would_explode() -> None:
    # z = 1e-4 on its own would need a PLD grid of ~1e11 points (MemoryError in dp-accounting).
    rdp = epsilon(1e-4, 2, DELTA, 1.0, "rdp")
    assert rdp > PLD_RDP_LIMIT
    assert epsilon(1e-4, 2, DELTA, 1.0, "pld") == rdp


@pytest.mark.parametrize("target, delta, steps, q, accountant", [
    (8.0, 1e-5, 100, 0.1, "rdp"),
    (2.0, 1e-5, 1000, 0.01, "rdp"),
    (1.0, 1e-6, 10, 1.0, "rdp"),
    (4.0, 1e-5, 50, 0.2, "pld"),
])
def test_calibrate_hits_the_target(target: float, delta: float, steps: int, q: float,
                                   accountant: str) -> None:
    tol = 1e-3
    z = calibrate(target, delta, steps, q, accountant, tol=tol)  # type: ignore[arg-type]
    spent = epsilon(z, steps, delta, q, accountant)  # type: ignore[arg-type]
    assert spent <= target
    assert spent > 0.97 * target
    # Minimal: a little less noise would overspend.
    assert epsilon(z - 2 * tol, steps, delta, q, accountant) > target  # type: ignore[arg-type]


def test_an_impossible_target_is_refused() -> None:
    with pytest.raises(ValueError, match=r"ε = 0\.001 .*cannot be met"):
        calibrate(1e-3, DELTA, 10_000, 1.0)


def test_epsilon_curve_is_epsilon_round_by_round() -> None:
    curve = epsilon_curve(1.2, 0.1, 30, DELTA)
    assert curve == pytest.approx([epsilon(1.2, t, DELTA, 0.1) for t in range(1, 31)], rel=1e-12)
    assert all(a < b for a, b in zip(curve, curve[1:], strict=False))
    pld = epsilon_curve(1.2, 0.1, 4, DELTA, "pld")  # composed step by step, not self-composed
    assert pld == pytest.approx([epsilon(1.2, t, DELTA, 0.1, "pld") for t in range(1, 5)],
                                rel=1e-6)
    assert epsilon_curve(1.2, 0.1, 0, DELTA) == []


# --- the ledger -----------------------------------------------------------------------------

A = [f"a{i}" for i in range(5)]
B = [f"b{i}" for i in range(10)]


def test_worst_case_is_the_group_sampled_more() -> None:
    ledger = Ledger(DELTA)
    for _ in range(50):
        ledger.record(A, 0.2, 1.0)
        ledger.record(B, 0.5, 1.0)
    per = ledger.per_agent()
    assert set(per) == set(A) | set(B)
    assert {per[a] for a in A} == {epsilon(1.0, 50, DELTA, 0.2)}
    assert {per[b] for b in B} == {epsilon(1.0, 50, DELTA, 0.5)}
    assert ledger.epsilon() == epsilon(1.0, 50, DELTA, 0.5) > per["a0"]


def test_an_agent_absent_from_rounds_spends_less() -> None:
    ledger = Ledger(DELTA)
    for t in range(50):
        ledger.record(A + ["late"] if t >= 20 else A, 0.3, 1.1)
    per = ledger.per_agent()
    assert per["late"] == epsilon(1.1, 30, DELTA, 0.3) < per["a0"] == epsilon(1.1, 50, DELTA, 0.3)
    assert ledger.epsilon() == per["a0"]


def test_a_mixed_history_is_dp_accountings_composition() -> None:
    ledger = Ledger(DELTA)
    for t in range(40):
        ledger.record(["x"], 0.1 if t % 3 else 0.25, 1.0 if t < 30 else 0.8)
    direct = rdp_direct(dp_accounting.ComposedDpEvent([
        step_event(0.1, 1.0, 20), step_event(0.25, 1.0, 10),
        step_event(0.1, 0.8, 6), step_event(0.25, 0.8, 4)]))
    assert ledger.epsilon() == pytest.approx(direct, rel=1e-12)


def test_uniform_history_matches_epsilon_in_both_accountants() -> None:
    for accountant in ("rdp", "pld"):
        ledger = Ledger(DELTA, accountant)
        assert ledger.epsilon() == 0.0 and ledger.per_agent() == {}
        for _ in range(25):
            ledger.record(B, 0.4, 1.3)
        assert ledger.epsilon() == epsilon(1.3, 25, DELTA, 0.4, accountant)


def test_would_exceed_flips_exactly_at_the_crossing_round() -> None:
    z, q, target = 1.0, 0.1, 5.0
    curve = epsilon_curve(z, q, 200, DELTA)
    crossing = next(t for t, e in enumerate(curve, start=1) if e > target)  # first bad round
    assert 5 < crossing < 200
    ledger = Ledger(DELTA)
    assert ledger.would_exceed(target, A, q, z, rounds=crossing)
    assert not ledger.would_exceed(target, A, q, z, rounds=crossing - 1)
    for done in range(crossing):
        assert ledger.would_exceed(target, A, q, z) == (done + 1 == crossing)
        if done + 1 < crossing:
            ledger.record(A, q, z)
    assert ledger.epsilon() <= target
    # A newcomer alone would still be within budget; the stop is about the worst agent.
    assert not ledger.would_exceed(target, ["new"], q, z)
    assert ledger.would_exceed(target, A + ["new"], q, z)


def test_would_exceed_sees_an_already_spent_budget() -> None:
    ledger = Ledger(DELTA)
    for _ in range(10):
        ledger.record(A, 1.0, 0.5)
    assert ledger.would_exceed(ledger.epsilon() - 0.1, B, 0.1, 5.0)


def test_record_rejects_programmer_errors() -> None:
    ledger = Ledger(DELTA)
    for args in [("a0", 0.1, 1.0), (["a0", "a0"], 0.1, 1.0), ([""], 0.1, 1.0),
                 (A, 1.2, 1.0), (A, 0.1, -1.0), (A, 0.1, math.inf)]:
        with pytest.raises(ValueError):
            ledger.record(*args)
    with pytest.raises(ValueError):
        ledger.would_exceed(5.0, A, 0.1, 1.0, rounds=0)
    with pytest.raises(ValueError):
        Ledger(0.0)
    with pytest.raises(ValueError):
        Ledger(DELTA, "gdp")  # type: ignore[arg-type]


def test_ledger_round_trips_through_json() -> None:
    ledger = Ledger(1e-6, "pld")
    for t in range(12):
        ledger.record(A if t % 2 else A + B, 0.2 if t < 6 else 1 / 3, 1.7)
    doc = json.loads(json.dumps(ledger.to_doc()))
    back = Ledger.from_doc(doc)
    assert back == ledger
    assert back.per_agent() == ledger.per_agent()
    assert Ledger.from_doc(Ledger(DELTA).to_doc()) == Ledger(DELTA)


@pytest.mark.parametrize("doc", [
    None,
    [],
    {"delta": DELTA, "accountant": "rdp"},
    {"delta": DELTA, "accountant": "rdp", "agents": {}, "extra": 1},
    {"delta": "1e-5", "accountant": "rdp", "agents": {}},
    {"delta": 2.0, "accountant": "rdp", "agents": {}},
    {"delta": DELTA, "accountant": "gdp", "agents": {}},
    {"delta": DELTA, "accountant": "rdp", "agents": []},
    {"delta": DELTA, "accountant": "rdp", "agents": {"": [[0.1, 1.0, 1]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [0.1, 1.0, 1]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, 1.0]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, 1.0, 1.5]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, 1.0, True]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, 1.0, 0]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.0, 1.0, 1]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[1.5, 1.0, 1]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, -1.0, 1]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, "1", 1]]}},
    {"delta": DELTA, "accountant": "rdp", "agents": {"a": [[0.1, 1.0, 1], [0.1, 1.0, 2]]}},
])
def test_malformed_ledger_documents_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        Ledger.from_doc(doc)


def test_a_thousand_agents_over_two_hundred_rounds_is_cheap() -> None:
    agents = [f"agent-{i}" for i in range(1000)]
    start = time.perf_counter()
    ledger = Ledger(DELTA)
    for _ in range(200):
        ledger.record(agents, 0.1, 1.0)
    worst = ledger.epsilon()
    elapsed = time.perf_counter() - start
    assert worst == epsilon(1.0, 200, DELTA, 0.1)
    assert elapsed < 10  # ~0.2 s here; loose so a slow CI box does not flake
    assert len(json.dumps(ledger.to_doc())) < 100_000  # one (q, z, count) per agent
