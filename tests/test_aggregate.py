"""WeightedSum: Σ w·x against a float64 reference, whichever path each vector takes."""

import numpy as np
import pytest

from hfl.models.aggregate import _CHUNK, WeightedSum
from hfl.wire.messages import Metrics

P = 2 * _CHUNK + 123  # crosses chunk boundaries, last chunk partial


def _vectors(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    return [rng.standard_normal(P).astype(np.float32) for _ in range(n)]


@pytest.mark.parametrize("weights", [[10, 10, 10, 10], [3, 600, 1, 47.5], [0.25, 0.25, 8, 0.25]])
def test_mean_and_total_match_float64(weights: list[float]) -> None:
    xs = _vectors(len(weights))
    ws = WeightedSum(P)
    for x, w in zip(xs, weights, strict=True):
        ws.add(x, w, Metrics(samples=w))
    ref = sum(np.float64(w) * x.astype(np.float64) for x, w in zip(xs, weights, strict=True))
    np.testing.assert_allclose(ws.mean(), ref / sum(weights), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ws.total, ref, rtol=1e-5, atol=1e-5)
    assert ws.weight == sum(weights) and ws.count == len(weights)


def test_weighted_and_plain_vectors_mix() -> None:
    a, b, c = _vectors(3)
    ws = WeightedSum(P)
    ws.add(a, 5.0, Metrics(samples=5))
    ws.add_weighted(7.0 * b, 7.0, Metrics(samples=7))  # a partial: already Σ w·x
    ws.add(c, 2.0, Metrics(samples=2))
    ref = 5.0 * a.astype(np.float64) + 7.0 * b + 2.0 * c
    np.testing.assert_allclose(ws.mean(), ref / 14.0, rtol=1e-5, atol=1e-6)


def test_total_is_the_live_buffer() -> None:
    """Writing into `total` (a checkpoint restore) sets the sum; adding goes on from it."""
    x = _vectors(1)[0]
    ws = WeightedSum(P)
    ws.add(x, 3.0, Metrics(samples=3))
    saved = ws.total.copy()
    back = WeightedSum(P)
    back.total[...] = saved
    back.weight = 3.0
    back.add(x, 4.0, Metrics(samples=4))
    np.testing.assert_allclose(back.mean(), x, rtol=1e-5, atol=1e-6)


def test_weight_zero_adds_no_vector_but_counts() -> None:
    x = _vectors(1)[0]
    ws = WeightedSum(P)
    ws.add(np.full(P, np.nan, np.float32), 0.0, Metrics(samples=0))
    ws.add(x, 2.0, Metrics(samples=2))
    np.testing.assert_array_equal(ws.mean(), x)  # one vector, equal to its weight: exact
    assert ws.count == 2


def test_wrong_size_is_refused_and_nothing_added() -> None:
    ws = WeightedSum(P)
    with pytest.raises(ValueError, match="shape"):
        ws.add(np.ones(P - 1, np.float32), 1.0, Metrics(samples=1))
    assert ws.count == 0 and ws._scale == 0 and not ws.total.any()
    with pytest.raises(ValueError, match="no weight"):
        ws.mean()


def test_state_and_restore_keep_the_sum() -> None:
    """A checkpoint taken mid-round (scale · sum, not normalized) restores the same mean."""
    a, b, c = _vectors(3)
    ws = WeightedSum(P)
    ws.add(a, 6.0, Metrics(samples=6))
    ws.add(b, 6.0, Metrics(samples=6))
    doc, arr = ws.state()
    back = WeightedSum.restore(doc, arr.copy())
    for acc in (ws, back):
        acc.add(c, 3.0, Metrics(samples=3))
    ref = 6.0 * a.astype(np.float64) + 6.0 * b + 3.0 * c
    np.testing.assert_allclose(back.mean(), ref / 15.0, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(back.mean(), ws.mean())
    assert back.count == 3 and back.weight == 15.0
