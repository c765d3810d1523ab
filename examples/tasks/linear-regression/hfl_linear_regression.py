"""FedAvg of a linear regression, the classic first example, as an hfl task.

The data of the blog post: y = 3x + 1 + N(0, 1) on x = 10·U(0, 1), 100 points drawn with
numpy's seed 0; two clients hold 50 each, train one local epoch of plain SGD on the mean
squared error per round, and 10 rounds of FedAvg follow. The least-squares line through
the 100 points predicts 1.22 at x = 0 and 31.16 at x = 10 (the truth: 1 and 31).

On a real board the points come from a CSV file (`path`, columns x and y); for a try on one
machine, `generate = {points = 100, seed = 0}` draws the blog's points instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import hfl.data
from hfl.task import DataError, Metric, Samples, Source, Task


class LinearRegression(Task):
    name = "linear-regression"
    version = "1.0.0"
    metrics = (Metric("rmse", reduce="rms", better="lower"),)
    # One local epoch of plain SGD per round (no momentum), as in the blog.
    epochs, batch_size, lr = 1, 5, 0.02

    def model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def data(self, source: Source) -> Samples:
        if source.path is not None:
            return hfl.data.csv(source.path, x=["x"], y=["y"])
        draw = source.get("generate")
        if not isinstance(draw, dict):
            raise DataError(source.name, "set path (a CSV of x, y) or generate = {points, seed}")
        return blog_points(int(draw.get("points", 100)), int(draw.get("seed", 0)))

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def measure(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rmse": torch.sqrt(F.mse_loss(output, target))}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 1)  # a batch of x values


def blog_points(n: int = 100, seed: int = 0) -> Samples:
    """The blog's draw, in its order: numpy's legacy generator, x first, then the noise."""
    rng = np.random.RandomState(seed)
    x = 10 * rng.rand(n, 1)
    y = 3 * x + 1 + rng.randn(n, 1)
    return Samples(x.astype(np.float32), y.astype(np.float32), "blog points")
