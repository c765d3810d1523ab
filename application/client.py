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

import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import DeviceFiles, load_ca_cert, load_roster
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import Node, encode_send
from hfl.runtime.roster_feed import RosterFeed
from hfl.wire.gate import Gate
from hfl.wire.messages import (
    JobMeta,
    ModelRequest,
    ModelSpec,
    Role,
)
from hfl.wire.topics import Topics

if TYPE_CHECKING:
    pass
from application.machine import (
    AppMachine,
    Event,
    ModelVersion,
    build_request,
    request_send,
)


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
        req = build_request(models, request_id, spec, self.roster)
        send = request_send(req, self.identity.id, self.topics)
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
    """An app with its own MQTT session (`hfl.runtime.mqtt`): requests models, yields versions."""

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
        req = build_request(models, request_id, spec, self.roster)
        self.node.send(request_send(req, self.identity.id, self.topics))
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
