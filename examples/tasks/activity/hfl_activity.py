"""Activity recognition on the board's own accelerometer, as an hfl task.

Each board's sensor publishes 3-axis readings on its local MQTT bus (`examples/sensors/
accelerometer.py` stands in for it); hfl keeps the newest in a bounded window on disk
(`hfl.data.live`) and cuts them into windows of 64 readings, about 1.3 s at 50 Hz. A small
1-D CNN with batch norm (whose running statistics travel with the weights) tells idle,
walking and running apart. The labels come with the readings here; on a real board they
would come from the user marking what they do, or from another sensor.

The task also shows the hooks beyond the defaults: its own optimizer (Adam, fresh each
round) and a model that removes gravity itself (each window's mean), so the exported ONNX
file takes raw readings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

import hfl.data
from hfl.task import Metric, Round, Samples, Source, Task

ACTIVITIES = ("idle", "walk", "run")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    window: int = Field(default=64, ge=16, le=1024, description="readings per window")
    stride: int = Field(default=32, ge=1, description="readings between window starts")
    channels: int = Field(default=16, ge=4, le=256)


class Activity(Task):
    name = "activity"
    version = "1.0.0"
    Options = Options
    metrics = (Metric("accuracy", bound=1.0),)
    epochs, batch_size, lr = 2, 16, 0.01
    options: Options

    def model(self) -> nn.Module:
        c = self.options.channels
        return nn.Sequential(
            Centre(),
            nn.Conv1d(3, c, kernel_size=9, padding=4), nn.BatchNorm1d(c), nn.ReLU(),
            nn.Conv1d(c, 2 * c, kernel_size=9, padding=4, stride=2), nn.ReLU(),
            nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(2 * c, len(ACTIVITIES)))

    def optimizer(self, model: nn.Module, r: Round) -> torch.optim.Optimizer:
        return torch.optim.Adam(model.parameters(), lr=r.lr)

    def data(self, source: Source) -> Samples:
        return hfl.data.live(source, self.options.window, self.options.stride, int_labels=True)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def measure(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (output.argmax(dim=1) == target).float().mean()}

    def example_input(self) -> torch.Tensor:
        return torch.zeros(2, 3, self.options.window)  # [batch, axes, readings]


class Centre(nn.Module):
    """Each window minus its own mean per axis: gravity and sensor offsets go, motion stays."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=-1, keepdim=True)
