"""The SecAgg+ stages: the server's (stage, event) → stage table walked in full, the client's
likewise, and the wire's stage names."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hfl.crypto import secagg as sa
from hfl.crypto.secagg_wire import WireStage
from hfl.errors import Rejected
from tests.test_secagg import Round

Stage = sa.Stage


def server_at(stage: Stage) -> Round:
    """A 10-client round whose server collects `stage`, everything it needs in hand."""
    r = Round(10)
    for i in r.ids:
        r.server.add_advert(i, r.clients[i].advertise())
    if stage >= Stage.SHARES:
        r.server.freeze_adverts()
        table = r.server.key_table()
        for i in r.ids:
            r.server.add_shares(i, r.clients[i].share(table, r.verify))
    if stage >= Stage.MASKED:
        r.server.freeze_shares()
        for i, row in r.server.routed().items():
            r.clients[i].receive(row)
        for i in r.ids:
            r.server.add_masked(i, r.clients[i].mask(r.inputs[i]))
    if stage >= Stage.UNMASK:
        r.server.freeze_survivors()
    assert r.server.stage is stage
    return r


def test_the_table_is_a_chain_over_every_stage() -> None:
    assert list(Stage) == [Stage.ADVERTS, Stage.SHARES, Stage.MASKED, Stage.UNMASK]
    assert [int(s) for s in Stage] == [1, 2, 3, 4]  # what checkpoints store
    assert sa.TRANSITIONS == {(Stage.ADVERTS, "freeze_adverts"): Stage.SHARES,
                              (Stage.SHARES, "freeze_shares"): Stage.MASKED,
                              (Stage.MASKED, "freeze_survivors"): Stage.UNMASK}
    assert sa.EVENTS == ("freeze_adverts", "freeze_shares", "freeze_survivors")


@pytest.mark.parametrize("event", sa.EVENTS)
@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.name)
def test_every_stage_and_event(stage: Stage, event: str) -> None:
    r = server_at(stage)
    srv = r.server
    before = (srv.stage, srv.export(), srv.u1, srv.u2, srv.acc.copy())
    nxt = sa.TRANSITIONS.get((stage, event))
    if nxt is None:
        with pytest.raises(Rejected) as e:
            getattr(srv, event)()  # each event is the command of its name
        assert e.value.reason == "secagg-wrong-stage"
        after = (srv.stage, srv.export(), srv.u1, srv.u2, srv.acc.copy())
        assert after[:4] == before[:4] and np.array_equal(after[4], before[4])
        return
    getattr(srv, event)()  # each event is the command of its name
    assert srv.stage is nxt
    # What the freeze fixed is readable, and reading it changes nothing.
    read = {Stage.SHARES: srv.key_table, Stage.MASKED: srv.routed,
            Stage.UNMASK: srv.survivors}[nxt]
    assert read() == read() and srv.stage is nxt


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.name)
def test_reading_before_the_freeze_is_refused_and_changes_nothing(stage: Stage) -> None:
    srv = server_at(stage).server
    for reads, frozen_at in ((srv.key_table, Stage.SHARES), (srv.routed, Stage.MASKED),
                             (srv.survivors, Stage.UNMASK)):
        if stage < frozen_at:
            with pytest.raises(Rejected) as e:
                reads()
            assert e.value.reason == "secagg-wrong-stage"
        else:
            reads()
        assert srv.stage is stage


def test_a_refused_freeze_of_too_few_leaves_the_stage() -> None:
    r = Round(10)
    for i in r.ids[:3]:
        r.server.add_advert(i, r.clients[i].advertise())
    with pytest.raises(Rejected) as e:
        r.server.freeze_adverts()
    assert e.value.reason == "secagg-too-few" and r.server.stage is Stage.ADVERTS


@pytest.mark.parametrize("stage", list(Stage), ids=lambda s: s.name)
def test_a_checkpoint_with_an_int_stage_restores(stage: Stage) -> None:
    r = server_at(stage)
    doc = json.loads(json.dumps(r.server.export()))
    assert doc["stage"] == int(stage) and type(doc["stage"]) is int
    clients = {i: rec for i in r.ids if (rec := r.server.export_client(i)) is not None}
    back = sa.Server.restore(r.params, r.ids, doc, r.server.acc.copy(), clients)
    assert back.stage is stage and back.export() == r.server.export()
    if stage >= Stage.MASKED:
        assert back.routed() == r.server.routed()
    with pytest.raises(ValueError):
        sa.Server.restore(r.params, r.ids, {**doc, "stage": 5}, None, clients)


def test_the_client_moves_by_its_table_only() -> None:
    CS = sa.ClientStage
    assert sa.CLIENT_TRANSITIONS == {(CS.ADVERTISED, "share"): CS.SHARED,
                                     (CS.SHARED, "receive"): CS.RECEIVED,
                                     (CS.RECEIVED, "mask"): CS.MASKED,
                                     (CS.MASKED, "unmask"): CS.UNMASKED}
    r = Round(10)
    c = r.clients["c00"]
    assert c.stage is CS.ADVERTISED
    for call in (lambda: c.receive({}), lambda: c.mask(r.inputs["c00"]),
                 lambda: c.unmask(r.ids)):
        with pytest.raises(Rejected) as e:
            call()
        assert e.value.reason == "secagg-wrong-stage" and c.stage is CS.ADVERTISED
    routed = r.keys_and_shares()
    assert c.stage is CS.RECEIVED
    with pytest.raises(Rejected) as e:
        c.unmask(r.ids)
    assert e.value.reason == "secagg-wrong-stage" and c.stage is CS.RECEIVED
    c.receive(routed["c00"])  # a repeat: no move
    assert c.stage is CS.RECEIVED
    survivors = r.mask()
    assert c.stage is CS.MASKED
    with pytest.raises(Rejected) as e:
        c.mask(r.inputs["c00"])
    assert e.value.reason == "secagg-replay" and c.stage is CS.MASKED
    r.unmask(survivors)
    assert c.stage is CS.UNMASKED
    np.testing.assert_array_equal(r.server.result(), r.expected(survivors))


def test_wire_stages_are_their_wire_strings() -> None:
    names = {"keys", "routed", "unmask", "advert", "shares", "masked", "unshares"}
    assert {s.value for s in WireStage} == names
    for s in WireStage:
        assert s == s.value and hash(s) == hash(s.value) and WireStage(s.value) is s
        assert str(s) == f"{s}" == s.value and json.dumps(s) == json.dumps(s.value)
        assert s.encode() == s.value.encode()
