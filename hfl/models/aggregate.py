"""The streaming weighted sum shared by aggregators and the coordinator: O(P) memory."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from hfl.wire.messages import Metrics, MetricSpec

_CHUNK = 1 << 16  # floats per fused step: 256 KiB, so the scaled chunk stays in L2


class WeightedSum:
    """Σ w_i·x_i, Σ w_i and sample-weighted metrics, accumulated one vector at a time.

    The running total is kept as `scale · _sum`, with `scale` the first weight seen, so
    the common case of equal weights (FedAvg shards of the same size) is one `numpy.add`
    per vector. Another weight is scaled into a cache-sized chunk and added, which reads
    and writes main memory once as well. `total` gives Σ w_i·x_i itself.
    `add_weighted` takes a vector already multiplied by its weight (what partials carry).
    """

    def __init__(self, size: int, metrics: Sequence[MetricSpec] = ()) -> None:
        self._sum = np.zeros(size, dtype=np.float32)
        self._scale = 0.0  # 0 until a vector with weight is added
        self._chunk = np.empty(min(size, _CHUNK), dtype=np.float32)
        self.weight = 0.0
        self.count = 0
        self._m = {"train": 0.0, "eval_n": 0.0, "eval_loss": 0.0}
        self._specs = tuple(metrics)
        self._vals = dict.fromkeys((m.name for m in self._specs), 0.0)  # Σ e·fold(value)

    @property
    def total(self) -> np.ndarray:
        """Σ w_i·x_i (the buffer itself, normalized in place: writes to it are kept)."""
        if self._scale not in (0.0, 1.0):
            np.multiply(self._sum, np.float32(self._scale), out=self._sum)
        self._scale = 1.0
        return self._sum

    def add(self, x: np.ndarray, weight: float, metrics: Metrics) -> None:
        """Add x with its weight; ValueError (and nothing added) for a vector of another
        size or metrics other than the job's."""
        self._check(x, metrics)
        if weight:
            if not self._scale:
                self._scale = float(weight)
            self._accumulate(x, weight / self._scale)
        self._fold(weight, metrics)

    def add_weighted(self, wx: np.ndarray, weight: float, metrics: Metrics) -> None:
        self._check(wx, metrics)
        if not self._scale:
            self._scale = 1.0
        self._accumulate(wx, 1.0 / self._scale)
        self._fold(weight, metrics)

    def _check(self, x: np.ndarray, metrics: Metrics) -> None:
        if x.shape != self._sum.shape:
            raise ValueError(f"vector of shape {x.shape}, expected {self._sum.shape}")
        self.check_metrics(metrics)

    def check_metrics(self, metrics: Metrics) -> None:
        """ValueError unless a contribution that evaluated names exactly the job's metrics."""
        if metrics.eval_samples > 0 and set(metrics.eval_metrics) != set(self._vals):
            raise ValueError(f"metrics {sorted(metrics.eval_metrics)}, the job's are "
                             f"{sorted(self._vals)}")

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
        """Fold in metrics of a contribution that carries no vector (weight 0). Its named
        metrics must be the job's when it evaluated anything (ValueError otherwise)."""
        self.check_metrics(metrics)
        e = metrics.eval_samples
        self._m["eval_n"] += e
        self._m["eval_loss"] += metrics.eval_loss * e
        if e > 0:
            for m in self._specs:
                self._vals[m.name] += e * fold(m, metrics.eval_metrics[m.name])

    def state(self) -> tuple[dict, np.ndarray]:
        """What a checkpoint keeps: the scalars and the running sum (not a copy), left as
        `scale · sum` so that checkpointing after every update keeps the one-add path."""
        doc = {"weight": self.weight, "count": self.count, "m": dict(self._m),
               "vals": dict(self._vals), "scale": self._scale}
        return doc, self._sum

    @classmethod
    def restore(cls, doc: dict, total: np.ndarray,
                metrics: Sequence[MetricSpec] = ()) -> WeightedSum:
        acc = cls(total.size, metrics)
        acc._sum[...] = total
        acc._scale = float(doc.get("scale", 1.0))  # checkpoints before the scale: Σ w·x
        acc.weight, acc.count = float(doc["weight"]), int(doc["count"])
        acc._m.update({k: float(doc["m"][k]) for k in acc._m})
        acc._vals.update({k: float(v) for k, v in doc.get("vals", {}).items()
                          if k in acc._vals})
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
            eval_metrics={s.name: unfold(s, self._vals[s.name] / n) for s in self._specs}
            if n else {},
        )


def fold(spec: MetricSpec, value: float) -> float:
    """What is averaged for a metric: the value, or its square for an RMS metric."""
    return value * value if spec.reduce == "rms" else value


def unfold(spec: MetricSpec, mean: float) -> float:
    return math.sqrt(max(mean, 0.0)) if spec.reduce == "rms" else mean
