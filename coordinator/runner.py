"""The coordinator's thin runner: its state machine, the registry and ONNX export on a `Node`,
checkpointed in its state directory (`state.sqlite` beside `registry/`)."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

import numpy as np

from coordinator.export import export_onnx
from coordinator.machine import CoordinatorMachine, NewVersion, Prepare
from coordinator.registry import Registry
from hfl.crypto.identity import Identity, Roster
from hfl.models.tasks import TaskSet, state_arrays, unflatten_into
from hfl.runtime.actions import Action, Send
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node
from hfl.runtime.roster_feed import RosterFeed
from hfl.runtime.state import Checkpointer, StateError, StateStore
from hfl.wire.messages import JobMeta, Kind, ModelMeta, ModelSpec
from hfl.wire.topics import Topics

log = logging.getLogger("hfl.coordinator")


def job_preparer(tasks: TaskSet) -> Prepare:
    """How the coordinator turns a requested spec into a job: the installed task's version,
    layout, metrics and round settings filled in, and its seeded initial parameters."""

    def prepare(spec: ModelSpec) -> tuple[ModelSpec, np.ndarray]:
        spec, p = tasks.resolve(spec)
        return spec, p.init_params(spec.seed)

    return prepare


def model_message(v: NewVersion, topics: Topics, onnx: bytes, state: dict,
                  inputs: list[list[int]]) -> Send:
    """The retained model version for apps: named tensors (a safetensors file that loads
    straight into the torch model) plus the ONNX file as a uint8 tensor named `onnx`."""
    meta = ModelMeta(model=v.spec.name, job=v.job, version=v.version, task=v.spec.task,
                     task_version=v.spec.task_version, options=v.spec.options,
                     layout=v.spec.layout, inputs=inputs,
                     num_params=int(v.params.size), agents=v.agents, dropped=v.dropped,
                     declines=v.declines, epsilon=v.epsilon,
                     delta=v.spec.privacy.delta if v.spec.privacy else None, metrics=v.metrics,
                     metric_specs=v.spec.metrics)
    tensors = {**state, "onnx": np.frombuffer(onnx, dtype=np.uint8)}
    return Send(Kind.MODEL, topics.model(v.spec.name), v.job, v.version, "model",
                meta.model_dump(mode="json"), tensors, retain=True, to=(v.app,))


class Publisher:
    """Carries out `NewVersion`: registry first (atomic files, then the row), then MQTT."""

    def __init__(self, node: Node, registry: Registry, topics: Topics, tasks: TaskSet) -> None:
        self.node, self.registry, self.topics, self.tasks = node, registry, topics, tasks

    def new_version(self, v: NewVersion) -> None:
        p = self.tasks.prepare(v.spec.task, v.spec.options)
        model = p.build()
        unflatten_into(model, v.params)
        example = p.example_input()
        onnx = export_onnx(model, example)
        state = state_arrays(model)
        # Beside its metrics: who made the version and the ε spent (hfl models, dashboard).
        metrics = {**v.metrics.model_dump(), "agents": v.agents, "dropped": v.dropped,
                   "declines": v.declines, "epsilon": v.epsilon}
        try:
            rec = self.registry.save_version(v.job, v.spec.name, v.version, state, onnx,
                                             metrics)
            log.info("model %s v%d saved to %s", v.spec.name, v.version, rec.onnx)
        except (OSError, sqlite3.Error) as e:  # a full disk: publish anyway, store on restart
            self.node.counters["registry_errors"] += 1
            log.error("model %s v%d not saved in %s: %s (it is saved when the coordinator "
                      "restarts with room)", v.spec.name, v.version, self.registry.root, e)
        inputs = [list(t.shape[1:]) for t in example]
        self.node.send(model_message(v, self.topics, onnx, state, inputs))

    def send(self, action: Send) -> None:
        if action.kind is Kind.JOB:
            m = JobMeta.model_validate(action.meta)
            try:
                self.registry.save_job(m.job, m.app, m.model, m.state, m.reason, m.version)
            except sqlite3.Error as e:
                self.node.counters["registry_errors"] += 1
                log.error("job %s not saved in %s: %s", m.job, self.registry.root, e)
        self.node.send(action)

    def unpublished(self, actions: list[Action]) -> list[Action]:
        """What a resumed coordinator must still do: leave out versions the registry has
        and job states it already records (those went out before the crash)."""
        out: list[Action] = []
        for a in actions:
            if isinstance(a, NewVersion) and self.registry.has_version(a.job, a.version):
                continue
            if isinstance(a, Send) and a.kind is Kind.JOB:
                row = self.registry.job(a.job)
                if row is not None and (row["state"], row["version"]) == (a.stage, a.round):
                    continue
            out.append(a)
        return out


def coordinator_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    state_dir: Path,
    tasks: TaskSet,
    *,
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
) -> tuple[Node, CoordinatorMachine, Registry]:
    """Wire the coordinator, with the tasks jobs may use; it resumes the jobs saved in
    `state_dir` (StateError when that folder cannot be used or belongs to another service)."""
    # The store first: it claims the whole folder, registry included.
    store = StateStore(Path(state_dir), owner=identity.who)
    try:
        registry = Registry(Path(state_dir) / "registry")
    except StateError:
        store.close()
        raise
    machine = CoordinatorMachine.of(identity, roster, topics, job_preparer(tasks),
                                    taken=lambda job: registry.job(job) is not None)
    durable = Checkpointer(machine, store,
                           resume=lambda now: pub.unpublished(machine.resume(now)))
    if durable.load():
        log.info("resuming %d job(s) from %s", len(machine.jobs), state_dir)
    node = Node(identity, roster, settings, topics, topics.coordinator_filters(identity.id),
                max_payload=max_payload, feed=feed, durable=durable)
    pub = Publisher(node, registry, topics, tasks)
    node.handlers[NewVersion] = pub.new_version
    node.handlers[Send] = pub.send
    return node, machine, registry
