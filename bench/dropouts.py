"""SecAgg+ dropout tolerance by simulation: the share of rounds the server can finish.

    PYTHONPATH=. .venv/bin/python bench/dropouts.py [--trials 10000]

For each n and expected dropout δ, `choose_params` picks (k, t); random drop sets on the
real neighbour graph of hfl.crypto.secagg (combinatorics only, no crypto) then say whether every
secret the server needs still has t holders among the survivors: each survivor's b (t-1
surviving neighbours and its own share) and the s_sk of each dropped client that some
survivor masked with (t surviving neighbours). Two kinds of drop sets: exactly round(δn)
clients, as bench/secagg.py drops them, and each client on its own with probability δ,
the model `failure_bound` bounds (more spread at small n). Further rows: the default
parameters (δ = 0.2) under 30 % dropout, and the old ones (k = 3·ceil(log2 n), t = 0.55·k,
at least k/2 + 1) under 30 %. `bound` is `failure_bound`; `choose ms`, `choose_params`
uncached, best of 5.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hfl.crypto import secagg as sa  # noqa: E402

NS = (10, 50, 100, 500, 1000)
DROPOUTS = (0.1, 0.3)


def adjacency(ids: list[str], degree: int, seed: bytes) -> np.ndarray:
    """The 0/1 matrix of `sa.neighbours` in the order of `ids` (float32, for a product)."""
    at = {i: p for p, i in enumerate(ids)}
    adj = np.zeros((len(ids), len(ids)), np.float32)
    for i, js in sa.neighbours(ids, degree, seed).items():
        adj[at[i], [at[j] for j in js]] = 1
    return adj


def recovered(adj: np.ndarray, alive: np.ndarray, t: int) -> np.ndarray:
    """For each row of `alive` (drop sets × clients, True = survived): whether the server
    can rebuild every secret it needs, and has the t survivors it asks for."""
    held = alive.astype(np.float32) @ adj  # each client's surviving neighbours
    b_ok = ~alive | (held + 1 >= t)
    s_ok = alive | (held == 0) | (held >= t)
    return (b_ok & s_ok).all(axis=1) & (alive.sum(axis=1) >= t)


def drop_sets(rng: np.random.Generator, trials: int, n: int, dropout: float,
              exact: bool) -> np.ndarray:
    """trials × n survivors: exactly round(δn) dropped, or each with probability δ."""
    if exact:
        return rng.random((trials, n)).argsort(axis=1) >= round(dropout * n)
    return rng.random((trials, n)) >= dropout


def success(n: int, k: int, t: int, dropout: float, trials: int, rng: np.random.Generator,
            exact: bool) -> float:
    """The share of `trials` random drop sets after which the round can be finished."""
    adj, ok, done = adjacency([f"c{i:04d}" for i in range(n)], k, b"bench"), 0, 0
    step = max(1, (1 << 22) // n)  # drop sets per product: a few MiB at a time
    while done < trials:
        m = min(step, trials - done)
        ok += int(recovered(adj, drop_sets(rng, m, n, dropout, exact), t).sum())
        done += m
    return ok / trials


def old_params(n: int) -> tuple[int, int]:
    """What params_for chose before: k = 3·ceil(log2 n) (even, at most n-1), t = 0.55·k."""
    k = min(3 * math.ceil(math.log2(n)), n - 1)
    k += k % 2 if k < n - 1 else 0
    return k, max((k + 1) // 2 + 1, math.ceil(0.55 * k - 1e-9))


def choose_ms(n: int, dropout: float) -> float:
    times = []
    for _ in range(5):
        t = time.perf_counter()
        sa.choose_params.__wrapped__(n, dropout)
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=10_000, help="drop sets per row and kind")
    args = ap.parse_args()
    rng = np.random.default_rng(2020)
    print(f"## SecAgg+ dropout tolerance ({platform.machine()}, {os.cpu_count()} cpus, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {args.trials} drop sets)")
    print()
    print("| n | params for | drop | k | t | bound | P(ok) δn | P(ok) i.i.d. | choose ms |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    rows = [(n, f"δ = {d}", d, sa.choose_params(n, d), choose_ms(n, d))
            for n in NS for d in DROPOUTS]
    rows += [(n, "δ = 0.2 (default)", 0.3, sa.choose_params(n), None) for n in NS]
    rows += [(n, "old: 3·log2 n, 0.55", 0.3, old_params(n), None) for n in NS]
    for n, label, d, (k, t), ms in rows:
        exact = success(n, k, t, d, args.trials, rng, exact=True)
        iid = success(n, k, t, d, args.trials, rng, exact=False)
        bound = sa.failure_bound(n, k, t, d)
        print(f"| {n} | {label} | {d:.0%} | {k} | {t} | {bound:.1e} | {exact:.4f} | {iid:.4f} "
              f"| {'' if ms is None else f'{ms:.2f}'} |", flush=True)
    print()
    print(f"load after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
