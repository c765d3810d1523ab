"""`hfl pki`: the fleet CA, device identities, the signed roster and the broker's TLS and ACL.

A thin layer over `hfl.crypto.pki` (issuing, revoking) and `fleet.ops.broker` (the broker's files).
"""

from __future__ import annotations

import datetime as dt
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fleet.ops.broker import (
    AUTOSAVE_S,
    MAX_PACKET_SIZE,
    MIN_PACKET_SIZE,
    BrokerTls,
    mosquitto_config,
)
from hfl.cli import fail
from hfl.crypto.pki import BROKER, Pki
from hfl.wire.messages import Role
from hfl.wire.topics import DEFAULT_PREFIX, Topics

app = typer.Typer(
    help="The fleet PKI: a CA on the operator's control node issues every device's keys and "
    "TLS certificate, signs the roster, and produces the broker's TLS config and ACL.\n\n"
    "Typical flow: hfl pki init PKI; hfl pki issue PKI ID --role ... for each device; "
    "hfl pki broker-config PKI --host ... --out DIR; copy PKI/devices/ID/ to each device "
    "and DIR to the broker (Ansible).",
    no_args_is_help=True,
)

# Role's members and the broker: built from Role, so mypy cannot list them.
IssueRole = Enum("IssueRole", {r.name: r.value for r in Role} | {"BROKER": BROKER},  # type: ignore[misc]
                 type=str)

PkiArg = Annotated[Path, typer.Argument(help="The PKI folder on the operator's control node.",
                                        show_default=False)]
HostOption = Annotated[list[str] | None, typer.Option(
    "--host", help="A DNS name or IP address devices use to reach the broker (repeatable).")]


def _open(root: Path) -> Pki:
    try:
        return Pki(root)
    except FileNotFoundError as e:
        fail(str(e))


@app.command()
def init(
    pki: PkiArg,
    name: Annotated[str, typer.Option(help="The CA's common name.")] = "hfl fleet CA",
    days: Annotated[int, typer.Option(min=1, help="How long the CA is valid.")] = 3650,
) -> None:
    """Create the fleet CA, an empty signed roster and an empty CRL in PKI.

    PKI/ca/ca.key (mode 0600) signs every certificate and roster: keep PKI on the
    operator's control node.

    Example: hfl pki init /srv/hfl/pki --name "acme fleet CA"
    """
    try:
        p = Pki.init(pki, name=name, days=days)
    except (ValueError, FileExistsError) as e:
        fail(str(e))
    typer.echo(f"created the fleet CA {p.ca_path} (key {p.ca_key_path}, mode 0600)")
    typer.echo(f"next: hfl pki issue {pki} ID --role ...")


@app.command()
def issue(
    pki: PkiArg,
    id: Annotated[str, typer.Argument(help="The device id (its certificate's CN, its MQTT "
                                      "username): letters, digits, '_', '.', '-'.",
                                      show_default=False)],
    role: Annotated[IssueRole, typer.Option("--role", "-r", help="The device's role.",
                                            show_default=False)],
    aggregator: Annotated[str | None, typer.Option(
        "--aggregator", "-a", help="An agent's aggregator (enrolled before it).")] = None,
    host: HostOption = None,
    days: Annotated[int, typer.Option(min=1, help="How long the certificate is valid.")] = 825,
    force: Annotated[bool, typer.Option(
        help="Re-issue an active id (a replaced board): its old certificate is revoked.")
    ] = False,
) -> None:
    """Issue a device: its keys, TLS certificate and an entry in the signed roster.

    Writes PKI/devices/ID/ (copy it onto the device) and re-signs the roster (serial + 1,
    copied into every device folder). A broker gets a server certificate for --host and no
    roster entry.

    Examples:

      hfl pki issue PKI coordinator --role coordinator

      hfl pki issue PKI site-a --role aggregator

      hfl pki issue PKI agent-1 --role agent --aggregator site-a

      hfl pki issue PKI broker --role broker --host broker.lan --host 10.0.0.2
    """
    p = _open(pki)
    try:
        if role.value == BROKER:
            if aggregator:
                raise typer.BadParameter("a broker has no aggregator", param_hint="--aggregator")
            folder = p.issue_broker(id, host or [], days=days, force=force)
        else:
            if host:
                raise typer.BadParameter("only a broker certificate names hosts",
                                         param_hint="--host")
            folder = p.issue(id, role.value, group=aggregator, days=days, force=force)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(f"issued {role.value} {id}: copy {folder}/ to the device")
    if role.value != BROKER:
        typer.echo(f"roster serial {p.roster().serial}: install {p.roster_path} on the "
                   "coordinator and refresh the broker (hfl pki broker-config)")


@app.command()
def revoke(
    pki: PkiArg,
    id: Annotated[str, typer.Argument(help="The id to revoke.", show_default=False)],
) -> None:
    """Revoke a device: out of the roster, its certificate in the CRL.

    The roster is re-signed (serial + 1). Then install PKI/roster.json on the coordinator
    (the nodes take it from there) and refresh the broker's ACL and CRL: hfl pki
    broker-config, then `systemctl reload mosquitto`.

    Example: hfl pki revoke PKI agent-7
    """
    p = _open(pki)
    try:
        p.revoke(id)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    typer.echo(f"revoked {id}: roster serial {p.roster().serial}, CRL {p.crl_path}")


@app.command("list")
def list_(pki: PkiArg) -> None:
    """List every issued id: role, aggregator, certificate expiry, revoked.

    Example: hfl pki list PKI
    """
    p = _open(pki)
    try:
        issued, serial = p.issued(), p.roster().serial
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    now = dt.datetime.now(dt.timezone.utc)
    table = Table("id", "role", "aggregator", "expires", "revoked",
                  title=f"{pki} (roster serial {serial})")
    for i in issued:
        expiry = i.not_after.date().isoformat()
        if i.not_after < now:
            expiry += " (expired)"
        table.add_row(i.id, i.role, i.group or "", expiry, "yes" if i.revoked else "")
    Console().print(table)


@app.command("broker-config")
def broker_config(
    pki: PkiArg,
    out: Annotated[Path, typer.Option("--out", "-o", help="Where to write the broker's files.",
                                      show_default=False)],
    host: HostOption = None,
    name: Annotated[str, typer.Option(help="The broker's certificate name.")] = "broker",
    port: Annotated[int, typer.Option(min=1, max=65535, help="The TLS listener's port.")] = 8883,
    bind: Annotated[str, typer.Option(help="The address the listener binds.")] = "0.0.0.0",
    install_dir: Annotated[Path, typer.Option(
        help="Where the files are installed on the broker host (the paths in "
        "mosquitto.conf).")] = Path("/etc/mosquitto/hfl"),
    persistence_dir: Annotated[Path, typer.Option(
        help="Mosquitto's persistence folder on the broker host.")] = Path("/var/lib/mosquitto"),
    prefix: Annotated[str, typer.Option(help="The topic prefix.")] = DEFAULT_PREFIX,
    max_packet_size: Annotated[int, typer.Option(
        min=MIN_PACKET_SIZE, help="The largest MQTT packet the broker takes; a client sending "
        "a larger one is disconnected. The default fits the services' chunks (max_payload "
        "256 KiB) whole; raise it to max_payload + 1024 if they use a larger max_payload. "
        "Larger retained messages (model versions) are retained in chunks that late "
        "subscribers get whole at any limit.")] = MAX_PACKET_SIZE,
    user: Annotated[str | None, typer.Option(
        help="The account Mosquitto drops to when started as root (its own default: "
        "mosquitto, which must read the installed files); \"$(id -un)\" runs a local broker "
        "on files only you can read.")] = None,
    autosave_interval: Annotated[int, typer.Option(
        min=0, help="Seconds between saves of the broker's persistence database (a kill -9 "
        "loses about twice this); each save rewrites the whole database, so raise it where "
        "much is queued for offline clients or the disk is slow; 0: only on a clean stop."
        )] = AUTOSAVE_S,
) -> None:
    """Write the broker's mosquitto.conf, ACL, CRL and certificate into OUT.

    OUT/mosquitto.conf (a TLS listener that requires a fleet client certificate, the ACL,
    raised queue limits, a packet limit just above hfl's chunks, persistence saved every
    second or two), OUT/acl (from the roster), OUT/ca.crt, OUT/crl.pem and OUT/NAME.crt +
    OUT/NAME.tls.key (0600), issuing the broker certificate for --host when it has none.

    Run it again after every issue or revoke, install OUT in --install-dir and reload the
    broker (`systemctl reload mosquitto`: SIGHUP re-reads the ACL and the CRL).

    Example: hfl pki broker-config PKI --host broker.lan --host 10.0.0.2 --out build/broker
    """
    p = _open(pki)
    try:
        tls = BrokerTls.from_pki(p, name, out, Topics(prefix), host or [])
        conf = mosquitto_config(port=port, host=bind, persistence_dir=persistence_dir,
                                max_packet_size=max_packet_size, autosave_s=autosave_interval,
                                user=user, tls=tls.under(install_dir))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    (out / "mosquitto.conf").write_text(
        f"# Generated by `hfl pki broker-config` for broker {name}; files in {install_dir}.\n"
        + conf)
    typer.echo(f"wrote {out}/: mosquitto.conf, acl, ca.crt, crl.pem, {name}.crt, "
               f"{name}.tls.key")
    typer.echo(f"install them in {install_dir} (readable by user {user or 'mosquitto'}) and "
               "reload: systemctl reload mosquitto")
