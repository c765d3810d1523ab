"""Live revocation: a re-issued roster reaches every node and takes effect at once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hfl.crypto.identity import Identity
from hfl.crypto.pki import Pki
from hfl.errors import Rejected
from hfl.runtime.node import encode_send
from hfl.runtime.roster_feed import RosterFeed
from hfl.wire import envelope
from hfl.wire.gate import Gate
from hfl.wire.messages import KNOWN_TYPES, Role
from hfl.wire.topics import Topics

TOPICS = Topics()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    p = Pki.init(tmp_path / "pki")
    p.issue("coordinator", Role.COORDINATOR)
    p.issue("site-a", Role.AGGREGATOR)
    for a in ("a1", "a2"):
        p.issue(a, Role.AGENT, group="site-a")
    return p


def update_from(pki: Pki, agent: str) -> tuple[str, bytes]:
    ident = Identity.load(pki.device(agent).dir, agent, Role.AGENT)
    topic = TOPICS.update("site-a", agent)
    return topic, envelope.encode(type="update", topic=topic, job="j", round=0, stage="update",
                                  sender=agent, key=ident.key)


def test_a_revocation_published_by_the_coordinator_is_taken_by_an_aggregator(pki: Pki) -> None:
    coord_roster, agg_roster = pki.roster(), pki.roster()
    coord = RosterFeed(coord_roster, pki.ca_cert(), TOPICS, pki.device("coordinator").roster,
                       publish=True)
    agg = RosterFeed(agg_roster, pki.ca_cert(), TOPICS)
    gate = Gate(agg_roster, TOPICS)
    assert gate.accept(*update_from(pki, "a1"), 0.0) is not None

    (first,) = coord.poll(0.0, force=True)  # at start: the current roster, retained
    assert first.retain and first.round == coord_roster.serial
    pki.revoke("a1")
    assert coord.poll(1.0) == []  # polled at most every few seconds
    (send,) = coord.poll(10.0)
    assert send.round == coord_roster.serial and "a1" not in coord_roster

    ident = Identity.load(pki.device("coordinator").dir, "coordinator", Role.COORDINATOR)
    data = encode_send(send, ident, coord_roster)
    env = envelope.decode(data, topic=TOPICS.roster(), public_key=agg_roster.public_key,
                          known_types=KNOWN_TYPES)
    agg.on_message(env)
    assert "a1" not in agg_roster and "a2" in agg_roster
    assert agg_roster.group("site-a") == ["a2"]
    assert gate.accept(*update_from(pki, "a1"), 0.0) is None
    assert gate.rejections == {"unknown-sender": 1}


def test_an_older_roster_replayed_changes_nothing(pki: Pki) -> None:
    old = pki.roster_path.read_bytes()
    pki.revoke("a2")
    roster = pki.roster()
    feed = RosterFeed(roster, pki.ca_cert(), TOPICS)
    assert feed.take(old, "replay") is False
    assert "a2" not in roster


def test_a_roster_not_signed_by_the_fleet_ca_is_rejected(pki: Pki, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other")
    other.issue("mallory", Role.COORDINATOR)
    other.issue("x1", Role.AGGREGATOR)
    roster = pki.roster()
    feed = RosterFeed(roster, pki.ca_cert(), TOPICS)
    with pytest.raises(Rejected) as e:
        feed.take(other.roster_path.read_bytes(), "forged")
    assert e.value.reason == "bad-roster"
    assert "mallory" not in roster
    tampered = bytearray(pki.roster_path.read_bytes())
    tampered[tampered.index(b'"serial": ') + 10] = ord("9")
    with pytest.raises(Rejected, match="bad-roster"):
        feed.take(bytes(tampered), "tampered")


def test_a_roster_message_without_its_tensor_is_rejected(pki: Pki) -> None:
    feed = RosterFeed(pki.roster(), pki.ca_cert(), TOPICS)
    ident = Identity.load(pki.device("coordinator").dir, "coordinator", Role.COORDINATOR)
    data = envelope.encode(type="roster", topic=TOPICS.roster(), job="", round=9, stage="roster",
                           sender="coordinator", key=ident.key,
                           tensors={"roster": np.zeros((2, 2), np.uint8)})
    env = envelope.decode(data, topic=TOPICS.roster(), public_key=feed.roster.public_key,
                          known_types=KNOWN_TYPES)
    with pytest.raises(Rejected) as e:
        feed.on_message(env)
    assert e.value.reason == "bad-shape"
