"""The application side: send model requests, receive verified model versions, sealed for
this app and opened with its key.

```python
app = App(identity, roster, device.broker_settings("broker", 8883), models=["digits"])
app.start()
app.request(ModelRequest(request_id="r1", models=[spec]))
for event in app.events(timeout=600):
    if isinstance(event, ModelVersion):
        logits = event.predict(x)          # onnxruntime on the shipped ONNX file
```
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from hfl.actions import Action, Send
from hfl.errors import Rejected
from hfl.identity import Identity, Roster
from hfl.messages import JobMeta, Kind, ModelMeta, ModelRequest, parse_meta
from hfl.mqtt import BrokerSettings
from hfl.node import Node
from hfl.roster_feed import RosterFeed
from hfl.topics import Route, Topics

if TYPE_CHECKING:
    from hfl.envelope import Envelope


@dataclass(frozen=True)
class ModelVersion:
    meta: ModelMeta
    onnx: bytes
    state: dict[str, np.ndarray]  # parameter name → array, as the torch model names them

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch shaped (n, *input_shape), via onnxruntime."""
        return _session(self.onnx).run(["logits"], {"input": np.asarray(x, np.float32)})[0]


@dataclass(frozen=True)
class JobStatus:
    meta: JobMeta

    @property
    def finished(self) -> bool:
        return self.meta.state != "running"


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
    """Turns verified coordinator messages into events; keeps only the newest per topic."""

    events: deque = field(default_factory=deque)
    seen: dict[str, int] = field(default_factory=dict)

    def handle(self, env: Envelope, route: Route, now: float) -> list[Action]:
        if env.type == Kind.MODEL.value:
            meta = parse_meta(ModelMeta, env.meta)
            if meta.version <= self.seen.get(env.topic, -1):
                return []
            onnx = env.tensors.get("onnx")
            if onnx is None or onnx.dtype != np.uint8 or onnx.ndim != 1:
                raise Rejected("bad-shape", "model without an onnx tensor")
            state = {k: v for k, v in env.tensors.items() if k != "onnx"}
            self.seen[env.topic] = meta.version
            self.events.append(ModelVersion(meta, onnx.tobytes(), state))
        elif env.type == Kind.JOB.value:
            self.events.append(JobStatus(parse_meta(JobMeta, env.meta)))
        return []

    def tick(self, now: float) -> list[Action]:
        return []


class App:
    def __init__(self, identity: Identity, roster: Roster, settings: BrokerSettings,
                 topics: Topics | None = None, *, models: list[str],
                 jobs: list[str] | None = None, feed: RosterFeed | None = None) -> None:
        self.topics = topics or Topics()
        self.identity = identity
        self.node = Node(identity, roster, settings, self.topics,
                         self.topics.app_filters(models, jobs), feed=feed)
        self.machine = AppMachine()

    def start(self, timeout: float = 30.0) -> None:
        self.node.start(timeout)

    def stop(self) -> None:
        self.node.stop()

    def request(self, req: ModelRequest) -> list[str]:
        """Publish a model request; returns the job ids the coordinator will create."""
        meta = req.model_dump(mode="json")
        self.node.send(Send(Kind.REQUEST, self.topics.app_requests(self.identity.id), "", 0,
                            "request", meta))
        return req.job_ids()

    def events(self, timeout: float) -> Iterator[ModelVersion | JobStatus]:
        """Yield model versions and job updates as they arrive, until `timeout` seconds pass."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            while self.machine.events:
                yield self.machine.events.popleft()
            self.node.step(self.machine, timeout=0.2)
