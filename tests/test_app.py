"""The app SDK without a broker: building and validating requests, and `AppWire` turning
real coordinator payloads (signed, sealed, chunked) into model versions."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from application import App, AppWire, JobStatus, ModelVersion, RequestError, request
from coordinator.export import export_onnx
from coordinator.machine import NewVersion
from coordinator.runner import model_message
from hfl.crypto.identity import Identity, Roster
from hfl.crypto.pki import Pki
from hfl.models.tasks import TaskSet, state_arrays, unflatten_into
from hfl.runtime.mqtt import BrokerSettings
from hfl.runtime.node import encode_send
from hfl.wire import envelope
from hfl.wire.chunks import split
from hfl.wire.messages import KNOWN_TYPES, Metrics, ModelRequest, ModelSpec, Role
from hfl.wire.topics import Topics

SPEC = dict(name="digits", task="logreg", options={"input_shape": [1, 8, 8], "num_classes": 10},
            dataset="digits", aggregators=["site-a"])


# ---------------------------------------------------------------- request()


def test_request_from_keywords_is_a_valid_request_with_a_fresh_id() -> None:
    a, b = request(**SPEC, rounds=3), request(**SPEC)
    assert isinstance(a, ModelRequest) and a.models[0].rounds == 3
    assert a.request_id != b.request_id
    assert a.job_ids() == [f"{a.request_id}-digits"]
    both = request(SPEC, {**SPEC, "name": "other"}, request_id="r7")
    assert both.job_ids() == ["r7-digits", "r7-other"]
    spec = ModelSpec(**SPEC)
    assert request(spec, request_id="r8").models == [spec]


def test_every_bad_field_is_named_at_once() -> None:
    with pytest.raises(RequestError) as e:
        request(**{**SPEC, "task": "res net", "rounds": 0, "epoch": 2,
                   "privacy": {"epsilon": -1}})
    fields = dict(e.value.problems)
    assert set(fields) == {"task", "rounds", "epoch", "privacy.epsilon"}
    assert "pattern" in fields["task"] and "(got 'res net')" in fields["task"]
    assert "(got 0)" in fields["rounds"]
    assert fields["epoch"] == "unknown field (did you mean 'epochs'?)"
    assert str(e.value).startswith("invalid model request: ")


def test_problems_of_several_models_say_which_model() -> None:
    with pytest.raises(RequestError) as e:
        request(SPEC, {"name": "bad name"}, 3)
    fields = dict(e.value.problems)
    assert "models[1].name" in fields and "models[1].task" in fields
    assert fields["models[1].task"] == "required"
    assert fields["models[2]"] == "a ModelSpec or a mapping, not int"
    assert not any(f.startswith("models[0]") for f in fields)


def test_request_level_problems() -> None:
    with pytest.raises(RequestError, match="at least one model"):
        request()
    with pytest.raises(RequestError, match="model names must be distinct"):
        request(SPEC, SPEC)
    long = {**SPEC, "name": "m" * 32}
    with pytest.raises(RequestError) as e:  # the job id would not fit in a topic level
        request(long, request_id="r" * 32)
    assert e.value.problems[0][0] == "request_id"
    assert request(long, request_id="r" * 31).job_ids()[0] == "r" * 31 + "-" + "m" * 32
    with pytest.raises(TypeError):
        request(SPEC, name="x")


# ---------------------------------------------------------------- AppWire


@pytest.fixture
def fleet() -> dict[str, Identity]:
    ids = {i: Identity.generate(i, r) for i, r in [
        ("coordinator", Role.COORDINATOR), ("site-a", Role.AGGREGATOR), ("app", Role.APP),
        ("other-app", Role.APP)]}
    return ids


def _roster(ids: dict[str, Identity]) -> Roster:
    roster = Roster()
    for identity in ids.values():
        roster.enroll(identity)
    return roster


def _version(ids, roster, version: int, job: str = "r1-digits", app: str = "app",
             epsilon: float | None = 0.5) -> tuple[str, bytes, np.ndarray]:
    """A model version as the coordinator publishes it: real export, real envelope."""
    spec, p = TaskSet.everything_installed().resolve(ModelSpec(**SPEC))
    params = p.init_params(seed=version)
    model = p.build()
    unflatten_into(model, params)
    m = Metrics(samples=60, eval_samples=10, eval_metrics={"accuracy": 0.5})
    v = NewVersion(job, app, spec, version, params, m, agents=3, epsilon=epsilon)
    send = model_message(v, Topics(), export_onnx(model, p.example_input()),
                         state_arrays(model), [[1, 8, 8]])
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    return send.topic, encode_send(send, ids["coordinator"], roster), logits


def test_a_sealed_chunked_model_version_arrives_once_verified_and_runs(fleet) -> None:
    roster = _roster(fleet)
    wire = AppWire(fleet["app"], roster)
    topic, data, logits = _version(fleet, roster, 1)
    frames = split(data, 1024)
    assert len(frames) > 3
    got = [e for f in frames for e in wire.feed(topic, f)]
    assert len(got) == 1 and isinstance(got[0], ModelVersion)
    v = got[0]
    assert (v.meta.version, v.meta.epsilon, v.meta.metrics.eval_metrics) == (
        1, 0.5, {"accuracy": 0.5})
    assert (v.meta.task, v.meta.inputs, [m.name for m in v.meta.metric_specs]) == (
        "logreg", [[1, 8, 8]], ["accuracy"])
    torch_names = set(TaskSet.everything_installed().prepare(
        "logreg", SPEC["options"]).build().state_dict())
    assert set(v.state) == torch_names and all(a.dtype == np.float32 for a in v.state.values())
    x = np.random.default_rng(0).random((5, 1, 8, 8), dtype=np.float32)
    np.testing.assert_allclose(v.predict(x), logits, rtol=1e-5, atol=1e-6)
    assert wire.feed(topic, data) == []  # the retained copy again: not a new version
    _, older, _ = _version(fleet, roster, 1)
    assert wire.feed(topic, older) == []  # another envelope of a version already seen
    _, newer, _ = _version(fleet, roster, 2)
    assert [e.meta.version for e in wire.feed(topic, newer)] == [2]
    _, next_job, _ = _version(fleet, roster, 1, job="r2-digits")  # a new job starts at 1
    assert [e.meta.job for e in wire.feed(topic, next_job)] == ["r2-digits"]
    assert wire.rejections == {}


def test_forged_or_foreign_versions_are_refused_without_raising(fleet) -> None:
    roster = _roster(fleet)
    wire = AppWire(fleet["app"], roster)
    topic, data, _ = _version(fleet, roster, 1, app="other-app")
    assert wire.feed(topic, data) == []  # sealed for another app: not ours to open
    assert wire.gate.counters["not_for_us"] == 1
    mallory = Identity.generate("coordinator", Role.COORDINATOR)
    forged_roster = _roster({**fleet, "coordinator": mallory})
    topic, forged, _ = _version({**fleet, "coordinator": mallory}, forged_roster, 2)
    assert wire.feed(topic, forged) == []
    assert wire.feed(Topics().model("other"), data) == []  # replayed on another topic
    assert wire.feed(topic, b"HFL1 garbage") == []
    assert wire.rejections == {"bad-signature": 1, "wrong-topic": 1, "malformed": 1}


def test_job_updates_are_events_and_kept(fleet) -> None:
    roster = _roster(fleet)
    wire = AppWire(fleet["app"], roster)
    topic = Topics().job("r1-digits")
    meta = {"job": "r1-digits", "app": "app", "model": "digits", "state": "done",
            "reason": "3 rounds", "version": 3, "rounds": 3, "epsilon": 2.5}
    data = envelope.encode(type="job", topic=topic, job="r1-digits", round=3, stage="done",
                           sender="coordinator", key=fleet["coordinator"].key, meta=meta)
    [event] = wire.feed(topic, data)
    assert isinstance(event, JobStatus) and event.finished
    assert wire.jobs["r1-digits"].epsilon == 2.5


def test_wire_request_is_a_signed_request_on_the_apps_topic(fleet) -> None:
    roster = _roster(fleet)
    wire = AppWire(fleet["app"], roster)
    topic, payload, jobs = wire.request(**SPEC, request_id="r9")
    assert topic == "hfl/v1/apps/app/requests" and jobs == ["r9-digits"]
    env = envelope.decode(payload, topic=topic, public_key=roster.public_key,
                          known_types=KNOWN_TYPES)
    assert env.type == "request" and not env.header.sealed
    assert ModelRequest.model_validate(env.meta).models[0].name == "digits"
    with pytest.raises(RequestError) as e:  # the coordinator would fail such a job
        wire.request(**{**SPEC, "aggregators": ["site-a", "site-z"]})
    assert e.value.problems == [("aggregators", "not enrolled: site-z (enrolled aggregators: "
                                                "site-a)")]
    assert wire.subscriptions(["digits"]) == ["hfl/v1/coord/models/digits",
                                              "hfl/v1/apps/app/replies",
                                              "hfl/v1/coord/jobs/+", "hfl/v1/coord/roster",
                                              # where retained sets keep their chunks
                                              "hfl/v1/coord/models/digits/chunk/+",
                                              "hfl/v1/coord/jobs/+/chunk/+",
                                              "hfl/v1/coord/roster/chunk/+"]


# ---------------------------------------------------------------- device folders


def test_from_device_loads_an_enrolled_app_and_says_what_is_wrong(tmp_path: Path) -> None:
    pki = Pki.init(tmp_path / "pki")
    pki.issue("app", Role.APP)
    pki.issue("site-a", Role.AGGREGATOR)
    pki.issue("agent-1", Role.AGENT, group="site-a")
    wire = AppWire.from_device(pki.device("app").dir)
    assert wire.identity.id == "app" and wire.files.ca.is_file()
    assert "site-a" in wire.roster
    app = App.from_device(pki.device("app").dir, "127.0.0.1", 8883, models=["digits"])
    assert app.node.session.settings.cert == str(pki.device("app").cert)
    with pytest.raises(ValueError, match="not subscribed"):
        app.models("other")
    with pytest.raises(ValueError, match="not enrolled as app"):
        AppWire.from_device(pki.device("agent-1").dir, id="agent-1")
    stale = tmp_path / "stale"  # keys from another issue of the same id
    shutil.copytree(pki.device("app").dir, stale)
    pki.issue("app", Role.APP, force=True)
    shutil.copy(pki.device("app").roster, stale / "roster.json")
    with pytest.raises(ValueError, match="do not match"):
        AppWire.from_device(stale, id="app")
    with pytest.raises(FileNotFoundError):
        AppWire.from_device(tmp_path / "nowhere")


def test_app_request_validates_before_sending(fleet) -> None:
    roster = _roster(fleet)
    app = App(fleet["app"], roster, BrokerSettings(), models=["digits"])
    with pytest.raises(RequestError, match="rounds"):
        app.request(**{**SPEC, "rounds": 0})
    assert app.node.counters["sent"] == 0


def test_follow_reads_only_the_answers_to_its_own_request() -> None:
    from application import RequestReply
    from fleet.sim.follow import follow
    from hfl.wire.messages import ReplyMeta

    class Answers:
        def events(self, timeout):
            # A request the coordinator could not read (sent in our name, or by a bug), and
            # another request's refusal: neither is about our jobs.
            yield RequestReply(ReplyMeta(request_id="", refused={"": "bad-request: ..."}))
            yield RequestReply(ReplyMeta(request_id="r2", refused={"m": "unknown task"}))
            yield RequestReply(ReplyMeta(request_id="r1", accepted=["r1-m"],
                                         refused={"x": "unknown task"}))

    out = follow(Answers(), ["r1-m", "r1-x"], None, None, timeout=1)  # type: ignore[arg-type]
    assert out.refused == {"r1-x": "unknown task"}
