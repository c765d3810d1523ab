"""The streaming weighted sum shared by aggregators and the coordinator: O(P) memory."""

from __future__ import annotations

import numpy as np

from hfl.messages import Metrics

_CHUNK = 1 << 16  # floats per fused step: 256 KiB, so the scaled chunk stays in L2


class WeightedSum:
    """Σ w_i·x_i, Σ w_i and sample-weighted metrics, accumulated one vector at a time.

    The running total is kept as `scale · _sum`, with `scale` the first weight seen, so
    the common case of equal weights (FedAvg shards of the same size) is one `numpy.add`
    per vector. Another weight is scaled into a cache-sized chunk and added, which reads
    and writes main memory once as well. `total` gives Σ w_i·x_i itself.
    `add_weighted` takes a vector already multiplied by its weight (what partials carry).
    """

    def __init__(self, size: int) -> None:
        self._sum = np.zeros(size, dtype=np.float32)
        self._scale = 0.0  # 0 until a vector with weight is added
        self._chunk = np.empty(min(size, _CHUNK), dtype=np.float32)
        self.weight = 0.0
        self.count = 0
        self._m = {"train": 0.0, "eval_n": 0.0, "eval_loss": 0.0, "eval_acc": 0.0}

    @property
    def total(self) -> np.ndarray:
        """Σ w_i·x_i (the buffer itself, normalized in place: writes to it are kept)."""
        if self._scale not in (0.0, 1.0):
            np.multiply(self._sum, np.float32(self._scale), out=self._sum)
        self._scale = 1.0
        return self._sum

    def add(self, x: np.ndarray, weight: float, metrics: Metrics) -> None:
        self._check(x)
        if weight:
            if not self._scale:
                self._scale = float(weight)
            self._accumulate(x, weight / self._scale)
        self._fold(weight, metrics)

    def add_weighted(self, wx: np.ndarray, weight: float, metrics: Metrics) -> None:
        self._check(wx)
        if not self._scale:
            self._scale = 1.0
        self._accumulate(wx, 1.0 / self._scale)
        self._fold(weight, metrics)

    def _check(self, x: np.ndarray) -> None:
        if x.shape != self._sum.shape:
            raise ValueError(f"vector of shape {x.shape}, expected {self._sum.shape}")

    def _accumulate(self, x: np.ndarray, factor: float) -> None:
        """_sum += factor·x, without a vector-sized temporary."""
        if factor == 1.0:
            np.add(self._sum, x, out=self._sum)
            return
        f = np.float32(factor)
        for i in range(0, x.size, _CHUNK):
            part, acc = x[i:i + _CHUNK], self._sum[i:i + _CHUNK]
            scaled = self._chunk[:part.size]
            np.multiply(part, f, out=scaled)
            np.add(acc, scaled, out=acc)

    def _fold(self, weight: float, metrics: Metrics) -> None:
        self.weight += weight
        self.count += 1
        self._m["train"] += metrics.train_loss * metrics.samples
        self.add_metrics(metrics)

    def add_metrics(self, metrics: Metrics) -> None:
        """Fold in metrics of a contribution that carries no vector (weight 0)."""
        self._m["eval_n"] += metrics.eval_samples
        self._m["eval_loss"] += metrics.eval_loss * metrics.eval_samples
        self._m["eval_acc"] += metrics.eval_accuracy * metrics.eval_samples

    def state(self) -> tuple[dict, np.ndarray]:
        """What a checkpoint keeps: the scalars and the running sum (not a copy), left as
        `scale · sum` so that checkpointing after every update keeps the one-add path."""
        doc = {"weight": self.weight, "count": self.count, "m": dict(self._m),
               "scale": self._scale}
        return doc, self._sum

    @classmethod
    def restore(cls, doc: dict, total: np.ndarray) -> WeightedSum:
        acc = cls(total.size)
        acc._sum[...] = total
        acc._scale = float(doc.get("scale", 1.0))  # checkpoints before the scale: Σ w·x
        acc.weight, acc.count = float(doc["weight"]), int(doc["count"])
        acc._m.update({k: float(doc["m"][k]) for k in acc._m})
        return acc

    def mean(self) -> np.ndarray:
        if self.weight <= 0:
            raise ValueError("no weight accumulated")
        return self._sum * np.float32(self._scale / self.weight)

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
