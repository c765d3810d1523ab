"""An in-process fleet: a coordinator, aggregators and agents as threads of one process,
each with its own MQTT connection to a real broker. The demo, `hfl simulate` and the
integration tests run on it; a real fleet runs the same nodes as separate services.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.runner import aggregator_node
from coordinator.registry import Registry, VersionRecord
from coordinator.runner import coordinator_node
from edge_agent.runner import LocalData, agent_node
from hfl.app import App
from hfl.identity import Identity, Roster
from hfl.messages import Role
from hfl.mqtt import BrokerSettings
from hfl.node import Node, run_in_thread
from hfl.topics import Topics

log = logging.getLogger("hfl.fleet")


@dataclass
class FleetLayout:
    """Who is in the fleet: aggregator id → {agent id → its local data}."""

    groups: dict[str, dict[str, dict[str, LocalData]]]
    coordinator: str = "coordinator"
    apps: tuple[str, ...] = ("app",)

    @property
    def agents(self) -> list[str]:
        return [a for g in self.groups.values() for a in g]


@dataclass
class InProcessFleet:
    layout: FleetLayout
    settings: BrokerSettings
    workdir: Path
    topics: Topics = field(default_factory=Topics)
    device: str = "cpu"
    max_payload: int = 256 * 1024
    identities: dict[str, Identity] = field(default_factory=dict)
    roster: Roster = field(default_factory=Roster)
    nodes: dict[str, Node] = field(default_factory=dict)
    registry: Registry | None = None
    versions: list[VersionRecord] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def enroll(self) -> None:
        """Create every identity and the roster (kept in workdir/keys, keys mode 0600)."""
        keys = self.workdir / "keys"
        lay = self.layout
        members: list[tuple[str, Role, str | None]] = [(lay.coordinator, Role.COORDINATOR, None)]
        members += [(a, Role.APP, None) for a in lay.apps]
        for agg, agents in lay.groups.items():
            members.append((agg, Role.AGGREGATOR, None))
            members += [(a, Role.AGENT, agg) for a in agents]
        for id_, role, group in members:
            ident = Identity.generate(id_, role)
            ident.save(keys)
            self.identities[id_] = ident
            self.roster.enroll(ident, group)
        self.roster.save(keys / "roster.json")

    def start(self, timeout: float = 30.0) -> None:
        if not self.identities:
            self.enroll()
        ids, lay = self.identities, self.layout
        node, machine, self.registry = coordinator_node(
            ids[lay.coordinator], self.roster, self.settings, self.topics,
            self.workdir / "coordinator", max_payload=self.max_payload)
        self._serve(lay.coordinator, node, machine, timeout)
        for agg, agents in lay.groups.items():
            node, machine = aggregator_node(ids[agg], self.roster, self.settings, self.topics,
                                            max_payload=self.max_payload)
            self._serve(agg, node, machine, timeout)
            for agent, data in agents.items():
                node, machine = agent_node(ids[agent], self.roster, self.settings, self.topics,
                                           agg, data, device=self.device,
                                           max_payload=self.max_payload)
                self._serve(agent, node, machine, timeout)

    def _serve(self, name: str, node: Node, machine: object, timeout: float) -> None:
        node.start(timeout)
        self.nodes[name] = node
        self._threads.append(run_in_thread(node, machine, name))  # type: ignore[arg-type]

    def app(self, app_id: str, models: list[str]) -> App:
        return App(self.identities[app_id], self.roster, self.settings, self.topics,
                   models=models)

    def rejections(self) -> dict[str, dict[str, int]]:
        return {n: dict(node.rejections) for n, node in self.nodes.items() if node.rejections}

    def stop(self) -> None:
        for node in self.nodes.values():
            node.stop_event.set()
        for t in self._threads:
            t.join(timeout=10)
        for node in self.nodes.values():
            try:
                node.stop(timeout=5)
            except Exception:  # a node that lost its broker still has to let go
                log.exception("stopping a node")
        if self.registry is not None:
            self.versions = self.registry.versions()  # what the run produced, for reports
            self.registry.close()
