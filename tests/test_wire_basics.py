"""Topics, roster and service config: the small pure pieces every role stands on."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from paho.mqtt.client import topic_matches_sub

from hfl.config import load_config
from hfl.crypto.identity import Identity, Roster
from hfl.errors import Rejected
from hfl.wire.chunks import chunk_topic
from hfl.wire.messages import Role
from hfl.wire.topics import Route, Topics


def test_every_topic_parses_back_to_what_built_it() -> None:
    t = Topics("fleet/x")
    assert t.parse(t.update("site-a", "agent-7")).agent == "agent-7"
    assert t.parse(t.update("site-a", "agent-7")).agg == "site-a"
    assert t.parse(t.rounds("site-a", "r1-m")).job == "r1-m"
    assert t.parse(t.round_to("site-a", "r1-m", "agent-7")) == Route(
        "round_to", agg="site-a", job="r1-m", agent="agent-7")
    assert t.parse(t.model("digits")).model == "digits"
    assert t.parse(t.status("agent", "a1")).role == "agent"
    assert t.parse(t.app_requests("app1")).app == "app1"
    assert t.parse(t.ack("site-a", "agent-7")) == Route("ack", id="site-a", to="agent-7")
    # An agent reads its aggregator's acknowledgements to it, no one else's.
    subs = t.agent_filters("site-a", "agent-7")
    assert [f for f in subs if topic_matches_sub(f, t.ack("site-a", "agent-7"))]
    assert not [f for f in subs if topic_matches_sub(f, t.ack("site-a", "agent-8"))]
    assert not [f for f in subs if topic_matches_sub(f, t.ack("site-b", "agent-7"))]


def test_an_agent_subscribes_to_its_groups_rounds_and_its_own_level_of_them() -> None:
    subs = Topics().agent_filters("site-a", "a1")
    mine, theirs = Topics().round_to("site-a", "j", "a1"), Topics().round_to("site-a", "j", "a2")
    assert [topic_matches_sub(f, mine) for f in subs] == [False, True] + [False] * 5
    assert not any(topic_matches_sub(f, theirs) for f in subs)
    assert topic_matches_sub(subs[0], Topics().rounds("site-a", "j"))
    # and the chunk subtopics of the retained round models and roster (retained sets)
    assert topic_matches_sub(subs[3], chunk_topic(Topics().rounds("site-a", "j"), 7))
    assert topic_matches_sub(subs[4], chunk_topic(Topics().roster(), 0))


@pytest.mark.parametrize("bad", ["a/b", "+", "#", "", "-lead", "x" * 65, "sp ace"])
def test_ids_that_could_break_the_topic_tree_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        Topics().update("site-a", bad)


@pytest.mark.parametrize("topic", ["hfl/v1/agg/a/updates", "hfl/v1/agg/a/updates/b/c",
                                   "hfl/v1/agg/a/rounds/j/b/c", "hfl/v1/agg/a/rounds/j/+",
                                   "other/v1/coord/jobs/j", "hfl/v1/coord/jobs/+",
                                   "hfl/v1/nothing/here"])
def test_unknown_topics_are_rejected(topic: str) -> None:
    with pytest.raises(Rejected) as e:
        Topics().parse(topic)
    assert e.value.reason == "unknown-topic"


def test_roster_round_trip_and_key_files(tmp_path: Path) -> None:
    agent = Identity.generate("a1", Role.AGENT)
    agent.save(tmp_path)
    for path in Identity.paths(tmp_path, "a1"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    loaded = Identity.load(tmp_path, "a1", Role.AGENT)
    assert loaded.public_key.public_bytes_raw() == agent.public_key.public_bytes_raw()
    assert loaded.seal_public.public_bytes_raw() == agent.seal_public.public_bytes_raw()
    r = Roster(serial=7)
    r.enroll(agent, "site-a")
    back = Roster.from_doc(json.loads(json.dumps(r.to_doc())))
    assert back.serial == 7 and back.group("site-a") == ["a1"]
    assert back.public_key("a1").public_bytes_raw() == agent.public_key.public_bytes_raw()
    assert back.seal_key("a1").public_bytes_raw() == agent.seal_public.public_bytes_raw()


def test_a_swapped_key_file_is_refused(tmp_path: Path) -> None:
    Identity.generate("a1", Role.AGENT).save(tmp_path)
    sign, seal = Identity.paths(tmp_path, "a1")
    sign.write_bytes(seal.read_bytes())  # an X25519 key where the Ed25519 one belongs
    with pytest.raises(ValueError, match="Ed25519"):
        Identity.load(tmp_path, "a1", Role.AGENT)


def test_agent_without_aggregator_cannot_enrol() -> None:
    with pytest.raises(ValueError, match="aggregator"):
        Roster().enroll(Identity.generate("a1", Role.AGENT))


_KEY = "A" * 43 + "="  # 32 zero bytes in base64


@pytest.mark.parametrize("doc", [[], {"version": 1, "serial": 1, "members": []},
                                 {"version": 2, "serial": 0, "members": []},
                                 {"version": 2, "serial": True, "members": []},
                                 {"version": 2, "serial": 1, "members": [{"id": "a"}]},
                                 {"version": 2, "serial": 1, "members": [
                                     {"id": "a", "role": "agent", "group": "g",
                                      "ed25519": "!!", "x25519": _KEY}]},
                                 {"version": 2, "serial": 1, "members": [
                                     {"id": "a", "role": "agent", "group": "g",
                                      "ed25519": _KEY, "x25519": _KEY[:-4]}]}])
def test_malformed_roster_is_a_clear_error(doc) -> None:
    with pytest.raises(ValueError, match="malformed roster"):
        Roster.from_doc(doc)


def test_config_paths_are_relative_to_the_file(tmp_path: Path) -> None:
    cfg_file = tmp_path / "etc" / "agent.toml"
    cfg_file.parent.mkdir()
    cfg_file.write_text('[identity]\nid = "a1"\ndir = "pki"\n[broker]\nhost = "b.lan"\n'
                        '[agent]\naggregator = "site-a"\n[agent.datasets.d]\nsource = "digits"\n')
    cfg = load_config(cfg_file)
    assert cfg.identity.dir == tmp_path / "etc" / "pki"
    assert cfg.agent is not None and cfg.agent.datasets["d"].source == "digits"
    s = cfg.broker_settings()  # TLS by default, with the device's files
    assert (s.host, s.port) == ("b.lan", 8883)
    assert s.ca == str(tmp_path / "etc" / "pki" / "ca.crt")
    assert s.cert == str(tmp_path / "etc" / "pki" / "a1.crt")


@pytest.mark.parametrize("body,field", [
    ('[identity]\nid = "a/1"\ndir = "k"\n', "identity.id"),
    ('[identity]\nid = "a1"\ndir = "k"\nbogus = 1\n', "identity.bogus"),
    ('[identity]\nid = "a1"\n', "identity.dir"),
])
def test_config_errors_name_the_field(tmp_path: Path, body: str, field: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(body)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load_config(p)
