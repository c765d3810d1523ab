"""A fleet as real processes on one machine, for the fault tests (tests/faults) and the scale
benchmark (bench/scale.py).

- The services run as their own console scripts (`hfl-coordinator run`, `hfl-aggregator run`)
  from a config file and a state directory (`service_config`, `spawn_service`), and log their
  counters when they stop (`tally`).
- `FixedDeltaAgent`: a real `AgentMachine` on its own MQTT connection that answers each round
  with a fixed delta instead of training. Everything else is the agent's own: the round
  protocol, SecAgg+, DP clipping and noise, signing and sealing.
- `spawn_agents`: such agents in processes of their own (`python -m fleet.sim.procs SPEC`).
  paho's network loop uses select(), which takes no file descriptor above 1023, so a
  thousand connections need a few processes of a few hundred agents each.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from edge_agent.machine import AgentMachine, Train, Update
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki
from hfl.crypto.secagg_wire import WireStage
from hfl.runtime.actions import Send
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node, run_in_thread
from hfl.wire.messages import Metrics, Role
from hfl.wire.topics import Topics

REPO = Path(__file__).resolve().parents[2]
# what an agent sends in a secure round, in order
STAGES = (WireStage.ADVERT, WireStage.SHARES, WireStage.MASKED, WireStage.UNSHARES)

# `hfl-aggregator run` / `hfl-coordinator run` (a role's own console script, without what the
# umbrella `hfl` imports): `run` is a subcommand when the role's app has a group of them.
LAUNCH = """
import sys, typer
from {role}.cli import app
group = hasattr(typer.main.get_command(app), "commands")
sys.exit(app(["run", *sys.argv[1:]] if group else sys.argv[1:]))
"""


def child_env() -> dict[str, str]:
    """This environment with the repository first on PYTHONPATH (a worktree's code wins)."""
    path = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path)}


# ---------------------------------------------------------------------- services


def service_role(id_: str) -> str:
    return "coordinator" if id_ == "coordinator" else "aggregator"


def service_config(path: Path, id_: str, identity_dir: Path, host: str, port: int, tls: bool,
                   state_dir: Path) -> Path:
    """The config file of service `id_` (the coordinator or an aggregator)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f'[identity]\nid = "{id_}"\ndir = "{identity_dir}"\n\n'
        f'[broker]\nhost = "{host}"\nport = {port}\ntls = {"true" if tls else "false"}\n\n'
        f'[{service_role(id_)}]\nstate_dir = "{state_dir}"\n')
    return path


def spawn_service(id_: str, config: Path, log: Path, cwd: Path) -> subprocess.Popen:
    """Start the service `id_` in its own process, verbose, appending to `log`."""
    cmd = [sys.executable, "-c", LAUNCH.format(role=service_role(id_)), "-v", "-c", str(config)]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:  # the child has its own copy of the descriptor
        out.write(f"\n===== start {time.strftime('%H:%M:%S')} =====\n".encode())
        out.flush()
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                env=child_env(), cwd=cwd)


def memory_mib(pid: int, field: str = "VmHWM") -> float:
    """A memory figure of /proc/PID/status in MiB: VmHWM (the peak, default) or VmRSS (now).
    Not `ru_maxrss`, which a child inherits from its parent over fork and exec."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid}")


def tally(log: str, id_: str) -> dict:
    """The counters a service logged when it stopped (its last `tally` line)."""
    lines = [ln for ln in log.splitlines() if f"{id_} tally " in ln]
    assert lines, f"{id_} logged no tally"
    return json.loads(lines[-1].split(" tally ", 1)[1])


# ---------------------------------------------------------------------- agents


class FixedDeltaAgent:
    """An agent that answers every round with `step` in every coordinate and `samples` as its
    weight, after `train_s` seconds of "training" (its node busy meanwhile, as a training
    board's is). With `hold`, it waits in its first training until `release`. `silent` makes it
    drop out of a round: from that stage on (advert, shares, masked, unshares) it sends
    nothing in that round (in every round when `rounds` is None)."""

    def __init__(self, identity: Identity, roster: Roster, settings: BrokerSettings,
                 topics: Topics, aggregator: str, step: float, samples: int,
                 hold: bool = False, silent: str | None = None,
                 rounds: set[int] | None = None, train_s: float = 0.0) -> None:
        self.id, self.step, self.samples, self.train_s = identity.id, step, samples, train_s
        self.node = Node(identity, roster, settings, topics,
                         topics.agent_filters(aggregator, identity.id),
                         group=aggregator)
        # Its jobs name the built-in logreg (the size of its parameter vector is all that
        # matters here) and the data source "d".
        self.machine = AgentMachine(identity, aggregator, {"logreg"}, {"d"}, topics, roster)
        self.node.handlers[Train] = self._train
        self.node.handlers[Send] = self._send
        self.silent = set(STAGES[STAGES.index(silent):]) if silent else set()
        self.silent_rounds = rounds
        self.withheld: list[tuple[str, int]] = []
        self.asked = threading.Event()  # a round asked us to train
        self.released = threading.Event()
        self.rounds: list[int] = []
        if not hold:
            self.released.set()

    def _train(self, t: Train) -> list:
        self.asked.set()
        self.released.wait()
        time.sleep(self.train_s)
        self.rounds.append(t.round)
        delta = np.full(t.params.size, self.step, np.float32)
        m = Metrics(samples=self.samples, train_loss=1.0, eval_samples=1, eval_loss=1.0,
                    eval_metrics={s.name: 0.5 for s in t.spec.metrics})
        return self.machine.trained(t.job, t.round, Update(delta, m))

    def _send(self, action: Send) -> None:
        if action.stage in self.silent and (self.silent_rounds is None
                                            or action.round in self.silent_rounds):
            self.withheld.append((action.stage, action.round))
            return
        self.node.send(action)

    def start(self) -> None:
        self.node.start(60)
        self.thread = run_in_thread(self.node, self.machine, self.id)

    def release(self) -> None:
        self.released.set()

    def stop(self) -> None:
        self.released.set()
        self.node.stop_event.set()
        self.thread.join(10)
        self.node.stop(5)


def spawn_agents(pki: Pki, host: str, port: int, agents: Sequence[tuple[str, str, float, int]],
                 workdir: Path, *, tls: bool, per_process: int = 250,
                 prefix: Sequence[str] = (), name: str = "local") -> list[subprocess.Popen]:
    """Start `agents` ((id, aggregator, step, samples) each) in processes of at most
    `per_process` each, all connecting at once; `prefix` runs them under another command
    (`ip netns exec NS`). Each prints `ready SECONDS COUNTERS` once its agents are connected
    and subscribed (`wait_ready`), serves until SIGTERM, then prints `tally COUNTERS`
    (`stop_agents`): the sum of its agents' node and MQTT counters, as JSON. With `tls`,
    each agent connects with its own certificate from `pki` (the broker's ACL applies);
    without, plainly."""
    procs = []
    for k in range(0, len(agents), per_process):
        spec_path = workdir / "agents" / f"{name}-{k}.json"
        spec_path.parent.mkdir(parents=True, exist_ok=True)
        spec_path.write_text(json.dumps({
            "pki": str(pki.root), "host": host, "port": port, "tls": tls,
            "agents": [list(a) for a in agents[k : k + per_process]]}))
        log = workdir / "logs" / f"agents-{name}-{k}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as err:
            procs.append(subprocess.Popen(
                [*prefix, sys.executable, "-m", "fleet.sim.procs", str(spec_path)],
                stdout=subprocess.PIPE, stderr=err, env=child_env(), text=True))
    return procs


def wait_ready(procs: Sequence[subprocess.Popen]) -> list[tuple[float, dict[str, int]]]:
    """How long each agents process took to connect its agents, and its agents' counters by
    then (its `ready` line)."""
    out = []
    for p in procs:
        line = p.stdout.readline()  # type: ignore[union-attr]
        assert line.startswith("ready "), f"agents process said {line!r}"
        seconds, counters = line[6:].split(" ", 1)
        out.append((float(seconds), json.loads(counters)))
    return out


def stop_agents(procs: Sequence[subprocess.Popen], timeout: float = 60.0) -> dict[str, int]:
    """SIGTERM every agents process; the sum of the counters they report on the way out
    (node and MQTT counters of all their agents: messages and bytes sent and received)."""
    for p in procs:
        p.send_signal(signal.SIGTERM)
    total: Counter[str] = Counter()
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            continue
        for line in out.splitlines():
            if line.startswith("tally "):
                total.update(json.loads(line[6:]))
    return dict(total)


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    pki = Pki(Path(spec["pki"]))
    roster, topics, host, port = pki.roster(), Topics(), spec["host"], spec["port"]

    def agent(id_: str, aggregator: str, step: float, samples: int) -> FixedDeltaAgent:
        settings = (pki.device(id_).broker_settings(host, port) if spec["tls"]
                    else BrokerSettings(host=host, port=port))
        return FixedDeltaAgent(Identity.load(pki.device(id_).dir, id_, Role.AGENT), roster,
                               settings, topics, aggregator, step, samples)

    def counters() -> str:
        total: Counter[str] = Counter()
        for a in agents:
            total.update(a.node.counters)
            total.update({f"mqtt_{k}": v for k, v in a.node.session.counters.items()})
        return json.dumps(dict(total))

    agents = [agent(*a) for a in spec["agents"]]
    t0 = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(FixedDeltaAgent.start, agents))
    print(f"ready {time.monotonic() - t0:.3f} {counters()}", flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    done.wait()
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(FixedDeltaAgent.stop, agents))
    print(f"tally {counters()}", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
