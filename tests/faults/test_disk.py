"""The aggregator's state directory on a real small filesystem (tmpfs) that fills up in the
middle of a round: the service says so clearly, keeps running, sends and
acknowledges nothing it could not save, leaves the last checkpoint intact, and finishes the
job with the exact result once the disk is usable again. A state directory that is unusable
from the start stops the service with a clear error. Mounting needs root."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hfl.runtime.state import StateStore
from tests.faults.harness import FaultFleet, assert_state, expected_state, spec, wait_for
from tests.faults.test_restarts import SAMPLES, SITE_A, STEPS, fedavg, no_crash

pytestmark = [pytest.mark.faults,
              pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")]


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def remount(path: Path, opts: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{opts}", str(path)], check=True)


def fill(path: Path) -> Path:
    """Take every free byte of the filesystem at `path`."""
    filler = path / "filler"
    with open(filler, "wb") as f:
        block = bytes(1 << 16)
        while True:
            try:
                f.write(block)
                f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
                break
    for size in (4096, 512, 1):  # the last partial blocks too
        with contextlib.suppress(OSError), open(filler, "ab") as f:
            while True:
                f.write(bytes(size))
                f.flush()
    return filler


def checkpoint_copy(state: Path, dest: Path) -> dict:
    """The checkpoint as a restart would find it: copied (WAL included), checked, read."""
    shutil.copytree(state, dest)
    db = sqlite3.connect(dest / "state.sqlite")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    db.close()
    store = StateStore(dest)
    try:
        return store.read()
    finally:
        store.close()


def test_a_full_disk_mid_round_stalls_cleanly_and_recovers(tmp_path: Path) -> None:
    # (A filesystem cannot be remounted read-only while the service holds its database open
    # for writing, so a read-only state directory is tested at start, below.)
    fleet = FaultFleet(tmp_path / "fleet", {"site-a": SITE_A})
    sp = spec(["site-a"], rounds=2, min_agents=6)
    with tmpfs(tmp_path / "disk") as disk:
        fleet.state_dir = lambda id_: disk / id_ if id_ == "site-a" else (  # type: ignore[method-assign]
            tmp_path / "fleet" / "state" / id_)
        try:
            fleet.spawn("coordinator")
            fleet.spawn("site-a")
            agents = fleet.start_agents("site-a", STEPS, SAMPLES, hold=True)
            app, jobs = fleet.request(sp)
            wait_for("every agent asked to train", lambda: all(a.asked.is_set()
                                                               for a in agents))
            filler = fill(disk)
            for a in agents:
                a.release()
            wait_for("the failed save logged", lambda: "cannot write the state in"
                     in fleet.log("site-a"), timeout=30)
            time.sleep(2)  # it keeps failing (retries) and keeps running
            assert fleet.procs["site-a"].poll() is None
            saved = checkpoint_copy(disk / "site-a", tmp_path / "copy")
            assert saved["round/r1-m"][0]["senders"] == []  # the round as last saved
            assert "partial_sent" not in fleet.log("site-a")  # nothing left unsaved
            filler.unlink()
            out = fleet.follow(app, jobs)
        finally:
            fleet.close()
    (job,) = jobs
    assert [r.agents for r in out.rows] == [6, 6]
    m = fedavg(SITE_A)
    assert_state(out.latest[job].state, expected_state(sp, [m, m]))
    log = fleet.log("site-a")
    assert "nothing is acknowledged or sent until a save succeeds" in log
    assert "state saved again after" in log
    assert "the disk has room" in log
    no_crash(fleet, "site-a", "coordinator")


@pytest.mark.parametrize("role", ["site-a", "coordinator"])
def test_a_read_only_state_directory_stops_the_service_with_a_clear_error(
        tmp_path: Path, role: str) -> None:
    fleet = FaultFleet(tmp_path / "fleet", {"site-a": SITE_A[:3]})
    with tmpfs(tmp_path / "disk") as disk:
        remount(disk, "ro")
        fleet.state_dir = lambda id_: disk / id_  # type: ignore[method-assign]
        try:
            proc = fleet.spawn(role, wait=False)
            code = proc.wait(60)
        finally:
            fleet.procs.clear()
            fleet.close()
    assert code == 1
    log = fleet.log(role)
    assert "Error: cannot open the state in" in log  # the coordinator's too: it goes first
    assert "Traceback" not in log
