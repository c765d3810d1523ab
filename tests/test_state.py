"""The checkpoint store and atomic files: round trips, all-or-nothing writes, clear errors
on a folder that cannot be used and on a disk that fills up."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from hfl.runtime.state import StateError, StateStore, write_atomic


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
    from hfl.runtime.state import StateError, StateStore
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


def run_service(tmp_path: Path, role: str, state_dir: Path):
    """`hfl ROLE run` in-process with `state_dir`, for an identity issued for it."""
    from typer.testing import CliRunner

    from fleet.cli import app
    from hfl.crypto.pki import Pki

    name = "site-a" if role == "aggregator" else "coordinator"
    if (tmp_path / "pki").exists():
        pki = Pki(tmp_path / "pki")
    else:
        pki = Pki.init(tmp_path / "pki")
        pki.issue(name, role)
    cfg = tmp_path / f"{role}.toml"
    cfg.write_text(f'[identity]\nid = "{name}"\ndir = "{pki.device(name).dir}"\n'
                   f'[{role}]\nstate_dir = "{state_dir}"\n')
    return CliRunner().invoke(app, [role, "run", "-c", str(cfg)])


@pytest.mark.parametrize("role", ["aggregator", "coordinator"])
def test_a_service_whose_state_dir_is_unusable_stops_with_a_clear_error(
        tmp_path: Path, role: str) -> None:
    (tmp_path / "taken").write_text("a file where the state folder should be")
    res = run_service(tmp_path, role, tmp_path / "taken")
    assert res.exit_code == 1
    # The state is opened first (it claims the folder), before the coordinator's registry.
    assert f"cannot open the state in {tmp_path / 'taken'}" in res.output
    assert "may write there" in res.output


# A service's process holding its state folder until it is killed.
HOLDER = textwrap.dedent("""
    import sys, time
    from hfl.runtime.state import StateStore
    store = StateStore(sys.argv[1], owner=sys.argv[2])
    store.write({"job/j": ({"v": 1}, {})})
    print("holding", flush=True)
    time.sleep(60)
""")


def hold(folder: Path, owner: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), owner],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline() == "holding\n"
    return proc


def test_a_state_folder_belongs_to_one_service(tmp_path: Path) -> None:
    first = StateStore(tmp_path, owner="aggregator site-a")
    with pytest.raises(StateError, match=rf"state folder {tmp_path} belongs to aggregator "
                       rf"site-a \(pid {os.getpid()}, running\); give this service "
                       r"\(coordinator coordinator\) its own state_dir"):
        StateStore(tmp_path, owner="coordinator coordinator")
    with pytest.raises(StateError, match="belongs to aggregator site-a"):
        StateStore(tmp_path, owner="aggregator site-a")  # the same service, twice at once
    first.close()
    with pytest.raises(StateError, match=rf"state folder {tmp_path} was written by aggregator "
                       r"site-a; give this service \(coordinator coordinator\) its own"):
        StateStore(tmp_path, owner="coordinator coordinator")
    StateStore(tmp_path, owner="aggregator site-a").close()  # its owner, once more
    StateStore(tmp_path).close()  # a reader (hfl's tools, tests) claims nothing


def test_a_killed_service_gets_its_folder_back_and_no_other_does(tmp_path: Path) -> None:
    proc = hold(tmp_path, "aggregator site-a")
    try:
        with pytest.raises(StateError, match=f"belongs to aggregator site-a "
                           rf"\(pid {proc.pid}, running\)"):
            StateStore(tmp_path, owner="aggregator site-b")
    finally:
        proc.kill()  # kill -9: the kernel drops its lock
        proc.wait()
    with pytest.raises(StateError, match="was written by aggregator site-a; give this service "
                       r"\(aggregator site-b\)"):
        StateStore(tmp_path, owner="aggregator site-b")
    again = StateStore(tmp_path, owner="aggregator site-a")
    assert again.read()["job/j"][0] == {"v": 1}
    again.close()


@pytest.mark.parametrize("role", ["aggregator", "coordinator"])
def test_a_service_given_another_services_state_folder_stops_with_its_name(
        tmp_path: Path, role: str) -> None:
    """Two services whose configs name one folder (as the examples once did): the second
    to start exits 1 naming the first, running or not."""
    other = "coordinator coordinator" if role == "aggregator" else "aggregator site-a"
    proc = hold(tmp_path / "state", other)
    try:
        res = run_service(tmp_path, role, tmp_path / "state")
    finally:
        proc.kill()
        proc.wait()
    assert res.exit_code == 1
    assert (f"state folder {tmp_path / 'state'} belongs to {other} (pid {proc.pid}, running)"
            in " ".join(res.output.split()))
    res = run_service(tmp_path, role, tmp_path / "state")
    assert res.exit_code == 1
    assert (f"state folder {tmp_path / 'state'} was written by {other}; give this service"
            in " ".join(res.output.split()))


def test_the_example_services_have_state_folders_of_their_own() -> None:
    from hfl.config import load_config

    services = Path(__file__).resolve().parents[1] / "examples" / "services"
    agg = load_config(services / "aggregator.toml").aggregator
    coord = load_config(services / "coordinator.toml").coordinator
    assert agg is not None and coord is not None
    assert agg.state_dir.resolve() != coord.state_dir.resolve()
