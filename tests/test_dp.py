"""DP mechanisms: clipping, the noise source and its statistics, distributed shares, adaptive
clipping. Statistical checks use exact chi-square / normal quantiles at a false-alarm rate of
1e-6 per assertion."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from hfl.privacy.dp import (
    AdaptiveClip,
    NoiseSource,
    agent_noise_std,
    clip_l2,
    edge_noise_std,
    l2_norm,
)

ALPHA = 1e-6  # false-alarm rate of each statistical assertion
N = (1 << 20) + 4097  # more than one chunk of the noise source, with a ragged tail


def norm64(x: np.ndarray) -> float:
    return float(np.linalg.norm(x.astype(np.float64)))


def variance_bounds(n: int) -> tuple[float, float]:
    """Two-sided (1 − ALPHA) range of mean(x²)/σ² for n iid N(0, σ²): χ²_n / n."""
    return stats.chi2.ppf(ALPHA / 2, n) / n, stats.chi2.isf(ALPHA / 2, n) / n


def assert_gaussian(x: np.ndarray, std: float) -> None:
    """x looks like iid N(0, std²): a z-test on the mean and a chi-square test on the
    variance (the mean is known to be 0)."""
    x64 = x.astype(np.float64)
    limit = stats.norm.isf(ALPHA / 2) * std / math.sqrt(x.size)
    assert abs(x64.mean()) < limit
    lo, hi = variance_bounds(x.size)
    assert lo < np.mean(x64**2) / std**2 < hi


# --- clipping -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 7, 1000, 3 * (1 << 20) + 5])
def test_clip_bounds_every_norm_and_reports_the_original(size: int) -> None:
    rng = np.random.default_rng(size)
    bound = 0.75
    for scale in [1e-4, 0.1, 0.7, 1.0, 10.0, 1e4]:
        x = (rng.standard_normal(size) * scale / math.sqrt(size)).astype(np.float32)
        before, original = norm64(x), x.copy()
        out, reported = clip_l2(x, bound)
        assert out is x  # in place
        assert reported == pytest.approx(before, rel=1e-9)
        assert norm64(x) <= bound
        if before <= bound:
            assert np.array_equal(x, original)  # small updates are untouched
        else:
            assert norm64(x) == pytest.approx(bound, rel=1e-5)
            np.testing.assert_allclose(x, original * (bound / before), rtol=1e-5, atol=1e-30)


def test_clip_holds_at_the_boundary_despite_float32_rounding() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        x = rng.uniform(-1, 1, rng.integers(1, 5000)).astype(np.float32)
        bound = norm64(x) * (1 - 1e-7)  # just below: a tiny rescale, where rounding matters
        clip_l2(x, bound)
        assert norm64(x) <= bound


def test_clip_refuses_what_it_cannot_clip() -> None:
    for bad in [np.array([1.0, np.nan], np.float32), np.array([np.inf, 0.0], np.float32)]:
        with pytest.raises(ValueError, match="non-finite"):
            clip_l2(bad, 1.0)
    with pytest.raises(ValueError, match="float32"):
        clip_l2(np.ones(3), 1.0)  # float64: a silent copy would make "in place" a lie
    with pytest.raises(ValueError, match="contiguous"):
        clip_l2(np.ones(6, np.float32)[::2], 1.0)
    for bound in [0.0, -1.0, math.inf, math.nan]:
        with pytest.raises(ValueError):
            clip_l2(np.ones(3, np.float32), bound)


def test_l2_norm_accumulates_in_float64() -> None:
    x = np.full(10_000_001, 0.1, np.float32)
    assert l2_norm(x) == pytest.approx(math.sqrt(x.size * float(np.float32(0.1)) ** 2), rel=1e-12)


# --- the noise source -----------------------------------------------------------------------

def test_noise_has_the_requested_variance_and_calls_add_up() -> None:
    src, std = NoiseSource(), 0.37
    x = np.zeros(N, np.float32)
    src.add_gaussian(x, std)
    assert_gaussian(x, std)
    # Every chunk, the ragged tail included, got noise (float32 normals are exactly 0 at
    # a rate of about 2^-23, so a few zeros are legitimate; an untouched chunk is not).
    assert N - np.count_nonzero(x) <= 8
    assert np.count_nonzero(x[(N // (1 << 20)) * (1 << 20):]) >= N % (1 << 20) - 8
    chunk = 1 << 20
    assert not np.array_equal(x[: N - chunk], x[chunk:])  # no chunk repeats another
    src.add_gaussian(x, std)  # a second, independent draw: the variances add
    assert_gaussian(x, std * math.sqrt(2))


def test_zero_std_is_a_no_op_and_bad_input_is_refused() -> None:
    x = np.ones(10, np.float32)
    NoiseSource().add_gaussian(x, 0.0)
    assert np.array_equal(x, np.ones(10, np.float32))
    for bad in [np.zeros(10), np.zeros(20, np.float32)[::2]]:
        with pytest.raises(ValueError):
            NoiseSource().add_gaussian(bad, 1.0)
    for std in [-1.0, math.nan, math.inf]:
        with pytest.raises(ValueError):
            NoiseSource().add_gaussian(np.zeros(3, np.float32), std)
    with pytest.raises(ValueError):
        NoiseSource(b"")


def test_unseeded_sources_differ_and_a_fixed_seed_reproduces() -> None:
    def draw(src: NoiseSource) -> np.ndarray:
        x = np.zeros(1000, np.float32)
        src.add_gaussian(x, 1.0)
        return x

    assert not np.array_equal(draw(NoiseSource()), draw(NoiseSource()))
    seed = bytes(range(32))
    assert np.array_equal(draw(NoiseSource(seed)), draw(NoiseSource(seed)))
    assert not np.array_equal(draw(NoiseSource(seed)), draw(NoiseSource(seed[::-1])))


def test_the_global_numpy_rng_is_left_alone() -> None:
    np.random.seed(1234)
    before = np.random.get_state()
    src = NoiseSource()
    src.add_gaussian(np.zeros(N, np.float32), 1.0)
    after = np.random.get_state()
    assert before[0] == after[0] and np.array_equal(before[1], after[1])
    assert before[2:] == after[2:]


# --- noise in the two modes -----------------------------------------------------------------

def test_noise_std_formulas() -> None:
    assert edge_noise_std(1.5, 0.4) == pytest.approx(0.6)
    assert agent_noise_std(1.5, 0.4, 9) == pytest.approx(0.2)
    assert agent_noise_std(1.5, 0.4, 1) == edge_noise_std(1.5, 0.4)
    for args in [(1.0, 1.0, 0), (1.0, 1.0, 2.0), (-1.0, 1.0, 3), (1.0, 0.0, 3)]:
        with pytest.raises(ValueError):
            agent_noise_std(*args)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        edge_noise_std(1.0, -1.0)


def group_sum_of_shares(agents: int, z: float, clip: float, quorum: int) -> np.ndarray:
    total = np.zeros(N, np.float32)
    for _ in range(agents):
        share = np.zeros(N, np.float32)
        NoiseSource().add_gaussian(share, agent_noise_std(z, clip, quorum))
        total += share
    return total


def test_a_quorum_of_shares_carries_exactly_the_target_noise() -> None:
    z, clip, m = 1.3, 0.5, 5
    assert_gaussian(group_sum_of_shares(m, z, clip, m), z * clip)


def test_more_survivors_than_the_quorum_never_carry_less_noise() -> None:
    z, clip, m, survivors = 1.3, 0.5, 5, 8
    total = group_sum_of_shares(survivors, z, clip, m)
    assert_gaussian(total, z * clip * math.sqrt(survivors / m))
    lo, _ = variance_bounds(N)
    assert np.mean(total.astype(np.float64) ** 2) > lo * (z * clip) ** 2


# --- adaptive clipping ----------------------------------------------------------------------

@pytest.mark.parametrize("quantile, start", [(0.5, 20.0), (0.5, 0.02), (0.9, 1.0)])
def test_adaptive_clip_tracks_the_target_quantile(quantile: float, start: float) -> None:
    rng = np.random.default_rng(11)
    norms = rng.lognormal(mean=0.0, sigma=1.0, size=500)  # a fixed population of clients
    m = norms.size
    clip = AdaptiveClip(start, target_quantile=quantile, bit_noise_std=m / 20)
    for _ in range(300):
        bits = sum(clip.bit(n) for n in norms)
        clip.update(bits + rng.normal(0, clip.bit_noise_std), m)
    assert np.mean(norms <= clip.bound) == pytest.approx(quantile, abs=0.08)
    assert clip.bound == pytest.approx(np.quantile(norms, quantile), rel=0.35)


def test_adaptive_clip_moves_the_right_way() -> None:
    clip = AdaptiveClip(1.0, bit_noise_std=5.0)
    assert clip.update(50.0, 100) < 1.0  # all 100 below the bound: shrink
    assert clip.bound == pytest.approx(math.exp(-0.2 * 0.5))
    low = clip.bound
    assert clip.update(-50.0, 100) > low  # all above: grow
    assert clip.bit(clip.bound) == 0.5 and clip.bit(clip.bound * 1.01) == -0.5


def test_update_noise_multiplier_is_the_papers_formula() -> None:
    for z, sigma_b in [(1.0, 5.0), (0.8, 2.5), (3.0, 1.6)]:
        z_delta = AdaptiveClip.update_noise_multiplier(z, sigma_b)
        assert z_delta == pytest.approx((z**-2 - (2 * sigma_b) ** -2) ** -0.5, rel=1e-12)
        assert z_delta > z  # the update gets more noise to pay for the bit sum
        # The pair costs one Gaussian with multiplier z: 1/z² = 1/z_Δ² + 1/(2σ_b)².
        assert z_delta**-2 + (2 * sigma_b) ** -2 == pytest.approx(z**-2, rel=1e-12)
    with pytest.raises(ValueError, match="exceed z/2"):
        AdaptiveClip.update_noise_multiplier(2.0, 1.0)


def test_adaptive_clip_rejects_bad_settings() -> None:
    for kwargs in [dict(bound=0.0), dict(target_quantile=1.0), dict(learning_rate=0.0),
                   dict(bit_noise_std=0.0)]:
        with pytest.raises(ValueError):
            AdaptiveClip(**(dict(bound=1.0, bit_noise_std=5.0) | kwargs))  # type: ignore[arg-type]
    clip = AdaptiveClip(1.0, bit_noise_std=5.0)
    with pytest.raises(ValueError):
        clip.update(math.nan, 10)
    with pytest.raises(ValueError):
        clip.update(1.0, 0)
