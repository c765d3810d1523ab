"""The aggregator's thin runner: its state machine on a `Node`, checkpointed in a state
directory when it has one."""

from __future__ import annotations

import logging
from pathlib import Path

from aggregator.machine import AggregatorMachine
from hfl.crypto.identity import Identity, Roster
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node
from hfl.runtime.roster_feed import RosterFeed
from hfl.runtime.state import Checkpointer, StateStore
from hfl.wire.topics import Topics

log = logging.getLogger("hfl.aggregator")


def aggregator_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    *,
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
    state_dir: Path | None = None,
) -> tuple[Node, AggregatorMachine]:
    """Wire an aggregator for the agents the roster enrols under it. With `state_dir`, it
    resumes the rounds saved there (StateError when that folder cannot be used or belongs
    to another service)."""
    machine = AggregatorMachine(identity.id, lambda: roster.group(identity.id), topics)
    durable = None
    if state_dir is not None:
        durable = Checkpointer(machine, StateStore(Path(state_dir), owner=identity.who))
        if durable.load():
            log.info("%s: resuming %d job(s) from %s", identity.id, len(machine.jobs), state_dir)
    node = Node(identity, roster, settings, topics, topics.aggregator_filters(identity.id),
                max_payload=max_payload, feed=feed, durable=durable)
    return node, machine
