"""hfl's own tasks, on the same API as a user's: four classifiers and their data.

| task | model |
|---|---|
| `mnist-cnn` | the CNN of McMahan et al. 2017 (FedAvg): 1,663,370 parameters for 10 classes |
| `mnist-2nn` | their MLP with two hidden layers of 200 (199,210 parameters) |
| `mlp` | one hidden layer of 128 |
| `logreg` | multinomial logistic regression |

Options: `input_shape` (one sample, without the batch axis) and `num_classes`. Data, from
the board's `[agent.datasets.NAME]` table: `source = "digits"` (scikit-learn's bundled set),
`"mnist"` (the IDX files in the folder `path`, `split = "train"` or `"test"`) or `"npz"`
(arrays `x` and integer `y` in the file `path`). The metric is accuracy.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from hfl import data
from hfl.task import DataError, Metric, Samples, Source, Task, TaskError

MNIST_SHAPE = (1, 28, 28)


class ClassifierOptions(BaseModel):
    """A job names both; reading data without them (`hfl agent check`) checks less."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_shape: tuple[int, ...] | None = Field(default=None, min_length=1, max_length=4)
    num_classes: int | None = Field(default=None, ge=2, le=100_000)

    @model_validator(mode="after")
    def _dims(self) -> ClassifierOptions:
        if self.input_shape is not None and any(d < 1 or d > 4096 for d in self.input_shape):
            raise ValueError("input_shape dimensions must be in 1..4096")
        return self


class Classifier(Task):
    """Cross-entropy over `num_classes` logits; accuracy as its metric."""

    Options = ClassifierOptions
    metrics = (Metric("accuracy", bound=1.0),)
    options: ClassifierOptions

    @property
    def shape(self) -> tuple[int, ...]:
        if self.options.input_shape is None:
            raise TaskError(f"task {self.name} needs the option input_shape")
        return self.options.input_shape

    @property
    def classes(self) -> int:
        if self.options.num_classes is None:
            raise TaskError(f"task {self.name} needs the option num_classes")
        return self.options.num_classes

    def data(self, source: Source) -> Samples:
        kind = source.get("source")
        if kind == "digits":
            s = data.digits()
        elif kind == "mnist":
            s = data.mnist(source.require_path(), source.get("split", "train"))
        elif kind == "npz":
            s = data.npz(source.require_path())
        else:
            raise DataError(source.name, f"source = {kind!r}: set digits, mnist or npz")
        return self._checked(s)

    def _checked(self, s: Samples) -> Samples:
        """Inputs in the task's shape (a channel axis is added where it is missing) and
        labels that are class indices."""
        shape = self.options.input_shape
        if shape is not None and s.x.shape[1:] != shape:
            if math.prod(s.x.shape[1:]) != math.prod(shape):
                raise DataError(s.source, f"samples of shape {s.x.shape[1:]}, the task's "
                                f"input_shape is {shape}")
            s = Samples(s.x.reshape(len(s), *shape), s.y, s.source)
        y = s.y
        if y is None or y.ndim != 1 or (y.size and not np.issubdtype(y.dtype, np.integer)):
            raise DataError(s.source, "labels must be a vector of integers")
        classes = self.options.num_classes or np.iinfo(np.int64).max
        bad = (y < 0) | (y >= classes)
        if bad.any():
            raise DataError(s.source, f"label {y[bad][0]} is not a class of {classes}",
                            row=int(np.argmax(bad)))
        return Samples(s.x, y.astype(np.int64, copy=False), s.source)

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(output, target)

    def measure(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"accuracy": (output.argmax(dim=1) == target).float().mean()}

    def example_input(self) -> torch.Tensor:
        # A batch of 2, not 1: a traced batch of 1 can get folded into constant shapes.
        return torch.zeros((2, *self.shape))


def _mlp(features: int, hidden: Sequence[int], num_classes: int) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = features
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


class MnistCnn(Classifier):
    name = "mnist-cnn"

    def model(self) -> nn.Module:
        if self.shape != MNIST_SHAPE:
            raise TaskError(f"mnist-cnn needs input_shape {MNIST_SHAPE}, got {self.shape}")
        return nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(1, 32, kernel_size=5, padding=2)),
            ("relu1", nn.ReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(32, 64, kernel_size=5, padding=2)),
            ("relu2", nn.ReLU()),
            ("pool2", nn.MaxPool2d(2)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(64 * 7 * 7, 512)),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(512, self.classes)),
        ]))


class _Dense(Classifier):
    hidden: tuple[int, ...] = ()

    def model(self) -> nn.Module:
        return _mlp(math.prod(self.shape), self.hidden, self.classes)


class Mnist2nn(_Dense):
    name = "mnist-2nn"
    hidden = (200, 200)


class Mlp(_Dense):
    name = "mlp"
    hidden = (128,)


class LogReg(_Dense):
    name = "logreg"


BUILTIN: dict[str, type[Classifier]] = {t.name: t for t in (MnistCnn, Mnist2nn, Mlp, LogReg)}
