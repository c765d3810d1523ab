"""The coordinator's thin runner: its state machine, the registry and ONNX export on a `Node`."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from coordinator.export import export_onnx
from coordinator.machine import CoordinatorMachine, NewVersion
from coordinator.registry import Registry
from hfl.actions import Send
from hfl.identity import Identity, Roster
from hfl.messages import JobMeta, Kind, ModelMeta, ModelSpec, Origin, Role
from hfl.models import build, init_params, state_dict_arrays, unflatten_into
from hfl.mqtt import BrokerSettings
from hfl.node import Node
from hfl.roster_feed import RosterFeed
from hfl.topics import Topics

log = logging.getLogger("hfl.coordinator")


def initial_params(spec: ModelSpec) -> np.ndarray:
    return init_params(spec.arch, spec.input_shape, spec.num_classes, spec.seed)


def model_message(v: NewVersion, topics: Topics, onnx: bytes, state: dict) -> Send:
    """The retained model version for apps: named tensors (a safetensors file that loads
    straight into the torch model) plus the ONNX file as a uint8 tensor named `onnx`."""
    meta = ModelMeta(model=v.spec.name, job=v.job, version=v.version, arch=v.spec.arch,
                     input_shape=v.spec.input_shape, num_classes=v.spec.num_classes,
                     num_params=int(v.params.size), agents=v.agents, dropped=v.dropped,
                     epsilon=v.epsilon, delta=v.spec.privacy.delta if v.spec.privacy else None,
                     metrics=v.metrics)
    tensors = {**state, "onnx": np.frombuffer(onnx, dtype=np.uint8)}
    return Send(Kind.MODEL, topics.model(v.spec.name), v.job, v.version, "model",
                meta.model_dump(mode="json"), tensors, retain=True, to=(v.app,))


class Publisher:
    """Carries out `NewVersion`: registry first (atomic files, then the row), then MQTT."""

    def __init__(self, node: Node, registry: Registry, topics: Topics) -> None:
        self.node, self.registry, self.topics = node, registry, topics

    def new_version(self, v: NewVersion) -> None:
        model = build(v.spec.arch, v.spec.input_shape, v.spec.num_classes)
        unflatten_into(model, v.params)
        onnx = export_onnx(model, v.spec.input_shape)
        state = state_dict_arrays(model)
        # Beside its metrics: who made the version and the ε spent (hfl models, dashboard).
        metrics = {**v.metrics.model_dump(), "agents": v.agents, "dropped": v.dropped,
                   "epsilon": v.epsilon}
        rec = self.registry.save_version(v.job, v.spec.name, v.version, state, onnx, metrics)
        log.info("model %s v%d saved to %s", v.spec.name, v.version, rec.onnx)
        self.node.send(model_message(v, self.topics, onnx, state))

    def send(self, action: Send) -> None:
        if action.kind is Kind.JOB:
            m = JobMeta.model_validate(action.meta)
            self.registry.save_job(m.job, m.app, m.model, m.state, m.reason, m.version)
        self.node.send(action)


def coordinator_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    state_dir: Path,
    *,
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
) -> tuple[Node, CoordinatorMachine, Registry]:
    node = Node(identity, roster, settings, topics, topics.coordinator_filters(),
                max_payload=max_payload, feed=feed)
    machine = CoordinatorMachine(
        lambda: roster.by_role(Role.AGGREGATOR), initial_params, topics,
        lambda job, version, params: Origin.sign(identity.id, identity.key, job, version, params),
        roster.group)
    registry = Registry(Path(state_dir) / "registry")
    pub = Publisher(node, registry, topics)
    node.handlers[NewVersion] = pub.new_version
    node.handlers[Send] = pub.send
    return node, machine, registry
