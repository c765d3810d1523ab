"""Partitioners: disjoint, covering, deterministic, and as skewed as their papers say."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import partition as pt

# 10 balanced classes of 100 samples, in a scrambled order.
LABELS = np.random.default_rng(42).permutation(np.repeat(np.arange(10), 100))


def _check_disjoint(parts: list[np.ndarray], n: int, *, cover: bool = True) -> None:
    joined = np.concatenate(parts)
    assert all(p.dtype == np.int64 for p in parts)
    assert len(np.unique(joined)) == len(joined), "parts overlap"
    assert joined.min() >= 0 and joined.max() < n
    if cover:
        assert len(joined) == n, "some samples are unassigned"


def test_iid_sizes_and_determinism() -> None:
    parts = pt.iid(103, 10, seed=1)
    _check_disjoint(parts, 103)
    assert {len(p) for p in parts} == {10, 11}
    assert all(np.array_equal(a, b) for a, b in zip(parts, pt.iid(103, 10, 1), strict=True))
    assert not np.array_equal(parts[0], pt.iid(103, 10, seed=2)[0])
    with pytest.raises(ValueError):
        pt.iid(3, 4, seed=0)


def test_shards_give_at_most_two_labels_per_part() -> None:
    parts = pt.shards(LABELS, 10, 2, seed=3)
    _check_disjoint(parts, len(LABELS))
    assert all(len(p) == 100 for p in parts)
    distinct = [len(np.unique(LABELS[p])) for p in parts]
    assert max(distinct) <= 2
    assert sum(distinct) > 10  # random dealing: not every part got one label twice
    again = pt.shards(LABELS, 10, 2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_shards_cover_uneven_sizes() -> None:
    parts = pt.shards(LABELS[:997], 7, 3, seed=0)
    _check_disjoint(parts, 997)
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 3


def test_dirichlet_respects_min_size_and_is_deterministic() -> None:
    parts = pt.dirichlet(LABELS, 8, alpha=0.5, seed=5, min_size=20)
    _check_disjoint(parts, len(LABELS))
    assert min(len(p) for p in parts) >= 20
    again = pt.dirichlet(LABELS, 8, alpha=0.5, seed=5, min_size=20)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _dominant_share(parts: list[np.ndarray]) -> float:
    """Mean over parts of the fraction of its samples carrying its most common label."""
    return float(np.mean([np.bincount(LABELS[p]).max() / len(p) for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    skewed = pt.dirichlet(LABELS, 10, alpha=0.05, seed=0, min_size=5)
    even = pt.dirichlet(LABELS, 10, alpha=100.0, seed=0, min_size=5)
    assert _dominant_share(skewed) > 0.5  # mostly one label per part
    assert _dominant_share(even) < 0.2  # close to the 0.1 of a uniform mix
    assert np.mean([len(np.unique(LABELS[p])) for p in skewed]) < 6


def test_dirichlet_gives_up_with_a_clear_error() -> None:
    with pytest.raises(ValueError, match="alpha"):
        pt.dirichlet(LABELS, 10, alpha=0.01, seed=0, min_size=90, max_attempts=20)
    with pytest.raises(ValueError):
        pt.dirichlet(LABELS, 10, alpha=1.0, seed=0, min_size=101)


def test_partition_dispatches() -> None:
    for kind in pt.KINDS:
        parts = pt.partition(kind, len(LABELS), 5, seed=0, labels=LABELS)
        _check_disjoint(parts, len(LABELS))
        assert len(parts) == 5
    assert [p.tolist() for p in pt.partition("contiguous", 7, 2, seed=0)] == [
        [0, 1, 2, 3], [4, 5, 6]]
    with pytest.raises(ValueError, match="iid"):
        pt.partition("zipf", len(LABELS), 5, seed=0, labels=LABELS)
    with pytest.raises(ValueError, match="needs integer class labels"):
        pt.partition("dirichlet", 10, 2, seed=0, labels=np.linspace(0, 1, 10))
