"""`hfl agent check`: is this board ready to serve? One line per check, each with a fix.

The checks run in order and a later one is skipped when what it needs failed earlier
(no identity, no broker probe). The broker probe connects as the device itself (the
broker takes the client id from the certificate), so:

- it does not run while the agent's service holds the device folder (`hfl.runtime.service.claim`):
  it would take over the service's connection;
- it resumes the device's persistent session and acks nothing: what the broker queued for
  the agent stays queued for it, and the probe leaves no Last Will behind.

Clocks: MQTT carries no time. Boards without an RTC boot with a clock in the past, so the
clock must read after this release was made, and after the creation time of every signed
retained message the probe receives (the coordinator's roster, the aggregator's round
announcements): that is a lower bound on the fleet's time. A clock running *ahead* of the
fleet, or behind by less than the age of the newest retained message, cannot be seen.
"""

from __future__ import annotations

import datetime as dt
import os
import queue
import socket
import ssl
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import load_pem_private_key

import hfl
from edge_agent.device import pick_device
from edge_agent.runner import board_data
from hfl.config import Config, load_config
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import load_ca_cert, load_roster
from hfl.runtime.mqtt import Inbound, Session
from hfl.runtime.service import AlreadyServed, claim
from hfl.wire.gate import Gate
from hfl.wire.messages import Role

Verdict = Literal["pass", "warn", "fail", "skip"]
CERT_WARN_DAYS = 30  # renew before this
CLOCK_TOLERANCE = 60.0  # seconds behind a fleet timestamp still taken as sender skew
RETAINED_WAIT = 1.0  # seconds to collect retained messages after subscribing


@dataclass(frozen=True)
class Check:
    name: str
    verdict: Verdict
    detail: str
    hint: str = ""


def ok(name: str, detail: str) -> Check:
    return Check(name, "pass", detail)


def bad(name: str, detail: str, hint: str) -> Check:
    return Check(name, "fail", detail, hint)


# ---------------------------------------------------------------- pure checks (no I/O)


def cert_check(cert: x509.Certificate, ca: x509.Certificate, device_id: str,
               now: dt.datetime) -> Check:
    """The device's TLS certificate: from the fleet CA, for this id, valid now, not about to
    expire."""
    name = "certificate"
    renew = (f"re-issue it on the control node (hfl pki issue PKI {device_id} --role agent "
             "--aggregator AGG --force) and copy the device folder again")
    try:
        cert.verify_directly_issued_by(ca)
    except (InvalidSignature, ValueError, TypeError) as e:
        why = "its signature does not verify" if isinstance(e, InvalidSignature) else str(e)
        return bad(name, f"not issued by the fleet CA in ca.crt: {why}", renew)
    cns = [a.value for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    if cns != [device_id]:
        return bad(name, f"issued to {', '.join(map(str, cns)) or 'nobody'}, not {device_id}",
                   renew)
    if now < cert.not_valid_before_utc:
        return bad(name, f"not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC "
                   f"(the clock reads {now:%Y-%m-%d %H:%M} UTC)",
                   "set the clock (see the clock line) or wait until then")
    if now >= cert.not_valid_after_utc:
        return bad(name, f"expired on {cert.not_valid_after_utc:%Y-%m-%d}", renew)
    days = (cert.not_valid_after_utc - now).days
    detail = f"valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days} days left)"
    if days < CERT_WARN_DAYS:
        return Check(name, "warn", detail, renew)
    return ok(name, detail)


def clock_floor_check(now: dt.datetime, released: dt.datetime) -> Check:
    """A clock before this release was made is certainly wrong (a board without an RTC)."""
    if now < released:
        return bad("clock", f"reads {now:%Y-%m-%d %H:%M} UTC, before this hfl release "
                   f"({released:%Y-%m-%d})",
                   "enable time sync (timedatectl set-ntp true; systemd-timesyncd or chrony) "
                   "and order hfl-agent after time-sync.target")
    return ok("clock", f"{now:%Y-%m-%d %H:%M} UTC, after this hfl release "
              f"({released:%Y-%m-%d})")


def fleet_clock_check(now: float, stamps: list[tuple[str, float]]) -> Check:
    """`stamps`: (sender, created) of signed retained messages; each is a lower bound on the
    fleet's time, up to the sender's own skew (CLOCK_TOLERANCE)."""
    name = "clock vs fleet"
    if not stamps:
        return Check(name, "skip", "no retained message to compare with (no roster or round "
                     "published yet); MQTT carries no time of its own")
    sender, newest = max(stamps, key=lambda s: s[1])
    behind = newest - now
    if behind > CLOCK_TOLERANCE:
        return bad(name, f"at least {behind:.0f} s behind: {sender} signed a message at "
                   f"{dt.datetime.fromtimestamp(newest, dt.timezone.utc):%Y-%m-%d %H:%M:%S} "
                   "UTC", "enable time sync (timedatectl set-ntp true) and check it "
                   "(timedatectl timesync-status)")
    return ok(name, f"not behind the newest of {len(stamps)} retained messages ({sender}'s, "
              f"{max(-behind, 0):.0f} s old); a clock running ahead cannot be seen this way")


def key_mode_check(paths: list[Path]) -> Check:
    """Private keys exist and only their owner may read them (mode 0600 or stricter)."""
    name = "identity files"
    missing = [p for p in paths if not p.is_file()]
    if missing:
        return bad(name, f"missing {', '.join(map(str, missing))}",
                   "copy the whole device folder made by `hfl pki issue` onto the board")
    open_ = [p for p in paths if p.name.endswith(".key") and stat.S_IMODE(p.stat().st_mode) & 0o077]
    if open_:
        modes = ", ".join(f"{p} ({stat.S_IMODE(p.stat().st_mode):04o})" for p in open_)
        return bad(name, f"private key readable by others: {modes}",
                   f"chmod 600 {' '.join(map(str, open_))}")
    unreadable = [p for p in paths if not os.access(p, os.R_OK)]
    if unreadable:
        return bad(name, f"not readable by this user: {', '.join(map(str, unreadable))}",
                   "run the check as the service's user (sudo -u hfl hfl agent check ...)")
    return ok(name, f"{len(paths)} files present, keys 0600")


# ---------------------------------------------------------------- the run


@dataclass
class Board:
    """What the checks found so far, for the ones that follow."""

    path: Path
    timeout: float
    now: Callable[[], float]
    cfg: Config | None = None
    ca: x509.Certificate | None = None
    roster: Roster | None = None
    stamps: list[tuple[str, float]] = field(default_factory=list)
    tasks: list = field(default_factory=list)  # the allowed task classes that loaded

    def utcnow(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.now(), dt.timezone.utc)


def run_checks(path: Path, *, timeout: float = 10.0,
               now: Callable[[], float] = time.time) -> list[Check]:
    """Every check for the agent configured in `path`, in order."""
    b = Board(Path(path), timeout, now)
    out = [config_check(b)]
    if b.cfg is None:
        return out
    for step in (identity_check, roster_check, enrolled_check, certificate_check, clock_check,
                 broker_check, fleet_check, tasks_check, datasets_check, device_check):
        out += step(b)
    return out


def passed(checks: list[Check]) -> bool:
    return all(c.verdict != "fail" for c in checks)


def config_check(b: Board) -> Check:
    try:
        cfg = load_config(b.path)
        if cfg.agent is None:
            raise ValueError(f"{b.path}: no [agent] section")
    except (ValueError, OSError) as e:  # OSError: unreadable (permissions)
        return bad("config", str(e), "fix the file (examples/services/agent.toml shows every "
                   "field)")
    b.cfg = cfg
    tls = "TLS" if cfg.broker.tls else "plain MQTT"
    return ok("config", f"{cfg.identity.id} under {cfg.agent.aggregator}, broker "
              f"{cfg.broker.host}:{cfg.broker.port} ({tls})")


def identity_check(b: Board) -> list[Check]:
    assert b.cfg is not None
    d, (sign, seal) = b.cfg.device, Identity.paths(b.cfg.device.dir, b.cfg.identity.id)
    paths = [d.ca, d.roster, sign, seal] + ([d.cert, d.tls_key] if b.cfg.broker.tls else [])
    return [key_mode_check(paths)]


def roster_check(b: Board) -> list[Check]:
    assert b.cfg is not None
    d = b.cfg.device
    try:
        b.ca = load_ca_cert(d.ca)
        b.roster = load_roster(d.roster, d.ca)
    except (ValueError, OSError) as e:
        return [bad("roster", str(e), f"copy ca.crt and roster.json together from the control "
                    f"node's PKI/devices/{b.cfg.identity.id}/: both come from one fleet CA")]
    return [ok("roster", f"signed by {b.ca.subject.rfc4514_string()}, serial "
               f"{b.roster.serial}, {len(b.roster)} members")]


def enrolled_check(b: Board) -> list[Check]:
    assert b.cfg is not None and b.cfg.agent is not None
    if b.roster is None:
        return [Check("enrolment", "skip", "needs a verified roster")]
    cfg, agg = b.cfg, b.cfg.agent.aggregator
    try:
        ident = Identity.load(cfg.device.dir, cfg.identity.id, Role.AGENT)
        b.roster.check_member(ident, str(cfg.device.roster))
    except (ValueError, OSError) as e:
        return [bad("enrolment", str(e), "issue the device on the control node and copy its "
                    "folder (hfl pki issue PKI ID --role agent --aggregator AGG)")]
    member = b.roster.get(ident.id)
    assert member is not None  # check_member passed
    if (group := member.group) != agg:
        return [bad("enrolment", f"the roster enrols {ident.id} under {group}, the config "
                    f"says aggregator = {agg!r}", f'set aggregator = "{group}" in [agent]')]
    return [ok("enrolment", f"{ident.id}: keys match the roster, agent of {agg}")]


def certificate_check(b: Board) -> list[Check]:
    assert b.cfg is not None
    if not b.cfg.broker.tls:
        return [Check("certificate", "warn", "broker.tls = false: no certificate, no "
                      "encryption, no broker ACL", "use TLS on a real fleet (port 8883)")]
    if b.ca is None:
        return [Check("certificate", "skip", "needs the CA certificate")]
    d = b.cfg.device
    try:
        cert = x509.load_pem_x509_certificate(d.cert.read_bytes())
        key = load_pem_private_key(d.tls_key.read_bytes(), password=None)
    except (OSError, ValueError) as e:
        return [bad("certificate", f"{d.cert} / {d.tls_key}: {e}",
                    "copy the device folder made by `hfl pki issue` again")]
    if key.public_key() != cert.public_key():
        return [bad("certificate", f"{d.tls_key} is not the key of {d.cert}",
                    "copy the device folder made by `hfl pki issue` again")]
    return [cert_check(cert, b.ca, b.cfg.identity.id, b.utcnow())]


def clock_check(b: Board) -> list[Check]:
    released = dt.datetime.fromisoformat(hfl.__released__).replace(tzinfo=dt.timezone.utc)
    return [clock_floor_check(b.utcnow(), released)]


def broker_check(b: Board) -> list[Check]:
    """TCP, then TLS with the device certificate, then MQTT: CONNACK and SUBACKs."""
    assert b.cfg is not None and b.cfg.agent is not None
    s, d = b.cfg.broker_settings(), b.cfg.device
    name = f"broker {s.host}:{s.port}"
    try:
        fd = claim(d.dir)  # held during the probe (a service starting meanwhile exits 1
        # and systemd starts it again: Restart=on-failure)
    except AlreadyServed:
        return [Check(name, "skip", "hfl-agent is running with this identity: a probe would "
                      "take over its connection", "see its state with systemctl status "
                      "hfl-agent; stop it to probe the broker from here")]
    except OSError as e:
        return [bad(name, f"cannot open {d.dir}: {e}", "run as the service's user")]
    try:
        failure = transport_probe(s.host, s.port, s.ca, s.cert, s.key, b.timeout)
        if failure:
            return [bad(name, *failure)]
        return [mqtt_probe(b, name)]
    finally:
        os.close(fd)


def transport_probe(host: str, port: int, ca: str | None, cert: str | None, key: str | None,
                    timeout: float) -> tuple[str, str] | None:
    """(what failed, hint) for TCP or the TLS handshake, or None when both succeed."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except socket.gaierror as e:
        return f"cannot resolve {host}: {e.strerror}", "check [broker] host and DNS"
    except ConnectionRefusedError:
        return (f"connection refused: nothing listens on {host}:{port}",
                "start the broker (systemctl status mosquitto) or fix [broker] port")
    except OSError as e:  # timeout, no route
        return (f"no connection within {timeout:.0f} s: {e}",
                "check the network path and firewall to the broker")
    with sock:
        if ca is None:
            return None
        assert cert is not None and key is not None  # BrokerSettings sets all three
        try:
            ctx = ssl.create_default_context(cafile=ca)
            ctx.load_cert_chain(cert, key)
        except (ssl.SSLError, OSError) as e:
            return (f"cannot load the device's TLS files: {e}",
                    "copy the device folder made by `hfl pki issue` again")
        try:
            with ctx.wrap_socket(sock, server_hostname=host):
                return None
        except ssl.SSLCertVerificationError as e:
            return (f"the broker's certificate does not verify: {e.verify_message}",
                    "issue the broker's certificate from this fleet CA for the name devices "
                    f"dial (hfl pki broker-config PKI --host {host})")
        except (ssl.SSLError, OSError) as e:
            return f"TLS handshake failed: {e}", "is this port the broker's TLS listener?"


def mqtt_probe(b: Board, name: str) -> Check:
    """Resume the device's session as the device, ack nothing, read what is retained."""
    assert b.cfg is not None and b.cfg.agent is not None
    cfg, agent, inbox = b.cfg, b.cfg.agent, queue.Queue[Inbound]()
    session = Session(cfg.identity.id, cfg.broker_settings(), inbox=inbox,
                      subscriptions=cfg.topics.agent_filters(agent.aggregator,
                                                             cfg.identity.id),
                      leave_unacked=True, max_payload=cfg.max_payload)
    started = time.monotonic()
    session.start()
    try:
        if not session.wait_ready(b.timeout):
            if session.connected:
                return bad(name, session.refusal or "subscriptions not acknowledged in time",
                           "the broker's ACL must come from the current roster "
                           "(hfl pki broker-config, then reload mosquitto)")
            return bad(name, f"no MQTT session within {b.timeout:.0f} s: "
                       f"{session.refusal or 'the broker closed the connection'}",
                       "is the certificate revoked (CRL), or the broker's ACL older than the "
                       "roster? (hfl pki list PKI; hfl pki broker-config)")
        took = time.monotonic() - started
        time.sleep(RETAINED_WAIT)
        b.stamps = received_stamps(inbox, b.roster, cfg)
    finally:
        session.stop()
    return ok(name, f"connected as {cfg.identity.id} and subscribed in {took:.2f} s "
              f"({'TLS with the device certificate' if cfg.broker.tls else 'plain MQTT'})")


def received_stamps(inbox: queue.Queue[Inbound], roster: Roster | None,
                    cfg: Config) -> list[tuple[str, float]]:
    """(sender, created) of each message that verifies against the roster."""
    if roster is None:
        return []
    gate, now = Gate(roster, cfg.topics), time.time()
    out: list[tuple[str, float]] = []
    while True:
        try:
            msg = inbox.get_nowait()
        except queue.Empty:
            return out
        accepted = gate.accept(msg.topic, msg.payload, now)
        if accepted is not None:
            out.append((accepted[0].sender, accepted[0].created))


def fleet_check(b: Board) -> list[Check]:
    return [fleet_clock_check(b.now(), b.stamps)]


def tasks_check(b: Board) -> list[Check]:
    """Each allowed task imports and is a valid task."""
    from hfl.models.tasks import load

    assert b.cfg is not None and b.cfg.agent is not None
    out = []
    for ref in b.cfg.agent.tasks:
        try:
            cls = load(ref)
        except Exception as e:  # a broken wheel is a finding, not a crash of the check
            out.append(bad(f"task {ref}", str(e), "install the task's wheel on this board "
                           "(pip install), or fix [agent] tasks"))
            continue
        b.tasks.append(cls)
        out.append(ok(f"task {ref}", f"{cls.name} {cls.version} ({cls.__module__})"))
    return out


def datasets_check(b: Board) -> list[Check]:
    """Each data source can be read by at least one allowed task (those that need a job's
    options to read data are skipped)."""
    assert b.cfg is not None and b.cfg.agent is not None
    out = []
    for ds_name, bd in board_data(b.cfg.agent.datasets, b.cfg.agent.state_dir).items():
        name, readers, errors = f"data {ds_name}", [], []
        for cls in b.tasks:
            try:
                local = bd.load(cls())
            except Exception as e:  # whatever a task's loading raises is a finding
                errors.append(f"{cls.name}: {e}")
                continue
            if len(local.train) == 0:
                errors.append(f"{cls.name}: no training samples")
            else:
                readers.append((cls.name, local))
        if readers:
            names = ", ".join(n for n, _ in readers)
            local = readers[0][1]
            out.append(ok(name, f"read by {names}: {len(local.train)} training, "
                          f"{len(local.test)} held-out samples"))
        else:
            out.append(bad(name, "; ".join(errors)[:300] or "no allowed task",
                           f"fix [agent.datasets.{ds_name}] or its files"))
    return out


def device_check(b: Board) -> list[Check]:
    assert b.cfg is not None and b.cfg.agent is not None
    asked = b.cfg.agent.device
    try:
        dev = pick_device(asked)
    except ValueError as e:
        return [bad("device", str(e), "install the board's CUDA build of torch (JetPack) or "
                    'set device = "cpu" in [agent]')]
    what = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    return [ok("device", f"{asked} → {dev} ({what}, torch {torch.__version__})")]
