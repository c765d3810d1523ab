"""An in-process fleet: a coordinator, aggregators and agents as threads of one process,
each with its own MQTT connection to a real broker. The demo, `hfl simulate` and the
integration tests run on it; a real fleet runs the same nodes as separate services.

It is secured as a real fleet is: a fleet CA issues every identity (`hfl.crypto.pki`), the broker
requires TLS client certificates and enforces the ACL generated from the roster.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.runner import aggregator_node
from application import App
from coordinator.registry import Registry, VersionRecord
from coordinator.runner import coordinator_node
from edge_agent.runner import DataSource, agent_node
from fleet.ops.broker import Broker, BrokerTls
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki
from hfl.models.tasks import TaskSet
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Machine, Node, run_in_thread
from hfl.runtime.roster_feed import RosterFeed
from hfl.runtime.telemetry import Telemetry, instrument
from hfl.wire.messages import Role
from hfl.wire.topics import Topics

log = logging.getLogger("hfl.fleet")


@dataclass
class FleetLayout:
    """Who is in the fleet: aggregator id → {agent id → its data sources by name}."""

    groups: Mapping[str, Mapping[str, Mapping[str, DataSource]]]
    coordinator: str = "coordinator"
    apps: tuple[str, ...] = ("app",)
    observers: tuple[str, ...] = ()

    @property
    def agents(self) -> list[str]:
        return [a for g in self.groups.values() for a in g]

    def members(self) -> list[tuple[str, Role, str | None]]:
        """Every identity, aggregators before their agents (the order enrolment needs)."""
        out: list[tuple[str, Role, str | None]] = [(self.coordinator, Role.COORDINATOR, None)]
        out += [(a, Role.APP, None) for a in self.apps]
        out += [(o, Role.OBSERVER, None) for o in self.observers]
        for agg, agents in self.groups.items():
            out.append((agg, Role.AGGREGATOR, None))
            out += [(a, Role.AGENT, agg) for a in agents]
        return out


@dataclass
class InProcessFleet:
    layout: FleetLayout
    workdir: Path
    tasks: TaskSet = field(default_factory=TaskSet.everything_installed)
    tls: bool = True
    topics: Topics = field(default_factory=Topics)
    device: str = "cpu"
    max_payload: int = 256 * 1024
    telemetry_s: float = 2.0  # how often each node may publish its telemetry (0: never)
    identities: dict[str, Identity] = field(default_factory=dict)
    roster: Roster = field(default_factory=Roster)
    pki: Pki | None = None
    broker: Broker | None = None
    nodes: dict[str, Node] = field(default_factory=dict)
    telemetry: dict[str, Telemetry] = field(default_factory=dict)
    registry: Registry | None = None
    versions: list[VersionRecord] = field(default_factory=list)
    _threads: list[threading.Thread] = field(default_factory=list)

    def enroll(self) -> None:
        """Issue every identity from a fresh fleet CA in workdir/pki (keys mode 0600).

        The CA is this run's own: one left by an earlier run in the same folder is replaced,
        and the coordinator's saved jobs with it."""
        shutil.rmtree(self.workdir / "pki", ignore_errors=True)
        # The coordinator's checkpoint belongs to the earlier run's fleet, too.
        for old in (self.workdir / "coordinator").glob("state.sqlite*"):
            old.unlink()
        self.pki = Pki.init(self.workdir / "pki", name="hfl in-process fleet CA")
        for id_, role, group in self.layout.members():
            self.pki.issue(id_, role, group=group)
            self.identities[id_] = Identity.load(self.pki.device(id_).dir, id_, role)
        self.roster = self.pki.roster()

    def start_broker(self) -> Broker:
        """A Mosquitto on a free loopback port: TLS with client certificates and the
        roster's ACL, or plain when `tls` is off."""
        tls = None
        if self.tls:
            assert self.pki is not None
            tls = BrokerTls.from_pki(self.pki, "broker", self.workdir / "broker" / "tls",
                                     self.topics)
        self.broker = Broker(self.workdir / "broker", tls=tls).start()
        return self.broker

    def settings(self, id_: str) -> BrokerSettings:
        assert self.broker is not None
        if not self.tls:
            return BrokerSettings(host=self.broker.host, port=self.broker.port)
        assert self.pki is not None
        return self.pki.device(id_).broker_settings(self.broker.host, self.broker.port)

    def feed(self, publish: bool = False) -> RosterFeed | None:
        if self.pki is None:
            return None
        path = self.pki.device(self.layout.coordinator).roster if publish else None
        return RosterFeed(self.roster, self.pki.ca_cert(), self.topics, path, publish=publish)

    def start(self, timeout: float = 30.0) -> None:
        if not self.identities:
            self.enroll()
        if self.broker is None:
            self.start_broker()
        ids, lay, s = self.identities, self.layout, self.settings
        node, machine, self.registry = coordinator_node(
            ids[lay.coordinator], self.roster, s(lay.coordinator), self.topics,
            self.workdir / "coordinator", self.tasks, max_payload=self.max_payload,
            feed=self.feed(publish=True))
        self._serve(lay.coordinator, node, machine, timeout)
        aggregators = {}
        for agg, agents in lay.groups.items():
            node, aggregators[agg] = aggregator_node(ids[agg], self.roster, s(agg), self.topics,
                                                     max_payload=self.max_payload,
                                                     feed=self.feed())
            self._serve(agg, node, aggregators[agg], timeout)
            for agent, data in agents.items():
                node, agent_machine = agent_node(ids[agent], self.roster, s(agent), self.topics,
                                                 agg, self.tasks, data, device=self.device,
                                                 max_payload=self.max_payload, feed=self.feed())
                self._serve(agent, node, agent_machine, timeout)
        # An aggregator samples among the agents it has seen online: wait until it has seen
        # them all, or a job asked for right away would start with whoever was quickest.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(
                not set(lay.groups[a]) <= m.online for a, m in aggregators.items()):
            time.sleep(0.05)

    def _serve(self, name: str, node: Node, machine: Machine, timeout: float) -> None:
        self.telemetry[name], served = instrument(node, machine, self.telemetry_s)
        node.start(timeout)
        self.nodes[name] = node
        self._threads.append(run_in_thread(node, served, name))

    def app(self, app_id: str, models: list[str]) -> App:
        return App(self.identities[app_id], self.roster, self.settings(app_id), self.topics,
                   models=models, feed=self.feed())

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
        if self.broker is not None:
            self.broker.close()
            self.broker = None
