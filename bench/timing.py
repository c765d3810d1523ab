"""What every benchmark here times with: the best of a few runs."""

from __future__ import annotations

import time
from collections.abc import Callable


def best(fn: Callable[[], object], repeat: int = 7) -> float:
    """The fastest of `repeat` runs of `fn`, in seconds (the least disturbed by the OS)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)
