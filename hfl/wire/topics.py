"""The MQTT topic tree (DESIGN.md §3): the only place that spells a topic.

Identifiers that become topic levels are restricted to a safe alphabet, so no id can
inject a level separator or a wildcard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hfl.errors import Rejected
from hfl.wire.chunks import CHUNK_LEVEL, split_chunk_topic

DEFAULT_PREFIX = "hfl/v1"
# The routes whose retained messages may outgrow one packet (a model version, a round's
# model, a job's history, the roster of a large fleet): such a message is a retained set,
# its frames on `{topic}/chunk/{index}` (hfl.wire.chunks). Status and telemetry stay whole:
# they are small, and a status is also a Last Will, which is one message.
CHUNKED = frozenset({"job", "model", "rounds", "roster"})
ID_MAX = 64
_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{ID_MAX - 1}}}")
ID_PATTERN = f"^{_ID.pattern}$"  # the same rule as a JSON Schema (ECMA-262) pattern


def check_id(value: str, what: str = "id") -> str:
    """Return `value` if it is a valid topic level for an identifier, else raise ValueError."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(
            f"invalid {what} {value!r}: use 1-64 letters, digits, '_', '.', '-' "
            "(starting with a letter or digit)"
        )
    return value


@dataclass(frozen=True)
class Route:
    """A parsed topic: its kind and the identifiers it names."""

    kind: str
    app: str = ""
    job: str = ""
    model: str = ""
    agg: str = ""
    agent: str = ""
    role: str = ""
    id: str = ""
    to: str = ""  # an acknowledgement's receiver (its sender is `id`)


@dataclass(frozen=True)
class Topics:
    prefix: str = DEFAULT_PREFIX

    def __post_init__(self) -> None:
        levels = self.prefix.split("/")
        if not self.prefix or any(not lv or lv in "+#" for lv in levels):
            raise ValueError(f"invalid topic prefix {self.prefix!r}")

    def app_requests(self, app: str) -> str:
        return f"{self.prefix}/apps/{check_id(app, 'app')}/requests"

    def replies(self, app: str) -> str:
        return f"{self.prefix}/apps/{check_id(app, 'app')}/replies"

    def job(self, job: str) -> str:
        return f"{self.prefix}/coord/jobs/{check_id(job, 'job')}"

    def model(self, model: str) -> str:
        return f"{self.prefix}/coord/models/{check_id(model, 'model')}"

    def tasks(self, agg: str) -> str:
        return f"{self.prefix}/agg/{check_id(agg, 'aggregator')}/tasks"

    def rounds(self, agg: str, job: str) -> str:
        return f"{self.prefix}/agg/{check_id(agg, 'aggregator')}/rounds/{check_id(job, 'job')}"

    def round_to(self, agg: str, job: str, agent: str) -> str:
        """The round topic's level for one agent: what only it may read (its SecAgg+ shares)."""
        return f"{self.rounds(agg, job)}/{check_id(agent, 'agent')}"

    def update(self, agg: str, agent: str) -> str:
        return f"{self.prefix}/agg/{check_id(agg, 'aggregator')}/updates/{check_id(agent, 'agent')}"

    def roster(self) -> str:
        return f"{self.prefix}/coord/roster"

    def partials(self, agg: str) -> str:
        return f"{self.prefix}/coord/partials/{check_id(agg, 'aggregator')}"

    def status(self, role: str, id: str) -> str:
        return f"{self.prefix}/status/{check_id(role, 'role')}/{check_id(id, 'id')}"

    def telemetry(self, role: str, id: str) -> str:
        return f"{self.prefix}/telemetry/{check_id(role, 'role')}/{check_id(id, 'id')}"

    def chunks(self, topic: str) -> str:
        """The filter of the chunk subtopics of a topic (or of a filter's topics): where
        the frames of a retained set on it are retained."""
        return f"{topic}/{CHUNK_LEVEL}/+"

    def chunk_of(self, topic: str) -> tuple[str, int] | None:
        """(topic, index) when `topic` is the chunk subtopic `index` of a topic of this tree
        that may carry retained sets (CHUNKED); None for anything else, a topic of the tree
        included (a job or an agent may be named `chunk`)."""
        cut = split_chunk_topic(topic)
        head = self.prefix + "/"
        if cut is None or not topic.startswith(head) or _match(topic[len(head):].split("/")):
            return None
        try:
            route = self.parse(cut[0])
        except Rejected:
            return None
        return cut if route.kind in CHUNKED else None

    def ack(self, sender: str, to: str) -> str:
        """`sender`'s acknowledgements of what `to` sent it (hfl.runtime.delivery)."""
        return f"{self.prefix}/acks/{check_id(sender, 'sender')}/{check_id(to, 'recipient')}"

    # Subscription filters, one list per role.

    def coordinator_filters(self, coordinator: str = "coordinator") -> list[str]:
        return [
            f"{self.prefix}/apps/+/requests",
            f"{self.prefix}/coord/partials/+",
            f"{self.prefix}/status/aggregator/+",
            f"{self.prefix}/acks/+/{check_id(coordinator, 'coordinator')}",
        ]

    # A role that reads a retained topic of CHUNKED also reads its chunk subtopics (last,
    # after the role's own topics).

    def aggregator_filters(self, agg: str) -> list[str]:
        return [
            self.tasks(agg),
            f"{self.prefix}/agg/{agg}/updates/+",
            f"{self.prefix}/status/agent/+",
            self.roster(),
            self.chunks(self.roster()),
            f"{self.prefix}/acks/+/{agg}",  # the coordinator's, of its partials
            f"{self.prefix}/status/coordinator/+",  # back online: its partials again
        ]

    def agent_filters(self, agg: str, agent: str) -> list[str]:
        rounds = f"{self.prefix}/agg/{check_id(agg, 'aggregator')}/rounds/+"
        # Its aggregator's acknowledgements of its answers, and its status: once the
        # aggregator is back online, unacknowledged answers go again.
        return [rounds, f"{rounds}/{check_id(agent, 'agent')}", self.roster(),
                self.chunks(rounds), self.chunks(self.roster()),
                self.ack(agg, agent), self.status("aggregator", agg)]

    def app_filters(self, models: list[str], jobs: list[str] | None = None,
                    app: str | None = None) -> list[str]:
        """An app's: its models, the jobs (all when None), the roster, and with its id, the
        coordinator's replies to its requests; then the chunk subtopics of the retained
        ones, where a version too large for one packet is retained."""
        out = [self.model(m) for m in models] + ([self.replies(app)] if app else [])
        jobs_ = [self.job(j) for j in jobs] if jobs is not None else [f"{self.prefix}/coord/jobs/+"]
        retained = [self.model(m) for m in models] + jobs_ + [self.roster()]
        return [*out, *jobs_, self.roster(), *map(self.chunks, retained)]

    def observer_filters(self) -> list[str]:
        """What the operator's tools read (hfl status, hfl dashboard): never the rounds,
        updates or models, whose bodies are large and sealed for others anyway."""
        jobs = f"{self.prefix}/coord/jobs/+"
        return [
            f"{self.prefix}/status/+/+",
            f"{self.prefix}/telemetry/+/+",
            jobs,
            self.roster(),
            self.chunks(jobs),
            self.chunks(self.roster()),
        ]

    def parse(self, topic: str) -> Route:
        """Parse a topic of this tree; anything else is `Rejected("unknown-topic")`."""
        head = self.prefix + "/"
        if not topic.startswith(head):
            raise Rejected("unknown-topic", topic[:200])
        parts = topic[len(head) :].split("/")
        route = _match(parts)
        if route is None or any(not _ID.fullmatch(p) for p in _ids(route)):
            raise Rejected("unknown-topic", topic[:200])
        return route


def _match(p: list[str]) -> Route | None:
    n = len(p)
    if n == 3 and p[0] == "apps" and p[2] == "requests":
        return Route("requests", app=p[1])
    if n == 3 and p[0] == "apps" and p[2] == "replies":
        return Route("replies", app=p[1])
    if n == 2 and p == ["coord", "roster"]:
        return Route("roster")
    if n == 3 and p[:2] == ["coord", "jobs"]:
        return Route("job", job=p[2])
    if n == 3 and p[:2] == ["coord", "models"]:
        return Route("model", model=p[2])
    if n == 3 and p[:2] == ["coord", "partials"]:
        return Route("partials", agg=p[2])
    if n == 3 and p[0] == "agg" and p[2] == "tasks":
        return Route("tasks", agg=p[1])
    if n == 4 and p[0] == "agg" and p[2] == "rounds":
        return Route("rounds", agg=p[1], job=p[3])
    if n == 5 and p[0] == "agg" and p[2] == "rounds":
        return Route("round_to", agg=p[1], job=p[3], agent=p[4])
    if n == 4 and p[0] == "agg" and p[2] == "updates":
        return Route("update", agg=p[1], agent=p[3])
    if n == 3 and p[0] == "status":
        return Route("status", role=p[1], id=p[2])
    if n == 3 and p[0] == "telemetry":
        return Route("telemetry", role=p[1], id=p[2])
    if n == 3 and p[0] == "acks":
        return Route("ack", id=p[1], to=p[2])
    return None


def _ids(r: Route) -> list[str]:
    return [v for v in (r.app, r.job, r.model, r.agg, r.agent, r.role, r.id, r.to) if v]
