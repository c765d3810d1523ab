"""The streaming weighted sum shared by aggregators and the coordinator: O(P) memory."""

from __future__ import annotations

import numpy as np

from hfl.messages import Metrics


class WeightedSum:
    """Σ w_i·x_i, Σ w_i and sample-weighted metrics, accumulated one vector at a time.

    `add_weighted` takes a vector already multiplied by its weight (what partials carry);
    `add` multiplies into a preallocated scratch buffer so no temporary is allocated per call.
    """

    def __init__(self, size: int) -> None:
        self.total = np.zeros(size, dtype=np.float32)
        self._scratch = np.empty(size, dtype=np.float32)
        self.weight = 0.0
        self.count = 0
        self._m = {"train": 0.0, "eval_n": 0.0, "eval_loss": 0.0, "eval_acc": 0.0}

    def add(self, x: np.ndarray, weight: float, metrics: Metrics) -> None:
        np.multiply(x, np.float32(weight), out=self._scratch)
        self.add_weighted(self._scratch, weight, metrics)

    def add_weighted(self, wx: np.ndarray, weight: float, metrics: Metrics) -> None:
        np.add(self.total, wx, out=self.total)
        self.weight += weight
        self.count += 1
        self._m["train"] += metrics.train_loss * metrics.samples
        self._m["eval_n"] += metrics.eval_samples
        self._m["eval_loss"] += metrics.eval_loss * metrics.eval_samples
        self._m["eval_acc"] += metrics.eval_accuracy * metrics.eval_samples

    def add_metrics(self, metrics: Metrics) -> None:
        """Fold in metrics of a contribution that carries no vector (weight 0)."""
        self._m["eval_n"] += metrics.eval_samples
        self._m["eval_loss"] += metrics.eval_loss * metrics.eval_samples
        self._m["eval_acc"] += metrics.eval_accuracy * metrics.eval_samples

    def state(self) -> tuple[dict, np.ndarray]:
        """What a checkpoint keeps: the scalars and the running total (not a copy)."""
        return {"weight": self.weight, "count": self.count, "m": dict(self._m)}, self.total

    @classmethod
    def restore(cls, doc: dict, total: np.ndarray) -> WeightedSum:
        acc = cls(total.size)
        acc.total[...] = total
        acc.weight, acc.count = float(doc["weight"]), int(doc["count"])
        acc._m.update({k: float(doc["m"][k]) for k in acc._m})
        return acc

    def mean(self) -> np.ndarray:
        if self.weight <= 0:
            raise ValueError("no weight accumulated")
        return self.total / np.float32(self.weight)

    def metrics(self) -> Metrics:
        m, w = self._m, self.weight
        n = m["eval_n"]
        return Metrics(
            samples=w,
            train_loss=m["train"] / w if w else 0.0,
            eval_samples=n,
            eval_loss=m["eval_loss"] / n if n else 0.0,
            eval_accuracy=min(1.0, max(0.0, m["eval_acc"] / n)) if n else 0.0,
        )
