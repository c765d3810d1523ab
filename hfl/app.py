"""The application side: ask the coordinator for a model, then receive every version of it,
verified (the coordinator's signature, checked against the CA-signed roster) and unsealed
with this app's key. The topic contract itself is docs/asyncapi.yaml.

With the SDK's own MQTT client:

```python
app = App.from_device("pki/devices/app", "broker.lan", 8883, models=["digits"])
app.start()
app.request(name="digits", task="mlp", options={"input_shape": [1, 8, 8], "num_classes": 10},
            dataset="digits", aggregators=["site-a"], rounds=10)
for version in app.models("digits"):
    print(version.meta.version, version.meta.epsilon, version.predict(x).argmax(axis=1))
```

With an MQTT client of your own, `AppWire` is the same app without I/O: subscribe to
`wire.subscriptions(...)`, publish what `wire.request(...)` returns, and feed it every
message received (examples/app_subscriber.py).
"""

from __future__ import annotations

import difflib
import secrets
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from hfl.actions import Action, Send
from hfl.errors import Rejected
from hfl.gate import Gate
from hfl.identity import Identity, Roster
from hfl.messages import (
    JobMeta,
    Kind,
    ModelMeta,
    ModelRequest,
    ModelSpec,
    PrivacySpec,
    ReplyMeta,
    Role,
    SecureSpec,
    parse_meta,
)
from hfl.mqtt import BrokerSettings
from hfl.node import Node, encode_send
from hfl.pki import DeviceFiles, load_ca_cert, load_roster
from hfl.roster_feed import RosterFeed
from hfl.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.envelope import Envelope


# ---------------------------------------------------------------- the request


class RequestError(ValueError):
    """A model request that would be refused, with every problem as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("invalid model request: " + "; ".join(f"{f}: {m}" for f, m in problems))


_FIELDS = sorted({*ModelSpec.model_fields, *SecureSpec.model_fields, *PrivacySpec.model_fields,
                  *ModelRequest.model_fields})


def request(*models: ModelSpec | Mapping[str, Any], request_id: str | None = None,
            **spec: Any) -> ModelRequest:
    """A validated model request: one model's fields as keywords, or several models (specs
    or mappings, e.g. read from TOML). `request_id` defaults to a fresh random id.

    Every problem is reported at once in a `RequestError` that names the field:
    `rounds: must be >= 1 (got 0)`, `models[1].task: ...` when there are several models.
    """
    if spec and models:
        raise TypeError("pass one model's fields as keywords, or models, not both")
    items: list[Any] = [spec] if spec else list(models)
    if not items:
        raise RequestError([("models", "at least one model is required")])
    problems: list[tuple[str, str]] = []
    specs = []
    for i, m in enumerate(items):
        where: tuple[str | int, ...] = ("models", i) if len(items) > 1 else ()
        if isinstance(m, ModelSpec):
            specs.append(m)
        elif not isinstance(m, Mapping):
            problems.append((_path(where) or "model",
                             f"a ModelSpec or a mapping, not {type(m).__name__}"))
        else:
            try:
                specs.append(ModelSpec.model_validate(dict(m)))
            except ValidationError as e:
                problems += _problems(e, where)
    if problems:
        raise RequestError(problems)
    rid = request_id if request_id is not None else "r" + secrets.token_hex(4)
    try:
        return ModelRequest(request_id=rid, models=specs)
    except ValidationError as e:
        raise RequestError(_problems(e)) from None


def _path(loc: tuple[str | int, ...]) -> str:
    """("models", 0, "privacy", "epsilon") → "models[0].privacy.epsilon"."""
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")


def _problems(e: ValidationError, prefix: tuple[str | int, ...] = ()) -> list[tuple[str, str]]:
    out = []
    for err in e.errors(include_url=False):
        where = _path((*prefix, *err["loc"])) or "request_id"  # the job-id length check
        kind, msg = err["type"], str(err["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            close = difflib.get_close_matches(str(err["loc"][-1]), _FIELDS, n=1)
            msg = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else "")
        elif kind == "missing":
            msg = "required"
        elif isinstance(err.get("input"), (int, float, str)) and len(repr(err["input"])) < 40 \
                and repr(err["input"]) not in msg:
            msg += f" (got {err['input']!r})"
        out.append((where, msg))
    return out


def _check_aggregators(req: ModelRequest, roster: Roster) -> None:
    """Refuse what the coordinator would fail the job for: aggregators not in the roster."""
    known = set(roster.by_role(Role.AGGREGATOR))
    problems = []
    for i, spec in enumerate(req.models):
        unknown = [a for a in spec.aggregators if a not in known]
        if unknown:
            where = f"models[{i}].aggregators" if len(req.models) > 1 else "aggregators"
            problems.append((where, f"not enrolled: {', '.join(unknown)} (enrolled "
                                    f"aggregators: {', '.join(sorted(known)) or 'none'})"))
    if problems:
        raise RequestError(problems)


def _request_send(req: ModelRequest, app: str, topics: Topics) -> Send:
    return Send(Kind.REQUEST, topics.app_requests(app), "", 0, "request",
                req.model_dump(mode="json"))


def _build(models: tuple[Any, ...], request_id: str | None, spec: dict[str, Any],
           roster: Roster) -> ModelRequest:
    if len(models) == 1 and isinstance(models[0], ModelRequest) and not spec:
        req = models[0]
    else:
        req = request(*models, request_id=request_id, **spec)
    _check_aggregators(req, roster)
    return req


# ---------------------------------------------------------------- what an app receives


@dataclass(frozen=True)
class ModelVersion:
    meta: ModelMeta  # version, job, task, metrics, ε spent (DP jobs), input shapes
    onnx: bytes
    state: dict[str, np.ndarray]  # parameter name → array, as the torch model names them

    def predict(self, *x: np.ndarray) -> np.ndarray:
        """The model's (first) output for a batch of inputs shaped (n, *meta.inputs[i]),
        via onnxruntime: a classifier's logits, a regression's predictions."""
        session = _session(self.onnx)
        feed = {i.name: np.asarray(a, np.float32) for i, a in zip(session.get_inputs(), x,
                                                                  strict=True)}
        return session.run([session.get_outputs()[0].name], feed)[0]


@dataclass(frozen=True)
class JobStatus:
    meta: JobMeta

    @property
    def finished(self) -> bool:
        return self.meta.state != "running"


@dataclass(frozen=True)
class RequestReply:
    """The coordinator's answer to one of our requests: the jobs it runs for it, and each
    model it refused with the reason ('' for the whole request)."""

    meta: ReplyMeta


Event = ModelVersion | JobStatus | RequestReply

_sessions: dict[int, object] = {}


def _session(onnx: bytes):  # noqa: ANN202 - onnxruntime is imported lazily
    import onnxruntime as ort

    key = hash(onnx)
    if key not in _sessions:
        _sessions.clear()  # keep only the newest model's session
        _sessions[key] = ort.InferenceSession(onnx, providers=["CPUExecutionProvider"])
    return _sessions[key]


@dataclass
class AppMachine:
    """Turns verified coordinator messages into events: each model version once (a retained
    copy seen again is dropped), every job update; keeps the newest state of each job."""

    events: deque = field(default_factory=deque)
    seen: dict[str, int] = field(default_factory=dict)  # job → newest version delivered
    jobs: dict[str, JobMeta] = field(default_factory=dict)

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        if env.type == Kind.MODEL.value:
            meta = parse_meta(ModelMeta, env.meta)
            if meta.model != route.model:
                raise Rejected("bad-meta", f"model {meta.model} on {route.model}'s topic")
            if meta.version <= self.seen.get(meta.job, -1):
                return []
            onnx = env.tensors.get("onnx")
            if onnx is None or onnx.dtype != np.uint8 or onnx.ndim != 1:
                raise Rejected("bad-shape", "model without an onnx tensor")
            state = {k: v for k, v in env.tensors.items() if k != "onnx"}
            self.seen[meta.job] = meta.version
            self.events.append(ModelVersion(meta, onnx.tobytes(), state))
        elif env.type == Kind.JOB.value:
            job = parse_meta(JobMeta, env.meta)
            self.jobs[job.job] = job
            self.events.append(JobStatus(job))
        elif env.type == Kind.REPLY.value:
            self.events.append(RequestReply(parse_meta(ReplyMeta, env.meta)))
        return []

    def tick(self, now: float) -> list[Action]:
        return []


def _open_device(device_dir: Path | str, id: str | None) -> tuple[DeviceFiles, Identity, Roster,
                                                                   RosterFeed]:
    """An app's device folder (from `hfl pki issue PKI ID --role app`): its keys and the
    verified roster, checked to agree. FileNotFoundError / ValueError say what to fix."""
    device_dir = Path(device_dir)
    files = DeviceFiles(device_dir, id or device_dir.name)
    identity = Identity.load(files.dir, files.id, Role.APP)
    roster = load_roster(files.roster, files.ca)
    roster.check_member(identity, str(files.roster))
    return files, identity, roster, RosterFeed(roster, load_ca_cert(files.ca), Topics())


class AppWire:
    """The app without I/O, for an MQTT client of your own (MQTT 5 or 3.1.1, QoS 1).

    Subscribe to `subscriptions(...)`, publish `request(...)`'s (topic, payload) with QoS 1,
    and pass every message received to `feed`: it reassembles chunks and retained sets (a
    version too large for one packet, retained on the model's chunk subtopics, which
    `subscriptions` includes, so a late subscriber gets it whole), checks the signature
    against the roster, opens what is sealed for this app, follows roster updates and
    returns the new model versions, job updates and replies to its requests. Nothing a peer
    sends raises: refusals are counted in `rejections`."""

    def __init__(self, identity: Identity, roster: Roster, topics: Topics | None = None,
                 feed: RosterFeed | None = None) -> None:
        self.identity, self.roster = identity, roster
        self.topics = topics or Topics()
        self.feed_roster = feed
        self.gate = Gate(roster, self.topics, identity=identity)
        self.machine = AppMachine()
        self.files: DeviceFiles | None = None  # from_device: the TLS files for your client

    @classmethod
    def from_device(cls, device_dir: Path | str, id: str | None = None) -> AppWire:
        """The app enrolled in `device_dir` (its id defaults to the folder's name)."""
        files, identity, roster, feed = _open_device(device_dir, id)
        wire = cls(identity, roster, feed=feed)
        wire.files = files
        return wire

    @property
    def rejections(self) -> dict[str, int]:
        return dict(self.gate.rejections)

    @property
    def jobs(self) -> dict[str, JobMeta]:
        return self.machine.jobs

    def subscriptions(self, models: list[str], jobs: list[str] | None = None) -> list[str]:
        """The topic filters to subscribe to: these models, the jobs (all when None), the
        roster and the coordinator's replies to this app."""
        return self.topics.app_filters(models, jobs, self.identity.id)

    def request(self, *models: ModelSpec | Mapping[str, Any] | ModelRequest,
                request_id: str | None = None, **spec: Any) -> tuple[str, bytes, list[str]]:
        """The signed request to publish: (topic, payload, the job ids it creates). Takes
        what `hfl.app.request` takes, or a built ModelRequest; RequestError when invalid."""
        req = _build(models, request_id, spec, self.roster)
        send = _request_send(req, self.identity.id, self.topics)
        return send.topic, encode_send(send, self.identity, self.roster), req.job_ids()

    def feed(self, topic: str, payload: bytes, now: float | None = None) -> list[Event]:
        """One received MQTT message in; the model versions and job updates it completes."""
        now = time.time() if now is None else now
        self.gate.deliver(topic, payload, now, self.feed_roster,
                          lambda env, route: self.machine.handle(env, route, now))
        self.gate.expire(now)
        out = list(self.machine.events)
        self.machine.events.clear()
        return out


class App:
    """An app with its own MQTT session (`hfl.mqtt`): requests models, yields versions."""

    def __init__(self, identity: Identity, roster: Roster, settings: BrokerSettings,
                 topics: Topics | None = None, *, models: list[str],
                 jobs: list[str] | None = None, feed: RosterFeed | None = None) -> None:
        self.topics = topics or Topics()
        self.identity = identity
        self.roster = roster
        self.subscribed = list(models)
        self.node = Node(identity, roster, settings, self.topics,
                         self.topics.app_filters(models, jobs, identity.id), feed=feed)
        self.machine = AppMachine()

    @classmethod
    def from_device(cls, device_dir: Path | str, host: str, port: int = 8883, *,
                    models: list[str], jobs: list[str] | None = None,
                    id: str | None = None) -> App:
        """The app enrolled in `device_dir` (from `hfl pki issue PKI ID --role app`; the id
        defaults to the folder's name), over TLS with its certificate to host:port."""
        files, identity, roster, feed = _open_device(device_dir, id)
        return cls(identity, roster, files.broker_settings(host, port), models=models,
                   jobs=jobs, feed=feed)

    @property
    def jobs(self) -> dict[str, JobMeta]:
        """The newest state of every job seen so far (job id → meta)."""
        return self.machine.jobs

    def start(self, timeout: float = 30.0) -> None:
        self.node.start(timeout)

    def stop(self) -> None:
        self.node.stop()

    def request(self, *models: ModelSpec | Mapping[str, Any] | ModelRequest,
                request_id: str | None = None, **spec: Any) -> list[str]:
        """Publish a model request; returns the job ids the coordinator will create.

        Takes one model's fields as keywords, several models (ModelSpec or mappings), or a
        built ModelRequest; raises RequestError naming each bad field before sending."""
        req = _build(models, request_id, spec, self.roster)
        self.node.send(_request_send(req, self.identity.id, self.topics))
        return req.job_ids()

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Model versions, job updates and replies to our requests as they arrive, until
        `timeout` seconds pass (None: for ever)."""
        end = None if timeout is None else time.monotonic() + timeout
        while end is None or time.monotonic() < end:
            while self.machine.events:
                yield self.machine.events.popleft()
            self.node.step(self.machine, timeout=0.2)

    def models(self, name: str, timeout: float | None = None) -> Iterator[ModelVersion]:
        """Each new version of model `name`, verified and unsealed, with its metrics and
        ε spent (`version.meta`); the newest one first if the coordinator already has one.
        Job updates are kept in `jobs`; use `events` to follow several models at once."""
        if name not in self.subscribed:
            raise ValueError(f"model {name!r} is not subscribed: App(..., models="
                             f"{self.subscribed}) must list it")
        return (e for e in self.events(timeout)
                if isinstance(e, ModelVersion) and e.meta.model == name)
