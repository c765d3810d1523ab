"""The application layer without I/O: building a model request, and turning the
coordinator's verified messages into an app's events (AppMachine). `application.client`
runs it over MQTT; the topic contract itself is docs/asyncapi.yaml."""


from __future__ import annotations

import difflib
import secrets
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from pydantic import ValidationError

from hfl.crypto.identity import Roster
from hfl.errors import Rejected
from hfl.runtime.actions import Action, Send
from hfl.wire.messages import (
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
from hfl.wire.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.wire.envelope import Envelope


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


def check_aggregators(req: ModelRequest, roster: Roster) -> None:
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


def request_send(req: ModelRequest, app: str, topics: Topics) -> Send:
    return Send(Kind.REQUEST, topics.app_requests(app), "", 0, "request",
                req.model_dump(mode="json"))


def build_request(models: tuple[Any, ...], request_id: str | None, spec: dict[str, Any],
           roster: Roster) -> ModelRequest:
    if len(models) == 1 and isinstance(models[0], ModelRequest) and not spec:
        req = models[0]
    else:
        req = request(*models, request_id=request_id, **spec)
    check_aggregators(req, roster)
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
