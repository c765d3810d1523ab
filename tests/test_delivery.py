"""End-to-end delivery (hfl.runtime.delivery): the resend bookkeeping alone, then the three machines
on the in-memory network losing what a dying broker loses: an agent's update or SecAgg+
answer, an acknowledgement, a partial, a task, and whole outages in which the broker comes
back empty and the peers reconnect one by one in the worst order. Each job must end with
the exact model of an undisturbed run, every agent counted once in every version."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace

import numpy as np
import pytest

from fleet.sim.memnet import MemNet
from hfl.errors import Rejected
from hfl.runtime.actions import Send
from hfl.runtime.delivery import GIVE_UP_S, JITTER, RESEND_FIRST_S, Key, Outbox, ack, acked
from hfl.wire.messages import Kind
from hfl.wire.topics import Topics
from tests import test_secure_rounds as secure
from tests.test_machines import GROUPS, build, constant_trainer, fedavg, request, spec, versions

EVERYONE = GROUPS["site-a"] + GROUPS["site-b"]
RESEND_S = RESEND_FIRST_S * (1 + JITTER) + 2  # by then, a first copy has gone again


def send(job: str = "j", round: int = 3, stage: str = "update") -> Send:
    return Send(Kind.UPDATE, f"t/{stage}", job, round, stage, {})


# ---------------------------------------------------------------- the outbox alone


def test_a_message_goes_again_with_a_doubling_back_off_until_acknowledged() -> None:
    box = Outbox(first_s=10, max_s=40)
    s = box.track(send(), "agg", now=0.0)
    key = Key.of(s, "agg")
    times = []
    now = 0.0
    while now < 200:
        now += 0.5
        again, gone = box.due(now)
        assert gone == []
        times += [now] * len(again)
        assert all(a is s for a in again)
    gaps = np.diff([0.0, *times])
    # 10, 20, 40, 40, ... each stretched by at most JITTER
    for gap, base in zip(gaps, [10, 20, 40, 40, 40], strict=False):
        assert base <= gap <= base * (1 + JITTER) + 0.5
    assert box.resent == len(times)
    assert box.ack(key) and not box.ack(key)  # a second acknowledgement settles nothing
    assert len(box) == 0 and box.due(1e6) == ([], [])
    assert box.acked == 1


def test_without_a_time_the_schedule_starts_at_the_next_tick() -> None:
    box = Outbox(first_s=10)
    box.track(send(), "agg")  # a handler that is not given the time (training's answer)
    assert box.due(100.0) == ([], [])  # starts the clock
    assert box.due(109.9) == ([], [])
    again, _ = box.due(100.0 + 10 * (1 + JITTER))
    assert len(again) == 1


def test_reconnecting_sends_everything_now_and_restarts_the_back_off() -> None:
    box = Outbox(first_s=10, max_s=100)
    a, b = box.track(send(stage="advert"), "agg", 0.0), box.track(send(stage="x"), "agg", 0.0)
    for t in range(1, 80):
        box.due(float(t))  # a few copies: the back-off has grown
    assert box.reconnected(80.0) == [a, b]
    assert box.due(80.0 + 9.9) == ([], [])  # the first wait again, not the grown one
    assert len(box.due(80.0 + 10 * (1 + JITTER))[0]) == 2


def test_a_peer_back_online_gets_only_what_waits_for_it() -> None:
    box = Outbox()
    mine = box.track(send(), "coordinator", 0.0)
    box.track(send(stage="other"), "site-b", 0.0)
    assert box.peer_online("coordinator", 1.0) == [mine]
    assert box.peer_online("nobody", 1.0) == []


def test_forget_ends_what_is_over_and_a_repeat_replaces() -> None:
    box = Outbox()
    for r in (1, 2, 3):
        box.track(send(round=r), "agg", 0.0)
    box.track(send(job="other", round=1), "agg", 0.0)
    assert box.forget("j", before=3) == 2  # a newer round opened
    assert box.forget("j", round=3, kind="partial") == 0  # not of that kind
    assert box.forget("j", round=3) == 1  # its round closed
    assert [k.job for k in box.pending()] == ["other"]
    newer = send(job="other", round=1)
    box.track(newer, "agg", 50.0)  # the same message again: one entry, its schedule anew
    assert len(box) == 1 and box.due(55.0) == ([], [])


def test_a_message_nobody_acknowledges_is_given_up_after_a_bound() -> None:
    box = Outbox(first_s=10, max_s=120)
    s = box.track(send(), "agg", 0.0)
    copies = 0
    for t in range(0, int(GIVE_UP_S) + 121, 5):
        again, gone = box.due(float(t))
        copies += len(again)
        if gone:
            assert gone == [Key.of(s, "agg")] and t >= GIVE_UP_S
            break
    else:
        pytest.fail("never given up")
    assert len(box) == 0 and box.given_up == 1
    assert copies <= GIVE_UP_S / 120 + 5  # the back-off bounds what it costs


def test_the_jitter_is_a_function_of_the_message_so_a_fleet_spreads_out() -> None:
    first = []
    for agent in range(50):
        box = Outbox(first_s=10)
        box.track(send(), f"a{agent}", 0.0)
        t = 10.0
        while not box.due(t)[0]:
            t += 0.01
        first.append(t)
    assert min(first) >= 10.0 and max(first) <= 10 * (1 + JITTER) + 0.01
    assert len({round(t, 2) for t in first}) > 25  # spread, not in lockstep
    with pytest.raises(ValueError):
        Outbox(first_s=0)


def test_an_ack_names_the_message_it_settles_and_bad_ones_are_refused() -> None:
    env = SimpleNamespace(type="update", job="j", round=7, stage="masked", sender="a1",
                          meta={})
    a = ack("site-a", Topics(), env, "repeat")  # type: ignore[arg-type]
    assert a.kind is Kind.ACK and a.topic == "hfl/v1/acks/site-a/a1"
    assert (a.job, a.round, a.stage) == ("j", 7, "masked") and not a.to and not a.retain
    back = SimpleNamespace(type="ack", job=a.job, round=a.round, stage=a.stage,
                           sender="site-a", meta=json.loads(json.dumps(a.meta)))
    key, meta = acked(back)  # type: ignore[arg-type]
    assert key == Key("site-a", "update", "j", 7, "masked") and meta.outcome == "repeat"
    for bad in ({"of": "update", "outcome": "maybe"}, {"of": "model", "outcome": "taken"},
                {"of": "update", "outcome": "taken", "extra": 1}):
        with pytest.raises(Rejected) as e:
            acked(SimpleNamespace(**{**vars(back), "meta": bad}))  # type: ignore[arg-type]
        assert e.value.reason == "bad-meta"


# ---------------------------------------------------------------- machines losing messages


def header(data: bytes) -> dict:
    h = int.from_bytes(data[4:8], "little")
    return json.loads(data[8 : 8 + h])


def lose(match, times: int = 1):
    """A fault: the first `times` messages that `match(topic, header)` never arrive."""
    lost: list[tuple[str, dict]] = []

    def fault(topic: str, data: bytes) -> list[bytes]:
        h = header(data)
        if len(lost) < times and match(topic, h):
            lost.append((topic, h))
            return []
        return [data]
    fault.lost = lost  # type: ignore[attr-defined]
    return fault


def wait(net: MemNet, seconds: float, step: float = 1.0) -> None:
    for _ in range(int(seconds / step)):
        net.advance(step)


def outboxes(net: MemNet) -> dict[str, int]:
    """Messages still waiting for an acknowledgement, per peer (empty ones left out)."""
    return {p: len(peer.machine.outbox) for p, peer in net.peers.items()
            if len(getattr(peer.machine, "outbox", ())) > 0}


def acks_to(net: MemNet, to: str) -> list[tuple[str, int, str, str]]:
    return [(s.meta["of"], s.round, s.stage, s.meta["outcome"]) for _, s in net.sent
            if s.kind is Kind.ACK and s.topic.endswith(f"/{to}")]


def test_a_lost_update_goes_again_and_is_counted_once() -> None:
    fault = lose(lambda t, h: h["type"] == "update" and t.endswith("/a1"))
    net = build(fault=fault)
    request(net, spec(rounds=1, deadline_s=120))
    assert fault.lost and not versions(net)  # the round waits for a1
    wait(net, RESEND_S)
    (v,) = versions(net)
    assert v.agents == 6
    np.testing.assert_allclose(v.params, fedavg(EVERYONE), rtol=1e-6)
    assert acks_to(net, "a1")[-1][3] == "taken"
    assert all(not net.rejections(p) for p in net.peers)
    assert outboxes(net) == {}


def test_a_lost_ack_costs_one_more_copy_which_is_acknowledged_as_a_repeat() -> None:
    # a3 is silent, so the round stays open long enough for a1 to send again.
    fault = lose(lambda t, h: h["type"] == "ack" and t.endswith("/a1"))
    net = build(fault=fault, trainer=constant_trainer(silent={"a3"}))
    request(net, spec(rounds=1, deadline_s=60))
    wait(net, 61)
    (v,) = versions(net)
    assert v.agents == 5  # a1 counted once; a3 left out at the deadline
    np.testing.assert_allclose(v.params, fedavg([a for a in EVERYONE if a != "a3"]), rtol=1e-6)
    assert [o for *_, o in acks_to(net, "a1")] == ["taken", "repeat"]
    assert [f["agent"] for _, f in net.events("duplicate")] == ["a1"]
    assert all(not net.rejections(p) for p in net.peers)
    assert outboxes(net) == {}


def test_a_lost_partial_goes_again_and_every_site_is_in_the_version() -> None:
    fault = lose(lambda t, h: h["type"] == "partial" and t.endswith("/site-a"))
    net = build(fault=fault)
    request(net, spec(rounds=2, deadline_s=60))
    assert len(versions(net)) == 0
    wait(net, RESEND_S)
    assert [v.agents for v in versions(net)] == [6, 6]
    np.testing.assert_allclose(versions(net)[-1].params, 2 * fedavg(EVERYONE), rtol=1e-6)
    assert ("partial", 0, "partial", "taken") in acks_to(net, "site-a")
    assert outboxes(net) == {}


def test_a_lost_task_goes_again() -> None:
    fault = lose(lambda t, h: h["type"] == "task" and "/site-b/" in t)
    net = build(fault=fault)
    request(net, spec(rounds=2, deadline_s=60))
    assert len(versions(net)) == 0
    wait(net, RESEND_S)
    assert [v.agents for v in versions(net)] == [6, 6]
    assert [o for of, *_, o in acks_to(net, "coord") if of == "task"] == ["taken"] * 4
    assert outboxes(net) == {}


def test_a_partial_acknowledged_too_late_is_late_not_an_error() -> None:
    fault = lose(lambda t, h: h["type"] == "ack" and t.endswith("/site-a"))
    net = build(fault=fault)
    request(net, spec(rounds=1))
    assert len(versions(net)) == 1
    wait(net, RESEND_S)  # site-a sends its partial again: the block is over
    assert len(fault.lost) == 1  # the first acknowledgement, "taken"
    assert [o for *_, o in acks_to(net, "site-a")] == ["taken", "late"]
    assert net.events("late") and not net.rejections("coord")
    assert len(versions(net)) == 1 and outboxes(net) == {}


@pytest.mark.parametrize("stage", ["advert", "shares", "masked", "unshares"])
def test_a_lost_secagg_answer_goes_again_and_nobody_is_dropped(stage: str) -> None:
    fault = lose(lambda t, h: h["type"] == "update" and h["stage"] == stage
                 and t.endswith("/a1"))
    net = secure.net(fault=fault)
    request(net, secure.spec(deadline_s=120, secagg={"threshold": 0.6,
                                                     "stage_timeout_s": 60}))
    assert fault.lost
    wait(net, RESEND_S)
    (v,) = versions(net)
    assert v.agents == 13 and v.dropped == 0
    np.testing.assert_allclose(v.params, secure.fedavg(secure.STEP), atol=secure.TOL)
    assert all(not net.rejections(p) for p in net.peers)
    assert outboxes(net) == {}


def test_a_secagg_answer_sent_again_after_its_stage_is_a_repeat_not_stale() -> None:
    # The ack of a1's shares is lost and the round moves on to its last stage, where a9 is
    # silent (so it stays open until its stage deadline): a1 sends its shares again.
    lost_ack = lose(lambda t, h: h["type"] == "ack" and h["stage"] == "shares"
                    and t.endswith("/a1"))
    silent = secure.drop({"a9"}, "unshares")
    net = build(trainer=secure.trainer, groups=secure.GROUPS,
                fault=lambda t, d: [x for y in lost_ack(t, d) for x in silent(t, y)])
    request(net, secure.spec(deadline_s=120, secagg={"threshold": 0.6,
                                                     "stage_timeout_s": 60}))
    wait(net, 61)
    assert [o for _, _, st, o in acks_to(net, "a1") if st == "shares"] == ["taken", "repeat"]
    assert all(not net.rejections(p) for p in net.peers)
    (v,) = versions(net)
    assert v.agents == 13 and v.dropped == 0  # a9's input is in: the others unmask it
    np.testing.assert_allclose(v.params, secure.fedavg(secure.STEP), atol=secure.TOL)


# ---------------------------------------------------------------- a broker that comes back empty


def worst_order(net: MemNet) -> list[str]:
    """Reconnect the senders before their receivers: agents, then aggregators, then the
    coordinator and the apps, so that whatever is sent again at once is lost again."""
    roles = {p: net.roster.get(p).role.value for p in net.peers}
    order = ("agent", "aggregator", "coordinator", "app")
    return sorted(net.peers, key=lambda p: order.index(roles[p]))


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("secagg", [False, True], ids=["plain", "secagg"])
def test_outages_of_a_broker_that_forgets_everything_lose_no_update(secagg: bool,
                                                                   seed: int) -> None:
    # Five outages after so many messages, spread over the job (an undisturbed one sends
    # 153 messages in plain rounds, 807 with SecAgg+): every kind of message is lost once.
    total = 807 if secagg else 153
    kills = sorted(random.Random(seed).sample(range(5, int(total * 0.9)), 5))
    seen, hits = [0], []
    net: MemNet

    def count(topic: str, data: bytes) -> list[bytes]:
        seen[0] += 1
        if seen[0] in kills:
            hits.append(header(data)["stage"])
            net.outage()
            return []
        return [data]

    if secagg:
        net = secure.net(fault=count)
        sp = secure.spec(rounds=6, deadline_s=120,
                         secagg={"threshold": 0.6, "stage_timeout_s": 60})
    else:
        net = build(fault=count)
        sp = spec(rounds=6, deadline_s=120)
    request(net, sp)
    for _ in range(2000):
        if len(versions(net)) == 6:
            break
        if net.offline:  # (one outage may come while the peers reconnect from another)
            net.advance(0.5)
            net.reconnect(*worst_order(net))
        else:
            net.advance(1.0)
    assert len(hits) == len(kills), (hits, seen[0])
    rows = versions(net)
    groups = secure.GROUPS if secagg else GROUPS
    agents = sum(groups.values(), [])
    assert [v.agents for v in rows] == [len(agents)] * 6  # every agent, every version
    assert all(v.dropped == 0 for v in rows)
    step = secure.fedavg(secure.STEP) if secagg else fedavg(EVERYONE)
    np.testing.assert_allclose(rows[-1].params, 6 * step, atol=secure.TOL)
    assert net.lost > 0
    assert all(not net.rejections(p) for p in net.peers)
    wait(net, 30)
    assert outboxes(net) == {}  # nothing left waiting once the job is over
