"""The coordinator's job logic as a sans-I/O state machine.

Events in: model requests from apps, partials from aggregators, `now`.
Actions out: tasks for aggregators, job status for apps, and `NewVersion` (the runner
stores the version, exports ONNX and publishes it: that is I/O, so it is not done here).

A request is decomposed into one job per model and one task per (job, aggregator). Each
block, the coordinator averages the partials it got — Σ_a W_a·Δ_a / Σ_a W_a — into the next
global version, then stops when the rounds are done, when the federated evaluation
loss has not improved for `patience` versions, or — for a DP job — before a block that
could spend more than its privacy budget (`coordinator.budget`).

Checkpoints, as in the aggregator: `changed` names the jobs (`job/{job}`) a message or a
deadline changed, `record` builds each one (the global model, the partials summed so far and
who sent them, the ledger), the runner saves them before anything goes out, and after a
restart `restore` and `resume` carry on between partials with the same global model.

End-to-end delivery (`hfl.runtime.delivery`): each partial is acknowledged (`Kind.ACK`) once saved,
a repeat or a late one too; each task waits in an `Outbox` until its aggregator acknowledges
it (or sends the block's partial), and goes again when the connection comes back
(`reconnected`, with every running job's status), when the aggregator says it is online, or
after a back-off; the block's end ends that.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from coordinator.budget import Budget
from hfl.errors import Rejected
from hfl.models.aggregate import WeightedSum
from hfl.runtime import record as codec
from hfl.runtime.actions import Action, Note, Send
from hfl.runtime.delivery import Outbox, ack, acked
from hfl.runtime.record import stored, transient
from hfl.runtime.state import Record
from hfl.wire.messages import (
    JobMeta,
    Kind,
    Metrics,
    ModelRequest,
    ModelSpec,
    Origin,
    PartialMeta,
    ReplyMeta,
    Role,
    StatusMeta,
    TaskMeta,
    expect_tensor,
    job_id,
    parse_meta,
)
from hfl.wire.topics import ID_MAX, Route, Topics

if TYPE_CHECKING:
    from hfl.crypto.identity import Identity, Roster
    from hfl.wire.envelope import Envelope

# A requested spec → the job's spec, filled in from its installed task (hfl.models.tasks.TaskSet
# .resolve), and its initial parameters; ValueError when the task cannot run it.
Prepare = Callable[[ModelSpec], "tuple[ModelSpec, np.ndarray]"]

# How long past the aggregators' own deadlines the coordinator waits for a block.
GRACE_S = 10.0
# After a restart, a block gets at least this long to take in what the broker kept for us.
RESUME_GRACE_S = 5.0


@dataclass(frozen=True)
class NewVersion:
    """Store, export and publish version `version` of `job`'s model."""

    job: str
    app: str
    spec: ModelSpec
    version: int
    params: np.ndarray
    metrics: Metrics
    agents: int
    dropped: int = 0
    epsilon: float | None = None
    declines: int = 0


def _dump_acc(acc: WeightedSum | None) -> tuple[dict | None, np.ndarray | None]:
    return acc.state() if acc is not None else (None, None)


def _load_acc(doc: dict | None, total: np.ndarray | None, job: Job,
              ctx: Mapping[str, Any]) -> WeightedSum | None:
    if doc is None:
        return None
    if total is None:
        raise ValueError("a running sum without its array")
    return WeightedSum.restore(doc, total, job.spec.metrics)


def _dump_budget(budget: Budget | None) -> tuple[dict | None, None]:
    return (budget.ledger.to_doc() if budget is not None else None), None


def _load_budget(ledger: dict | None, _: np.ndarray | None, job: Job,
                 ctx: Mapping[str, Any]) -> Budget | None:
    return None if ledger is None else Budget.restore(job.spec, ctx["group"], ledger)


@dataclass
class Job:
    """A job: its record (`job/{job}`) is this, declared (`hfl.runtime.record`)."""

    job: str = field(metadata=transient)  # the record's key
    app: str
    spec: ModelSpec
    params: np.ndarray
    version: int = 0
    attempt: int = 0
    # The partials summed so far in this block.
    acc: WeightedSum | None = field(default=None, metadata=stored(dump=_dump_acc,
                                                                  load=_load_acc))
    reported: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)  # this block's, from the aggregators
    declined: dict[str, str] = field(default_factory=dict)  # this block's: agent → why
    agents: int = 0
    dropped: int = 0
    deadline: float = 0.0
    state: str = "running"
    reason: str = ""
    best_loss: float = float("inf")
    since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    # DP jobs: the privacy ledger.
    budget: Budget | None = field(default=None, metadata=stored("ledger", dump=_dump_budget,
                                                                load=_load_budget))
    velocity: np.ndarray | None = None  # server momentum
    requested: dict[str, Any] = field(default_factory=dict)  # the spec as the app asked

    @property
    def num_params(self) -> int:
        return int(self.params.size)

    def latest(self) -> NewVersion:
        """The newest version again, from the job's history (its last row)."""
        row = self.history[-1]
        metrics = Metrics(**{k: row[k] for k in Metrics.model_fields if k in row})
        return NewVersion(self.job, self.app, self.spec, self.version, self.params, metrics,
                          row["agents"], row["dropped"], row["epsilon"], row.get("declines", 0))


def missing_sites(job: Job) -> dict[str, str]:
    """The block's aggregators without a contribution, and why: the failure each reported
    (a site too small for its secure group, say), or none by the deadline."""
    out = {}
    for failure in job.failures:  # "{aggregator}: {why}" (an id has no colon)
        agg, _, why = failure.partition(": ")
        out[agg] = why
    for agg in job.spec.aggregators:
        if agg not in job.reported:
            out[agg] = "no partial by the deadline"
    return out


def block_timeout(spec: ModelSpec) -> float:
    """The longest an aggregator may take for a block, retries included."""
    return spec.kappa1 * spec.deadline_s * (spec.max_retries + 1) + GRACE_S


class CoordinatorMachine:
    def __init__(
        self,
        aggregators: Callable[[], list[str]],
        prepare: Prepare,
        topics: Topics,
        sign: Callable[[str, int, np.ndarray], Origin],
        group: Callable[[str], list[str]],
        taken: Callable[[str], bool] = lambda job: False,
        me: str = "coordinator",
    ) -> None:
        self.me = me  # our id: the sender level of our acknowledgements' topic
        self.aggregators = aggregators  # the enrolled aggregators (the roster may change)
        self.taken = taken  # a job id the registry has from an earlier job
        self.group = group  # an aggregator's enrolled agents, for privacy accounting
        self.prepare = prepare
        self.sign = sign  # our signature on a model version, which agents check
        self.topics = topics
        self.jobs: dict[str, Job] = {}
        self.changed: set[str] = set()  # records to save before anything goes out
        self.outbox = Outbox()  # tasks not yet acknowledged by their aggregators

    @classmethod
    def of(cls, identity: Identity, roster: Roster, topics: Topics, prepare: Prepare,
           taken: Callable[[str], bool] = lambda job: False) -> CoordinatorMachine:
        """The coordinator `identity`: its aggregators and their agents are `roster`'s (as it
        changes), and it signs each model version with its own key."""
        return cls(lambda: roster.by_role(Role.AGGREGATOR), prepare, topics,
                   lambda job, version, params: Origin.sign(identity.id, identity.key, job,
                                                            version, params),
                   roster.group, taken, identity.id)

    # ------------------------------------------------------------------ events

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        if env.type == Kind.REQUEST.value:
            return self._request(env, route, now)
        if env.type == Kind.PARTIAL.value:
            try:
                out = self._partial(env, now)
            except Rejected as r:  # acknowledged all the same: a copy would be refused too
                raise Rejected(r.reason, r.detail, answer=[
                    *r.answer, ack(self.me, self.topics, env, "refused", str(r))]) from None
            said = {a.event for a in out if isinstance(a, Note)}
            outcome = "late" if "late" in said else "repeat" if "duplicate" in said else "taken"
            return [*out, ack(self.me, self.topics, env, outcome)]
        if env.type == Kind.STATUS.value:
            if route.role == Role.AGGREGATOR.value and parse_meta(
                    StatusMeta, env.meta).state == "online":  # so subscribed: its tasks again
                return list(self.outbox.peer_online(env.sender, now))
            return []
        if env.type == Kind.ACK.value:
            key, meta = acked(env)
            self.outbox.ack(key)
            if meta.outcome == "refused":
                return [Note("task_refused", {"job": env.job, "block": env.round,
                                              "aggregator": env.sender, "reason": meta.reason})]
            return []
        raise Rejected("unexpected-type", f"coordinator does not take {env.type}")

    def reconnected(self, now: float) -> list[Action]:
        """The connection is back, maybe to a broker that lost every session and retained
        message: the tasks not yet acknowledged, and each running job's status (retained)."""
        return [*self.outbox.reconnected(now),
                *(self._status(j) for j in self.jobs.values() if j.state == "running")]

    def tick(self, now: float) -> list[Action]:
        again, gone = self.outbox.due(now)
        out: list[Action] = [*again, *(Note("gave_up", {"job": k.job, "block": k.round,
                                                        "aggregator": k.to}) for k in gone)]
        for job in list(self.jobs.values()):
            if job.state != "running" or now < job.deadline:
                continue
            assert job.acc is not None
            self.changed.add(f"job/{job.job}")
            if job.acc.weight > 0:
                out += self._finish_block(job, now)
            elif job.attempt < job.spec.max_retries:
                job.attempt += 1
                out += [Note("block_retry", {"job": job.job, "block": job.version}),
                        *self._start_block(job, now)]
            else:
                out += self._end(job, "failed", "no aggregator delivered a partial")
        return out

    def _request(self, env: Envelope, route: Route, now: float) -> list[Action]:
        """Start a job per model; answer the app either way (its replies topic).

        A job id (`{request_id}-{model}`) names one job for ever: the same app sending the
        same request again gets the running job back (an idempotent repeat); any other use
        of a taken id — another app, another spec, a job from an earlier run kept in the
        registry — is refused, never merged. A job that failed before its first block may
        be asked for again by its app."""
        try:
            req = parse_meta(ModelRequest, env.meta, reason="bad-request")
        except Rejected as r:
            rid = env.meta.get("request_id")
            rid = rid if isinstance(rid, str) and len(rid) <= ID_MAX else ""
            raise Rejected(r.reason, r.detail,
                           answer=[self._reply(route.app, rid, refused={"": r.detail})]) from None
        out: list[Action] = []
        accepted, refused = [], {}
        known = set(self.aggregators())
        for spec in req.models:
            jid = job_id(req.request_id, spec.name)
            why = self._taken(jid, route.app, spec)
            if why == "repeat":
                accepted.append(jid)
                out += [Note("duplicate", {"job": jid}), self._status(self.jobs[jid])]
                continue
            if why:
                refused[spec.name] = why
                out.append(Note("request_refused", {"job": jid, "app": route.app, "why": why}))
                continue
            requested = spec.model_dump(mode="json")
            unknown = [a for a in spec.aggregators if a not in known]
            budget = None
            try:
                if unknown:
                    raise ValueError(f"unknown aggregators: {', '.join(unknown)}")
                spec, params = self.prepare(spec)  # the task's version, layout, metrics
                if spec.privacy is not None:
                    budget = Budget(spec, self.group)
                    spec = budget.spec  # with the noise multiplier resolved
                params = np.ascontiguousarray(params, dtype=np.float32)
            except ValueError as e:
                job = Job(jid, route.app, spec, np.zeros(1, np.float32), requested=requested)
                self.jobs[jid] = job
                self.changed.add(f"job/{jid}")
                out += self._end(job, "failed", str(e))
                refused[spec.name] = str(e)[:500]
                continue
            job = Job(jid, route.app, spec, params, budget=budget, requested=requested)
            self.jobs[jid] = job
            self.changed.add(f"job/{jid}")
            accepted.append(jid)
            out.append(Note("job_started", {"job": jid, "app": route.app, "model": spec.name,
                                            "params": job.num_params}))
            out += self._start_block(job, now)
            if job.state == "running":
                out.append(self._status(job))
        return [*out, self._reply(route.app, req.request_id, accepted, refused)]

    def _taken(self, jid: str, app: str, spec: ModelSpec) -> str:
        """'' when `jid` is free for this request, 'repeat' when it is this very request
        again, else why it cannot be used."""
        job = self.jobs.get(jid)
        if job is None:
            if self.taken(jid):
                return (f"job id {jid} belongs to an earlier job in the model registry: "
                        "choose another request_id")
            return ""
        if job.app != app:
            return f"job id {jid} belongs to another app: choose another request_id"
        if job.state == "failed" and job.version == 0:
            return ""  # it never started: the app may try again
        if job.requested == spec.model_dump(mode="json"):
            return "repeat"
        return (f"job id {jid} is taken by an earlier request of yours with another spec: "
                "choose another request_id")

    def _reply(self, app: str, request_id: str, accepted: list[str] | None = None,
               refused: dict[str, str] | None = None) -> Send:
        meta = ReplyMeta(request_id=request_id, accepted=accepted or [],
                         refused={k: v[:500] for k, v in (refused or {}).items()})
        return Send(Kind.REPLY, self.topics.replies(app), "", 0, "reply",
                    meta.model_dump(mode="json"))

    def _partial(self, env: Envelope, now: float) -> list[Action]:
        job = self.jobs.get(env.job)
        if job is not None and env.sender not in job.spec.aggregators:
            raise Rejected("not-in-job", env.sender)
        if job is not None and (env.round < job.version or (
                env.round == job.version and job.state != "running")):
            # A block already averaged (or a job ended): an aggregator that restarted sends
            # its partial again. A repeat, not a fault.
            return [Note("late", {"job": job.job, "aggregator": env.sender,
                                  "block": env.round})]
        if job is None or env.round != job.version:
            raise Rejected("stale-round", f"partial for {env.job}/{env.round}")
        # The partial says the task arrived: it need not go again.
        self.outbox.forget(job.job, kind=Kind.TASK.value, round=env.round, to=env.sender)
        if env.sender in job.reported:
            return [Note("duplicate", {"job": job.job, "aggregator": env.sender})]
        meta = parse_meta(PartialMeta, env.meta)
        assert job.acc is not None
        try:
            job.acc.check_metrics(meta.metrics)
        except ValueError as e:
            raise Rejected("bad-meta", str(e)) from None
        if meta.weight > 0:
            total = expect_tensor(env.tensors, "sum", np.float32, (job.num_params,))
            job.acc.add_weighted(total, meta.weight, meta.metrics)
            job.agents += meta.agents
            job.dropped += meta.dropped
            if job.budget is not None:
                job.budget.record(meta.releases)
        else:
            job.acc.add_metrics(meta.metrics)
            job.failures.append(f"{env.sender}: {meta.failure or 'no partial'}")
        job.declined.update(meta.declined)
        job.reported.add(env.sender)
        self.changed.add(f"job/{job.job}")
        if job.reported >= set(job.spec.aggregators):
            return self._finish_block(job, now)
        return []

    # ------------------------------------------------------------------ checkpoints

    def record(self, key: str) -> Record | None:
        job = self.jobs.get(key.partition("/")[2])
        return codec.dump(job) if job is not None else None

    def restore(self, records: dict[str, Record]) -> None:
        """Take back what `record` saved (before the node starts)."""
        for key, rec in records.items():
            jid = key.partition("/")[2]
            self.jobs[jid] = codec.load(Job, rec, job=jid, group=self.group)

    def resume(self, now: float) -> list[Action]:
        """After `restore`: every job's newest version and status, and for a running job the
        task again to each aggregator that has not reported (an aggregator answers a repeat
        with the partial it has, or carries on). The runner leaves out what it finds stored
        already; receivers take the rest as repeats."""
        out: list[Action] = []
        for job in self.jobs.values():
            if job.version > 0 and job.history:
                out.append(job.latest())
            out.append(self._status(job))
            if job.state == "running":
                job.deadline = max(job.deadline, now + RESUME_GRACE_S)
                missing = [a for a in job.spec.aggregators if a not in job.reported]
                out += self._tasks(job, missing)
                self.changed.add(f"job/{job.job}")
            out.append(Note("resumed", {"job": job.job, "version": job.version,
                                        "state": job.state, "reported": sorted(job.reported)}))
        return out

    # ------------------------------------------------------------------ transitions

    def _start_block(self, job: Job, now: float) -> list[Action]:
        if job.budget is not None and job.budget.next_block_exceeds():
            return self._end(job, "stopped", f"privacy budget: the next block could exceed "
                             f"ε = {job.budget.privacy.epsilon:g} (spent "
                             f"{job.budget.spent():.3g})")
        job.acc = WeightedSum(job.num_params, job.spec.metrics)
        job.reported, job.failures, job.declined = set(), [], {}
        job.agents = job.dropped = 0
        job.deadline = now + block_timeout(job.spec)
        self.outbox.forget(job.job, kind=Kind.TASK.value)  # an earlier block's: over
        return self._tasks(job, job.spec.aggregators)

    def _tasks(self, job: Job, aggregators: list[str]) -> list[Action]:
        """The block's task to each of `aggregators`, kept until it acknowledges it."""
        origin = self.sign(job.job, job.version, job.params)
        meta = TaskMeta(spec=job.spec, num_params=job.num_params, origin=origin)
        return [
            self.outbox.track(Send(Kind.TASK, self.topics.tasks(agg), job.job, job.version,
                                   "train", meta.model_dump(mode="json"),
                                   {"params": job.params}, to=(agg,)), agg)
            for agg in aggregators
        ]

    def _finish_block(self, job: Job, now: float) -> list[Action]:
        acc = job.acc
        assert acc is not None
        if acc.weight <= 0:
            why = "; ".join(job.failures) or "no aggregator delivered a partial"
            return self._end(job, "failed", f"every aggregator failed the block ({why})")
        step = acc.mean()
        if job.spec.server_momentum:  # FedAvgM: smooths the noisy steps of DP-FedAvg
            job.velocity = step if job.velocity is None else (
                np.float32(job.spec.server_momentum) * job.velocity + step)
            step = job.velocity
        job.params = job.params + np.float32(job.spec.server_lr) * step
        job.version += 1
        job.attempt = 0
        metrics = acc.metrics()
        eps = job.budget.spent() if job.budget is not None else None
        row = {"version": job.version, "agents": job.agents, "dropped": job.dropped,
               "aggregators": len(job.reported), "epsilon": eps,
               # who sat the block out and why (the first few: the row is retained, per version)
               "declines": len(job.declined), "declined": dict(list(job.declined.items())[:20]),
               **metrics.model_dump()}
        row["missing"] = missing = missing_sites(job)  # sites not in it, and why
        job.history.append(row)
        out: list[Action] = [
            NewVersion(job.job, job.app, job.spec, job.version, job.params, metrics, job.agents,
                       job.dropped, eps, len(job.declined)),
            Note("version", {"job": job.job, **row}),
        ]
        if missing:
            out.append(Note("sites_missing", {"job": job.job, "version": job.version,
                                              "missing": missing}, logging.WARNING,
                            f"job {job.job} version {job.version} was made without "
                            + "; ".join(f"{a} ({why})" for a, why in sorted(missing.items()))))
        if metrics.eval_samples > 0:
            if metrics.eval_loss < job.best_loss - job.spec.min_delta:
                job.best_loss, job.since_best = metrics.eval_loss, 0
            else:
                job.since_best += 1
        if job.version >= job.spec.rounds:
            return out + self._end(job, "done", f"{job.version} rounds")
        if job.spec.patience and job.since_best >= job.spec.patience:
            return out + self._end(job, "stopped", f"eval loss flat for {job.since_best} versions")
        more = self._start_block(job, now)
        if job.state != "running":  # stopped by the budget: the version, then why it ended
            return out + more
        # The next block's tasks go out first: storing and exporting the version (ONNX) is
        # the runner's slowest step, and the fleet need not wait for it.
        return more + out + [self._status(job)]

    def _end(self, job: Job, state: str, reason: str) -> list[Action]:
        job.state, job.reason, job.acc = state, reason, None
        self.outbox.forget(job.job)
        level = logging.WARNING if state == "failed" else logging.INFO
        return [self._status(job), Note("job_ended", {"job": job.job, "state": state,
                                                      "reason": reason}, level,
                                        f"job {job.job} {state}: {reason}")]

    def _status(self, job: Job) -> Send:
        b = job.budget
        meta = JobMeta(job=job.job, app=job.app, model=job.spec.name, task=job.spec.task,
                       metric_specs=job.spec.metrics, state=job.state,  # type: ignore[arg-type]
                       reason=job.reason, version=job.version, rounds=job.spec.rounds,
                       epsilon=b.spent() if b else None, delta=b.privacy.delta if b else None,
                       history=job.history)
        return Send(Kind.JOB, self.topics.job(job.job), job.job, job.version, job.state,
                    meta.model_dump(mode="json"), retain=True)
