"""The fleet PKI: one CA on the operator's control node issues everything a device needs.

```
PKI/ca/ca.crt, ca.key (0600)   the fleet CA (ECDSA P-256); ca.key never leaves this folder
PKI/roster.json                the CA-signed roster: the source of truth, its serial grows on
                               every change
PKI/crl.pem                    revoked TLS certificates (re-signed on every revocation)
PKI/issued.json                bookkeeping, no secrets: id → role, group, certificate serial
PKI/devices/{id}/              one folder per device, ready to copy onto it: ca.crt, {id}.crt,
                               {id}.tls.key, {id}.key, {id}.seal.key, roster.json
```
The same CA signs the TLS certificates the broker checks (CN = device id, which the ACL
names) and the roster every node checks the senders of messages against.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hfl.crypto.identity import Identity, Roster, b64, unb64, write_private
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.state import write_atomic
from hfl.wire.messages import Role
from hfl.wire.topics import check_id

SIGNATURE_ALG = "ecdsa-p256-sha256"
BROKER = "broker"  # the role recorded for a broker certificate (no roster entry)
CLOCK_SKEW = dt.timedelta(hours=1)  # boards without a real-time clock boot a little behind


# ---------------------------------------------------------------- the signed roster


def canonical(doc: Any) -> bytes:
    """The bytes a roster signature covers: one spelling for one document."""
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def sign_roster(roster: Roster, ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    doc = roster.to_doc()
    sig = ca_key.sign(canonical(doc), ec.ECDSA(hashes.SHA256()))
    signed = {"roster": doc, "signature": {"alg": SIGNATURE_ALG, "value": b64(sig)}}
    return (json.dumps(signed, indent=1, sort_keys=True) + "\n").encode()


def verify_roster(data: bytes, ca_cert: x509.Certificate) -> Roster:
    """The roster in `data` if the fleet CA signed it; ValueError saying what is wrong."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"roster is not JSON: {e}") from None
    if not isinstance(doc, dict) or set(doc) != {"roster", "signature"}:
        raise ValueError("not a signed roster: expected {'roster': ..., 'signature': ...} "
                         "(unsigned rosters are refused: issue identities with hfl pki)")
    sig = doc["signature"]
    if not isinstance(sig, dict) or sig.get("alg") != SIGNATURE_ALG \
            or not isinstance(sig.get("value"), str):
        raise ValueError(f"roster signature is missing or not {SIGNATURE_ALG}")
    value = unb64(sig["value"], what="roster signature")
    key = ca_cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise ValueError("the CA certificate's key is not ECDSA P-256")
    try:
        key.verify(value, canonical(doc["roster"]), ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise ValueError(f"roster signature does not verify with the CA "
                         f"{ca_cert.subject.rfc4514_string()} (altered, or signed by another "
                         "CA)") from None
    return Roster.from_doc(doc["roster"])


def load_ca_cert(path: Path) -> x509.Certificate:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CA certificate {path} not found (copy ca.crt from the device "
                                "folder made by `hfl pki issue`, or create a CA: hfl pki init)")
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
        ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except (ValueError, x509.ExtensionNotFound) as e:
        raise ValueError(f"{path} is not a CA certificate: {e}") from None
    if not ca:
        raise ValueError(f"{path} is not a CA certificate (BasicConstraints CA is false)")
    return cert


def load_roster(path: Path, ca_path: Path) -> Roster:
    """The verified roster at `path`; FileNotFoundError / ValueError with what to do."""
    path = Path(path)
    ca = load_ca_cert(ca_path)
    if not path.is_file():
        raise FileNotFoundError(f"roster {path} not found (copy roster.json from the device "
                                "folder made by `hfl pki issue PKI ID --role ...`)")
    try:
        return verify_roster(path.read_bytes(), ca)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


# ---------------------------------------------------------------- a device's files


@dataclass(frozen=True)
class DeviceFiles:
    """The conventional names of the files in one device folder."""

    dir: Path
    id: str

    @property
    def ca(self) -> Path:
        return Path(self.dir) / "ca.crt"

    @property
    def cert(self) -> Path:
        return Path(self.dir) / f"{self.id}.crt"

    @property
    def tls_key(self) -> Path:
        return Path(self.dir) / f"{self.id}.tls.key"

    @property
    def roster(self) -> Path:
        return Path(self.dir) / "roster.json"

    def broker_settings(self, host: str, port: int) -> BrokerSettings:
        """TLS settings for hfl.runtime.mqtt: this device's certificate, checked against the CA."""
        for path in (self.ca, self.cert, self.tls_key):
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: copy the whole device folder made "
                                        f"by `hfl pki issue PKI {self.id} ...`")
        return BrokerSettings(host=host, port=port, ca=str(self.ca), cert=str(self.cert),
                              key=str(self.tls_key))


@dataclass(frozen=True)
class Issued:
    """One line of PKI/issued.json: the current certificate of an id."""

    id: str
    role: str  # a Role value, or "broker"
    group: str | None
    serial: int
    not_after: dt.datetime
    revoked: bool


# ---------------------------------------------------------------- the PKI


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for h in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            if not h or any(c.isspace() or c in "/:@" for c in h):
                raise ValueError(f"invalid broker host {h!r}: give a DNS name or an IP "
                                 "address") from None
            out.append(x509.DNSName(h))
    return out


def uncovered_hosts(cert: x509.Certificate, hosts: Sequence[str]) -> list[str]:
    """The `hosts` a server certificate is not valid for (its SubjectAlternativeName)."""
    try:
        san = list(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
    except x509.ExtensionNotFound:
        san = []
    return [h for h, name in zip(hosts, _san(hosts), strict=True) if name not in san]


class Pki:
    """A PKI folder on the operator's control node (see the module doc for its layout)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        if not self.ca_path.is_file():
            raise FileNotFoundError(f"no fleet CA in {self.root} (create one: "
                                    f"hfl pki init {self.root})")
        self._ca_key: ec.EllipticCurvePrivateKey | None = None

    @property
    def ca_path(self) -> Path:
        return self.root / "ca" / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        return self.root / "ca" / "ca.key"

    @property
    def roster_path(self) -> Path:
        return self.root / "roster.json"

    @property
    def crl_path(self) -> Path:
        return self.root / "crl.pem"

    @property
    def issued_path(self) -> Path:
        return self.root / "issued.json"

    @classmethod
    def init(cls, root: Path, name: str = "hfl fleet CA", days: int = 3650) -> Pki:
        """Create the CA, an empty signed roster and an empty CRL; refuses an existing CA."""
        root = Path(root)
        ca_dir = root / "ca"
        for path in (ca_dir / "ca.crt", ca_dir / "ca.key"):
            if path.exists():
                raise FileExistsError(f"{path} exists: {root} already holds a fleet CA "
                                      "(replacing it would cut off every issued device)")
        if days < 1:
            raise ValueError(f"days must be at least 1, got {days}")
        ca_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hfl"),
                             x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(  # digital_signature: it signs the roster too
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        write_private(ca_dir / "ca.key", _key_pem(key))
        write_atomic(ca_dir / "ca.crt", _cert_pem(cert))
        pki = cls(root)
        pki._save_records({"version": 1, "crl_number": 0, "certs": {}, "revoked": []}, crl=True)
        pki._publish(Roster())
        return pki

    # ------------------------------------------------------------ reading

    def ca_cert(self) -> x509.Certificate:
        return load_ca_cert(self.ca_path)

    def roster(self) -> Roster:
        """The roster, verified against the CA (never trusted as plain JSON)."""
        return load_roster(self.roster_path, self.ca_path)

    def crl(self) -> x509.CertificateRevocationList:
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    def cert(self, id: str) -> x509.Certificate:
        """The current TLS certificate of `id` (a device or the broker)."""
        path = self.device(id).cert
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: issue it (hfl pki issue {self.root} {id} "
                                    "--role ...)")
        return x509.load_pem_x509_certificate(path.read_bytes())

    def device(self, id: str) -> DeviceFiles:
        return DeviceFiles(self.root / "devices" / check_id(id), id)

    def issued(self) -> list[Issued]:
        """Every id ever issued, with its current certificate, sorted by id."""
        out = []
        for id, r in sorted(self._records()["certs"].items()):
            out.append(Issued(id, r["role"], r.get("group"), int(r["serial"], 16),
                              dt.datetime.fromisoformat(r["not_after"]), bool(r["revoked"])))
        return out

    # ------------------------------------------------------------ issuing

    def issue(self, id: str, role: Role | str, *, group: str | None = None, days: int = 825,
              force: bool = False) -> Path:
        """A new identity (signing and sealing keys) and TLS certificate for `id`, enrolled in
        the re-signed roster; returns its device folder.

        Agents need `group`: their aggregator, already enrolled. Re-issuing an active id needs
        `force` (a replaced board), which revokes the old certificate.
        """
        return self.issue_many([(id, role, group)], days=days, force=force)[0]

    def issue_many(self, members: Sequence[tuple[str, Role | str, str | None]], *,
                   days: int = 825, force: bool = False) -> list[Path]:
        """`issue` for each (id, role, group) in order, with the roster re-signed once: issuing
        a fleet one by one re-signs it (into every enrolled device's folder) once per device.
        An agent's aggregator may come earlier in `members`. Every member is checked before
        anything is written: one refused member issues none."""
        roster = self.roster()
        planned: list[tuple[Identity, str | None]] = []
        for id, role, group in members:
            identity = Identity.generate(id, self._check_member(roster, id, role, group))
            roster.enroll(identity, group)  # in memory: later members may name it as group
            planned.append((identity, group))
        records = self._records()
        for identity, _ in planned:
            self._check_cert(records, identity.id, days, force)
        folders, revoked = [], len(records["revoked"])
        for identity, group in planned:
            folders.append(self._issue_cert(records, identity.id, identity.role.value, group,
                                            days, [ExtendedKeyUsageOID.CLIENT_AUTH]))
            identity.save(folders[-1])
        self._save_records(records, crl=len(records["revoked"]) > revoked)
        roster.serial += 1
        self._publish(roster)
        return folders

    def _check_member(self, roster: Roster, id: str, role: Role | str,
                      group: str | None) -> Role:
        check_id(id)
        if role == BROKER:
            raise ValueError("a broker is not in the roster: use issue_broker "
                             "(hfl pki issue PKI NAME --role broker --host ...)")
        try:
            role = Role(role)
        except ValueError:
            raise ValueError(f"unknown role {role!r}: use one of "
                             f"{', '.join(r.value for r in Role)}") from None
        if role is Role.AGENT:
            if not group:
                raise ValueError(f"agent {id} needs its aggregator (--aggregator AGG)")
            agg = roster.get(group)
            if agg is None or agg.role is not Role.AGGREGATOR:
                raise ValueError(f"aggregator {group!r} is not enrolled: issue it first "
                                 f"(hfl pki issue {self.root} {group} --role aggregator)")
        elif group is not None:
            raise ValueError(f"only agents have an aggregator; {id} is a {role.value}")
        return role

    def issue_broker(self, name: str, hosts: Sequence[str], *, days: int = 825,
                     force: bool = False) -> Path:
        """A server certificate for the broker, valid for `hosts` (DNS names, IP addresses)
        that devices dial; not in the roster. Returns its device folder."""
        check_id(name, "broker name")
        if not hosts:
            raise ValueError("a broker certificate needs at least one --host (the DNS name or "
                             "IP address devices connect to)")
        records = self._records()
        self._check_cert(records, name, days, force)
        revoked = len(records["revoked"])
        usages = [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        folder = self._issue_cert(records, name, BROKER, None, days, usages, hosts)
        self._save_records(records, crl=len(records["revoked"]) > revoked)
        return folder

    @staticmethod
    def _check_cert(records: dict[str, Any], id: str, days: int, force: bool) -> None:
        old = records["certs"].get(id)
        if old and not old["revoked"] and not force:
            raise ValueError(f"{id} is already issued (as {old['role']}); re-issue it with "
                             "--force, which revokes its current certificate")
        if days < 1:
            raise ValueError(f"days must be at least 1, got {days}")

    def _issue_cert(self, records: dict[str, Any], id: str, role: str, group: str | None,
                    days: int, usages: list[x509.ObjectIdentifier],
                    hosts: Sequence[str] = ()) -> Path:
        """Write ca.crt, {id}.crt and {id}.tls.key into the device folder and record them in
        `records`, with the certificate it replaces as revoked: the caller saves them."""
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._leaf(id, role, key.public_key(), days, usages, _san(hosts) if hosts else [])
        files = self.device(id)
        write_atomic(files.ca, self.ca_path.read_bytes())
        write_private(files.tls_key, _key_pem(key))
        write_atomic(files.cert, _cert_pem(cert))
        old = records["certs"].get(id)
        records["certs"][id] = {"role": role, "group": group, "serial": f"{cert.serial_number:x}",
                                "not_after": cert.not_valid_after_utc.isoformat(),
                                "revoked": False}
        if old and not old["revoked"]:
            records["revoked"].append({"id": id, "serial": old["serial"], "at": _now().isoformat()})
        return files.dir

    def _leaf(self, cn: str, role: str, public_key: ec.EllipticCurvePublicKey, days: int,
              usages: list[x509.ObjectIdentifier], san: list[x509.GeneralName]
              ) -> x509.Certificate:
        ca = self.ca_cert()
        now = _now()
        not_after = min(now + dt.timedelta(days=days), ca.not_valid_after_utc)
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hfl"),
                                     x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                                     x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject).public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(self._key(), hashes.SHA256())

    # ------------------------------------------------------------ revoking

    def revoke(self, id: str) -> None:
        """Remove `id` from the roster (re-signed, serial + 1) and list its certificate in the
        CRL. Deploy both: the roster to the coordinator, the CRL and ACL to the broker."""
        records = self._records()
        r = records["certs"].get(id)
        if r is None or r["revoked"]:
            raise ValueError(f"{id} has no active certificate in {self.root} "
                             f"(see: hfl pki list {self.root})")
        r["revoked"] = True
        records["revoked"].append({"id": id, "serial": r["serial"], "at": _now().isoformat()})
        self._save_records(records, crl=True)
        roster = self.roster()
        if id in roster:
            roster.remove(id)
            roster.serial += 1
            self._publish(roster)

    # ------------------------------------------------------------ internals

    def _key(self) -> ec.EllipticCurvePrivateKey:
        if self._ca_key is None:
            if not self.ca_key_path.is_file():
                raise FileNotFoundError(f"CA key {self.ca_key_path} not found: issuing and "
                                        "revoking need the control node's PKI folder")
            key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{self.ca_key_path} is not an ECDSA key")
            self._ca_key = key
        return self._ca_key

    def _records(self) -> dict[str, Any]:
        try:
            return json.loads(self.issued_path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.issued_path} not found: {self.root} is not a "
                                    "complete PKI folder (made by hfl pki init)") from None

    def _save_records(self, records: dict[str, Any], crl: bool = False) -> None:
        """Save the bookkeeping; with `crl` (the revocations changed), re-sign the CRL first."""
        if crl:
            self._write_crl(records)
        write_atomic(self.issued_path, (json.dumps(records, indent=1) + "\n").encode())

    def _write_crl(self, records: dict[str, Any]) -> None:
        """Re-sign the CRL from the bookkeeping (whose CRL number it bumps). Valid until the CA
        expires: OpenSSL refuses every client once a CRL's nextUpdate has passed, and it is
        re-signed on every change."""
        records["crl_number"] += 1
        ca, now = self.ca_cert(), _now()
        ca_ski = ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        builder = (
            x509.CertificateRevocationListBuilder().issuer_name(ca.subject)
            .last_update(now - CLOCK_SKEW).next_update(ca.not_valid_after_utc)
            .add_extension(x509.CRLNumber(records["crl_number"]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                           critical=False)
        )
        for r in records["revoked"]:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(int(r["serial"], 16))
                .revocation_date(dt.datetime.fromisoformat(r["at"])).build())
        crl = builder.sign(self._key(), hashes.SHA256())
        write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def _publish(self, roster: Roster) -> None:
        """Sign the roster into PKI/roster.json and every enrolled device's folder."""
        data = sign_roster(roster, self._key())
        write_atomic(self.roster_path, data)
        for m in roster.members():
            write_atomic(self.device(m.id).roster, data)

