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


def open_config(path: Path, role: Role, section: str | None = None) -> tuple[Config, Identity,
                                                                            Roster]:
    """Load config, identity and roster, or stop with a message that says what to fix."""
    try:
        cfg = load_config(path)
        if section and getattr(cfg, section) is None:
            raise ValueError(f"{path}: a [{section}] section is required for the {role.value}")
        identity = Identity.load(cfg.identity.key, cfg.identity.id, role)
        roster = Roster.load(cfg.identity.roster)
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    member = roster.get(identity.id)
    if member is None or member.role is not role:
        fail(
            f"{identity.id} is not enrolled as {role.value} in {cfg.identity.roster} "
            "(hfl keys enroll)")
    if member.public_key.public_bytes_raw() != identity.public_key.public_bytes_raw():
        fail(
            f"the key {cfg.identity.key} does not match {identity.id}'s key in the roster")
    return cfg, identity, roster
