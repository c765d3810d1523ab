"""Partitioners that split one dataset among simulated agents.

Every function returns disjoint, sorted int64 index arrays covering the samples it assigns,
and is deterministic for a seed (numpy's Generator is fine here: nothing must match across
machines, unlike the secure-aggregation masks).
"""

from __future__ import annotations

import numpy as np

KINDS: tuple[str, ...] = ("iid", "dirichlet", "shards", "contiguous")


def _check_parts(n_samples: int, n_parts: int) -> None:
    if n_parts < 1:
        raise ValueError(f"n_parts must be at least 1, got {n_parts}")
    if n_samples < n_parts:
        raise ValueError(f"cannot split {n_samples} samples into {n_parts} non-empty parts")


def _labels(labels: np.ndarray) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
        raise ValueError(f"labels must be a vector of integers, got {y.dtype} {y.shape}")
    return y


def _finish(parts: list[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(p).astype(np.int64, copy=False) for p in parts]


def iid(n_samples: int, n_parts: int, seed: int) -> list[np.ndarray]:
    """A uniform random split into parts whose sizes differ by at most one."""
    _check_parts(n_samples, n_parts)
    perm = np.random.default_rng(seed).permutation(n_samples)
    return _finish(np.array_split(perm, n_parts))


def contiguous(n_samples: int, n_parts: int) -> list[np.ndarray]:
    """Consecutive runs in the data's own order (the first n/k samples to part 0, ...), as
    when each board records its own stretch of a stream."""
    _check_parts(n_samples, n_parts)
    return _finish(np.array_split(np.arange(n_samples), n_parts))


def _dirichlet_draw(
    by_class: list[np.ndarray], n_parts: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """One draw: each class is cut among the parts in Dir(alpha) proportions."""
    pieces: list[list[np.ndarray]] = [[] for _ in range(n_parts)]
    for idx in by_class:
        idx = rng.permutation(idx)
        props = rng.dirichlet(np.full(n_parts, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
        for part, chunk in zip(pieces, np.split(idx, cuts), strict=True):
            part.append(chunk)
    return [np.concatenate(p) for p in pieces]


def default_min_size(n_samples: int, n_parts: int) -> int:
    """10 samples (the usual floor), relaxed to half a fair share when the data are scarce."""
    return max(1, min(10, n_samples // (2 * n_parts)))


def dirichlet(
    labels: np.ndarray,
    n_parts: int,
    alpha: float,
    seed: int,
    min_size: int | None = None,
    max_attempts: int = 1000,
) -> list[np.ndarray]:
    """The label-Dirichlet non-IID split (Hsu et al. 2019): smaller alpha, more skew.

    Draws again until every part has at least `min_size` samples (default:
    `default_min_size`), giving up with a ValueError after `max_attempts` draws.
    """
    y = _labels(labels)
    _check_parts(len(y), n_parts)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    if min_size is None:
        min_size = default_min_size(len(y), n_parts)
    if min_size * n_parts > len(y):
        raise ValueError(f"{len(y)} samples cannot give {n_parts} parts {min_size} each")
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(max_attempts):
        parts = _dirichlet_draw(by_class, n_parts, alpha, rng)
        if min(len(p) for p in parts) >= min_size:
            return _finish(parts)
    raise ValueError(
        f"no Dirichlet(alpha={alpha}) split of {len(y)} samples into {n_parts} parts gave each "
        f"at least {min_size} samples in {max_attempts} draws; raise alpha or lower min_size"
    )


def shards(
    labels: np.ndarray, n_parts: int, shards_per_part: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """The FedAvg paper's pathological non-IID split: sort by label, cut into
    n_parts * shards_per_part shards (sizes differ by at most one), deal each part
    `shards_per_part` random shards. Every sample is assigned."""
    y = _labels(labels)
    if shards_per_part < 1:
        raise ValueError(f"shards_per_part must be at least 1, got {shards_per_part}")
    n_shards = n_parts * shards_per_part
    _check_parts(len(y), n_shards)
    rng = np.random.default_rng(seed)
    # Shuffle first so which samples of a label land in which shard is random too.
    shuffled = rng.permutation(len(y))
    by_label = shuffled[np.argsort(y[shuffled], kind="stable")]
    cut = np.array_split(by_label, n_shards)
    deal = rng.permutation(n_shards).reshape(n_parts, shards_per_part)
    return _finish([np.concatenate([cut[s] for s in row]) for row in deal])


def partition(
    kind: str,
    n_samples: int,
    n_parts: int,
    seed: int,
    labels: np.ndarray | None = None,
    alpha: float = 0.5,
    shards_per_part: int = 2,
) -> list[np.ndarray]:
    """Dispatch by kind: "iid", "contiguous", or by integer class labels "dirichlet" (uses
    alpha) or "shards" (uses shards_per_part)."""
    if kind == "iid":
        return iid(n_samples, n_parts, seed)
    if kind == "contiguous":
        return contiguous(n_samples, n_parts)
    if kind not in KINDS:
        raise ValueError(f"unknown partition kind {kind!r}; known: {', '.join(KINDS)}")
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"a {kind} partition needs integer class labels (y), as a "
                         "classifier's data has; use iid or contiguous")
    if kind == "dirichlet":
        return dirichlet(labels, n_parts, alpha, seed)
    return shards(labels, n_parts, shards_per_part, seed)
