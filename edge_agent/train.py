"""The PyTorch trainer: local SGD epochs, evaluation, and the delta an agent sends.

Board datasets are small, so the whole set moves to the device once and mini-batches are
index gathers there: no DataLoader workers or per-batch host-to-device copies.

Training runs on the service's loop thread and can take minutes on a Pi, so `progress` is
called after every batch: the service feeds systemd's watchdog from it (progress is
liveness: a batch that never finishes stops the pings) and cuts training short on SIGTERM.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge_agent.data import Dataset
from hfl.models import flatten, unflatten_into


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.05
    momentum: float = 0.0
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be at least 1")
        if not self.lr > 0 or not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("need lr > 0, 0 <= momentum < 1 and weight_decay >= 0")


def pick_device(name: str = "auto") -> torch.device:
    """The training device: "auto" is CUDA when present (a Jetson), else CPU; or "cpu",
    "cuda", "cuda:N" explicitly."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"unknown device {name!r}; use auto, cpu or cuda[:N]") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use auto, cpu or cuda[:N]")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available here")
    return device


def _tensors(ds: Dataset, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.from_numpy(ds.x).to(device), torch.from_numpy(ds.y).to(device)


Progress = Callable[[], None] | None  # called after each batch


def train(
    model: nn.Module, ds: Dataset, cfg: TrainConfig, *, device: torch.device, seed: int,
    progress: Progress = None,
) -> dict:
    """SGD on cross-entropy over shuffled mini-batches; {loss (mean over the last epoch),
    samples, steps}. A fresh optimizer per call: momentum does not carry across rounds."""
    n = len(ds)
    if n == 0:
        return {"loss": 0.0, "samples": 0, "steps": 0}
    model.to(device).train()
    x, y = _tensors(ds, device)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    steps = 0
    total = torch.zeros((), device=device)
    for _ in range(cfg.epochs):
        total.zero_()  # only the last epoch's loss is reported
        order = torch.randperm(n, generator=gen).to(device)
        for batch in order.split(cfg.batch_size):
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            opt.step()
            # Accumulate on the device: one host sync per call, not per step.
            total += loss.detach() * len(batch)
            steps += 1
            if progress is not None:
                progress()
    return {"loss": float(total.item()) / n, "samples": n, "steps": steps}


@torch.no_grad()
def evaluate(
    model: nn.Module, ds: Dataset, *, device: torch.device, batch_size: int = 512,
    progress: Progress = None,
) -> dict:
    """{loss, accuracy, samples} of `model` on `ds`; all zero for an empty dataset."""
    n = len(ds)
    if n == 0:
        return {"loss": 0.0, "accuracy": 0.0, "samples": 0}
    was_training = model.training
    model.to(device).eval()
    x, y = _tensors(ds, device)
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.int64)
    for start in range(0, n, batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(dim=1) == yb).sum()
        if progress is not None:
            progress()
    model.train(was_training)
    return {"loss": float(loss.item()) / n, "accuracy": int(correct.item()) / n, "samples": n}


def local_update(
    model: nn.Module,
    params: np.ndarray,
    ds: Dataset,
    cfg: TrainConfig,
    *,
    device: torch.device,
    seed: int,
    progress: Progress = None,
) -> tuple[np.ndarray, dict]:
    """Train from `params` and return (trained - params as float32, train metrics)."""
    model.to(device)
    unflatten_into(model, params)
    metrics = train(model, ds, cfg, device=device, seed=seed, progress=progress)
    delta = np.subtract(flatten(model), params, dtype=np.float32)
    return delta, metrics
