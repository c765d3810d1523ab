"""The checkpoint store and atomic files: round trips, all-or-nothing writes, clear errors
on a folder that cannot be used and on a disk that fills up."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hfl.state import StateError, StateStore, write_atomic


def test_records_round_trip_and_delete(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "s")
    a = np.arange(5, dtype=np.float32)
    store.write({"job/x": ({"n": 1, "inf": float("inf")}, {"a": a}),
                 "round/x": ({"senders": ["a1"]}, {})})
    store.write({"round/x": None, "job/y": ({}, {"u": np.array([7], np.uint32)})})
    store.close()
    got = StateStore(tmp_path / "s").read()  # a fresh connection: what is on disk
    assert sorted(got) == ["job/x", "job/y"]
    doc, arrays = got["job/x"]
    assert doc == {"n": 1, "inf": float("inf")}
    np.testing.assert_array_equal(arrays["a"], a)
    arrays["a"][0] = 9  # the arrays are the reader's own, not views of the database
    assert got["job/y"][1]["u"].tolist() == [7]


def test_a_write_that_fails_leaves_every_record_as_it_was(tmp_path: Path) -> None:
    store = StateStore(tmp_path)
    store.write({"k": ({"v": 1}, {"a": np.zeros(3, np.float32)})})
    with pytest.raises(TypeError):  # the second record cannot be encoded: nothing is written
        store.write({"k": ({"v": 2}, {}), "bad": ({"v": object()}, {})})
    assert store.read()["k"][0] == {"v": 1}


def test_an_unusable_folder_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("a file where the folder should be")
    with pytest.raises(StateError, match="cannot open the state in .*taken"):
        StateStore(tmp_path / "taken")


# A child process whose files may not grow past 64 KiB (RLIMIT_FSIZE): writes then fail with
# EFBIG, which is what a full disk looks like to SQLite, for any user (root included).
FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    import numpy as np
    from hfl.state import StateError, StateStore
    store = StateStore(sys.argv[1])
    store.write({"k": ({"v": 1}, {"a": np.ones(100, np.float32)})})
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    try:
        store.write({"k": ({"v": 2}, {"a": np.ones(1 << 20, np.float32)})})
    except StateError as e:
        print("StateError:", e)
""")


def test_a_full_disk_is_a_clear_error_and_the_old_record_survives(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "StateError: cannot write the state in" in run.stdout
    assert "the disk has room" in run.stdout
    doc, arrays = StateStore(tmp_path).read()["k"]
    assert doc == {"v": 1} and arrays["a"].size == 100


def test_write_atomic_replaces_whole_or_not_at_all(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    write_atomic(path, b"old")
    with pytest.raises(TypeError):
        write_atomic(path, "not bytes")  # type: ignore[arg-type]
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary file left
    write_atomic(path, b"new", mode=0o600)
    assert path.read_bytes() == b"new" and path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(("role", "what"), [("aggregator", "the state"),
                                            ("coordinator", "the model registry")])
def test_a_service_whose_state_dir_is_unusable_stops_with_a_clear_error(
        tmp_path: Path, role: str, what: str) -> None:
    from typer.testing import CliRunner

    from fleet.cli import app
    from hfl.pki import Pki

    pki = Pki.init(tmp_path / "pki")
    name = "site-a" if role == "aggregator" else "coordinator"
    pki.issue(name, role)
    (tmp_path / "taken").write_text("a file where the state folder should be")
    cfg = tmp_path / "svc.toml"
    cfg.write_text(f'[identity]\nid = "{name}"\ndir = "{pki.device(name).dir}"\n'
                   f'[{role}]\nstate_dir = "{tmp_path / "taken"}"\n')
    res = CliRunner().invoke(app, [role, "run", "-c", str(cfg)])
    assert res.exit_code == 1
    assert f"cannot open {what} in {tmp_path / 'taken'}" in res.output
    assert "may write there" in res.output
