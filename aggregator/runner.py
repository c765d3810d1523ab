"""The aggregator's thin runner: its state machine on a `Node`."""

from __future__ import annotations

from aggregator.machine import AggregatorMachine
from hfl.identity import Identity, Roster
from hfl.mqtt import BrokerSettings
from hfl.node import Node
from hfl.roster_feed import RosterFeed
from hfl.topics import Topics


def aggregator_node(
    identity: Identity,
    roster: Roster,
    settings: BrokerSettings,
    topics: Topics,
    *,
    max_payload: int = 256 * 1024,
    feed: RosterFeed | None = None,
) -> tuple[Node, AggregatorMachine]:
    """Wire an aggregator for the agents the roster enrols under it."""
    node = Node(identity, roster, settings, topics, topics.aggregator_filters(identity.id),
                max_payload=max_payload, feed=feed)
    machine = AggregatorMachine(identity.id, lambda: roster.group(identity.id), topics)
    return node, machine
