"""What every role's command line shares: the config option, loading it with clear errors,
and logging (journal entries with structured fields under systemd, rich on a terminal)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console

from hfl.config import Config, load_config
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import load_ca_cert, load_roster
from hfl.runtime import activity
from hfl.runtime.roster_feed import RosterFeed
from hfl.wire.messages import Role

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", help="The service's TOML config file.", show_default=True)
]
VerboseOption = Annotated[bool, typer.Option("--verbose", "-v", help="Log debug detail.")]


def fail(message: str) -> NoReturn:
    """Stop the command with a message that says what is wrong and exit code 1."""
    typer.echo(f"Error: {message}", err=True)
    raise typer.Exit(1)


def table_console() -> Console:
    """A console for tables: the terminal's width, or when the output goes to a file or a
    pipe, room enough that no cell (a file path) is cut."""
    return Console() if sys.stdout.isatty() else Console(width=1000)


def stderr_is_journal() -> bool:
    """Whether stderr is systemd's journal stream (JOURNAL_STREAM names its device and inode;
    a child whose stderr went elsewhere still inherits the variable)."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):  # no real stderr (captured in tests)
        return False
    return os.environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def _journal_handler() -> logging.Handler | None:
    """systemd-python's journal handler (the optional `hfl[systemd]` extra), or None."""
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found]
    except ImportError:
        return None
    return JournalHandler(SYSLOG_IDENTIFIER=Path(sys.argv[0]).name or "hfl")


class _PriorityPrefix(logging.Formatter):
    """`<3>` etc. before each line: journald takes it as the entry's priority."""

    LEVELS = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
              (logging.INFO, 6))

    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for lvl, p in self.LEVELS if record.levelno >= lvl), 7)
        return f"<{prio}>{super().format(record)}"


def setup_logging(verbose: bool = False, quiet: bool = False) -> None:
    """Rich on a terminal; under systemd, journal entries with the fields of the job and
    round the service is on (hfl.runtime.activity) when systemd-python is installed, else plain
    lines with a priority prefix; plain lines anywhere else. `quiet`: hfl logs errors only
    (a command with its own progress display)."""
    level = logging.DEBUG if verbose else logging.INFO
    fmt = "%(name)s: %(message)s"
    journal = stderr_is_journal()
    handler = _journal_handler() if journal else None
    if handler is not None:
        handler.addFilter(activity.context)
        handler.setFormatter(logging.Formatter(fmt))
    elif journal:  # journald adds its own timestamps
        handler = logging.StreamHandler()
        handler.setFormatter(_PriorityPrefix(fmt))
    elif sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(show_path=False)
        handler.setFormatter(logging.Formatter(fmt))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s " + fmt))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.getLogger("hfl").setLevel(logging.ERROR if quiet else logging.NOTSET)
    # paho logs every broker disconnect at ERROR; reconnecting is routine for us.
    paho = logging.getLogger("hfl.runtime.mqtt.paho")
    paho.setLevel(logging.DEBUG if verbose else logging.CRITICAL)
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
        roster.check_member(identity, str(device.roster))
    except (ValueError, FileNotFoundError) as e:
        fail(str(e))
    return cfg, identity, roster, feed
