"""The message vocabulary, declared once: who sends each kind, on which topic, and what
its header `meta` and its tensors hold. Receivers read the same table.

Every structured field travels in the signed header's `meta` and is validated here with
pydantic (unknown keys refused); tensors travel in the safetensors body and are checked
against the job's parameter count with `expect_tensor`.
"""

from __future__ import annotations

import base64
import hashlib
import math
from dataclasses import dataclass
from enum import Enum
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    JsonValue,
    ValidationError,
    field_validator,
    model_validator,
)

from hfl.errors import Rejected
from hfl.wire.topics import ID_MAX, ID_PATTERN, Route, check_id


class Role(str, Enum):
    COORDINATOR = "coordinator"
    AGGREGATOR = "aggregator"
    AGENT = "agent"
    APP = "app"
    OBSERVER = "observer"  # reads everything (operators' tools), sends only its status


class Kind(str, Enum):
    REQUEST = "request"
    REPLY = "reply"
    JOB = "job"
    MODEL = "model"
    TASK = "task"
    ROUND = "round"
    UPDATE = "update"
    PARTIAL = "partial"
    STATUS = "status"
    TELEMETRY = "telemetry"
    ROSTER = "roster"
    ACK = "ack"


@dataclass(frozen=True)
class Link:
    senders: frozenset[Role]
    routes: tuple[str, ...]  # the topic kinds it travels on (hfl.wire.topics.Route.kind)
    retained: bool
    own_topic: bool = False  # on `{kind}/{role}/{id}`: each sender on its own topic only


def _by(*roles: Role) -> frozenset[Role]:
    return frozenset(roles)


NODES = _by(Role.COORDINATOR, Role.AGGREGATOR, Role.AGENT)  # the services (hfl.runtime.node.Node)

VOCABULARY: dict[Kind, Link] = {
    Kind.REQUEST: Link(_by(Role.APP), ("requests",), retained=False),
    Kind.REPLY: Link(_by(Role.COORDINATOR), ("replies",), retained=False),
    Kind.JOB: Link(_by(Role.COORDINATOR), ("job",), retained=True),
    Kind.MODEL: Link(_by(Role.COORDINATOR), ("model",), retained=True),
    Kind.TASK: Link(_by(Role.COORDINATOR), ("tasks",), retained=False),
    Kind.ROUND: Link(_by(Role.AGGREGATOR), ("rounds", "round_to"), retained=True),
    Kind.UPDATE: Link(_by(Role.AGENT), ("update",), retained=False),
    Kind.PARTIAL: Link(_by(Role.AGGREGATOR), ("partials",), retained=False),
    Kind.STATUS: Link(frozenset(Role), ("status",), retained=True, own_topic=True),
    Kind.TELEMETRY: Link(NODES, ("telemetry",), retained=True, own_topic=True),
    Kind.ROSTER: Link(_by(Role.COORDINATOR), ("roster",), retained=True),
    # On `acks/{sender}/{to}`: a receiver's word that a message arrived (hfl.runtime.delivery).
    Kind.ACK: Link(_by(Role.AGGREGATOR, Role.COORDINATOR), ("ack",), retained=False),
}
# What a receiver acknowledges, and who acknowledges it: kind → the receiver's role.
ACKED = {Kind.UPDATE: Role.AGGREGATOR, Kind.PARTIAL: Role.COORDINATOR,
         Kind.TASK: Role.AGGREGATOR}
KNOWN_TYPES = frozenset(k.value for k in Kind)


def check_route(kind: Kind, route: Route, sender: str, role: Role, group: str | None) -> None:
    """Bind a verified sender to the topic it used: a device may speak only on its own topics.

    `group` is the sender's aggregator for agents (from the roster).
    """
    link = VOCABULARY[kind]
    if route.kind not in link.routes:
        raise Rejected("wrong-topic", f"{kind.value} on a {route.kind} topic")
    if role not in link.senders:
        raise Rejected("wrong-role", f"{kind.value} from {role.value} {sender}")
    if link.own_topic:
        if route.role != role.value or route.id != sender:
            raise Rejected("wrong-sender", f"{kind.value} of {route.role}/{route.id} from "
                           f"{sender}")
        return
    owner = {
        Kind.REQUEST: route.app,
        Kind.ROUND: route.agg,
        Kind.UPDATE: route.agent,
        Kind.PARTIAL: route.agg,
        Kind.ACK: route.id,
    }.get(kind)
    if owner is not None and owner != sender:
        raise Rejected("wrong-sender", f"{kind.value} on {owner}'s topic from {sender}")
    if kind is Kind.UPDATE and group != route.agg:
        raise Rejected("wrong-group", f"agent {sender} belongs to {group}, not {route.agg}")


# ---------------------------------------------------------------- request (app → coordinator)

# check_id validates the alphabet with a clearer message; the pattern is for the schema.
_Id = Annotated[str, Field(min_length=1, max_length=32, json_schema_extra={"pattern": ID_PATTERN})]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecureSpec(_Strict):
    """Secure aggregation (SecAgg+) of each edge round: the aggregator learns only the sum.

    Inputs are fixed point: each coordinate of an agent's weighted delta is clipped to
    `clip`, and an agent's weight saturates at `weight_cap` samples (the bounded weights of
    DP-FedAvg), so the sum of the group fits in 32 bits with room to spare.
    """

    enabled: bool = True
    # Unless given, the degree k and threshold t follow from these two (choose_params in
    # hfl/crypto/secagg.py): a leak below 2^-40, a failed (retried) round below 2^-20, or else the
    # complete graph. Under 1/2 each: t > k/2 holds off neither half the neighbours gone
    # nor half corrupt; corrupt up to 1/3 keeps that choice to milliseconds at n = 1000.
    dropout: float = Field(default=0.2, ge=0, lt=0.5,
                           description="expected fraction of agents that do not finish a round")
    corrupt: float = Field(default=0.1, ge=0, le=1 / 3,
                           description="fraction of agents that may collude with the aggregator")
    threshold: float | None = Field(default=None, gt=0.5, le=1,
                                    description="shares needed, as a fraction of the "
                                    "neighbours (empty: automatic)")
    degree: int = Field(default=0, ge=0, description="neighbours per agent (0: automatic)")
    clip: float = Field(default=2.0, gt=0, le=1e6, description="bound on a delta coordinate")
    weight_cap: float = Field(default=1000.0, gt=0, description="samples of full weight")
    stage_timeout_s: float = Field(default=15.0, gt=0, le=3600,
                                   description="deadline of each key-exchange stage")
    small_groups: Literal["skip", "plain"] = Field(
        default="skip", description="a round that finds fewer than 3 agents (SecAgg+ hides "
        "no one in a group of two): skip the site for the block (it reports why), or plain: "
        "aggregate that round in the clear (the aggregator then sees each update)")


class PrivacySpec(_Strict):
    """Client-level differential privacy (DP-FedAvg): each agent's delta is clipped to L2
    norm `clip` and Gaussian noise of std `noise_multiplier`·`clip` is added to every group
    sum, by the agents as shares (`distributed`: no trust in the aggregator needed) or by
    the aggregator (`edge`). The coordinator spends at most `epsilon` (with `delta`) on the
    job: it calibrates the noise when none is given, refuses a target it cannot meet and
    stops the job before a round that would exceed it. Agents count equally (w = 1)."""

    epsilon: float = Field(gt=0, le=1e4, description="the job's budget ε")
    delta: float = Field(default=1e-5, gt=0, lt=1)
    clip: float = Field(default=1.0, gt=0, le=1e6, description="L2 bound on an agent's delta")
    noise_multiplier: float | None = Field(default=None, ge=0, le=1e3,
                                           description="z (empty: calibrated for epsilon)")
    mode: Literal["distributed", "edge"] = "distributed"
    accountant: Literal["rdp", "pld"] = "rdp"
    adaptive: bool = Field(default=False, description="adaptive clipping (Andrew et al. "
                           "2021): each group's bound follows the target quantile of norms")
    target_quantile: float = Field(default=0.5, gt=0, lt=1)
    clip_lr: float = Field(default=0.2, gt=0, le=10, description="geometric step of the bound")


class MetricSpec(_Strict):
    """One of the task's named metrics (hfl.task.Metric), as a job declares it: how the
    fleet combines the agents' values and how far they may range."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,32}$")
    reduce: Literal["mean", "rms"] = Field(default="mean", description="rms: root of the "
                                           "weighted mean of squares (exact for an RMSE)")
    better: Literal["higher", "lower"] = "higher"
    bound: float = Field(default=64.0, gt=0, le=1e6, description="largest magnitude kept")


_TaskName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,31}$",
                                 description="the task's name (hfl.task.Task.name)")]
_Option = Annotated[JsonValue, Field()]


class ModelSpec(_Strict):
    """One model to train: the unit the coordinator turns into a job.

    The task (hfl.task) is installed on the coordinator and the boards and named here with
    its options. The coordinator fills in what the installed task declares (its version,
    the fingerprint of its parameter layout, its metrics and loss bound, its round settings
    where the request leaves them out) before any aggregator or agent sees the job, and
    agents refuse a job whose task they would read differently."""

    name: _Id
    task: _TaskName
    options: dict[str, _Option] = Field(default_factory=dict, max_length=64,
                                        description="the task's options (its Options model)")
    task_version: str = Field(default="", max_length=64, description="the task's version "
                              "(empty: the coordinator's installed one, filled in)")
    layout: str = Field(default="", pattern=r"^([0-9a-f]{64})?$", description="SHA-256 of "
                        "the parameter layout: names, shapes, dtypes (filled in)")
    metrics: list[MetricSpec] = Field(default_factory=list, max_length=32,
                                      description="the task's named metrics (filled in)")
    loss_bound: float = Field(default=64.0, gt=0, le=1e6, description="losses clip here in "
                              "secure aggregation (filled in from the task)")
    dataset: _Id | None = Field(default=None, description="the boards' data source "
                                "(`[agent.datasets.NAME]`); empty: the task's name")
    aggregators: list[_Id] = Field(min_length=1, max_length=1000)
    rounds: int = Field(default=10, ge=1, le=100_000, description="global rounds (model versions)")
    kappa1: int = Field(default=1, ge=1, le=1000, description="edge rounds per global round")
    epochs: int | None = Field(default=None, ge=1, le=1000, description="empty: the task's")
    batch_size: int | None = Field(default=None, ge=1, le=65_536, description="empty: the task's")
    lr: float | None = Field(default=None, gt=0, le=100, description="empty: the task's")
    momentum: float | None = Field(default=None, ge=0, lt=1, description="empty: the task's")
    server_lr: float = Field(default=1.0, gt=0, le=100, description="global step on the mean")
    server_momentum: float = Field(default=0.0, ge=0, lt=1,
                                   description="FedAvgM: momentum of the global steps")
    client_fraction: float = Field(default=1.0, gt=0, le=1)
    min_agents: int = Field(default=1, ge=1, description="quorum per edge round and aggregator")
    deadline_s: float = Field(default=60.0, gt=0, le=86_400, description="edge round deadline")
    max_retries: int = Field(default=3, ge=0, le=100)
    patience: int = Field(default=0, ge=0, description="stop after this many versions "
                          "without eval-loss improvement (0: off)")
    min_delta: float = Field(default=0.0, ge=0)
    seed: int = Field(default=0, ge=0, lt=2**31)
    secagg: SecureSpec = SecureSpec()
    privacy: PrivacySpec | None = None
    compression: Literal["none", "int8"] = Field(
        default="none", description="int8: each update travels as int8 levels and one scale, "
        "stochastically rounded (about P bytes instead of 4P); plain rounds only")

    @property
    def data_source(self) -> str:
        """The boards' data source this job trains on."""
        return self.dataset or self.task

    def sample_size(self, candidates: int) -> int:
        """Agents an edge round selects among `candidates`: ⌈C·n⌉, at least the quorum."""
        return min(candidates, max(self.min_agents,
                                   math.ceil(self.client_fraction * candidates)))

    @field_validator("name")
    @classmethod
    def _topic_safe(cls, v: str) -> str:
        return check_id(v)

    @field_validator("dataset")
    @classmethod
    def _source_id(cls, v: str | None) -> str | None:
        return None if v is None else check_id(v, "dataset")

    @field_validator("metrics")
    @classmethod
    def _metric_names(cls, v: list[MetricSpec]) -> list[MetricSpec]:
        if len({m.name for m in v}) != len(v):
            raise ValueError("metric names must be distinct")
        return v

    @field_validator("aggregators")
    @classmethod
    def _aggs(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("aggregators must be distinct")
        return [check_id(a, "aggregator") for a in v]

    @model_validator(mode="after")
    def _compression_is_plain(self) -> ModelSpec:
        if self.compression != "none" and self.secagg.enabled:
            raise ValueError(f"compression {self.compression!r} needs secagg.enabled = false: "
                             "SecAgg+ masks fixed-point inputs in a 32-bit ring")
        return self


class ModelRequest(_Strict):
    request_id: _Id
    models: list[ModelSpec] = Field(min_length=1, max_length=16)

    @field_validator("request_id")
    @classmethod
    def _rid(cls, v: str) -> str:
        return check_id(v, "request_id")

    @field_validator("models")
    @classmethod
    def _distinct(cls, v: list[ModelSpec]) -> list[ModelSpec]:
        if len({m.name for m in v}) != len(v):
            raise ValueError("model names must be distinct within a request")
        return v

    @model_validator(mode="after")
    def _job_ids_fit(self) -> ModelRequest:
        for m in self.models:  # a job id is a topic level too: "{request_id}-{name}"
            if len(self.request_id) + 1 + len(m.name) > ID_MAX:
                raise ValueError(f"request_id and model name {m.name!r} make a job id longer "
                                 f"than {ID_MAX} characters: shorten one")
        return self

    def job_ids(self) -> list[str]:
        return [job_id(self.request_id, m.name) for m in self.models]


def job_id(request_id: str, model: str) -> str:
    return check_id(f"{request_id}-{model}", "job")


class ReplyMeta(_Strict):
    """coordinator → the app that sent a request (on its replies topic): what became of it.
    Every request is answered, a malformed one too."""

    request_id: str = Field(max_length=ID_MAX, description="as the request said ('' when it "
                            "could not be read)")
    accepted: list[str] = Field(default_factory=list, max_length=16,
                                description="job ids started, or already running for this "
                                "very request (a repeat)")
    refused: dict[str, str] = Field(default_factory=dict, max_length=17, description="model "
                                    "name ('' for the whole request) → why it was refused")


# ---------------------------------------------------------------- per-kind meta


class Origin(_Strict):
    """The coordinator's signature on a global model version, checked by the agents that
    train from it: an aggregator forwards the model but cannot alter it."""

    signer: str
    digest: str = Field(pattern=r"^[0-9a-f]{64}$")
    signature: str = Field(max_length=100)

    @staticmethod
    def statement(job: str, version: int, digest: str) -> bytes:
        return f"hfl/model/v1\0{job}\0{version}\0{digest}".encode()

    @classmethod
    def sign(cls, signer: str, key: Ed25519PrivateKey, job: str, version: int,
             params: np.ndarray) -> Origin:
        digest = hashlib.sha256(np.ascontiguousarray(params).data).hexdigest()
        sig = key.sign(cls.statement(job, version, digest))
        return cls(signer=signer, digest=digest, signature=base64.b64encode(sig).decode())

    def verify(self, key: Ed25519PublicKey | None, job: str, version: int,
               params: np.ndarray) -> None:
        """Rejected("bad-origin") unless this is `signer`'s signature on exactly `params`."""
        digest = hashlib.sha256(np.ascontiguousarray(params).data).hexdigest()
        if key is None or digest != self.digest:
            raise Rejected("bad-origin", f"model of {job} v{version} does not match its origin")
        try:
            key.verify(base64.b64decode(self.signature, validate=True),
                       self.statement(job, version, digest))
        except (InvalidSignature, ValueError):
            raise Rejected("bad-origin", f"bad signature on {job} v{version}") from None


class TaskMeta(_Strict):
    """coordinator → aggregator: train one block (κ1 edge rounds) of a job from `params`."""

    spec: ModelSpec
    num_params: int = Field(ge=1)
    origin: Origin


class RoundMeta(_Strict):
    """aggregator → agents (retained): an edge round is open for the selected agents.

    The first edge round of a block trains from the global model and carries the
    coordinator's `origin`; later ones (κ1 > 1) from the aggregator's own edge model."""

    spec: ModelSpec
    num_params: int = Field(ge=1)
    block: int = Field(ge=0)
    edge_round: int = Field(ge=0)
    selected: list[str] = Field(max_length=100_000)
    deadline: float  # the aggregator's clock; informative for agents
    origin: Origin | None = None


class Metrics(_Strict):
    """Sample-weighted metrics of one contribution (agent) or a sum of them (partial)."""

    samples: float = Field(ge=0, description="training samples (in a DP job: agents)")
    train_loss: float = Field(default=0.0, allow_inf_nan=False, description="mean training loss")
    eval_samples: float = Field(default=0.0, ge=0, description="held-out samples evaluated")
    eval_loss: float = Field(default=0.0, allow_inf_nan=False,
                             description="mean loss on the agents' held-out data")
    eval_metrics: dict[str, Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=32, description="the task's named metrics on the "
        "agents' held-out data, combined as the job's `metrics` say (e.g. accuracy, rmse)")

    @field_validator("eval_metrics")
    @classmethod
    def _names(cls, v: dict[str, float]) -> dict[str, float]:
        for k in v:
            if not (0 < len(k) <= 32 and k.replace("_", "").replace("-", "").isalnum()):
                raise ValueError(f"metric name {k[:40]!r}: 1-32 letters, digits, '-' or '_'")
        return v


def evaluation_text(m: dict[str, Any]) -> str:
    """A version's federated evaluation as the task reports it, from a metrics document
    (`Metrics.model_dump()`, a job's history row): `loss 0.31, accuracy 0.912`."""
    if not m.get("eval_samples"):
        return "-"
    named = ", ".join(f"{k} {v:.4g}" for k, v in (m.get("eval_metrics") or {}).items())
    return f"loss {m.get('eval_loss', 0.0):.4g}" + (f", {named}" if named else "")


class UpdateMeta(_Strict):
    """agent → aggregator: the delta from the round model, weighted by `metrics.samples`."""

    metrics: Metrics
    clip_bit: float | None = Field(default=None, allow_inf_nan=False,
                                   description="adaptive clipping: [norm <= S] - 1/2, noised")


class DeclineMeta(_Strict):
    """agent → aggregator: it sits this round out, and why (a task it does not have or has
    in another version or layout, no usable data, a task that failed or gave a non-finite
    update). The round goes on without it, and the reason travels on to the coordinator."""

    reason: Literal["no-task", "task-version", "task-layout", "no-data", "bad-data",
                    "task-error", "bad-update"]
    detail: str = Field(default="", max_length=500)


class AckMeta(_Strict):
    """A receiver → the sender of a message it must not lose (on `acks/{receiver}/{sender}`):
    the message named by this header's job, round and stage, of kind `of`, arrived and what
    it changed is saved; do not send it again. An agent's answers in a round are acknowledged
    by its aggregator, a partial by the coordinator, a task by its aggregator
    (docs/reliability.md, "End-to-end delivery")."""

    of: Literal["update", "partial", "task"] = Field(description="the kind acknowledged")
    outcome: Literal["taken", "repeat", "late", "refused"] = Field(
        description="taken: counted now; repeat: it had it already; late: the block it was "
        "for is over; refused: it was refused (`reason`)")
    reason: str = Field(default="", max_length=200, description="why it was refused")


class Release(_Strict):
    """One edge round whose (noised) sum left the group: who could have been sampled."""

    candidates: list[str] = Field(max_length=100_000)
    sampled: int = Field(ge=0)


class PartialMeta(_Strict):
    """aggregator → coordinator: Σ n_i·Δ_i over its group after κ1 edge rounds."""

    weight: float = Field(ge=0)
    agents: int = Field(ge=0)
    dropped: int = Field(default=0, ge=0, description="agents whose masks were recovered")
    failure: str = Field(default="", max_length=500, description="why the block failed")
    releases: list[Release] = Field(default_factory=list, max_length=1000,
                                    description="the block's edge rounds, for DP accounting")
    declined: dict[str, str] = Field(default_factory=dict, max_length=1000, description=
                                     "agents that sat a round of the block out: id → why")
    metrics: Metrics


class ModelMeta(_Strict):
    """coordinator → apps (retained): one global model version."""

    model: str
    job: str
    version: int = Field(ge=0)
    task: str = Field(description="the task that defines the model")
    task_version: str
    options: dict[str, JsonValue] = Field(default_factory=dict, description="the task's "
                                          "options in this job")
    layout: str = Field(description="SHA-256 of the parameter layout")
    inputs: list[list[int]] = Field(description="the ONNX inputs' shapes, each without "
                                    "its batch axis")
    num_params: int
    agents: int = Field(ge=0, description="agents whose updates made this version")
    dropped: int = Field(default=0, ge=0, description="agents that dropped out mid-round")
    declines: int = Field(default=0, ge=0, description="agents that sat the block out (the "
                          "job's history says who and why)")
    epsilon: float | None = Field(default=None, ge=0, description="ε spent (DP jobs)")
    delta: float | None = Field(default=None, description="the job's δ (DP jobs)")
    metrics: Metrics = Field(description="the block's last edge round, over all sites: its "
                             "training loss and the agents' evaluation of the model it started "
                             "from (the previous version when kappa1 = 1)")
    metric_specs: list[MetricSpec] = Field(default_factory=list,
                                           description="what each named metric means")


class JobMeta(_Strict):
    """coordinator → apps (retained): where a job stands."""

    job: str
    app: str
    model: str
    task: str = Field(default="", description="the task that defines the model")
    metric_specs: list[MetricSpec] = Field(default_factory=list,
                                           description="what each named metric means")
    state: Literal["running", "done", "stopped", "failed"]
    reason: str = Field(default="", description="why it ended")
    version: int = Field(ge=0, description="the newest version published")
    rounds: int = Field(description="the versions asked for")
    epsilon: float | None = Field(default=None, ge=0, description="ε spent (DP jobs)")
    delta: float | None = None
    history: list[dict[str, Any]] = Field(default_factory=list, max_length=100_000,
                                          description="one row per version: its metrics, "
                                          "agents, ε, the agents that declined and why, and "
                                          "`missing`: the aggregators not in it and why")


class StatusMeta(_Strict):
    """every node → its status topic (retained; also its Last Will)."""

    state: Literal["online", "offline", "lost"] = Field(
        description="offline: it left cleanly; lost: its Last Will (the connection died)")
    group: str | None = Field(default=None, description="an agent's aggregator")


_Count = Annotated[int, Field(ge=0)]


class _Tolerant(BaseModel):
    """Telemetry, read by operators' tools only: fields a newer service adds are ignored, so
    an older `hfl status` still shows what it knows."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class ActivityMeta(_Tolerant):
    """What a service is on (hfl.runtime.activity): its job, global round (block), edge round and
    the step it took last (a stage it sent or an event such as `round_closed`)."""

    job: str = Field(default="", max_length=ID_MAX)
    block: int | None = Field(default=None, ge=0)
    round: int | None = Field(default=None, ge=0)
    stage: str = Field(default="", max_length=64)


class Counts(_Tolerant):
    """A service's counters since it started (`TelemetryMeta.started`)."""

    messages_in: _Count = Field(description="envelopes accepted: verified, not a repeat")
    messages_out: _Count = Field(description="envelopes sent (not status)")
    bytes_in: _Count = Field(description="MQTT payload bytes received")
    bytes_out: _Count = Field(description="their bytes")
    duplicates: _Count = Field(description="repeats dropped (QoS 1 redelivery, retained copy)")
    connects: _Count
    disconnects: _Count
    internal_errors: _Count = Field(description="messages a bug of ours failed to handle")
    unsendable: _Count = Field(description="messages with no known recipient left")
    checkpoints: _Count = Field(description="state saves (a durable aggregator or "
                                "coordinator)")
    checkpoint_errors: _Count = Field(description="state saves that failed (a full disk): "
                                      "nothing is acknowledged or sent until one works")
    registry_errors: _Count = Field(description="coordinator: versions or job states the "
                                    "registry could not store")
    rounds: _Count = Field(description="aggregator: edge rounds closed; agent: updates sent; "
                           "coordinator: versions published")
    retries: _Count = Field(description="rounds (aggregator) or blocks (coordinator) retried")
    failures: _Count = Field(description="blocks failed (aggregator) or jobs failed "
                             "(coordinator)")
    updates: _Count = Field(description="aggregator: agents' updates in its closed rounds")
    dropped: _Count = Field(description="aggregator: agents whose masks were recovered")


class RoundTimes(_Tolerant):
    """How long rounds took: an aggregator's edge rounds (open to closed), an agent's work
    on one (round open to update sent), the coordinator's global rounds (tasks to version)."""

    count: _Count = 0
    total_s: float = Field(default=0.0, ge=0)
    last_s: float | None = Field(default=None, ge=0)


class Failing(_Tolerant):
    """Something that keeps failing: the last reason, since when, how many times in a row."""

    reason: str = Field(max_length=500)
    since: float = Field(description="the first failure in a row (the node's clock, Unix s)")
    count: int = Field(default=1, ge=1, description="failures in a row (blocks, saves)")
    job: str = Field(default="", max_length=ID_MAX, description="the job (failing blocks)")


class TelemetryMeta(_Tolerant):
    """every service → its telemetry topic (retained): what it is on and its counters,
    published when something changed, at most every `telemetry_s` seconds, and at least
    every `every_s` seconds: older than three times that (and 10 s), it is stale."""

    uptime_s: float = Field(ge=0)
    started: float | None = Field(default=None, description="when the process started (Unix "
                                  "s): its counters count from then")
    restarts: int | None = Field(default=None, ge=0, description="starts before this one on "
                                 "the service's state folder (none: it keeps no state)")
    every_s: float | None = Field(default=None, gt=0, description="the longest it goes "
                                  "without publishing this message")
    failing: Failing | None = Field(default=None, description="aggregator: its blocks fail "
                                    "(a site too small for its secure group, say): why, since")
    saves_failing: Failing | None = Field(default=None, description="its state saves fail "
                                          "now (a full disk): the last error, since when")
    activity: ActivityMeta
    counts: Counts
    round_s: RoundTimes
    rejections: dict[str, _Count] = Field(default_factory=dict, max_length=256,
                                          description="messages refused, by reason")
    declines: dict[str, _Count] = Field(default_factory=dict, max_length=64, description=
                                        "rounds sat out, by reason: an agent's own; an "
                                        "aggregator's, its agents' (no-task, bad-data, ...)")
    epsilon: dict[str, float] = Field(default_factory=dict, max_length=10_000,
                                      description="coordinator: ε spent per DP job")


_M = TypeVar("_M", bound=BaseModel)


def parse_meta(model: type[_M], meta: dict[str, Any], reason: str = "bad-meta") -> _M:
    """Validate a header's meta against its schema; bad meta is `Rejected(reason)`."""
    try:
        return model.model_validate(meta)
    except ValidationError as e:
        raise Rejected(reason, short_error(e)) from None


def short_error(e: ValidationError) -> str:
    errs = e.errors()[:3]
    return "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in errs)


def expect_tensor(
    tensors: dict[str, np.ndarray], name: str, dtype: np.dtype | type, shape: tuple[int, ...]
) -> np.ndarray:
    """The tensor `name` with exactly this dtype and shape, else `Rejected("bad-shape")`."""
    a = tensors.get(name)
    if a is None:
        raise Rejected("bad-shape", f"missing tensor {name!r}")
    if a.dtype != np.dtype(dtype) or a.shape != shape:
        raise Rejected("bad-shape", f"{name}: {a.dtype}{list(a.shape)}, want "
                       f"{np.dtype(dtype)}{list(shape)}")
    return a
