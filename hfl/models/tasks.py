"""Finding tasks, and turning a task's model into what the protocol moves.

A task is found by its entry point in the group `hfl.tasks` (how an installed wheel
announces it) or by a `package.module:Attribute` reference, and is then known by its own
`name`. A role runs only the tasks its config allows (`TaskSet`).

On the wire a model is one flat float32 vector: every floating-point entry of the model's
state dict (parameters and float buffers such as batch-norm statistics), in state-dict
order, cast to float32. `Layout` is that order with shapes and dtypes, and its
fingerprint is what a job pins, so an agent whose installed task would read the vector
differently refuses instead of training garbage. Integer buffers (batch-norm's step
count) stay on the board.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import logging
import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np
import torch
from torch import nn

from hfl.task import Task, TaskError
from hfl.wire.messages import MetricSpec, ModelSpec

log = logging.getLogger("hfl.tasks")

GROUP = "hfl.tasks"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$")


def load(ref: str) -> type[Task]:
    """The task class behind an entry-point name or a `module:Attribute` reference."""
    if ":" in ref:
        module, _, attr = ref.partition(":")
        try:
            obj: Any = importlib.import_module(module)
            for part in attr.split("."):
                obj = getattr(obj, part)
        except (ImportError, AttributeError) as e:
            raise TaskError(f"task {ref!r}: cannot import it ({e})") from None
    else:
        found = entry_points(group=GROUP, name=ref)
        if not found:
            known = ", ".join(sorted(installed())) or "none"
            raise TaskError(f"task {ref!r} is not installed (entry points in {GROUP}: "
                            f"{known}); install its wheel or use a module:Attribute reference")
        try:
            obj = next(iter(found)).load()
        except Exception as e:  # a broken wheel: say which, do not take the role down
            raise TaskError(f"task {ref!r}: its entry point fails to load ({e})") from None
    return check_class(obj, ref)


def check_class(obj: Any, ref: str = "") -> type[Task]:
    """`obj` as a usable task class: a `Task` subclass with a valid name and metrics."""
    if not (isinstance(obj, type) and issubclass(obj, Task)):
        raise TaskError(f"task {ref or obj!r} is not a subclass of hfl.task.Task")
    if not _NAME.match(obj.name or ""):
        raise TaskError(f"task {ref or obj.__name__}: name {obj.name!r} must be 1-32 letters, "
                        "digits, '.', '-' or '_'")
    names = [m.name for m in obj.metrics]
    if len(set(names)) != len(names):
        raise TaskError(f"task {obj.name}: metric names repeat: {names}")
    if not isinstance(obj.version, str) or not 0 < len(obj.version) <= 64:
        raise TaskError(f"task {obj.name}: version must be a non-empty string")
    return obj


def installed() -> dict[str, str]:
    """Entry-point name → its `module:attr`, for every task installed in this environment."""
    return {ep.name: ep.value for ep in entry_points(group=GROUP)}


class TaskSet:
    """The tasks a role may run, by name, loaded from entry-point names or references."""

    def __init__(self, refs: Iterable[str | type[Task]]) -> None:
        self.classes: dict[str, type[Task]] = {}
        for ref in refs:
            cls = check_class(ref) if isinstance(ref, type) else load(ref)
            other = self.classes.get(cls.name)
            if other is not None and other is not cls:
                raise TaskError(f"two tasks are named {cls.name!r}: {other.__module__}."
                                f"{other.__qualname__} and {cls.__module__}.{cls.__qualname__}")
            self.classes[cls.name] = cls
        self._prepared: dict[tuple[str, str], Prepared] = {}

    @classmethod
    def everything_installed(cls) -> TaskSet:
        """Every task installed as an entry point; one that fails to load is left out with
        a warning (a broken wheel must not stop the others)."""
        classes = []
        for ref in installed():
            try:
                classes.append(load(ref))
            except TaskError as e:
                log.warning("%s", e)
        return cls(classes)

    def __contains__(self, name: object) -> bool:
        return name in self.classes

    def names(self) -> list[str]:
        return sorted(self.classes)

    def prepare(self, name: str, options: dict[str, Any] | None = None) -> Prepared:
        """The task `name` with these options (cached: its model is built once)."""
        cls = self.classes.get(name)
        if cls is None:
            raise TaskError(f"task {name!r} is not allowed here (allowed: "
                            f"{', '.join(self.names()) or 'none'})")
        key = (name, json.dumps(options or {}, sort_keys=True))
        if key not in self._prepared:
            self._prepared[key] = Prepared(cls(options or {}))
        return self._prepared[key]

    def resolve(self, spec: ModelSpec) -> tuple[ModelSpec, Prepared]:
        """The coordinator's side: a requested spec with the task's own version, layout,
        metrics and round settings filled in. TaskError when the request pins a version or
        layout other than the installed task's."""
        p = self.prepare(spec.task, spec.options)
        task = p.task
        if spec.task_version and spec.task_version != task.version:
            raise TaskError(f"task {task.name}: version {spec.task_version} asked for, "
                            f"{task.version} installed")
        if spec.layout and spec.layout != p.layout.fingerprint:
            raise TaskError(f"task {task.name}: layout {spec.layout[:12]} asked for, the "
                            f"installed task's is {p.layout.fingerprint[:12]}")
        return spec.model_copy(update={
            "task_version": task.version,
            "layout": p.layout.fingerprint,
            "metrics": p.metric_specs(),
            "loss_bound": task.loss_bound,
            "epochs": spec.epochs or task.epochs,
            "batch_size": spec.batch_size or task.batch_size,
            "lr": spec.lr or task.lr,
            "momentum": task.momentum if spec.momentum is None else spec.momentum,
        }), p


@dataclass(frozen=True)
class Layout:
    """(name, shape, dtype) of each floating entry of the state dict, in order."""

    entries: tuple[tuple[str, tuple[int, ...], str], ...]

    @classmethod
    def of(cls, model: nn.Module) -> Layout:
        return cls(tuple((name, tuple(t.shape), str(t.dtype).removeprefix("torch."))
                         for name, t in model.state_dict().items() if t.is_floating_point()))

    @property
    def num_params(self) -> int:
        return sum(math.prod(shape) for _, shape, _ in self.entries)

    @property
    def fingerprint(self) -> str:
        canon = json.dumps([[n, list(s), d] for n, s, d in self.entries], separators=(",", ":"))
        return hashlib.sha256(canon.encode()).hexdigest()


class Prepared:
    """A task with its options: its layout, fresh models, and the flat vector's codec."""

    def __init__(self, task: Task) -> None:
        self.task = task
        model = self._call("model")
        if not isinstance(model, nn.Module):
            raise TaskError(f"task {task.name}: model() returned {type(model).__name__}, "
                            "not a torch.nn.Module")
        self.layout = Layout.of(model)
        if self.layout.num_params == 0:
            raise TaskError(f"task {task.name}: the model has no floating-point parameters")

    def _call(self, method: str, *args: Any) -> Any:
        try:
            return getattr(self.task, method)(*args)
        except TaskError:
            raise
        except Exception as e:
            raise TaskError(f"task {self.task.name}: {method}() failed: "
                            f"{type(e).__name__}: {e}") from e

    def metric_specs(self) -> list[MetricSpec]:
        return [MetricSpec(name=m.name, reduce=m.reduce, better=m.better, bound=m.bound)
                for m in self.task.metrics]

    def build(self, device: torch.device | str = "cpu") -> nn.Module:
        """A fresh model, checked against the layout (a model() that varies is a bug)."""
        model = self._call("model")
        if Layout.of(model) != self.layout:
            raise TaskError(f"task {self.task.name}: model() built a different layout")
        return model.to(device)

    def init_params(self, seed: int) -> np.ndarray:
        """The initial flat vector for a seed: the model's own initialisation, seeded, with
        torch's global generator restored afterwards (other roles may share the process)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = self.build()
        return flatten(model)

    def example_input(self) -> tuple[torch.Tensor, ...]:
        ex = self._call("example_input")
        ex = ex if isinstance(ex, tuple) else (ex,)
        if not ex or not all(isinstance(t, torch.Tensor) and t.ndim >= 1 for t in ex):
            raise TaskError(f"task {self.task.name}: example_input() must give a tensor (or a "
                            "tuple of tensors) with a batch axis")
        return ex


def _floats(model: nn.Module) -> list[torch.Tensor]:
    return [t for t in model.state_dict().values() if t.is_floating_point()]


@torch.no_grad()
def flatten(model: nn.Module) -> np.ndarray:
    """The model's floating state as one new contiguous float32 vector (on the CPU)."""
    flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in _floats(model)])
    return flat.numpy()


@torch.no_grad()
def unflatten_into(model: nn.Module, vec: np.ndarray) -> None:
    """Copy a flat float32 vector into the model's floating state (on whatever device)."""
    entries = _floats(model)
    n = sum(t.numel() for t in entries)
    if not isinstance(vec, np.ndarray) or vec.dtype != np.float32:
        got = vec.dtype if isinstance(vec, np.ndarray) else type(vec).__name__
        raise ValueError(f"parameter vector must be a native float32 ndarray, got {got}")
    if vec.ndim != 1 or vec.size != n:
        raise ValueError(f"parameter vector has shape {vec.shape}, model needs ({n},)")
    # torch.from_numpy warns on read-only arrays (np.frombuffer over wire bytes); a private
    # copy is cheap next to training.
    src = torch.from_numpy(vec if vec.flags.writeable and vec.flags.c_contiguous else vec.copy())
    offset = 0
    for t in entries:  # state-dict tensors share storage with the model's own
        k = t.numel()
        t.copy_(src[offset:offset + k].view(t.shape))
        offset += k


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """name → array copies of the whole state dict (float entries as float32), for a
    safetensors file that `load_state_dict` accepts."""
    return {name: (t.detach().to("cpu", torch.float32) if t.is_floating_point()
                   else t.detach().cpu()).numpy().copy()
            for name, t in model.state_dict().items()}
