"""The agent's thin runner: its state machine, the board's data and the job's task on a
`Node`.

`LocalTrainer` carries out `Train`: it checks that the installed task is the one the job
names (version and parameter layout), opens the data source through the task, evaluates the
round model on the held-out part, trains, and answers with the delta, or with the reason
this board sits the round out. Nothing the task does can take the agent down: an exception,
NaN or a model of another shape becomes a decline that names it.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from edge_agent.device import pick_device
from edge_agent.machine import AgentMachine, Declined, Train, Update
from edge_agent.partition import partition
from hfl.config import DatasetSection
from hfl.crypto.identity import Identity, Roster
from hfl.models.tasks import Prepared, TaskSet, flatten, unflatten_into
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node
from hfl.runtime.roster_feed import RosterFeed
from hfl.task import (
    DataError,
    Evaluation,
    NoData,
    Round,
    Samples,
    Source,
    Task,
    TaskError,
    check_metrics,
)
from hfl.wire.messages import Metrics
from hfl.wire.topics import Topics


@dataclass(frozen=True)
class LocalData:
    """Data in memory: what it trains on and what it evaluates round models on (a
    simulated board's share, given to it whole)."""

    train: Samples
    test: Samples

    def load(self, task: Task) -> LocalData:
        return self


class DataSource(Protocol):
    def load(self, task: Task) -> LocalData: ...


@dataclass(frozen=True)
class BoardData:
    """A data source as the board's config declares it (`[agent.datasets.NAME]`), opened
    through the job's task at every round it trains in."""

    name: str
    section: DatasetSection
    state_dir: Path = Path("state")

    def source(self) -> Source:
        return Source(self.name, self.section.settings, self.section.path, self.state_dir)

    def start(self) -> None:
        """A live source (one with a `topic`) starts listening when the agent starts, so
        its window fills between rounds and before the first one."""
        if "topic" in self.section.settings:
            from hfl.data import live_window

            live_window(self.source())

    def load(self, task: Task) -> LocalData:
        got = task.data(self.source())
        s = self.section
        if isinstance(got, tuple):
            train, test = got
        elif isinstance(got, Samples):
            whole = got
            if s.partition is not None:  # a simulated board: its part of a shared set
                if s.index >= s.parts:
                    raise DataError(self.name, f"partition index {s.index} >= parts {s.parts}")
                parts = partition(s.partition, len(whole), s.parts, seed=s.seed,
                                  labels=whole.y, alpha=s.alpha,
                                  shards_per_part=s.shards_per_part)
                whole = whole.subset(parts[s.index])
            train, test = whole.split(s.test_fraction, seed=s.seed)
        else:
            raise DataError(self.name, f"the task's data() returned {type(got).__name__}, "
                            "not Samples or (train, test)")
        if not (isinstance(train, Samples) and isinstance(test, Samples)):
            raise DataError(self.name, "the task's data() must return Samples")
        return LocalData(train, test)


def board_data(datasets: dict[str, DatasetSection], state_dir: Path) -> dict[str, BoardData]:
    return {name: BoardData(name, section, state_dir) for name, section in datasets.items()}


def train_seed(spec_seed: int, model: str, round: int, agent: str) -> int:
    """The seed of one agent's local round: distinct per agent and round, reproducible for
    the spec (its seed and model name), whatever the job's id."""
    digest = hashlib.sha256(f"{spec_seed}/{model}/{round}/{agent}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class LocalTrainer:
    agent_id: str
    tasks: TaskSet
    data: Mapping[str, DataSource]
    device: torch.device = field(default_factory=lambda: pick_device("auto"))
    progress: Callable[[], None] | None = None  # after every batch (Node.alive)
    # One model per (task, options): a simulator's many trainers share one dict.
    models: dict[tuple, torch.nn.Module] = field(default_factory=dict)

    def __call__(self, t: Train) -> Update | Declined:
        spec = t.spec
        try:
            p = self.tasks.prepare(spec.task, spec.options)
        except TaskError as e:
            return Declined("task-error", str(e))
        if spec.task_version != p.task.version:
            return Declined("task-version", f"task {spec.task} {p.task.version} is installed, "
                            f"the job's is {spec.task_version or '(none)'}")
        if spec.layout != p.layout.fingerprint or t.params.size != p.layout.num_params:
            return Declined("task-layout", f"task {spec.task}'s parameter layout here is "
                            f"{p.layout.fingerprint[:12]} ({p.layout.num_params} values), the "
                            f"job's is {spec.layout[:12]} ({t.params.size})")
        try:
            local = self.data[spec.data_source].load(p.task)
        except NoData as e:
            return Declined("no-data", str(e))
        except Exception as e:  # DataError names the source and row; anything else, the task
            detail = str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}"
            return Declined("bad-data", detail)
        if len(local.train) == 0:
            return Declined("no-data", f"{spec.data_source}: no samples to train on")
        r = Round(job=t.job, round=t.round, epochs=spec.epochs or p.task.epochs,
                  batch_size=spec.batch_size or p.task.batch_size, lr=spec.lr or p.task.lr,
                  momentum=p.task.momentum if spec.momentum is None else spec.momentum,
                  seed=train_seed(spec.seed, spec.name, t.round, self.agent_id),
                  device=self.device, progress=self.progress)
        try:
            return self._train(p, t, local, r)
        except Exception as e:  # the task's code failed: say so, sit out, stay up
            return Declined("task-error", f"{type(e).__name__}: {e}")

    def _train(self, p: Prepared, t: Train, local: LocalData, r: Round) -> Update | Declined:
        key = (p.task.name, json.dumps(t.spec.options, sort_keys=True), str(self.device))
        if key not in self.models:
            self.models[key] = p.build(self.device)
        model = self.models[key]
        task = p.task
        # Evaluate the round model before training: federated evaluation of the version.
        unflatten_into(model, t.params)
        ev = task.evaluate(model, local.test, r) if len(local.test) else Evaluation(0.0, 0)
        values = check_metrics(task, ev.metrics) if ev.samples else {}
        fit = task.fit(model, local.train, r)
        if not (math.isfinite(fit.loss) and math.isfinite(ev.loss)):
            return Declined("bad-update", f"the loss is not finite (training {fit.loss}, "
                            f"evaluation {ev.loss})")
        delta = flatten(model)
        delta -= t.params
        metrics = Metrics(samples=fit.samples, train_loss=fit.loss, eval_samples=ev.samples,
                          eval_loss=ev.loss, eval_metrics=values)
        return Update(delta, metrics)


def agent_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    aggregator: str,
    tasks: TaskSet,
    data: Mapping[str, DataSource],
    *,
    device: str = "auto",
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
) -> tuple[Node, AgentMachine]:
    """Wire an agent: subscriptions, machine and the training handler."""
    node = Node(identity, roster, settings, topics,
                topics.agent_filters(aggregator, identity.id),
                max_payload=max_payload, feed=feed, group=aggregator)
    machine = AgentMachine(identity, aggregator, set(tasks.names()), set(data), topics, roster)
    trainer = LocalTrainer(identity.id, tasks, data, pick_device(device), progress=node.alive)
    for source in data.values():
        start = getattr(source, "start", None)
        if start is not None:
            start()
    node.handlers[Train] = lambda t: machine.trained(t.job, t.round, trainer(t))
    return node, machine
