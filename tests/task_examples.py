"""Small tasks the tests bring, as a user's package would: importable by reference
(`tests.task_examples:Line`), never installed as entry points."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

import hfl.data
from hfl.task import Metric, Samples, Source, Task


class LineOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    slope: float = 3.0


class Line(Task):
    """y = slope·x + 1 + noise on x in [0, 10]: a regression with an RMSE."""

    name = "line"
    version = "2"
    metrics = (Metric("rmse", reduce="rms", better="lower"),)
    Options = LineOptions
    lr, batch_size = 0.01, 10
    options: LineOptions

    def model(self) -> nn.Module:
        return nn.Linear(1, 1)

    def data(self, source: Source) -> Samples:
        rng = np.random.default_rng(int(source.get("seed", 0)))
        x = 10 * rng.random((int(source.get("n", 100)), 1))
        y = self.options.slope * x + 1 + rng.normal(size=x.shape)
        return Samples(x, y.astype(np.float32), source.name)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target)

    def measure(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"rmse": torch.sqrt(F.mse_loss(output, target))}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 1)


class FromCsv(Line):
    """The line's model on points from a CSV file (columns x and y)."""

    name = "from-csv"

    def data(self, source: Source) -> Samples:
        s = hfl.data.csv(source.require_path(), x=["x"], y=["y"])
        return Samples(s.x, s.y[:, None], s.source)


class Normed(Line):
    """A model with batch norm: float buffers travel, the integer step count stays."""

    name = "normed"

    def model(self) -> nn.Module:
        return nn.Sequential(nn.BatchNorm1d(1), nn.Linear(1, 1))


class Exploding(Line):
    """Training that diverges to NaN."""

    name = "exploding"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target) * float("nan")


class Raising(Line):
    name = "raising"

    def fit(self, model, data, r):  # noqa: ANN001, ANN201
        raise RuntimeError("the sensor driver is gone")


class WrongShapes(Line):
    """Targets of another shape than the model's output: torch refuses the loss."""

    name = "wrong-shapes"

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(output, target.reshape(-1, 2))


NotATask = object()
