"""The agent's thin runner: its state machine, the local data and the trainer on a `Node`."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from edge_agent import data as datasets
from edge_agent.data import Dataset
from edge_agent.machine import AgentMachine, Train
from edge_agent.partition import partition
from edge_agent.train import TrainConfig, evaluate, local_update, pick_device
from hfl.config import DatasetSection
from hfl.identity import Identity, Roster
from hfl.messages import Metrics
from hfl.models import build, unflatten_into
from hfl.mqtt import BrokerSettings
from hfl.node import Node
from hfl.roster_feed import RosterFeed
from hfl.topics import Topics


@dataclass(frozen=True)
class LocalData:
    """One dataset on this board: what it trains on and what it evaluates round models on."""

    train: Dataset
    test: Dataset


def load_local(section: DatasetSection) -> LocalData:
    """A board's data from its config: the whole set, or one share of it in a simulation."""
    ds = datasets.load(section.source, path=str(section.path) if section.path else None,
                       split=section.split)
    if section.partition is not None:
        if section.index >= section.parts:
            raise ValueError(f"partition index {section.index} >= parts {section.parts}")
        parts = partition(section.partition, ds.y, section.parts, seed=section.seed,
                          alpha=section.alpha)
        ds = ds.subset(parts[section.index])
    train, test = datasets.split(ds, section.test_fraction, seed=section.seed)
    return LocalData(train, test)


@dataclass
class LocalTrainer:
    agent_id: str
    data: dict[str, LocalData]
    device: torch.device = field(default_factory=lambda: pick_device("auto"))
    progress: Callable[[], None] | None = None  # after every batch (Node.alive)
    # One model per architecture to train in; a simulator's many trainers share one dict.
    models: dict[tuple, torch.nn.Module] = field(default_factory=dict)

    def __call__(self, t: Train) -> tuple[np.ndarray, Metrics]:
        spec, local = t.spec, self.data[t.spec.dataset]
        key = (spec.arch, tuple(spec.input_shape), spec.num_classes)
        if key not in self.models:
            self.models[key] = build(spec.arch, spec.input_shape, spec.num_classes).to(self.device)
        model = self.models[key]
        # Evaluate the round model before training: federated evaluation of the version.
        unflatten_into(model, t.params)
        ev = evaluate(model, local.test, device=self.device, progress=self.progress)
        cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
                          momentum=spec.momentum)
        seed = int.from_bytes(
            hashlib.sha256(f"{spec.seed}/{t.job}/{t.round}/{self.agent_id}".encode()).digest()[:4],
            "little",
        )
        delta, tm = local_update(model, t.params, local.train, cfg, device=self.device, seed=seed,
                                 progress=self.progress)
        metrics = Metrics(samples=len(local.train), train_loss=tm["loss"],
                          eval_samples=ev["samples"], eval_loss=ev["loss"],
                          eval_accuracy=ev["accuracy"])
        return delta, metrics


def agent_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    aggregator: str,
    data: dict[str, LocalData],
    *,
    device: str = "auto",
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
) -> tuple[Node, AgentMachine]:
    """Wire an agent: subscriptions, machine and the training handler."""
    node = Node(identity, roster, settings, topics,
                topics.agent_filters(aggregator, identity.id),
                max_payload=max_payload, feed=feed, group=aggregator)
    machine = AgentMachine(identity, aggregator, set(data), topics, roster)
    trainer = LocalTrainer(identity.id, data, pick_device(device), progress=node.alive)
    node.handlers[Train] = lambda t: machine.trained(t.job, t.round, *trainer(t))
    return node, machine
