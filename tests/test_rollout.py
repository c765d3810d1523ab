"""A real rollout: deploy/ansible/site.yml over SSH to six "hosts" on this machine (a broker,
the coordinator, one aggregator, three agents), each under its own root, sharing one venv.
Then every installed service starts from its unit's ExecStart (drop-ins applied) as the unit's
user, with NOTIFY_SOCKET pointed at a test socket; each reports READY=1, an app requests a
model, a round completes; a second run of the playbook changes nothing.

This machine's PID 1 is not systemd, so the test plays its part: the unit's User=, Group=,
WorkingDirectory=, WatchdogSec= (WATCHDOG_USEC, WATCHDOG_PID), NoNewPrivileges= and
MemoryDenyWriteExecute= (both by prctl, as systemd does) are applied; the rest of the sandbox
is checked by tests/test_units.py and `systemd-analyze verify`.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from application import App
from hfl.config import load_config
from hfl.crypto.pki import Pki
from hfl.runtime.state import StateStore
from hfl.wire.messages import Role
from tests import systemd_units as su

REPO = Path(__file__).resolve().parent.parent
ANSIBLE = REPO / "deploy" / "ansible"
ANSIBLE_BIN = REPO / ".venv-ansible" / "bin"
SSHD = "/usr/sbin/sshd"
AGENTS = ("agent-1", "agent-2", "agent-3")
SERVICES = {"coordinator": "coordinator", "site-a": "aggregator",
            **{a: "agent" for a in AGENTS}}  # host → the hfl service it runs
WATCHDOG = "3s"  # short, so a few pings arrive during the test
PACKAGES = ("hfl", "edge_agent", "aggregator", "coordinator", "fleet")

pytestmark = [pytest.mark.broker, pytest.mark.timeout(900)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen, what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on port {port}")


def stop(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


@pytest.fixture
def root() -> Iterator[Path]:
    """A folder the services' unprivileged user can traverse (pytest's tmp_path is 0700);
    HFL_KEEP_ROLLOUT=1 keeps it (playbook and service logs) for a look afterwards."""
    path = Path(tempfile.mkdtemp(prefix="hfl-rollout-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    if not os.environ.get("HFL_KEEP_ROLLOUT"):
        # The hosts' venv is over 1 GB of small files (torch): removing it took 1-2 minutes
        # of the suite, so it is removed in the background while the other tests run.
        subprocess.Popen(["rm", "-rf", str(path)], start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@pytest.fixture
def account() -> Iterator[str]:
    """The services' account, which the role creates: one per test run (removed after), so
    concurrent runs never share it. systemd refuses to vouch for User=nobody."""
    name = f"hfl-t{os.getpid()}"
    yield name
    subprocess.run(["userdel", name], capture_output=True)
    subprocess.run(["groupdel", name], capture_output=True)


# --- the control node -------------------------------------------------------------------


def enrol(pki_dir: Path) -> Pki:
    pki = Pki.init(pki_dir, name="hfl rollout test CA")
    pki.issue("coordinator", Role.COORDINATOR)
    pki.issue("site-a", Role.AGGREGATOR)
    for agent in AGENTS:
        pki.issue(agent, Role.AGENT, group="site-a")
    pki.issue("app", Role.APP)
    return pki


def build_wheel(root: Path, src: Path, names: tuple[str, ...], pattern: str) -> Path:
    """The operator's `pip wheel --no-deps -w dist .`, from a copy of the sources (an in-tree
    build would leave build/ and *.egg-info behind in the repository)."""
    copy = root / "src" / src.name
    copy.mkdir(parents=True)
    for name in names:
        if (src / name).is_dir():
            shutil.copytree(src / name, copy / name,
                            ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src / name, copy / name)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                            "--no-build-isolation", "-w", str(root / "dist"), str(copy)],
                           capture_output=True, text=True)
    assert build.returncode == 0, build.stdout + build.stderr
    (wheel,) = (root / "dist").glob(pattern)
    return wheel


@contextlib.contextmanager
def sshd(root: Path) -> Iterator[dict[str, str]]:
    """sshd on a loopback port with a fresh host key, taking one fresh client key for root;
    yields the Ansible connection variables."""
    d = root / "ssh"
    d.mkdir()
    for key in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"hfl-{key}",
                        "-f", str(d / key)], check=True)
    shutil.copy(d / "client.pub", d / "authorized_keys")
    port = free_port()
    (d / "known_hosts").write_text(f"[127.0.0.1]:{port} {(d / 'host.pub').read_text()}")
    (d / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {d / 'host'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized_keys'}\nAllowUsers root\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\n"
        "KbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
        "Subsystem sftp internal-sftp\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation folder
    with open(d / "sshd.log", "wb") as log:
        proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(d / "sshd_config")],
                                stdout=log, stderr=log)
    try:
        wait_port(port, proc, "sshd")
        yield {"ansible_host": "127.0.0.1", "ansible_port": str(port), "ansible_user": "root",
               "ansible_ssh_private_key_file": str(d / "client"),
               "ansible_ssh_common_args": f"-o UserKnownHostsFile={d / 'known_hosts'} "
                                          "-o StrictHostKeyChecking=yes"}
    finally:
        stop(proc)


def inventory(root: Path, ssh: dict[str, str], wheel: Path, task: Path, pki: Path,
              broker_port: int, account: str) -> Path:
    """Six hosts on one machine: every path under the host's own root, one shared venv."""
    host_root = f"{root}/hosts/{{{{ inventory_hostname }}}}"
    common = {
        **ssh,
        "ansible_python_interpreter": "/usr/bin/python3",
        "ansible_become": False,  # already root
        "hfl_base_python": "/usr/bin/python3",
        "hfl_base_venv": f"{root}/venv",
        "hfl_base_throttle": 1,
        "hfl_base_config_dir": f"{host_root}/etc/hfl",
        "hfl_base_state_dir": f"{host_root}/var/lib/hfl",
        "hfl_base_unit_dir": f"{host_root}/etc/systemd/system",
        "hfl_base_user": account,
        "hfl_base_group": account,
        "hfl_base_home": f"{root}/home",  # one account for all six hosts
        "hfl_base_systemd": False,
        "hfl_base_wheel": str(wheel),
        "hfl_base_pki": str(pki),
        "hfl_base_broker_host": "127.0.0.1",
        "hfl_base_broker_port": broker_port,
        "hfl_agent_watchdog": WATCHDOG,
        "hfl_aggregator_watchdog": WATCHDOG,
        "hfl_coordinator_watchdog": WATCHDOG,
        # A user's task as a wheel, on the boards and the coordinator (docs/tasks.md).
        "hfl_agent_tasks": ["logreg", "linear-regression"],
        "hfl_agent_task_wheels": [str(task)],
        "hfl_coordinator_task_wheels": [str(task)],
        "mosquitto_pki": str(pki),
        "mosquitto_hfl_command": [str(Path(sys.executable).parent / "hfl")],
        "mosquitto_build_dir": f"{root}/broker-config",
        "mosquitto_hosts": ["127.0.0.1"],
        "mosquitto_port": broker_port,
        "mosquitto_bind": "127.0.0.1",
        "mosquitto_conf": f"{host_root}/etc/mosquitto/mosquitto.conf",
        "mosquitto_dir": f"{host_root}/etc/mosquitto/hfl",
        "mosquitto_persistence_dir": f"{host_root}/var/lib/mosquitto",
        "mosquitto_manage_package": False,
        "mosquitto_systemd": False,
    }

    def agent(i: int) -> dict:
        return {"hfl_agent_aggregator": "site-a", "hfl_agent_datasets": {"digits": {
            "source": "digits", "partition": "iid", "parts": len(AGENTS), "index": i}}}

    doc = {"all": {"vars": common, "children": {
        "brokers": {"hosts": {"broker": None}},
        "coordinators": {"hosts": {"coordinator": None}},
        "aggregators": {"hosts": {"site-a": None}},
        "agents": {"children": {
            "pi": {"hosts": {a: agent(i) for i, a in enumerate(AGENTS[:2])}},
            # CPU here (device auto), but the GPU drop-in is installed and verified.
            "jetson": {"hosts": {AGENTS[2]: agent(2)}, "vars": {"hfl_agent_gpu": True}},
        }},
    }}}
    path = root / "inventory.json"
    path.write_text(json.dumps(doc, indent=1))
    return path


def playbook(root: Path, inv: Path) -> dict[str, dict[str, int]]:
    """Run site.yml; returns the recap (host → ok/changed/failed/... counts)."""
    env = {**os.environ, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"),
           "ANSIBLE_HOME": str(root / "ansible-home"),
           "ANSIBLE_REMOTE_TEMP": str(root / "remote-tmp"),
           "ANSIBLE_SSH_CONTROL_PATH_DIR": str(root / "cp"), "ANSIBLE_NOCOLOR": "1",
           "ANSIBLE_FORKS": str(1 + len(SERVICES)),  # every host at once
           # SSH masters outlive the playbook by this much, not by Ansible's 60 s.
           "ANSIBLE_SSH_ARGS": "-o ControlMaster=auto -o ControlPersist=5s",
           "PATH": f"{ANSIBLE_BIN}:{os.environ['PATH']}"}
    run = subprocess.run([str(ANSIBLE_BIN / "ansible-playbook"), "-i", str(inv), "site.yml"],
                         cwd=ANSIBLE, env=env, capture_output=True, text=True, timeout=600)
    (root / f"playbook-{time.monotonic_ns()}.log").write_text(run.stdout + run.stderr)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    recap = {}
    for host, counts in re.findall(r"^(\S+)\s+:\s+(ok=.*)$", run.stdout, re.M):
        recap[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", counts)}
    assert set(recap) == {"broker", *SERVICES}, run.stdout[-3000:]
    return recap


# --- the hosts' services, started as systemd would -------------------------------------


class Notifications:
    """One datagram socket per service (its NOTIFY_SOCKET), drained by a thread."""

    def __init__(self, folder: Path, names: list[str]) -> None:
        folder.mkdir()
        folder.chmod(0o755)
        self.paths, self.messages = {}, {n: [] for n in names}
        self._socks, self._stop = {}, threading.Event()
        for name in names:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self.paths[name] = folder / f"{name}.sock"
            s.bind(str(self.paths[name]))
            self.paths[name].chmod(0o666)  # the service runs as another user
            s.settimeout(0.1)
            self._socks[name] = s
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop.is_set():
            for name, s in self._socks.items():
                with contextlib.suppress(TimeoutError, socket.timeout):
                    self.messages[name] += s.recv(4096).decode().splitlines()

    def seen(self, name: str, line: str) -> bool:
        return line in list(self.messages[name])

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        for s in self._socks.values():
            s.close()


def seconds(span: str) -> float:
    """A systemd time span as WatchdogSec= takes it (enough of the syntax for our units)."""
    units = {"ms": 1e-3, "s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", span)
    return sum(float(n) * units[u or "s"] for n, u in parts)


def sandbox(unit: su.Unit) -> Callable[[], None]:
    """What the child applies before exec, as systemd does: no_new_privs and, where the unit
    asks for it, memory-deny-write-execute (prctl PR_SET_MDWE, inherited across exec)."""
    nnp = su.value(unit, "Service", "NoNewPrivileges") == "yes"
    mdwe = su.value(unit, "Service", "MemoryDenyWriteExecute") == "yes"

    def apply() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        if nnp and libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS
            raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
        if mdwe and libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, REFUSE_EXEC_GAIN
            raise OSError(ctypes.get_errno(), "PR_SET_MDWE")

    return apply


def start_service(unit_path: Path, notify: Path, log: Path) -> subprocess.Popen:
    """Start a unit's ExecStart as systemd would: its user and group, working directory,
    a clean environment with NOTIFY_SOCKET and the watchdog's WATCHDOG_USEC/WATCHDOG_PID."""
    unit = su.load(unit_path)
    user = pwd.getpwnam(su.value(unit, "Service", "User") or "root")
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": user.pw_dir,
           "USER": user.pw_name, "LOGNAME": user.pw_name, "NOTIFY_SOCKET": str(notify)}
    watchdog = su.value(unit, "Service", "WatchdogSec")
    if watchdog:
        env["WATCHDOG_USEC"] = str(int(seconds(watchdog) * 1e6))
    # The shell's pid is the service's after exec: that is what WATCHDOG_PID names.
    cmd = ["/bin/sh", "-c", 'WATCHDOG_PID=$$ exec "$@"', "sh", *su.exec_start(unit)]
    with open(log, "wb") as out:
        return subprocess.Popen(cmd, env=env, cwd=su.value(unit, "Service", "WorkingDirectory"),
                                user=user.pw_uid, group=su.value(unit, "Service", "Group"),
                                extra_groups=[], stdout=out, stderr=out,
                                preexec_fn=sandbox(unit))


def wait_until(done: Callable[[], bool], timeout: float, procs: dict[str, subprocess.Popen],
               logs: Path) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if done():
            return True
        dead = {n: p.returncode for n, p in procs.items() if p.poll() is not None}
        assert not dead, f"exited: {dead}\n" + tails(logs)
        time.sleep(0.1)
    return done()


def tails(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace")
                                                   .splitlines()[-15:])
                     for p in sorted(logs.glob("*.log")))


# --- the test ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [p for p in (ANSIBLE_BIN / "ansible-playbook", Path(SSHD)) if not p.exists()]
    if missing:
        pytest.fail(f"missing {', '.join(map(str, missing))}: run `make test`, which installs "
                    "them", pytrace=False)


def test_site_yml_rolls_out_a_fleet_that_trains(tools: None, mosquitto: str, root: Path,
                                                 account: str) -> None:
    t0 = time.monotonic()
    pki = enrol(root / "pki")
    wheel = build_wheel(root, REPO, (*PACKAGES, "pyproject.toml", "README.md"), "hfl-*.whl")
    task = build_wheel(root, REPO / "examples/tasks/linear-regression",
                       ("pyproject.toml", "hfl_linear_regression.py"),
                       "hfl_example_linear_regression-*.whl")
    broker_port = free_port()
    hosts = root / "hosts"
    for host in ("broker", *SERVICES):
        (hosts / host).mkdir(mode=0o755, parents=True)  # each board's "/"
    with sshd(root) as ssh:
        inv = inventory(root, ssh, wheel, task, pki.root, broker_port, account)
        first = playbook(root, inv)
        t_first = time.monotonic() - t0
        assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in first.values()), first
        assert all(c["changed"] > 0 for c in first.values()), first

        # What the roles installed, checked on the "hosts".
        units = {h: hosts / h / "etc/systemd/system" / f"hfl-{s}.service"
                 for h, s in SERVICES.items()}
        for unit in units.values():
            assert su.verify(unit) == "", unit  # with its drop-ins, against the real venv
        gpu = units["agent-3"].with_name("hfl-agent.service.d") / "jetson-gpu.conf"
        assert gpu.is_file() and not (units["agent-1"].parent / gpu.parent.name / gpu.name
                                      ).exists()
        key = hosts / "agent-1/etc/hfl/pki/agent-1/agent-1.key"
        assert (key.stat().st_mode & 0o777, key.stat().st_uid) == (0o600,
                                                                    pwd.getpwnam(account).pw_uid)
        cfg = load_config(hosts / "agent-2/etc/hfl/agent.toml")
        assert (cfg.agent.aggregator, cfg.agent.datasets["digits"].index,
                cfg.broker.port) == ("site-a", 1, broker_port)
        assert cfg.agent.tasks == ["logreg", "linear-regression"]
        # The task wheel is installed in the venv the services run from, found by its name.
        found = subprocess.run([f"{root}/venv/bin/python", "-c",
                                "from hfl.models.tasks import load; "
                                "print(load('linear-regression').version)"],
                               capture_output=True, text=True)
        assert found.stdout.strip() == "1.0.0", found.stderr

        # The broker from its installed config (Mosquitto drops to user mosquitto itself).
        logs = root / "logs"
        logs.mkdir()
        conf = hosts / "broker/etc/mosquitto/mosquitto.conf"
        with open(logs / "mosquitto.log", "wb") as out:
            broker = subprocess.Popen([mosquitto, "-c", str(conf)], stdout=out, stderr=out)
        notes = Notifications(root / "notify", list(SERVICES))
        procs: dict[str, subprocess.Popen] = {}
        app = None
        try:
            wait_port(broker_port, broker, "mosquitto")
            t_services = time.monotonic()
            for host, unit in units.items():
                procs[host] = start_service(unit, notes.paths[host], logs / f"{host}.log")
            assert wait_until(lambda: all(notes.seen(h, "READY=1") for h in SERVICES), 180,
                              procs, logs), f"READY=1 from {notes.messages}\n{tails(logs)}"
            t_ready = time.monotonic() - t_services

            app = App.from_device(pki.device("app").dir, "127.0.0.1", broker_port,
                                  models=["digits"])
            app.start()
            jobs = app.request(name="digits", task="logreg",
                               options={"input_shape": [1, 8, 8], "num_classes": 10},
                               dataset="digits", aggregators=["site-a"],
                               rounds=1, min_agents=len(AGENTS), epochs=2, lr=0.1,
                               deadline_s=60, request_id="rollout")
            assert jobs == ["rollout-digits"]
            version = next(app.models("digits", timeout=180), None)
            assert version is not None, tails(logs)
            assert version.meta.version == 1
            t_round = time.monotonic() - t_services - t_ready
            assert all(p.poll() is None for p in procs.values()), tails(logs)
            app.stop()
            app = None
            codes = {h: stop(p) for h, p in procs.items()}  # SIGTERM, as systemctl stop
            assert codes == dict.fromkeys(SERVICES, 0), tails(logs)
            # The role gave the aggregator a checkpoint folder, and the job was saved there.
            saved = StateStore(hosts / "site-a/var/lib/hfl/aggregator").read()
            assert "job/rollout-digits" in saved, sorted(saved)
            # The operator's check on a board, as its account, with the broker up.
            check = subprocess.run(
                [*su.exec_start(su.load(units["agent-1"]))[:1], "check", "-c",
                 str(hosts / "agent-1/etc/hfl/agent.toml")], user=account, group=account,
                extra_groups=[], env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"},
                capture_output=True, text=True, timeout=120)
            assert check.returncode == 0 and "ready to serve" in check.stdout, check.stdout
        finally:
            if app is not None:
                app.stop()
            for p in procs.values():
                stop(p)
            stop(broker)
            notes.close()
        # What systemd would have heard from each service.
        for host in SERVICES:
            heard = notes.messages[host]
            assert {"READY=1", "WATCHDOG=1", "STOPPING=1"} <= set(heard), (host, heard)
            assert heard.index("READY=1") < heard.index("STOPPING=1"), (host, heard)
            if host != "coordinator":  # the aggregator and agents say which job they serve
                assert any(m.startswith("STATUS=") and "job rollout-digits" in m
                           for m in heard), (host, heard)

        t1 = time.monotonic()
        second = playbook(root, inv)
        t_second = time.monotonic() - t1
    assert {h: c["changed"] for h, c in second.items()} == dict.fromkeys(second, 0), second
    print(f"\nrollout: first playbook {t_first:.0f} s (with the wheel and PKI), services READY "
          f"in {t_ready:.0f} s, round {t_round:.0f} s, second playbook {t_second:.0f} s, "
          f"total {time.monotonic() - t0:.0f} s")
