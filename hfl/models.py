"""The model zoo shared by every role, and the flat float32 view of a model's parameters.

Every protocol message carries a model as one contiguous float32 vector in state-dict order;
`layout` is that order, `flatten`/`unflatten_into` convert, and `init_params` gives every role
the same starting vector for a seed.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

ARCHS: tuple[str, ...] = ("mnist-cnn", "mnist-2nn", "mlp", "logreg")

MNIST_SHAPE = (1, 28, 28)


def _mnist_cnn(num_classes: int) -> nn.Module:
    """The CNN of McMahan et al. 2017 (FedAvg): 1,663,370 parameters for 10 classes."""
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
        ("fc2", nn.Linear(512, num_classes)),
    ]))


def _mlp(features: int, hidden: Sequence[int], num_classes: int) -> nn.Module:
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    width = features
    for i, h in enumerate(hidden, start=1):
        layers += [(f"fc{i}", nn.Linear(width, h)), (f"relu{i}", nn.ReLU())]
        width = h
    layers.append((f"fc{len(hidden) + 1}", nn.Linear(width, num_classes)))
    return nn.Sequential(OrderedDict(layers))


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
    if not shape or any(d <= 0 for d in shape):
        raise ValueError(f"input_shape must be non-empty positive dimensions, got {shape}")
    return shape


def build(arch: str, input_shape: Sequence[int], num_classes: int) -> nn.Module:
    """A freshly initialised model (torch's default init, from the global RNG)."""
    shape = _check_shape(input_shape)
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    features = math.prod(shape)
    if arch == "mnist-cnn":
        if shape != MNIST_SHAPE:
            raise ValueError(f"mnist-cnn needs input_shape {MNIST_SHAPE}, got {shape}")
        return _mnist_cnn(num_classes)
    if arch == "mnist-2nn":
        return _mlp(features, (200, 200), num_classes)
    if arch == "mlp":
        return _mlp(features, (128,), num_classes)
    if arch == "logreg":
        return _mlp(features, (), num_classes)
    raise ValueError(f"unknown arch {arch!r}; known: {', '.join(ARCHS)}")


def layout(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter in state-dict order: the order of the flat vector."""
    # A buffer (e.g. batch-norm statistics) would silently fall out of the flat vector.
    assert not list(model.buffers()), "zoo models must have no buffers"
    params = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    assert [n for n, _ in params] == list(model.state_dict()), "state dict != parameters"
    return params


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def flatten(model: nn.Module) -> np.ndarray:
    """All parameters as one new contiguous float32 vector (on the CPU)."""
    layout(model)
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return flat.to("cpu", torch.float32).numpy()


@torch.no_grad()
def unflatten_into(model: nn.Module, vec: np.ndarray) -> None:
    """Copy a flat float32 vector into the model's parameters (on whatever device they are)."""
    n = num_params(model)
    if not isinstance(vec, np.ndarray) or vec.dtype != np.float32:
        got = vec.dtype if isinstance(vec, np.ndarray) else type(vec).__name__
        raise ValueError(f"parameter vector must be a native float32 ndarray, got {got}")
    if vec.ndim != 1 or vec.size != n:
        raise ValueError(f"parameter vector has shape {vec.shape}, model needs ({n},)")
    # torch.from_numpy warns on read-only arrays (e.g. np.frombuffer over wire bytes); we only
    # read from it, but a private copy is cheap next to training and keeps the warning away.
    src = torch.from_numpy(vec if vec.flags.writeable and vec.flags.c_contiguous else vec.copy())
    offset = 0
    for p in model.parameters():
        k = p.numel()
        p.copy_(src[offset:offset + k].view_as(p))
        offset += k


def state_dict_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """name -> float32 array copies, for a safetensors file that `load_state_dict` accepts."""
    layout(model)
    return {
        name: t.detach().to("cpu", torch.float32).numpy().copy()
        for name, t in model.state_dict().items()
    }


@torch.no_grad()
def _reset(model: nn.Module, gen: torch.Generator) -> None:
    """torch's default Linear/Conv init (U(±1/sqrt(fan_in)) for weight and bias), seeded."""
    done = 0
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            for p in (module.weight, module.bias):
                nn.init.uniform_(p, -bound, bound, generator=gen)
                done += p.numel()
    assert done == num_params(model), "a parameter has no init rule"


def init_params(arch: str, input_shape: Sequence[int], num_classes: int, seed: int) -> np.ndarray:
    """The initial flat vector for a seed, identical on every role and leaving torch's global
    RNG alone (an in-process fleet runs many roles on threads that share it)."""
    with torch.device("meta"):
        model = build(arch, input_shape, num_classes)  # no storage, no global RNG draws
    model = model.to_empty(device="cpu")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    _reset(model, gen)
    return flatten(model)
