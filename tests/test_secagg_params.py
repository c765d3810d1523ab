"""SecAgg+ parameters (hfl.crypto.secagg.choose_params): the bounds against exact sums and
simulation on the real neighbour graph, the choices made, overrides, and rounds that
recover at the dropout they were chosen for (bench/dropouts.py's simulation, itself checked
against the real server)."""

from __future__ import annotations

import importlib.util
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest

from hfl.crypto import secagg as sa
from hfl.crypto import secagg_wire as wire
from hfl.wire.messages import ModelSpec, SecureSpec
from tests.test_secagg import Round

HALF, ETA = 2.0 ** -(sa.SECURITY_BITS + 1), 2.0**-sa.CORRECTNESS_BITS


def _bench(name: str):
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


dropouts = _bench("dropouts")
IDS = {n: [f"c{i:04d}" for i in range(n)] for n in (12, 30, 40, 60, 100, 500)}


def _graph(n: int, k: int) -> np.ndarray:
    return dropouts.adjacency(IDS[n], k, b"test")


def _choose(rng: np.random.Generator, trials: int, n: int, m: int) -> np.ndarray:
    """trials × n booleans, exactly m True in each row, uniformly."""
    return rng.random((trials, n)).argsort(axis=1) < m


# ------------------------------------------------------------------ the bounds


def test_tails_are_the_exact_sums() -> None:
    for k, p, x in [(9, 0.7, 5), (30, 0.8, 15), (99, 0.7, 50), (200, 0.9, 68), (70, 0.7, 60),
                    (5, 1.0, 4), (5, 0.0, 0), (8, 0.5, -1), (8, 0.5, 8)]:
        q = Fraction(p)
        want = sum(math.comb(k, i) * q**i * (1 - q) ** (k - i) for i in range(max(x + 1, 0)))
        assert sa._binom_cdf(k, p, x) == pytest.approx(float(want), rel=1e-9, abs=1e-300)
    for pop, marked, draws, x in [(99, 10, 30, 8), (999, 100, 46, 24), (29, 3, 29, 2),
                                  (29, 3, 29, 4), (59, 12, 10, 6), (99, 0, 30, 1)]:
        want = sum(Fraction(math.comb(marked, i) * math.comb(pop - marked, draws - i),
                            math.comb(pop, draws)) for i in range(x, min(marked, draws) + 1))
        assert sa._hyper_sf(pop, marked, draws, x) == pytest.approx(float(want), rel=1e-9)


def test_failure_bound_is_exact_for_the_complete_graph_and_bounds_simulated_rounds() -> None:
    rng = np.random.default_rng(1)
    for n, k, t, dropout in [(12, 11, 7, 0.3), (60, 12, 7, 0.15), (40, 10, 6, 0.12)]:
        alive = rng.random((8000, n)) >= dropout
        failed = 1 - dropouts.recovered(_graph(n, k), alive, t).mean()
        bound = sa.failure_bound(n, k, t, dropout)
        se = math.sqrt(bound * (1 - bound) / len(alive))
        assert failed <= bound + 4 * se  # a bound ...
        assert bound <= 4 * failed  # ... and not a loose one
        if k == n - 1:
            assert failed == pytest.approx(bound, abs=4 * se)


def test_leak_bound_against_random_corrupt_sets() -> None:
    rng = np.random.default_rng(2)
    for n, k, t, c in [(40, 8, 5, 10), (60, 10, 6, 12)]:
        corrupt = _choose(rng, 8000, n, c)
        held = corrupt.astype(np.float32) @ _graph(n, k)  # corrupt neighbours of each client
        leaked = ((held >= t) & ~corrupt).any(axis=1).mean()
        bound = sa.leak_bound(n, k, t, c)
        assert leaked <= bound + 4 * math.sqrt(bound / len(corrupt)) and bound <= 2 * leaked
    assert sa.leak_bound(30, 29, 16, 15) == 0 and sa.leak_bound(30, 29, 16, 16) == 1


def _connected(adj: np.ndarray) -> bool:
    seen = np.zeros(len(adj), bool)
    seen[:1] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = (adj[frontier].sum(axis=0) > 0) & ~seen
        seen |= frontier
    return bool(seen.all())


def test_split_bound_against_random_rounds() -> None:
    rng = np.random.default_rng(3)
    for n, k, c, dropout in [(40, 8, 4, 0.3), (40, 6, 2, 0.2)]:
        adj, trials = _graph(n, k), 3000
        honest = ~_choose(rng, trials, n, c) & (rng.random((trials, n)) >= dropout)
        split = np.mean([not _connected(adj[np.ix_(h, h)]) for h in honest])
        bound = sa.split_bound(n, k, c, dropout)
        assert split <= bound + 4 * math.sqrt(bound / trials) and bound <= 1.5 * split
    assert sa.split_bound(30, 29, 5, 0.3) == 0  # the complete graph never splits


# ------------------------------------------------------------------ the choices


def _meets(n: int, k: int, t: int, dropout: float, corrupt: float) -> bool:
    c = math.ceil(corrupt * n - 1e-9)
    return (sa.failure_bound(n, k, t, dropout) <= ETA and sa.leak_bound(n, k, t, c) <= HALF
            and sa.split_bound(n, k, c, dropout) <= HALF)


@pytest.mark.parametrize("n", [20, 50, 100, 300])
def test_the_choice_meets_the_bounds_and_no_smaller_degree_does(n: int) -> None:
    for dropout in (0.05, 0.1, 0.2, 0.3):
        for corrupt in (0.0, 0.1, 0.2):
            k, t = sa.choose_params(n, dropout, corrupt)
            sparse = k < n - 1
            assert 2 * t > k + 1 and t <= k and (k % 2 == 0 or not sparse)
            assert not sparse or _meets(n, k, t, dropout, corrupt)
            smaller = range(2, k, 2) if n <= 50 else [k - 2]  # every one where it is cheap
            assert not any(_meets(n, k2, t2, dropout, corrupt)
                           for k2 in smaller for t2 in range(k2 // 2 + 1, k2 + 1))


def test_small_groups_get_the_complete_graph_with_the_least_t() -> None:
    for n in range(3, 21):
        assert sa.choose_params(n) == (n - 1, n // 2 + 1)
    assert sa.choose_params(10, 0.3) == (9, 6)
    assert sa.choose_params(100, 0.3) == (99, 51)  # 30 % dropout: complete up to n ≈ 190
    k, t = sa.choose_params(100, 0.2)
    assert k < 99 and t == k // 2 + 1


@pytest.mark.parametrize("n", [50, 100, 300, 1000])
def test_more_dropout_corruption_or_certainty_never_means_fewer_neighbours(n: int) -> None:
    def degrees(**vary) -> list[int]:
        (name, values), = vary.items()
        return [sa.choose_params(n, **{"dropout": 0.2, "corrupt": 0.1, name: v})[0]
                for v in values]

    for ks in (degrees(dropout=[0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4]),
               degrees(corrupt=[0, 0.05, 0.1, 0.2, 0.3]),
               degrees(sigma=[20, 40, 80]), degrees(eta=[5, 10, 20, 30])):
        assert ks == sorted(ks), ks
    assert sa.choose_params(n, 0.3)[0] > sa.choose_params(n, 0.1)[0]


def test_explicit_degree_and_threshold_are_honoured() -> None:
    assert sa.choose_params(30, degree=7) == (8, 5)  # even, and the least t for it
    assert sa.choose_params(30, degree=8, threshold=2 / 3) == (8, 6)  # as given
    assert sa.choose_params(5, degree=50) == (4, 3)  # at most the complete graph
    assert sa.choose_params(9, degree=7) == (8, 5)  # rounding up reaches n-1: complete
    k, t = sa.choose_params(500, threshold=0.6)
    assert k < 499 and t == math.ceil(0.6 * k) and _meets(500, k, t, sa.DROPOUT, sa.CORRUPT)
    assert k > sa.choose_params(500)[0]  # a larger t/k needs more neighbours to keep it
    assert sa.choose_params(200, threshold=0.75) == (199, 150)  # none sparse: complete
    for bad in ({"threshold": 0.5}, {"corrupt": 0.5}, {"dropout": 1.0}, {"degree": -1}):
        with pytest.raises(ValueError):
            sa.choose_params(30, **bad)
    with pytest.raises(ValueError):
        sa.choose_params(2)


def test_the_spec_chooses_the_round_params() -> None:
    assert (SecureSpec().dropout, SecureSpec().corrupt) == (sa.DROPOUT, sa.CORRUPT)
    assert SecureSpec().threshold is None and SecureSpec().degree == 0

    def params(**secagg) -> tuple[int, int]:
        spec = ModelSpec(name="m", task="logreg", dataset="d", aggregators=["site-a"],
                         secagg=secagg)
        p, _ = wire.round_params("job", 1, 100, 10, spec)
        return p.degree, p.threshold

    assert params() == sa.choose_params(100)
    assert params(dropout=0.3) == (99, 51)
    assert params(degree=20, threshold=0.6) == (20, 12)
    with pytest.raises(ValueError):
        SecureSpec(dropout=0.5)


# ------------------------------------------------------------------ simulated rounds


def test_the_simulation_agrees_with_the_real_server() -> None:
    n, k, t = 12, 4, 3
    params = sa.Params("job", 7, k, t, 64)
    ids = [f"c{i:02d}" for i in range(n)]  # as Round names them
    seed = sa._graph_seed(params.context())
    graph, adj = sa.neighbours(ids, k, seed), dropouts.adjacency(ids, k, seed)
    j, a, b = "c00", *graph["c00"][:2]
    rng = np.random.default_rng(5)
    drops = [set(), {j}, {a, b}, {j, a, b}, *(set(rng.choice(ids, 4, replace=False))
                                              for _ in range(4))]
    verdicts = []
    for drop in drops:
        r = Round(n, params=params)
        assert r.ids == ids
        r.keys_and_shares()
        survivors = r.mask(drop)
        r.unmask(survivors)
        alive = np.array([[i not in drop for i in ids]])
        assert bool(dropouts.recovered(adj, alive, t)[0]) is r.server.ready(), drop
        verdicts.append(r.server.ready())
    assert verdicts[:2] == [True, True] and verdicts[3] is False  # j's s_sk: 2 shares of 3


@pytest.mark.parametrize(("n", "dropout"), [(100, 0.3), (100, 0.2), (500, 0.3)])
def test_thousands_of_rounds_recover_at_the_dropout_chosen_for(n: int, dropout: float) -> None:
    k, t = sa.choose_params(n, dropout)
    rng = np.random.default_rng(n)
    for exact in (True, False):  # exactly δn dropped, and each client with probability δ
        alive = dropouts.drop_sets(rng, 3000, n, dropout, exact)
        assert dropouts.recovered(_graph(n, k), alive, t).all()


def test_the_old_parameters_lose_half_the_rounds_at_30_percent() -> None:
    k, t = dropouts.old_params(100)
    assert (k, t) == (22, 13)
    alive = dropouts.drop_sets(np.random.default_rng(4), 3000, 100, 0.3, exact=True)
    assert 0.3 < dropouts.recovered(_graph(100, k), alive, t).mean() < 0.65
