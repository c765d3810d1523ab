"""Reading and checking systemd units the way systemd does, for tests/test_units.py and
tests/test_rollout.py: sections and keys, drop-ins applied in order (an empty assignment
resets a list such as ExecStart=), and `systemd-analyze verify` with no warning allowed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"
SYSTEM_UNITS = Path("/lib/systemd/system")  # targets the units order themselves after

Unit = dict[str, dict[str, list[str]]]  # section → key → values in order


def parse(text: str, into: Unit | None = None) -> Unit:
    """Add the assignments of one unit file or drop-in to `into` (a fresh Unit if None)."""
    unit: Unit = {} if into is None else into
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        if section is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, value = (part.strip() for part in line.split("=", 1))
        if value == "":
            section[key] = []  # systemd: an empty assignment resets the list
        else:
            section.setdefault(key, []).append(value)
    return unit


def load(path: Path) -> Unit:
    """A unit with the drop-ins of `path.d/` beside it, applied in name order as systemd does."""
    unit = parse(path.read_text())
    dropins = path.with_name(path.name + ".d")
    if dropins.is_dir():
        for conf in sorted(dropins.glob("*.conf")):
            parse(conf.read_text(), unit)
    return unit


def value(unit: Unit, section: str, key: str) -> str | None:
    """The effective value of a single-valued key (the last assignment wins)."""
    values = unit.get(section, {}).get(key, [])
    return values[-1] if values else None


def exec_start(unit: Unit) -> list[str]:
    """The one ExecStart= command line of a Type=notify service, split as systemd does."""
    commands = unit.get("Service", {}).get("ExecStart", [])
    if len(commands) != 1:
        raise ValueError(f"expected one ExecStart=, found {commands}")
    return shlex.split(commands[0].lstrip("-@:+!"))


def verify(*units: Path, root: Path | None = None) -> str:
    """`systemd-analyze verify`; returns what it printed on stderr ("" when clean).

    It exits 0 on mere warnings (an unknown key such as `Restrt=` is one), so callers treat
    any output as a failure. With `root`, units and the executables they name are looked up
    under that tree (see `unit_tree`)."""
    cmd = [SYSTEMD_ANALYZE, "verify", "--man=no"]
    if root is not None:
        cmd.append(f"--root={root}")
    run = subprocess.run([*cmd, *map(str, units)], capture_output=True, text=True, timeout=60)
    out = (run.stderr + run.stdout).strip()
    if run.returncode != 0 and not out:
        out = f"systemd-analyze exited {run.returncode}"
    return out


def unit_tree(root: Path, units: list[Path], executables: list[str]) -> Path:
    """A root for `verify(root=...)`: the system's own units (the targets ours order after),
    ours with their drop-in folders in /etc/systemd/system, and an executable stub at each
    path in `executables` (the services' binaries exist only on a deployed host)."""
    shutil.copytree(SYSTEM_UNITS, root / "usr/lib/systemd/system", symlinks=True)
    dest = root / "etc/systemd/system"
    dest.mkdir(parents=True)
    for unit in units:
        shutil.copy(unit, dest / unit.name)
        dropins = unit.with_name(unit.name + ".d")
        if dropins.is_dir():
            shutil.copytree(dropins, dest / dropins.name)
    for exe in executables:
        stub = root / exe.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\nexit 0\n")
        stub.chmod(0o755)
    return dest
