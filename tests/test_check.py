"""`hfl agent check` on a real fleet CA and a real TLS broker: a good board passes every
line; each broken thing fails the line that names it; the probe leaves the device's
session as it found it."""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import queue
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import edge_agent.cli as agent_cli
from edge_agent.check import (
    Check,
    cert_check,
    clock_floor_check,
    fleet_clock_check,
    passed,
    run_checks,
)
from fleet.cli import app
from fleet.ops.broker import Broker, BrokerTls, free_port
from hfl.crypto.identity import Identity
from hfl.crypto.pki import Pki
from hfl.runtime.mqtt import Inbound, Session
from hfl.runtime.node import encode_send
from hfl.runtime.roster_feed import RosterFeed
from hfl.runtime.service import claim
from hfl.wire.messages import Role
from hfl.wire.topics import Topics

T = Topics()
runner = CliRunner()
NOW = dt.datetime(2027, 6, 1, tzinfo=dt.timezone.utc)


@pytest.fixture(scope="module")
def fleet(mosquitto: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[
        tuple[Pki, Broker]]:
    """A fleet CA, a TLS broker with its ACL, and the coordinator's roster retained on it."""
    root = tmp_path_factory.mktemp("check")
    pki = Pki.init(root / "pki")
    pki.issue("coordinator", "coordinator")
    pki.issue("site-a", "aggregator")
    pki.issue("a1", "agent", group="site-a")
    tls = BrokerTls.from_pki(pki, "broker", root / "broker", T)
    with Broker(root / "broker", tls=tls) as broker:
        coord = Identity.load(pki.device("coordinator").dir, "coordinator", Role.COORDINATOR)
        roster = pki.roster()
        (send,) = RosterFeed(roster, pki.ca_cert(), T, pki.device("coordinator").roster,
                             publish=True).poll(time.time(), force=True)
        with session(pki, broker, "coordinator") as (pub, _):
            pub.publish(send.topic, encode_send(send, coord, roster), retain=True)
            assert pub.flush(5)
        yield pki, broker


class session:
    """A device's own session, as a context manager."""

    def __init__(self, pki: Pki, broker: Broker, id_: str, subs: list[str] = ()) -> None:
        self.inbox: queue.Queue[Inbound] = queue.Queue()
        self.s = Session(id_, pki.device(id_).broker_settings(broker.host, broker.port),
                         inbox=self.inbox, subscriptions=list(subs))

    def __enter__(self) -> tuple[Session, queue.Queue[Inbound]]:
        self.s.start()
        assert self.s.wait_ready(10)
        return self.s, self.inbox

    def __exit__(self, *exc: object) -> None:
        self.s.stop()


def board(tmp_path: Path, pki: Pki, port: int, **agent: str) -> Path:
    """A copy of a1's device folder and its config, as on the board."""
    dev = tmp_path / "a1"
    if not dev.exists():
        shutil.copytree(pki.device("a1").dir, dev)
    cfg = tmp_path / "agent.toml"
    extra = "".join(f'{k} = "{v}"\n' for k, v in agent.items())
    cfg.write_text(f'[identity]\nid = "a1"\ndir = "a1"\n[broker]\nhost = "127.0.0.1"\n'
                   f'port = {port}\n[agent]\naggregator = "site-a"\ndevice = "cpu"\n{extra}'
                   '[agent.datasets.digits]\nsource = "digits"\n')
    return cfg


def line(checks: list[Check], name: str) -> Check:
    (c,) = [c for c in checks if c.name.startswith(name)]
    return c


def test_a_good_board_passes_every_line(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    checks = run_checks(board(tmp_path, pki, broker.port), timeout=5)
    assert [c.name for c in checks] == [
        "config", "identity files", "roster", "enrolment", "certificate", "clock",
        f"broker 127.0.0.1:{broker.port}", "clock vs fleet", "task mnist-cnn",
        "task mnist-2nn", "task mlp", "task logreg", "data digits", "device"]
    assert [c for c in checks if c.verdict != "pass"] == []
    assert "coordinator's" in line(checks, "clock vs fleet").detail  # the retained roster


def test_the_command_prints_the_table_and_exits_0_or_1(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    res = runner.invoke(app, ["agent", "check", "-c", str(cfg), "--timeout", "5"])
    assert res.exit_code == 0, res.output
    assert "ready to serve" in res.output and "FAIL" not in res.output
    res = runner.invoke(agent_cli.app, ["check", "-c", str(tmp_path / "none.toml")])
    assert res.exit_code == 1 and "no such config file" in res.output


def test_broker_down_fails_naming_the_broker(fleet, tmp_path: Path) -> None:
    pki, _ = fleet
    port = free_port("127.0.0.1")
    cfg = board(tmp_path, pki, port)
    checks = run_checks(cfg, timeout=2)
    c = line(checks, "broker")
    assert c.name == f"broker 127.0.0.1:{port}" and c.verdict == "fail"
    assert "connection refused" in c.detail and c.hint
    assert line(checks, "clock vs fleet").verdict == "skip"
    assert not passed(checks)
    res = runner.invoke(agent_cli.app, ["check", "-c", str(cfg), "--timeout", "2"])
    assert res.exit_code == 1 and f"not ready: broker 127.0.0.1:{port}" in res.output
    assert "[broker] port" in res.output  # hints are printed as written, not as markup


def test_a_key_readable_by_others_fails_naming_the_file(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    key = tmp_path / "a1" / "a1.key"
    key.chmod(0o644)
    c = line(run_checks(cfg, timeout=5), "identity files")
    assert c.verdict == "fail" and str(key) in c.detail and f"chmod 600 {key}" in c.hint


def test_a_roster_from_another_ca_fails_the_roster_check(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    rogue = Pki.init(tmp_path / "rogue")
    shutil.copy(rogue.ca_path, tmp_path / "a1" / "ca.crt")
    checks = run_checks(cfg, timeout=5)
    c = line(checks, "roster")
    assert c.verdict == "fail" and "does not verify" in c.detail and "ca.crt" in c.hint
    assert line(checks, "enrolment").verdict == "skip"
    assert line(checks, "broker").verdict == "fail"  # the broker's certificate, too


def test_wrong_aggregator_and_missing_cuda_are_named(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    cfg.write_text(cfg.read_text().replace('aggregator = "site-a"', 'aggregator = "site-b"')
                   .replace('device = "cpu"', 'device = "cuda"'))
    checks = run_checks(cfg, timeout=5)
    assert 'aggregator = "site-a"' in line(checks, "enrolment").hint
    assert line(checks, "device").verdict == ("pass" if torch.cuda.is_available() else "fail")


def test_a_missing_task_and_unreadable_data_are_named(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    (tmp_path / "points.csv").write_text("x,y\n1,2\n3,oops\n")
    cfg.write_text(cfg.read_text().replace('device = "cpu"', 'device = "cpu"\ntasks = '
                                           '["tests.task_examples:FromCsv", "not-installed"]')
                   + '[agent.datasets.points]\npath = "points.csv"\n')
    checks = run_checks(cfg, timeout=5)
    assert line(checks, "task tests.task_examples:FromCsv").detail.startswith("from-csv 2")
    missing = line(checks, "task not-installed")
    assert missing.verdict == "fail" and "not installed" in missing.detail
    assert "pip install" in missing.hint
    bad = line(checks, "data points")
    assert bad.verdict == "fail" and "points.csv row 2: not a number" in bad.detail
    (tmp_path / "points.csv").write_text("x,y\n1,2\n3,4\n5,6\n7,8\n9,10\n")
    assert line(run_checks(cfg, timeout=5), "data points").detail == (
        "read by from-csv: 4 training, 1 held-out samples")


def test_no_probe_while_the_service_holds_the_identity(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    cfg = board(tmp_path, pki, broker.port)
    fd = claim(tmp_path / "a1")  # what `hfl-agent run` holds while it serves
    try:
        c = line(run_checks(cfg, timeout=5), "broker")
    finally:
        os.close(fd)
    assert c.verdict == "skip" and "take over" in c.detail


def test_the_probe_leaves_queued_messages_for_the_agent(fleet, tmp_path: Path) -> None:
    pki, broker = fleet
    subs = T.agent_filters("site-a", "a1")
    with session(pki, broker, "a1", subs) as (_, inbox):
        while not inbox.empty():
            inbox.get()  # the retained roster
    # The agent is away; its persistent session queues what the aggregator sends.
    with session(pki, broker, "site-a") as (agg, _):
        agg.publish(T.rounds("site-a", "j1"), b"while away")
        agg.publish(T.round_to("site-a", "j1", "a1"), b"its shares")  # not retained either
        assert agg.flush(5)
    assert line(run_checks(board(tmp_path, pki, broker.port), timeout=5), "broker").verdict \
        == "pass"
    with session(pki, broker, "a1", subs) as (_, inbox):
        got = []
        deadline = time.monotonic() + 5
        while not {b"while away", b"its shares"} <= set(got) and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                got.append(inbox.get(timeout=0.5).payload)
    assert {b"while away", b"its shares"} <= set(got)


# ---------------------------------------------------------------- pure checks


def test_certificate_validity_window_and_issuer(fleet, tmp_path: Path) -> None:
    pki, _ = fleet
    cert, ca = pki.cert("a1"), pki.ca_cert()
    now = cert.not_valid_before_utc + dt.timedelta(days=10)
    assert cert_check(cert, ca, "a1", now).verdict == "pass"
    late = cert_check(cert, ca, "a1", cert.not_valid_after_utc + dt.timedelta(days=1))
    assert late.verdict == "fail" and "expired" in late.detail and "--force" in late.hint
    soon = cert_check(cert, ca, "a1", cert.not_valid_after_utc - dt.timedelta(days=3))
    assert soon.verdict == "warn" and "3 days left" in soon.detail
    early = cert_check(cert, ca, "a1", cert.not_valid_before_utc - dt.timedelta(hours=1))
    assert early.verdict == "fail" and "not valid before" in early.detail
    assert cert_check(cert, ca, "a2", now).verdict == "fail"  # someone else's certificate
    other = Pki.init(tmp_path / "other").ca_cert()
    assert "not issued by the fleet CA" in cert_check(cert, other, "a1", now).detail


def test_a_clock_before_the_release_fails() -> None:
    released = dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc)
    assert clock_floor_check(NOW, released).verdict == "pass"
    boot = clock_floor_check(dt.datetime(1970, 1, 1, 0, 5, tzinfo=dt.timezone.utc), released)
    assert boot.verdict == "fail" and "1970-01-01" in boot.detail and "set-ntp" in boot.hint


def test_fleet_timestamps_are_a_lower_bound_on_the_clock() -> None:
    t = NOW.timestamp()
    assert fleet_clock_check(t, []).verdict == "skip"
    fine = fleet_clock_check(t, [("coordinator", t - 3600), ("site-a", t - 5)])
    assert fine.verdict == "pass" and "site-a's" in fine.detail and "ahead" in fine.detail
    assert fleet_clock_check(t, [("site-a", t + 30)]).verdict == "pass"  # sender skew
    behind = fleet_clock_check(t, [("coordinator", t - 10), ("site-a", t + 7200)])
    assert behind.verdict == "fail" and "7200 s behind" in behind.detail
    assert "site-a" in behind.detail
