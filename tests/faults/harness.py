"""A fleet for fault injection: the coordinator and the aggregators run as real processes
(fleet.sim.procs: `hfl-coordinator run`, `hfl-aggregator run`, each with its state directory) that
a test can `kill -9` and start again; lightweight agents (`FixedDeltaAgent`: a real
`AgentMachine` answering each round with a fixed delta instead of training) and the app run
in the test, or the agents in processes of their own. All over a real Mosquitto: TLS with
client certificates and the roster's ACL (or plain), persistence on, so a broker restart
keeps the sessions and what they had queued.
"""

from __future__ import annotations

import contextlib
import json
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from application import App
from fleet.ops.broker import Broker, BrokerTls, free_port
from fleet.sim import procs
from fleet.sim.follow import Outcome, follow
from fleet.sim.procs import FixedDeltaAgent
from hfl.crypto.identity import Identity
from hfl.crypto.pki import Pki
from hfl.runtime.mqtt import BrokerSettings, Session
from hfl.runtime.state import Record, StateStore
from hfl.wire import envelope
from hfl.wire.messages import KNOWN_TYPES, ModelRequest, ModelSpec, Role
from hfl.wire.topics import Topics

P_SHAPE = [1, 2, 3]  # logreg on 6 features, 2 classes: 14 parameters (a list: JSON)


class RawPublisher:
    """A bare MQTT client that publishes payloads exactly as given (no chunking)."""

    def __init__(self, settings: BrokerSettings) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="raw-publisher",
                                  protocol=mqtt.MQTTv5)
        self.client.max_queued_messages_set(0)
        self.client.connect(settings.host, settings.port)
        self.client.loop_start()
        self.infos: list = []

    def publish(self, topic: str, payload: bytes) -> None:
        self.infos.append(self.client.publish(topic, payload, qos=1))

    def flush(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for info in self.infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
        self.infos.clear()

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def wait_for(what: str, check: Callable[[], object], timeout: float = 30.0) -> object:
    """Poll `check` until it returns something true; AssertionError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def spec(aggregators: list[str], **kw) -> ModelSpec:
    base = dict(name="m", task="logreg", options={"input_shape": list(P_SHAPE), "num_classes": 2},
                dataset="d", aggregators=aggregators, rounds=2, min_agents=2, deadline_s=60,
                max_retries=2,
                secagg={"enabled": False, "stage_timeout_s": 20})
    return ModelSpec(**{**base, **kw})


class FaultFleet:
    def __init__(self, workdir: Path, groups: dict[str, list[str]], *, tls: bool = True,
                 persistence: bool = True, edge: bool = False, listen: str | None = None) -> None:
        """`edge`: the agents get a broker of their own (plain), for a `Proxy` in between.
        Without `tls`, the broker is plain and anonymous (every device still has a
        certificate). `listen`: one more address the (plain) broker listens on, at port
        `listen_port` (for agents in another network namespace)."""
        self.workdir, self.groups, self.tls = workdir, groups, tls
        self.topics = Topics()
        self.pki = Pki.init(workdir / "pki", name="hfl fault-test CA")
        members = [("coordinator", Role.COORDINATOR, None), ("app", Role.APP, None),
                   ("ops", Role.OBSERVER, None)]
        agents = [(a, Role.AGENT, agg) for agg, ids in groups.items() for a in ids]
        members += [(agg, Role.AGGREGATOR, None) for agg in groups]
        self.pki.issue_many(members + agents)
        self.identities = {i: Identity.load(self.pki.device(i).dir, i, r)
                           for i, r, _ in members + agents}
        self.roster = self.pki.roster()
        broker_tls = (BrokerTls.from_pki(self.pki, "broker", workdir / "broker" / "tls",
                                         self.topics) if tls else None)
        self.listen, self.listen_port = listen, free_port()
        extra = f"listener {self.listen_port} {listen}" if listen else ""
        self.broker = Broker(workdir / "broker", persistence=persistence, tls=broker_tls,
                             extra=extra).start()
        self.edge = Broker(workdir / "edge").start() if edge else None
        self.procs: dict[str, subprocess.Popen] = {}
        self.agent_procs: list[subprocess.Popen] = []
        self.agents: dict[str, FixedDeltaAgent] = {}
        self.apps: list[App] = []
        self._status: queue.Queue = queue.Queue()
        self.observer = Session("ops", self.settings("ops"), inbox=self._status,
                                subscriptions=[f"{self.topics.prefix}/status/+/+"])
        self.observer.start()
        assert self.observer.wait_ready(10)
        self.online: dict[str, float] = {}  # id → when it last said online

    # ------------------------------------------------------------------ wiring

    def settings(self, id_: str) -> BrokerSettings:
        if self.edge is not None and self.roster.get(id_).role is Role.AGENT:
            return BrokerSettings(host=self.edge.host, port=self.edge.port)
        if not self.tls:
            return BrokerSettings(host=self.broker.host, port=self.broker.port)
        return self.pki.device(id_).broker_settings(self.broker.host, self.broker.port)

    def state_dir(self, id_: str) -> Path:
        return self.workdir / "state" / id_

    def config(self, id_: str) -> Path:
        return procs.service_config(self.workdir / "config" / f"{id_}.toml", id_,
                                    self.pki.device(id_).dir, self.broker.host,
                                    self.broker.port, self.tls, self.state_dir(id_))

    # ------------------------------------------------------------------ processes

    def spawn(self, id_: str, wait: bool = True) -> subprocess.Popen:
        """Start the service `id_` (the coordinator or an aggregator) as its own process."""
        started = time.time()
        self.procs[id_] = procs.spawn_service(id_, self.config(id_), self.log_path(id_),
                                              self.workdir)
        if wait:
            self.wait_online(id_, since=started)
        return self.procs[id_]

    def kill(self, id_: str) -> None:
        """`kill -9`: no clean exit, no save, no goodbye (the broker sends the Last Will)."""
        p = self.procs.pop(id_)
        p.send_signal(signal.SIGKILL)
        p.wait(10)

    def stop(self, id_: str) -> int:
        p = self.procs.pop(id_)
        p.send_signal(signal.SIGTERM)
        try:
            return p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            return p.wait()

    def log_path(self, id_: str) -> Path:
        return self.workdir / "logs" / f"{id_}.log"

    def log(self, id_: str) -> str:
        return self.log_path(id_).read_text(errors="replace")

    def state(self, id_: str) -> dict[str, Record]:
        """What the process has saved so far (read through a connection of our own)."""
        store = StateStore(self.state_dir(id_))
        try:
            return store.read()
        finally:
            store.close()

    def wait_online(self, id_: str, since: float, timeout: float = 60.0) -> None:
        def seen() -> bool:
            self._drain_status()
            if id_ in self.procs and self.procs[id_].poll() is not None:
                raise AssertionError(f"{id_} exited with {self.procs[id_].returncode}:\n"
                                     f"{self.log(id_)[-3000:]}")
            return self.online.get(id_, 0.0) >= since - 1.0
        wait_for(f"{id_} online", seen, timeout)

    def _drain_status(self) -> None:
        while not self._status.empty():
            msg = self._status.get()
            if not msg.payload:
                continue
            try:
                env = envelope.decode(msg.payload, topic=msg.topic,
                                      public_key=self.roster.public_key, known_types=KNOWN_TYPES)
            except Exception:  # noqa: BLE001 - the observer only watches
                continue
            if env.stage == "online":
                self.online[env.sender] = max(self.online.get(env.sender, 0.0), env.created)

    # ------------------------------------------------------------------ agents and app

    def start_agents(self, agg: str, steps: dict[str, float], samples: dict[str, int],
                     hold: bool = False, silent: dict[str, str] | None = None,
                     rounds: set[int] | None = None,
                     train_s: float = 0.0) -> list[FixedDeltaAgent]:
        out = [FixedDeltaAgent(self.identities[a], self.roster, self.settings(a), self.topics,
                               agg, steps[a], samples[a], hold, (silent or {}).get(a), rounds,
                               train_s)
               for a in self.groups[agg]]
        with ThreadPoolExecutor(min(32, len(out))) as pool:  # connect together, as a fleet does
            list(pool.map(FixedDeltaAgent.start, out))
        self.agents.update({a.id: a for a in out})
        return out

    def spawn_agents(self, agg: str, steps: dict[str, float], samples: dict[str, int],
                     per_process: int = 250, ids: list[str] | None = None,
                     netns: str | None = None) -> list[float]:
        """The group's agents (or `ids`) in processes of their own (`procs.spawn_agents`),
        all connecting at once, from network namespace `netns` to the `listen` address when
        given; returns how long each process took to connect its agents."""
        ids = ids or self.groups[agg]
        host, port = ((self.listen, self.listen_port) if netns
                      else (self.broker.host, self.broker.port))
        started = procs.spawn_agents(
            self.pki, host, port, [(a, agg, steps[a], samples[a]) for a in ids], self.workdir,
            tls=self.tls, per_process=per_process, name=f"{agg}-{netns or 'local'}",
            prefix=["ip", "netns", "exec", netns] if netns else [])
        self.agent_procs += started
        return [seconds for seconds, _ in procs.wait_ready(started)]

    def request(self, *specs: ModelSpec, rid: str = "r1") -> tuple[App, list[str]]:
        app = App(self.identities["app"], self.roster, self.settings("app"), self.topics,
                  models=[s.name for s in specs])
        app.start()
        self.apps.append(app)
        return app, app.request(ModelRequest(request_id=rid, models=list(specs)))

    @staticmethod
    def follow(app: App, jobs: list[str], timeout: float = 120.0) -> Outcome:
        out = follow(app, jobs, None, None, timeout)
        assert all(out.finished(j) for j in jobs), f"jobs not finished: {out.status}"
        return out

    def close(self) -> None:
        for agent in self.agents.values():
            agent.released.set()
        for agent in self.agents.values():
            with contextlib.suppress(Exception):  # tearing down what a fault left behind
                agent.stop()
        procs.stop_agents(self.agent_procs)
        for app in self.apps:
            app.stop()
        for id_ in list(self.procs):
            self.stop(id_)
        self.observer.stop()
        self.broker.close()
        if self.edge is not None:
            self.edge.close()

    def tally(self, id_: str) -> dict:
        """The counters a service logged when it stopped (its last `tally` line)."""
        return procs.tally(self.log(id_), id_)


class Proxy:
    """A man in the middle between the agents' broker (edge) and the services' (core): it
    carries the agents' updates up and the aggregator's rounds, acknowledgements and status
    down, and on the way up sends
    every update twice, shuffles them, and replays every earlier one when a new round opens.
    Its copies are byte for byte the agents' messages (signed, same nonce)."""

    def __init__(self, fleet: FaultFleet, agg: str, seed: int = 0) -> None:
        t = fleet.topics
        assert fleet.edge is not None
        self.up_in: queue.Queue = queue.Queue()
        self.down_in: queue.Queue = queue.Queue()
        self.edge = Session("proxy-edge", BrokerSettings(fleet.edge.host, fleet.edge.port),
                            inbox=self.up_in, subscriptions=[f"{t.prefix}/agg/{agg}/updates/+"])
        # Down: the rounds, and the aggregator's acknowledgements and status (hfl.runtime.delivery).
        self.core = Session("proxy-core", fleet.settings("ops"), inbox=self.down_in,
                            subscriptions=[f"{t.prefix}/agg/{agg}/rounds/+",
                                           f"{t.prefix}/agg/{agg}/rounds/+/+",
                                           f"{t.prefix}/acks/{agg}/+",
                                           t.status("aggregator", agg)])
        self.rng = np.random.default_rng(seed)
        self.history: list[tuple[str, bytes]] = []
        self.rounds: set[tuple[str, int]] = set()
        self.forwarded = self.extra = 0  # updates carried up; copies beyond the first
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, name="proxy", daemon=True)

    def start(self) -> Proxy:
        for s in (self.edge, self.core):
            s.start()
            assert s.wait_ready(10)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(10)
        self.edge.stop()
        self.core.stop()

    def _run(self) -> None:
        while not self.stop_event.is_set():
            batch: list[tuple[str, bytes]] = []
            while not self.up_in.empty():
                m = self.up_in.get()
                assert not m.payload.startswith(b"HFC1"), "the proxy takes whole messages"
                self.forwarded += 1
                batch += [(m.topic, m.payload)] * 2  # every update twice
                self.extra += 1
            while not self.down_in.empty():
                m = self.down_in.get()
                if not m.payload:
                    continue
                header = _header(m.payload)
                key = (header["job"], header["round"])
                if header["type"] == "round" and header["stage"] == "open" and (
                        key not in self.rounds):
                    self.rounds.add(key)
                    batch += self.history  # late copies of everything sent so far
                    self.extra += len(self.history)
                self.edge.publish(m.topic, m.payload)
            self.history += [b for b in dict.fromkeys(batch) if b not in self.history]
            for k in self.rng.permutation(len(batch)):  # shuffled
                self.core.publish(*batch[k])
            time.sleep(0.1)


def _header(data: bytes) -> dict:
    h = int.from_bytes(data[4:8], "little")
    return json.loads(data[8 : 8 + h])


def expected_state(sp: ModelSpec, mean_steps: list[float]) -> dict[str, np.ndarray]:
    """The global model after versions that each moved every coordinate by a mean step."""
    from hfl.models.tasks import TaskSet, state_arrays, unflatten_into

    sp, p = TaskSet.everything_installed().resolve(sp)
    params = p.init_params(sp.seed)
    for s in mean_steps:
        params = params + np.float32(s)
    model = p.build()
    unflatten_into(model, params)
    return state_arrays(model)


def assert_state(got: dict[str, np.ndarray], want: dict[str, np.ndarray],
                 atol: float = 1e-6) -> None:
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=atol, err_msg=name)
