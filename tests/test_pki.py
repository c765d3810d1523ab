"""hfl.crypto.pki and fleet.ops.acl without a broker: certificates, the signed roster,
revocation, the ACL."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleet.ops.acl import ANY, acl, listener_tls, pattern
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki, load_ca_cert, load_roster, sign_roster, verify_roster
from hfl.wire.messages import Role
from hfl.wire.topics import Topics


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """coord, site-a (a1, a2), site-b (b1), app dash, observer obs and a broker."""
    p = Pki.init(tmp_path_factory.mktemp("pki") / "pki", name="test CA")
    p.issue("coord", Role.COORDINATOR)
    p.issue("site-a", "aggregator")
    p.issue("site-b", "aggregator")
    p.issue("a1", "agent", group="site-a")
    p.issue("a2", "agent", group="site-a")
    p.issue("b1", "agent", group="site-b")
    p.issue("dash", "app")
    p.issue("obs", "observer")
    p.issue_broker("broker", ["broker.lan", "10.0.0.2"])
    return p


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def usages(cert: x509.Certificate) -> set[x509.ObjectIdentifier]:
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


def test_ca_is_a_p256_signing_ca(pki: Pki) -> None:
    ca = pki.ca_cert()
    ca.verify_directly_issued_by(ca)
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    assert ca.public_key().curve.name == "secp256r1"
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = ca.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days >= 3650
    assert mode(pki.ca_key_path) == 0o600


def test_device_certificate_chains_to_the_ca_with_its_id_as_cn(pki: Pki) -> None:
    files = pki.device("a1")
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    cert.verify_directly_issued_by(pki.ca_cert())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "a1"
    assert usages(cert) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and not ku.key_cert_sign
    assert load_pem_private_key(files.tls_key.read_bytes(), None).public_key() == cert.public_key()
    assert files.ca.read_bytes() == pki.ca_path.read_bytes()
    for path in (files.tls_key, *Identity.paths(files.dir, "a1")):
        assert mode(path) == 0o600, path


def test_broker_certificate_names_its_hosts_and_is_not_enrolled(pki: Pki) -> None:
    cert = pki.cert("broker")
    cert.verify_directly_issued_by(pki.ca_cert())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.lan"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.2"]
    assert usages(cert) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert "broker" not in pki.roster()
    assert mode(pki.device("broker").tls_key) == 0o600


def test_every_device_folder_holds_the_current_signed_roster(pki: Pki) -> None:
    roster = pki.roster()
    assert roster.by_role(Role.AGENT) == ["a1", "a2", "b1"]
    assert roster.group("site-a") == ["a1", "a2"]
    for m in roster.members():
        assert pki.device(m.id).roster.read_bytes() == pki.roster_path.read_bytes()
        ident = Identity.load(pki.device(m.id).dir, m.id, m.role)
        assert ident.public_key.public_bytes_raw() == m.public_key.public_bytes_raw()
        assert ident.seal_public.public_bytes_raw() == m.seal_key.public_bytes_raw()


def test_device_broker_settings_point_at_its_files(pki: Pki, tmp_path: Path) -> None:
    files = pki.device("a1")
    s = files.broker_settings("broker.lan", 8883)
    assert (s.host, s.port, s.ca, s.cert, s.key) == (
        "broker.lan", 8883, str(files.ca), str(files.cert), str(files.tls_key))
    with pytest.raises(FileNotFoundError, match="hfl pki issue"):
        type(files)(tmp_path, "a1").broker_settings("b", 1)


# ---------------------------------------------------------------- the signed roster


def _doc(data: bytes) -> dict[str, Any]:
    return json.loads(data)


def _member(doc: dict[str, Any], id: str) -> dict[str, Any]:
    return next(m for m in doc["roster"]["members"] if m["id"] == id)


def _move(d: dict[str, Any]) -> None:
    _member(d, "a1")["group"] = "site-b"


def _swap_key(d: dict[str, Any]) -> None:
    _member(d, "a1")["ed25519"] = _member(d, "b1")["ed25519"]


def _promote(d: dict[str, Any]) -> None:
    _member(d, "dash")["role"] = "coordinator"


def _serial(d: dict[str, Any]) -> None:
    d["roster"]["serial"] += 100


def _drop(d: dict[str, Any]) -> None:
    d["roster"]["members"] = [m for m in d["roster"]["members"] if m["id"] != "coord"]


def _strip(d: dict[str, Any]) -> None:
    del d["signature"]


def _bad_alg(d: dict[str, Any]) -> None:
    d["signature"]["alg"] = "none"


def _flip_sig(d: dict[str, Any]) -> None:
    sig = bytearray(base64.b64decode(d["signature"]["value"]))
    sig[-1] ^= 1
    d["signature"]["value"] = base64.b64encode(bytes(sig)).decode()


@pytest.mark.parametrize("tamper", [_move, _swap_key, _promote, _serial, _drop, _strip,
                                    _bad_alg, _flip_sig])
def test_any_change_to_the_signed_roster_is_refused(
        pki: Pki, tamper: Callable[[dict[str, Any]], None]) -> None:
    doc = _doc(pki.roster_path.read_bytes())
    assert verify_roster(json.dumps(doc).encode(), pki.ca_cert()).serial == doc["roster"]["serial"]
    tamper(doc)
    with pytest.raises(ValueError, match="signature|signed roster"):
        verify_roster(json.dumps(doc).encode(), pki.ca_cert())


def test_unsigned_or_malformed_rosters_are_refused(pki: Pki) -> None:
    plain = json.dumps(pki.roster().to_doc()).encode()
    with pytest.raises(ValueError, match="unsigned rosters are refused"):
        verify_roster(plain, pki.ca_cert())
    with pytest.raises(ValueError, match="not JSON"):
        verify_roster(b"{roster", pki.ca_cert())
    with pytest.raises(ValueError, match="not base64"):
        verify_roster(json.dumps({"roster": {}, "signature": {
            "alg": "ecdsa-p256-sha256", "value": "!!"}}).encode(), pki.ca_cert())


def test_a_roster_signed_by_another_ca_is_refused(pki: Pki, tmp_path: Path) -> None:
    other = Pki.init(tmp_path / "other")
    forged = sign_roster(pki.roster(), other._key())  # same members, the wrong CA
    assert verify_roster(forged, other.ca_cert()).serial == pki.roster().serial
    with pytest.raises(ValueError, match="another CA"):
        verify_roster(forged, pki.ca_cert())


def test_load_roster_errors_say_what_to_do(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="hfl pki issue"):
        load_roster(tmp_path / "roster.json", pki.ca_path)
    with pytest.raises(FileNotFoundError, match="ca.crt"):
        load_roster(pki.roster_path, tmp_path / "ca.crt")
    with pytest.raises(ValueError, match="not a CA certificate"):
        load_ca_cert(pki.device("a1").cert)
    bad = tmp_path / "roster.json"
    bad.write_text(json.dumps(pki.roster().to_doc()))
    with pytest.raises(ValueError, match=f"{bad}: .*unsigned"):
        load_roster(bad, pki.ca_path)


# ---------------------------------------------------------------- issuing and revoking


@pytest.fixture
def small(tmp_path: Path) -> Pki:
    p = Pki.init(tmp_path / "pki")
    p.issue("site-a", "aggregator")
    p.issue("a1", "agent", group="site-a")
    p.issue("a2", "agent", group="site-a")
    return p


def test_agents_need_an_enrolled_aggregator(small: Pki) -> None:
    with pytest.raises(ValueError, match="needs its aggregator"):
        small.issue("a3", "agent")
    with pytest.raises(ValueError, match="site-z' is not enrolled.*--role aggregator"):
        small.issue("a3", "agent", group="site-z")
    with pytest.raises(ValueError, match="a1' is not enrolled"):  # an agent is no aggregator
        small.issue("a3", "agent", group="a1")
    with pytest.raises(ValueError, match="only agents have an aggregator"):
        small.issue("c", "coordinator", group="site-a")
    with pytest.raises(ValueError, match="unknown role 'king'"):
        small.issue("k", "king")
    with pytest.raises(ValueError, match="issue_broker"):
        small.issue("b", "broker")
    assert not small.device("a3").dir.exists()  # nothing written for a refused issue


def test_revoke_drops_the_member_bumps_the_serial_and_lists_the_cert(small: Pki) -> None:
    serial = small.roster().serial
    cert = small.cert("a2")
    small.revoke("a2")
    roster = small.roster()
    assert "a2" not in roster and roster.serial == serial + 1
    crl = small.crl()
    assert crl.is_signature_valid(small.ca_cert().public_key())
    assert crl.get_revoked_certificate_by_serial_number(cert.serial_number) is not None
    assert small.crl_path.read_bytes().startswith(b"-----BEGIN X509 CRL")
    assert [(i.id, i.revoked) for i in small.issued()] == [
        ("a1", False), ("a2", True), ("site-a", False)]
    # The members that remain get the new roster; the revoked device's copy goes stale.
    assert load_roster(small.device("a1").roster, small.ca_path).serial == serial + 1
    with pytest.raises(ValueError, match="no active certificate"):
        small.revoke("a2")


def test_reissue_needs_force_and_revokes_the_old_certificate(small: Pki) -> None:
    old_cert, old_key = small.cert("a1"), small.roster().public_key("a1")
    with pytest.raises(ValueError, match="already issued.*--force"):
        small.issue("a1", "agent", group="site-a")
    serial = small.roster().serial
    small.issue("a1", "agent", group="site-a", force=True)
    roster = small.roster()
    assert roster.serial == serial + 1
    assert roster.public_key("a1").public_bytes_raw() != old_key.public_bytes_raw()
    assert small.crl().get_revoked_certificate_by_serial_number(old_cert.serial_number)
    assert small.crl().get_revoked_certificate_by_serial_number(
        small.cert("a1").serial_number) is None


def test_init_refuses_an_existing_ca_and_open_needs_one(small: Pki, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="already holds a fleet CA"):
        Pki.init(small.root)
    with pytest.raises(FileNotFoundError, match="hfl pki init"):
        Pki(tmp_path / "nowhere")


def test_empty_pki_has_a_signed_empty_roster(tmp_path: Path) -> None:
    p = Pki.init(tmp_path / "pki")
    assert len(p.roster()) == 0 and p.roster().serial == 1
    assert list(p.crl()) == []


# ---------------------------------------------------------------- ACL and listener


def parse_acl(text: str) -> dict[str, set[tuple[str, str]]]:
    users: dict[str, set[tuple[str, str]]] = {}
    user = None
    for line in text.splitlines():
        if line.startswith("user "):
            user = line.split()[1]
            users[user] = set()
        elif line.startswith("topic "):
            assert user is not None, "a topic line outside a user block applies to anonymous"
            _, access, topic = line.split()
            users[user].add((access, topic))
    return users


def wild(topic: str, *ids: str) -> str:
    """A Topics-built topic with the levels spelled `ids` as `+`."""
    return "/".join("+" if level in ids else level for level in topic.split("/"))


@pytest.mark.parametrize("prefix", ["hfl/v1", "acme/fl"])
def test_acl_pins_every_member_to_its_own_topics(pki: Pki, prefix: str) -> None:
    t = Topics(prefix)
    users = parse_acl(acl(pki.roster(), t))
    assert set(users) == {m.id for m in pki.roster().members()}
    assert users["a1"] == {
        ("read", wild(t.rounds("site-a", "J"), "J")), ("read", t.roster()),
        ("read", wild(t.round_to("site-a", "J", "a1"), "J")),  # its own shares only
        # the chunk subtopics of the round models and of the roster (retained sets)
        ("read", t.chunks(wild(t.rounds("site-a", "J"), "J"))), ("read", t.chunks(t.roster())),
        # its aggregator's acknowledgements to it, and its aggregator back online
        ("read", t.ack("site-a", "a1")), ("read", t.status("aggregator", "site-a")),
        ("write", t.update("site-a", "a1")), ("write", t.status("agent", "a1")),
        ("write", t.telemetry("agent", "a1"))}
    assert users["site-a"] == {
        ("read", t.tasks("site-a")), ("read", wild(t.update("site-a", "X"), "X")),
        ("read", wild(t.status("agent", "X"), "X")), ("read", t.roster()),
        ("read", t.chunks(t.roster())),
        ("read", wild(t.ack("X", "site-a"), "X")),
        ("read", wild(t.status("coordinator", "X"), "X")),
        ("write", wild(t.ack("site-a", "X"), "X")),
        ("write", wild(t.rounds("site-a", "J"), "J")), ("write", t.partials("site-a")),
        ("write", t.chunks(wild(t.rounds("site-a", "J"), "J"))),
        ("write", wild(t.round_to("site-a", "J", "A"), "J", "A")),
        ("write", t.status("aggregator", "site-a")),
        ("write", t.telemetry("aggregator", "site-a"))}
    assert users["coord"] == {
        ("read", wild(t.app_requests("X"), "X")), ("read", wild(t.partials("X"), "X")),
        ("read", wild(t.status("R", "X"), "R", "X")),
        ("read", wild(t.ack("X", "coord"), "X")), ("write", wild(t.ack("coord", "X"), "X")),
        ("write", wild(t.job("J"), "J")), ("write", wild(t.model("M"), "M")),
        ("write", t.roster()), ("write", wild(t.tasks("X"), "X")),
        # it alone writes the chunk subtopics of its retained sets
        ("write", t.chunks(wild(t.job("J"), "J"))), ("write", t.chunks(wild(t.model("M"), "M"))),
        ("write", t.chunks(t.roster())),
        ("write", wild(t.replies("X"), "X")), ("write", t.status("coordinator", "coord")),
        ("write", t.telemetry("coordinator", "coord"))}
    assert users["dash"] == {
        ("read", wild(t.job("J"), "J")), ("read", wild(t.model("M"), "M")), ("read", t.roster()),
        ("read", t.chunks(wild(t.job("J"), "J"))), ("read", t.chunks(wild(t.model("M"), "M"))),
        ("read", t.chunks(t.roster())),  # where versions too large for a packet are retained
        ("read", t.replies("dash")),  # the answers to its own requests, no other app's
        ("write", t.app_requests("dash")), ("write", t.status("app", "dash"))}
    assert users["obs"] == {("read", f"{prefix}/#"), ("write", t.status("observer", "obs"))}


def test_wildcards_never_rewrite_a_real_id() -> None:
    t = Topics()
    # Ids that look like the stand-ins `pattern` uses internally stay pinned.
    assert pattern(t.rounds, "x0", ANY) == wild(t.rounds("x0", "J"), "J")
    assert pattern(t.update, "y1", ANY) == wild(t.update("y1", "A"), "A")
    assert pattern(t.round_to, "x0", ANY, "y1") == wild(t.round_to("x0", "J", "y1"), "J")
    assert pattern(t.status, ANY, ANY) == wild(t.status("R", "I"), "R", "I")


def test_listener_lines_follow_their_listener() -> None:
    lines = listener_tls(8883, "0.0.0.0", "/c/ca.crt", "/c/b.crt", "/c/b.key", "/c/acl",
                         crl="/c/crl.pem").splitlines()
    assert lines[0] == "listener 8883 0.0.0.0"
    for want in ("cafile /c/ca.crt", "certfile /c/b.crt", "keyfile /c/b.key",
                 "crlfile /c/crl.pem", "require_certificate true", "use_identity_as_username true",
                 "tls_version tlsv1.2", "allow_anonymous false", "use_username_as_clientid true",
                 "acl_file /c/acl"):
        assert want in lines
    assert "crlfile" not in listener_tls(1, "h", "a", "b", "c", "d")
    with pytest.raises(ValueError, match="invalid path"):
        listener_tls(1, "h", "a\nallow_anonymous true", "b", "c", "d")


def test_roster_round_trips_through_sign_and_verify(pki: Pki) -> None:
    roster = Roster([m for m in pki.roster().members()], serial=42)
    back = verify_roster(sign_roster(roster, pki._key()), pki.ca_cert())
    assert back.serial == 42 and back.to_doc() == roster.to_doc()


def test_issue_many_signs_the_roster_once_and_refuses_all_or_nothing(small: Pki) -> None:
    serial = small.roster().serial
    folders = small.issue_many([("site-b", "aggregator", None), ("b1", "agent", "site-b"),
                                ("b2", Role.AGENT, "site-b")])
    roster = small.roster()
    assert roster.serial == serial + 1  # once for the three
    assert [roster.get(i).group for i in ("b1", "b2")] == ["site-b", "site-b"]
    assert folders == [small.device(i).dir for i in ("site-b", "b1", "b2")]
    for id_ in ("b1", "b2", "a1"):  # every member's folder holds the new roster
        assert load_roster(small.device(id_).roster, small.ca_path).serial == serial + 1
        assert small.cert(id_).subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == id_
    # A refused member (unknown aggregator; an active id without force) issues nobody.
    for bad in ([("b3", "agent", "site-b"), ("b4", "agent", "site-z")],
                [("b3", "agent", "site-b"), ("b1", "agent", "site-b")]):
        with pytest.raises(ValueError, match="not enrolled|already issued"):
            small.issue_many(bad)
        assert not small.device("b3").dir.exists() and small.roster().serial == serial + 1
