"""`hfl keys`: identities and the roster of enrolled devices."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from hfl.identity import Identity, Member, Roster, public_from_b64
from hfl.messages import Role

app = typer.Typer(help="Create device identities and keep the roster of enrolled senders.",
                  no_args_is_help=True)

RoleOption = Annotated[Role, typer.Option("--role", "-r", help="The device's role.")]


@app.command()
def init(
    id: Annotated[str, typer.Argument(help="The device id (a topic-safe name).")],
    role: RoleOption,
    dir: Annotated[Path, typer.Option("--dir", "-d", help="Where to write the key files.")] = Path(
        "keys"),
    force: Annotated[bool, typer.Option(help="Replace an existing key.")] = False,
) -> None:
    """Create an Ed25519 identity: DIR/ID.key (mode 0600) and DIR/ID.pub."""
    if (dir / f"{id}.key").exists() and not force:
        raise typer.BadParameter(f"{dir / (id + '.key')} exists (use --force to replace it)")
    try:
        ident = Identity.generate(id, role)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="ID") from None
    path = ident.save(dir)
    typer.echo(f"wrote {path} and {path.with_suffix('.pub')}")
    typer.echo(f"public key: {ident.public_b64}")


@app.command()
def enroll(
    roster: Annotated[Path, typer.Argument(help="The roster JSON (created if missing).")],
    id: Annotated[str, typer.Argument(help="The device id.")],
    role: RoleOption,
    pub: Annotated[Path, typer.Option(help="The device's ID.pub file.")],
    aggregator: Annotated[str | None, typer.Option(help="An agent's aggregator.")] = None,
) -> None:
    """Add (or replace) a device in the roster."""
    r = Roster.load(roster) if roster.exists() else Roster()
    try:
        r.add(Member(id, role, public_from_b64(pub.read_text()), aggregator))
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    r.save(roster)
    typer.echo(f"enrolled {role.value} {id} in {roster} ({len(r)} members)")


@app.command()
def revoke(
    roster: Annotated[Path, typer.Argument(help="The roster JSON.")],
    id: Annotated[str, typer.Argument(help="The device id to remove.")],
) -> None:
    """Remove a device: services that reload the roster drop its messages."""
    r = Roster.load(roster)
    if id not in r:
        raise typer.BadParameter(f"{id} is not in {roster}")
    r.remove(id)
    r.save(roster)
    typer.echo(f"revoked {id} ({len(r)} members left)")


@app.command()
def show(roster: Annotated[Path, typer.Argument(help="The roster JSON.")]) -> None:
    """List the enrolled devices."""
    try:
        r = Roster.load(roster)
    except (ValueError, FileNotFoundError) as e:
        raise typer.BadParameter(str(e)) from None
    table = Table("id", "role", "aggregator")
    for role in Role:
        for id in r.by_role(role):
            m = r.get(id)
            assert m is not None
            table.add_row(id, role.value, m.group or "")
    Console().print(table)
