"""Documentation is code: README.md's shell blocks run as written, in a fresh copy of the
repository (its tracked files, the venv linked in), and do what the text around them says."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv"


def blocks(path: Path = ROOT / "README.md") -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", path.read_text(), re.M | re.S)


def block(first_line: str) -> str:
    (found,) = [b for b in blocks() if b.startswith(first_line)]
    return found


def test_every_shell_block_is_run_here() -> None:
    """A new block must come with its run below (or be one of the two set-up commands)."""
    covered = ("make demo", ".venv/bin/hfl simulate", "hfl pki init", "hfl status")
    assert [b.split("\n")[0].split("  #")[0].strip() for b in blocks()] == [
        "make demo", ".venv/bin/hfl simulate examples/tasks/linear-regression.toml --report "
        "linreg.json", "hfl pki init pki", "hfl status -c observer.toml"]
    assert all(b.startswith(covered) for b in blocks())
    # The set-up block is CI's own: .ci/run calls the test command, make demo the demo.
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    assert "hfl demo" in (ROOT / "Makefile").read_text()


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """The tracked files as they are now, as a fresh clone has them, with the venv."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, dst = ROOT / name, tmp_path / name
        if src.is_file():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(src.read_bytes())
            dst.chmod(src.stat().st_mode)
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def bash(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run `script` as a shell would; output goes to files, so what it starts in the
    background does not hold us up. Past `timeout` its whole process group is stopped and
    TimeoutExpired raised."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    out, err = cwd / ".out", cwd / ".err"
    with out.open("w") as o, err.open("w") as e:
        proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=cwd, stdout=o, stderr=e,
                                env=env, start_new_session=True)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(10)
            raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out.read_text(),
                                       err.read_text())


@pytest.mark.broker
def test_the_blog_example_runs_as_written(checkout: Path) -> None:
    run = bash(block(".venv/bin/hfl simulate"), checkout, 300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    doc = json.loads((checkout / "linreg.json").read_text())
    assert len(doc["rounds"]) == 10 and doc["onnx"].endswith("-v10.onnx")


def _held_by(cwd: Path) -> list[int]:
    """The processes working in `cwd` (the broker daemonizes out of our process group)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and Path(os.readlink(proc / "cwd")) == cwd:
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.broker
def test_running_and_watching_a_fleet_by_hand_as_written(checkout: Path) -> None:
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 8883)) == 0:
            pytest.fail("port 8883, which the README's fleet uses, is taken here",
                        pytrace=False)
    activate = ". .venv/bin/activate\n"
    try:
        start = bash(activate + block("hfl pki init"), checkout, 120)
        assert start.returncode == 0, start.stdout[-2000:] + start.stderr[-2000:]
        # What the block started keeps running; the operator's tools watch it.
        status = None
        for _ in range(60):
            status = bash(activate + "hfl status -c observer.toml --once --json", checkout, 60)
            if status.returncode == 0 and '"state": "online"' in status.stdout and all(
                    n["state"] == "online" for n in _nodes(status.stdout)):
                break
        assert status is not None and status.returncode == 0, status.stderr[-2000:]
        assert {n["id"] for n in _nodes(status.stdout)} == {"coordinator", "site-a", "agent-1"}
        # The watching block, line by line: the live views run until stopped.
        for line in block("hfl status").splitlines():
            command = line.split("  #")[0].strip()
            live = command.startswith(("hfl dashboard", "hfl status -c observer.toml")) and \
                "--once" not in command
            try:
                run = bash(activate + command, checkout, 8 if live else 60)
            except subprocess.TimeoutExpired:
                assert live, command  # a live view: still serving when we stop it
                continue
            assert run.returncode == 0, (command, run.stdout[-1000:], run.stderr[-1000:])
    finally:
        for pid in _held_by(checkout):
            os.kill(pid, signal.SIGTERM)


def _nodes(doc: str) -> list[dict]:
    snap = json.loads(doc)
    return [*snap["coordinators"], *snap["aggregators"], *snap["agents"]]
