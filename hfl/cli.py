"""What every role's command line shares: the config option, loading it with clear errors,
and logging (journald-friendly plain lines under systemd, rich on a terminal)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from hfl.config import Config, load_config
from hfl.identity import Identity, Roster
from hfl.messages import Role
from hfl.pki import load_ca_cert, load_roster
from hfl.roster_feed import RosterFeed

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The service's TOML config file.", show_default=True)
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]


def fail(message: str) -> NoReturn:
    """Stop the command with a message that says what is wrong and exit code 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def setup_logging(verbose: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty() and "JOURNAL_STREAM" not in os.environ:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(show_path=False)
        fmt = "%(name)s: %(message)s"
    else:  # journald adds its own timestamps
        handler = logging.StreamHandler()
        fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, handlers=[handler], force=True)
    # paho logs every broker disconnect at ERROR; reconnecting is routine for us.
    logging.getLogger("hfl.mqtt.paho").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's numerical notes


def open_config(path: Path, role: Role, section: str | None = None) -> tuple[
        Config, Identity, Roster, RosterFeed]:
    """Load config, identity and the verified roster (with the feed that keeps it current),
    or stop with a message saying what to fix."""
    try:
        cfg = load_config(path)
        if section and getattr(cfg, section) is None:
            raise ValueError(f"{path}: a [{section}] section is required for the {role.value}")
        device = cfg.device
        identity = Identity.load(device.dir, cfg.identity.id, role)
        roster = load_roster(device.roster, device.ca)
        feed = RosterFeed(roster, load_ca_cert(device.ca), cfg.topics, device.roster,
                          publish=role is Role.COORDINATOR)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    member = roster.get(identity.id)
    if member is None or member.role is not role:
        fail(f"{identity.id} is not enrolled as {role.value} in {device.roster} "
             f"(hfl pki issue PKI {identity.id} --role {role.value})")
    if (member.public_key.public_bytes_raw() != identity.public_key.public_bytes_raw()
            or member.seal_key.public_bytes_raw() != identity.seal_public.public_bytes_raw()):
        fail(f"the keys in {device.dir} do not match {identity.id}'s keys in the roster")
    return cfg, identity, roster, feed
