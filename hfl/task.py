"""The task API, version 1: the model, the board's data and the objective are the user's.

A task is ordinary Python in the user's own package: a subclass of `Task` that builds the
model, opens the board's local data and says what to minimise and what to report. hfl
does the rest (the fleet, encryption, secure aggregation, differential privacy, the
hierarchy, ONNX export) without looking inside: on the wire a model is one flat float32
vector in the order of `hfl.tasks.Layout`.

```python
class LinearRegression(Task):
    name = "linear-regression"
    version = "1.0"
    metrics = (Metric("rmse", reduce="rms", better="lower"),)
    lr, batch_size = 0.01, 10

    def model(self):
        return torch.nn.Linear(1, 1)

    def data(self, source):
        return hfl.data.csv(source.path, x=["x"], y=["y"])

    def loss(self, output, target):
        return torch.nn.functional.mse_loss(output, target)

    def measure(self, output, target):
        return {"rmse": torch.sqrt(torch.mean((output - target) ** 2))}

    def example_input(self):
        return torch.zeros(2, 1)
```

`fit` and `evaluate` default to mini-batch training and batched evaluation of `loss` over
`Samples` (x, y); a task overrides them for anything else (several inputs, a custom
optimizer, unsupervised objectives). Tasks are found by the entry-point group `hfl.tasks`
or by a `package.module:Attribute` reference (`hfl.models.tasks.load`); docs/tasks.md walks
through writing one.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from hfl.errors import TaskError

__all__ = ["API_VERSION", "DataError", "Evaluation", "Fit", "Metric", "NoData", "Round",
           "Samples", "Source", "Task", "TaskError", "check_metrics"]

API_VERSION = 1


class DataError(ValueError):
    """Local data hfl cannot train on: names the source and, where it can, the row."""

    def __init__(self, source: str, problem: str, row: int | None = None) -> None:
        self.source, self.problem, self.row = source, problem, row
        where = f"{source}" + (f" row {row}" if row is not None else "")
        super().__init__(f"{where}: {problem}")


class NoData(DataError):
    """A source that is readable but holds nothing to train on yet (an empty window)."""


@dataclass(frozen=True)
class Metric:
    """A named metric that `evaluate` returns besides the loss.

    reduce: how the fleet combines the agents' values, weighted by their evaluation
    samples: `mean`, or `rms` for a root-mean-square metric (RMSE: the agents' values are
    squared, averaged and the root taken, so the fleet's RMSE is exact). bound: the largest
    magnitude kept (secure aggregation sums metrics in fixed point; beyond it they clip).
    """

    name: str
    reduce: Literal["mean", "rms"] = "mean"
    better: Literal["higher", "lower"] = "higher"
    bound: float = 64.0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise TaskError(f"metric name {self.name!r}: letters, digits, '-' and '_' only")
        if not self.bound > 0:
            raise TaskError(f"metric {self.name}: bound must be > 0")


@dataclass(frozen=True)
class Samples:
    """N samples: inputs `x` (N x ...) and, for supervised tasks, targets `y` (N x ...).

    Checked on creation, so bad data never reaches training: same length, real numbers,
    no NaN or infinity (a `DataError` naming `source` and the first bad row).
    """

    x: np.ndarray
    y: np.ndarray | None = None
    source: str = "data"

    def __post_init__(self) -> None:
        x = np.asarray(self.x)
        if x.ndim < 1 or not _real(x):
            raise DataError(self.source, f"x must be an N x ... array of numbers, got "
                            f"{x.dtype} of shape {x.shape}")
        if x.dtype != np.float32:
            x = x.astype(np.float32)
        _check_finite(x, self.source, "x")
        y = self.y
        if y is not None:
            y = np.asarray(y)
            if y.ndim < 1 or len(y) != len(x):
                raise DataError(self.source, f"y has {len(y) if y.ndim else 0} rows, x has "
                                f"{len(x)}")
            if not _real(y) and y.dtype != np.bool_:
                raise DataError(self.source, f"y must be numbers, got {y.dtype}")
            if y.dtype.kind == "f":
                _check_finite(y, self.source, "y")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return len(self.x)

    def subset(self, idx: np.ndarray) -> Samples:
        return Samples(self.x[idx], None if self.y is None else self.y[idx], self.source)

    def split(self, test_fraction: float, seed: int) -> tuple[Samples, Samples]:
        """A random (train, test) split; `test_fraction` of the rows (rounded) go to test."""
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {test_fraction}")
        perm = np.random.default_rng(seed).permutation(len(self))
        n_test = int(round(len(self) * test_fraction))
        return self.subset(np.sort(perm[n_test:])), self.subset(np.sort(perm[:n_test]))


def _real(a: np.ndarray) -> bool:
    return np.issubdtype(a.dtype, np.number) and a.dtype.kind != "c"


def _check_finite(a: np.ndarray, source: str, what: str) -> None:
    if a.dtype.kind != "f" or a.size == 0:
        return
    bad = ~np.isfinite(a.reshape(len(a), -1)).all(axis=1) if a.ndim > 1 else ~np.isfinite(a)
    if bad.any():
        raise DataError(source, f"{what} is not finite (NaN or infinity)",
                        row=int(np.argmax(bad)))


@dataclass(frozen=True)
class Source:
    """One data source of the board, as its agent config declares it
    (`[agent.datasets.NAME]`): its name, its settings (the table minus hfl's own keys) and
    `path`, resolved against the config's folder. `state_dir` is a folder the task may keep
    files in across restarts (a live window)."""

    name: str
    settings: Mapping[str, Any] = field(default_factory=dict)
    path: Path | None = None
    state_dir: Path = Path("state")

    def get(self, key: str, default: Any = None) -> Any:
        return self.settings.get(key, default)

    def require_path(self) -> Path:
        if self.path is None:
            raise DataError(self.name, "no path: set `path` in its [agent.datasets] table")
        return self.path


@dataclass(frozen=True)
class Round:
    """One local round: its settings (from the job, defaulting to the task's) and where to
    train. `progress` must be called often (after each batch): it feeds systemd's watchdog
    and lets a stop request cut training short."""

    job: str = ""
    round: int = 0
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    seed: int = 0
    device: torch.device = torch.device("cpu")
    progress: Callable[[], None] | None = None

    def tick(self) -> None:
        if self.progress is not None:
            self.progress()


@dataclass(frozen=True)
class Fit:
    """What local training reports: the mean training loss and the samples it saw."""

    loss: float
    samples: int


@dataclass(frozen=True)
class Evaluation:
    """A model's mean loss on `samples` held-out samples, and the task's named metrics."""

    loss: float
    samples: int
    metrics: dict[str, float] = field(default_factory=dict)


class _NoOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task:
    """Subclass this. Required: `name`, `model`, `data` and, for the default loops, `loss`;
    `example_input` for the ONNX export. Class attributes `epochs`, `batch_size`, `lr` and
    `momentum` are the round's settings unless a job sets its own."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    metrics: ClassVar[tuple[Metric, ...]] = ()
    # Losses above this clip in secure aggregation's fixed point (a diverged agent cannot
    # swamp its group's reported loss); the update itself is bounded separately.
    loss_bound: ClassVar[float] = 64.0
    # Options a job may pass (`options = {...}` in its spec), validated here: a pydantic
    # model; without one, a task takes no options.
    Options: ClassVar[type[BaseModel]] = _NoOptions
    epochs: ClassVar[int] = 1
    batch_size: ClassVar[int] = 32
    lr: ClassVar[float] = 0.05
    momentum: ClassVar[float] = 0.0

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        try:
            self.options = self.Options.model_validate(dict(options or {}))
        except ValidationError as e:
            problems = "; ".join(f"{'.'.join(map(str, x['loc'])) or 'options'}: {x['msg']}"
                                 for x in e.errors()[:3])
            raise TaskError(f"task {self.name}: bad options: {problems}") from None

    # ------------------------------------------------------------ what the user writes

    def model(self) -> nn.Module:
        """A fresh model. hfl initialises it (seeded) on the coordinator only."""
        raise NotImplementedError(f"task {self.name}: define model()")

    def data(self, source: Source) -> Samples | tuple[Samples, Samples]:
        """The board's local data for `source`: all of it (hfl keeps the source's
        `test_fraction` aside for evaluation), or (train, test). Called at every round the
        board trains in, so a file that grows or a live window gives the newest data."""
        raise NotImplementedError(f"task {self.name}: define data()")

    def loss(self, output: Any, target: Any) -> torch.Tensor:
        """The mean loss of a batch (what the default `fit` minimises)."""
        raise NotImplementedError(f"task {self.name}: define loss() or override fit()")

    def measure(self, output: Any, target: Any) -> Mapping[str, Any]:
        """The named metrics (`metrics`) over the whole local test set's outputs."""
        return {}

    def example_input(self) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """A batch of inputs (of 2 or more) for the ONNX export: shapes and dtypes only."""
        raise NotImplementedError(f"task {self.name}: define example_input() for the export")

    # ------------------------------------------------------------ defaults

    def optimizer(self, model: nn.Module, r: Round) -> torch.optim.Optimizer:
        """A fresh optimizer per round: momentum does not carry across rounds."""
        return torch.optim.SGD(model.parameters(), lr=r.lr, momentum=r.momentum)

    def fit(self, model: nn.Module, data: Samples, r: Round) -> Fit:
        """Mini-batch training of `loss` for `r.epochs` epochs, shuffled from `r.seed`. The
        whole (small) set moves to the device once; batches are index gathers there."""
        n = len(data)
        if n == 0:
            return Fit(0.0, 0)
        model.to(r.device).train()
        x, y = _tensors(data, r.device)
        opt = self.optimizer(model, r)
        gen = torch.Generator(device="cpu").manual_seed(int(r.seed))
        total = torch.zeros((), device=r.device)
        for _ in range(r.epochs):
            total.zero_()  # only the last epoch's loss is reported
            for batch in torch.randperm(n, generator=gen).to(r.device).split(r.batch_size):
                opt.zero_grad(set_to_none=True)
                loss = self.loss(model(x[batch]), None if y is None else y[batch])
                loss.backward()
                opt.step()
                total += loss.detach() * len(batch)  # on the device: one sync per round
                r.tick()
        return Fit(float(total.item()) / n, n)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, data: Samples, r: Round) -> Evaluation:
        """The mean loss and `measure` of `model` on `data`, in batches of 512."""
        n = len(data)
        if n == 0:
            return Evaluation(0.0, 0, {})
        was_training = model.training
        model.to(r.device).eval()
        x, y = _tensors(data, r.device)
        outputs = []
        for start in range(0, n, 512):
            outputs.append(model(x[start:start + 512]))
            r.tick()
        model.train(was_training)
        return self.score(torch.cat(outputs), y)

    @torch.no_grad()
    def score(self, output: torch.Tensor, target: torch.Tensor | None) -> Evaluation:
        """Loss and metrics of a whole set's outputs: the default `evaluate`, and how an app
        scores an exported model's outputs on its own held-out data."""
        n = len(output)
        loss = 0.0
        for start in range(0, n, 4096):  # the loss is a batch mean: weight it by the batch
            part = slice(start, start + 4096)
            batch = len(output[part])
            loss += float(self.loss(output[part], None if target is None else target[part])) \
                * batch
        values = {k: float(v) for k, v in self.measure(output, target).items()}
        return Evaluation(loss / n if n else 0.0, n, values)


def _tensors(data: Samples, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    x = torch.from_numpy(data.x).to(device)
    y = None if data.y is None else torch.from_numpy(np.ascontiguousarray(data.y)).to(device)
    return x, y


def check_metrics(task: Task, values: Mapping[str, float]) -> dict[str, float]:
    """The evaluation's metrics, exactly the task's declared ones and finite."""
    declared = [m.name for m in task.metrics]
    if sorted(values) != sorted(declared):
        raise TaskError(f"task {task.name}: evaluate returned metrics {sorted(values)}, it "
                        f"declares {declared}")
    bad = [k for k, v in values.items() if not math.isfinite(v)]
    if bad:
        raise TaskError(f"task {task.name}: metric {bad[0]} is not finite")
    return {k: float(values[k]) for k in declared}
