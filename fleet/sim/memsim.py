"""A fleet at scale in one process: the role machines on the in-memory network.

A thousand TLS MQTT clients in one process on two cores spend their time in the broker,
TLS and paho, not in federated learning. Here only the broker is replaced
(`fleet.sim.memnet`): every identity has real keys in a real roster, every message is a
signed envelope, parameter bodies are sealed, agents train with torch on their own
data, edge rounds run SecAgg+ and DP-FedAvg clips and noises exactly as on the boards,
and the coordinator calibrates, accounts and publishes ε as it does over MQTT.

The clock is simulated: messages and training take no time, and when the network falls
quiet before the job has ended, time moves on in `tick_s` steps and every machine ticks,
so a round waits for its deadline only when an agent did not answer (`silent`).

Each model version (`NewVersion`) is scored here with torch on the held-out set; the
ONNX export, registry and the app's subscription are the MQTT fleet's business.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from aggregator.machine import AggregatorMachine
from coordinator.machine import CoordinatorMachine, NewVersion
from coordinator.runner import job_preparer
from edge_agent.device import pick_device
from edge_agent.machine import AgentMachine, Declined, Train, Update
from edge_agent.runner import LocalTrainer
from fleet.sim.follow import NAN, RoundRow
from fleet.sim.inproc import FleetLayout
from fleet.sim.memnet import MemNet
from hfl.crypto.identity import Identity, Roster
from hfl.models.tasks import TaskSet, unflatten_into
from hfl.runtime.actions import Send
from hfl.task import Evaluation, Round, Samples
from hfl.wire.envelope import Envelope
from hfl.wire.messages import (
    JobMeta,
    Kind,
    ModelRequest,
    ModelSpec,
    StatusMeta,
    parse_meta,
)
from hfl.wire.topics import Route, Topics

ENDED = ("done", "stopped", "failed")


class _App:
    """The app's machine: it asked for the job and keeps the newest status of each."""

    def __init__(self) -> None:
        self.jobs: dict[str, JobMeta] = {}

    def handle(self, env: Envelope, route: Route, now: float) -> list:
        if env.type == Kind.JOB.value:
            self.jobs[env.job] = parse_meta(JobMeta, env.meta)
        return []

    def tick(self, now: float) -> list:
        return []


@dataclass
class MemRun:
    """What one job did: a row per model version, how it ended, and the wall time."""

    rows: list[RoundRow]
    status: JobMeta
    spec: ModelSpec  # as the coordinator ran it: with the calibrated noise multiplier
    seconds: float
    round_seconds: list[float]  # wall time from the previous version (or the request)
    rejections: dict[str, dict[str, int]]

    @property
    def z(self) -> float | None:
        return self.spec.privacy.noise_multiplier if self.spec.privacy else None


class MemFleet:
    """The coordinator, an app, the aggregators and their agents of `layout`, each with
    its own identity, on one in-memory network; `run` asks for one job at a time."""

    tls = False  # no broker, so no TLS: every message is still signed, bodies sealed

    @property
    def versions(self) -> list:
        return []  # no registry or ONNX export: each version is scored as it comes

    def __init__(self, layout: FleetLayout, tasks: TaskSet, *, device: str = "cpu",
                 silent: Collection[str] = ()) -> None:
        """`silent`: agents that never answer a round (dropouts, for deadline tests)."""
        self.layout = layout
        self.tasks = tasks
        self.device = pick_device(device)
        self.silent = set(silent)
        self.topics = Topics()
        self.roster = Roster()
        ids: dict[str, Identity] = {}
        for id_, role, group in layout.members():
            ids[id_] = Identity.generate(id_, role)
            self.roster.enroll(ids[id_], group)
        models: dict[tuple, torch.nn.Module] = {}  # one model per task for every trainer
        self.trainers = {agent: LocalTrainer(agent, tasks, data, self.device, models=models)
                         for g in layout.groups.values() for agent, data in g.items()}
        self.net = MemNet(self.topics, self.roster, trainer=self._train, record=False)
        coord = ids[layout.coordinator]
        self.coordinator = CoordinatorMachine.of(coord, self.roster, self.topics,
                                                 job_preparer(tasks))
        self.net.add(coord, self.coordinator, self.topics.coordinator_filters(coord.id))
        self.app_id = layout.apps[0]
        self.app = _App()
        self.net.add(ids[self.app_id], self.app, self.topics.app_filters([]))
        self.aggregators: dict[str, AggregatorMachine] = {}
        for agg, agents in layout.groups.items():
            self.aggregators[agg] = AggregatorMachine(agg, partial(self.roster.group, agg),
                                                      self.topics)
            self.net.add(ids[agg], self.aggregators[agg], self.topics.aggregator_filters(agg))
            for agent in agents:
                self.net.add(ids[agent], AgentMachine(ids[agent], agg, set(tasks.names()),
                                                      set(agents[agent]), self.topics,
                                                      self.roster),
                             self.topics.agent_filters(agg, agent))
                self._online(agent, agg)
        self.net.run()

    def rejections(self) -> dict[str, dict[str, int]]:
        """Per peer, the messages its gate refused, by reason (peers with none left out)."""
        return {p: r for p in self.net.peers if (r := self.net.rejections(p))}

    def _online(self, agent: str, agg: str) -> None:
        """What an agent's node says when it connects (retained): its aggregator samples
        among the agents it has seen online."""
        meta = StatusMeta(state="online", group=agg).model_dump(mode="json")
        self.net.publish(agent, Send(Kind.STATUS, self.topics.status("agent", agent), "", 0,
                                     "online", meta, retain=True))

    def _train(self, agent: str, t: Train) -> Update | Declined | None:
        return None if agent in self.silent else self.trainers[agent](t)

    def run(self, spec: ModelSpec, request_id: str, test: Samples | None = None, *,
            tick_s: float = 1.0, timeout_s: float = 86_400.0,
            on_row: Callable[[RoundRow], None] | None = None) -> MemRun:
        """Request `spec` as the app and drive the network until the job ends, or until
        `timeout_s` of simulated time pass (a TimeoutError)."""
        req = ModelRequest(request_id=request_id, models=[spec])
        (job,) = req.job_ids()
        scorer = _Scorer(self.tasks, spec, test, self.device)
        rows: list[RoundRow] = []
        laps: list[float] = []
        t0 = time.perf_counter()

        def version(peer: str, v: NewVersion) -> None:
            laps.append(time.perf_counter() - t0 - sum(laps))
            ev = scorer(v.params)
            m = v.metrics
            row = RoundRow(v.job, v.version, ev.loss if ev else NAN, ev.metrics if ev else {},
                           v.agents, v.dropped, m.train_loss,
                           m.eval_loss if m.eval_samples else NAN, dict(m.eval_metrics),
                           v.epsilon, v.declines)
            rows.append(row)
            if on_row:
                on_row(row)

        self.net.handlers[NewVersion] = version  # type: ignore[assignment]
        start = self.net.now
        self.net.publish(self.app_id, Send(Kind.REQUEST, self.topics.app_requests(self.app_id),
                                           "", 0, "request", req.model_dump(mode="json")))
        self.net.run()
        while (status := self.app.jobs.get(job)) is None or status.state not in ENDED:
            if self.net.now - start > timeout_s:
                raise TimeoutError(f"job {job} still running after {timeout_s:g} s "
                                   "of simulated time")
            self.net.advance(tick_s)
        return MemRun(rows, status, self.coordinator.jobs[job].spec, time.perf_counter() - t0,
                      laps, self.rejections())


class _Scorer:
    """The task's loss and metrics of a parameter vector on the held-out set (torch)."""

    def __init__(self, tasks: TaskSet, spec: ModelSpec, test: Samples | None,
                 device: torch.device) -> None:
        self.prepared = tasks.prepare(spec.task, spec.options)
        self.test, self.device = test, device
        self.model = self.prepared.build(device)

    def __call__(self, params: np.ndarray) -> Evaluation | None:
        if self.test is None or not len(self.test):
            return None
        unflatten_into(self.model, params)
        return self.prepared.task.evaluate(self.model, self.test, Round(device=self.device))
