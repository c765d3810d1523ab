"""docs/asyncapi.yaml against the AsyncAPI 3.0 schema and against the code: the topics of
hfl.wire.topics, the vocabulary of hfl.wire.messages (kinds, senders, retained flags), each role's
subscriptions, and the schemas generated from the pydantic models.

The official schema and parser come from the npm packages @asyncapi/specs and
@asyncapi/parser, which `make test` installs into docs/node_modules (docs/package.json);
they are never committed."""

from __future__ import annotations

import copy
import inspect
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from paho.mqtt.client import topic_matches_sub

from hfl.crypto.identity import Identity
from hfl.wire import asyncapi, envelope
from hfl.wire.chunks import MANIFEST_SIZE, chunk_topic
from hfl.wire.messages import VOCABULARY, Kind, ModelMeta, Role
from hfl.wire.topics import CHUNKED, Topics
from tests.contract import (
    DOCUMENT,
    SAMPLE,
    channel_messages,
    channel_routes,
    document,
    header_errors,
    is_frame,
    message_for,
    params,
    resolve,
    route_kind,
    sample_topic,
)

DOCS = Path(__file__).resolve().parents[1] / "docs"
SPEC = DOCS / "node_modules" / "@asyncapi" / "specs" / "schemas" / "3.0.0-without-$id.json"


@pytest.fixture(scope="module")
def spec_validator() -> jsonschema.Draft7Validator:
    if not SPEC.is_file():
        pytest.fail(f"{SPEC} is missing: `make test` installs it (npm ci --prefix docs)",
                    pytrace=False)
    return jsonschema.Draft7Validator(json.loads(SPEC.read_text()))


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return document()


# ---------------------------------------------------------------- the document itself


def test_the_document_is_valid_asyncapi_3(spec_validator, doc) -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in spec_validator.iter_errors(doc)]
    assert errors == []
    broken = copy.deepcopy(doc)  # the validator does catch a mistake (an AsyncAPI 2 verb)
    broken["operations"]["appRequestsModel"]["action"] = "publish"
    assert not spec_validator.is_valid(broken)


def _parse_with_the_official_parser(path: Path) -> subprocess.CompletedProcess:
    if shutil.which("node") is None or not (DOCS / "node_modules" / "@asyncapi").is_dir():
        pytest.fail("Node.js and docs/node_modules are needed: `make test` installs them "
                    "(npm ci --prefix docs)", pytrace=False)
    return subprocess.run(["node", str(DOCS / "validate.mjs"), str(path)], capture_output=True,
                          text=True, timeout=120)


def test_the_official_parser_finds_no_error_or_warning(tmp_path: Path) -> None:
    run = _parse_with_the_official_parser(DOCUMENT)
    assert run.returncode == 0, run.stdout + run.stderr
    # A YAML slip that a plain YAML loader takes silently: commas in a flow mapping.
    text = DOCUMENT.read_text(encoding="utf-8")
    bad = tmp_path / "asyncapi.yaml"
    bad.write_text(text.replace('{description: "the version: 1, 2, ..."}',
                                "{description: the version, 1, 2}"), encoding="utf-8")
    assert bad.read_text(encoding="utf-8") != text
    run = _parse_with_the_official_parser(bad)
    assert run.returncode == 1 and "Mapping key must be a string" in run.stdout


def _keys(node: Any) -> list[Any]:
    if isinstance(node, dict):
        return [*node, *(k for v in node.values() for k in _keys(v))]
    if isinstance(node, list):
        return [k for v in node for k in _keys(v)]
    return []


def _refs(node: Any, path: str = "#") -> list[tuple[str, str]]:
    if isinstance(node, dict):
        out = [(path, node["$ref"])] if isinstance(node.get("$ref"), str) else []
        for k, v in node.items():
            out += _refs(v, f"{path}/{k}")
        return out
    if isinstance(node, list):
        return [r for i, v in enumerate(node) for r in _refs(v, f"{path}/{i}")]
    return []


def test_every_reference_resolves_and_operations_use_their_channels_messages(doc) -> None:
    assert all(isinstance(k, str) for k in _keys(doc))  # no `{a: b, 1, 2}` slip
    refs = _refs(doc)
    assert len(refs) > 80
    for where, ref in refs:
        assert resolve(doc, ref) is not None, where
    for name, op in doc["operations"].items():
        channel = op["channel"]["$ref"]
        assert all(m["$ref"].startswith(channel + "/messages/") for m in op["messages"]), name
    for name, ch in doc["channels"].items():
        assert set(ch.get("parameters", {})) == set(params(ch["address"])), name


def test_the_generated_schemas_are_current(doc) -> None:
    text = DOCUMENT.read_text(encoding="utf-8")
    assert asyncapi.render(text) == text, "run: python -m hfl.wire.asyncapi"
    assert doc["components"]["schemas"] == json.loads(json.dumps(asyncapi.schemas()))


def test_render_refuses_a_document_without_its_marker() -> None:
    with pytest.raises(ValueError, match="marker"):
        asyncapi.render("asyncapi: 3.0.0\n")


# ---------------------------------------------------------------- the document against the code


def _code_topics() -> dict[str, str]:
    """Route kind → method name, for every method of Topics that spells one topic."""
    t = Topics()
    out = {}
    for name, fn in inspect.getmembers(t, inspect.ismethod):
        if name.startswith("_") or inspect.signature(fn).return_annotation != "str" \
                or not set(inspect.signature(fn).parameters) <= set(SAMPLE):
            continue  # `chunks(topic)` spells a filter of another topic's subtopics
        topic = fn(*[SAMPLE[p] for p in inspect.signature(fn).parameters])
        out[t.parse(topic).kind] = name
    return out


def test_every_topic_of_the_code_is_a_channel_and_vice_versa(doc) -> None:
    code = _code_topics()
    # The code agrees with itself; retained sets are for retained topics only.
    assert set(code) == {r for link in VOCABULARY.values() for r in link.routes}
    assert {r for link in VOCABULARY.values() if link.retained for r in link.routes} >= CHUNKED
    routes = channel_routes(doc)
    # One channel per topic, none missing, and one per chunk subtopics of a retained set.
    assert sorted(routes.values()) == sorted([*code, *(f"{k}/chunk" for k in CHUNKED)])
    t = Topics()
    for channel, kind in routes.items():  # spelled exactly as the code spells it
        address = doc["channels"][channel]["address"]
        base = kind.removesuffix("/chunk")
        built = getattr(t, code[base])(**{p: SAMPLE[p] for p in params(address) if p != "index"})
        if base != kind:  # and what a subscriber's `chunks` filter matches
            assert topic_matches_sub(t.chunks(built), chunk_topic(built, 0))
            built = chunk_topic(built, int(SAMPLE["index"]))
        assert sample_topic(address) == built


def _kinds(doc: dict[str, Any], message: dict[str, Any]) -> str:
    return next(p["properties"]["type"]["const"] for p in message["x-hfl-header"]["allOf"]
                if "properties" in p)


def test_each_channel_carries_the_kinds_the_vocabulary_routes_to_it(doc) -> None:
    for channel, route in channel_routes(doc).items():
        frames = [m["x-hfl-frame"] for m in channel_messages(doc, channel).values()
                  if is_frame(m)]
        messages = [m for m in channel_messages(doc, channel).values() if not is_frame(m)]
        if route.endswith("/chunk"):  # the frames of a retained set, and nothing else
            assert frames == ["chunk"] and messages == [], channel
            continue
        assert frames == (["manifest"] if route in CHUNKED else []), channel
        assert {_kinds(doc, m) for m in messages} == {
            k.value for k, link in VOCABULARY.items() if route in link.routes}
        for m in messages:  # a sealed message says for whom
            sealed = next(p["properties"]["sealed"]["const"]
                          for p in m["x-hfl-header"]["allOf"] if "properties" in p)
            assert sealed == ("sealedFor" in m["x-hfl-body"]), m["name"]


def _operations(doc: dict[str, Any], action: str) -> list[tuple[str, dict, set[str], set[str]]]:
    """(channel, operation, its role tags, the kinds of its envelope messages)."""
    out = []
    for op in doc["operations"].values():
        if op["action"] == action:
            channel = op["channel"]["$ref"].split("/")[-1]
            kinds = {_kinds(doc, m) for ref in op["messages"]
                     if not is_frame(m := resolve(doc, ref["$ref"]))}
            out.append((channel, op, {t["name"] for t in op["tags"]}, kinds))
    return out


def test_retained_sets_are_sent_retained_by_their_topics_senders(doc) -> None:
    routes = channel_routes(doc)
    for channel, op, roles, _ in _operations(doc, "send"):
        frames = {resolve(doc, m["$ref"]).get("x-hfl-frame") for m in op["messages"]} - {None}
        if not frames:
            continue
        base = routes[channel].removesuffix("/chunk")
        assert base in CHUNKED, channel
        assert op["bindings"]["mqtt"]["retain"] is True, channel
        assert roles == {r.value for link in VOCABULARY.values() if base in link.routes
                         for r in link.senders}, channel
    # The manifest is documented as hfl.wire.chunks builds it.
    text = DOCUMENT.read_text(encoding="utf-8")
    layout = '"HFM1" | message id (16) | u32 LE count | u64 LE total | SHA-256 of the message (32)'
    assert layout in text and MANIFEST_SIZE == 4 + 16 + 4 + 8 + 32 == 64


def test_senders_and_retained_flags_are_the_vocabulary(doc) -> None:
    sends = [s for s in _operations(doc, "send") if s[3]]  # frames: the test above
    assert {k for *_, kinds in sends for k in kinds} == {k.value for k in Kind}
    for _, op, roles, kinds in sends:
        for kind in map(Kind, kinds):
            link = VOCABULARY[kind]
            assert roles == {r.value for r in link.senders}, kind
            assert op["bindings"]["mqtt"]["qos"] == 1
            if not link.retained:
                assert op["bindings"]["mqtt"]["retain"] is False, kind
    for kind, link in VOCABULARY.items():  # a retained kind has a retained operation
        retained = [op["bindings"]["mqtt"]["retain"] for _, op, _, kinds in sends
                    if kind.value in kinds]
        assert (True in retained) == link.retained, kind


def _filters(role: Role) -> list[str]:
    """What a role subscribes to, from Topics.<role>_filters (every role has one), with
    every id it can be given (an app's own replies come with its id)."""
    fn = getattr(Topics(), f"{role.value}_filters")
    args = {p.name: ["m"] if p.annotation.startswith("list") else SAMPLE[p.name]
            for p in inspect.signature(fn).parameters.values()
            if p.default is p.empty or p.name in SAMPLE}
    return fn(**args)


def _sample(topic_filter: str) -> str:
    """A topic the filter matches: a chunk subtopic's index 0, any other level x9."""
    if topic_filter.endswith("/chunk/+"):
        topic_filter = topic_filter.removesuffix("+") + "0"
    return topic_filter.replace("+", "x9")


def test_receive_operations_are_each_roles_subscriptions(doc) -> None:
    receives = _operations(doc, "receive")
    routes = channel_routes(doc)
    for role in Role:
        subscribed = {route_kind(_sample(f)) for f in _filters(role)}
        documented = {routes[ch] for ch, _, roles, _ in receives if role.value in roles}
        assert documented == subscribed, role


# ---------------------------------------------------------------- headers against the schemas


def _header(data: bytes) -> dict[str, Any]:
    size = int.from_bytes(data[4:8], "little")
    return json.loads(data[8 : 8 + size])


def test_a_real_model_header_is_the_documented_model_message_and_a_bad_one_is_not(doc) -> None:
    coord = Identity.generate("coordinator", Role.COORDINATOR)
    topic = Topics().model("digits")
    meta = ModelMeta(model="digits", job="r1-digits", version=3, task="mlp", task_version="1",
                     layout="0" * 64, inputs=[[1, 8, 8]], num_params=100, agents=6,
                     epsilon=1.5, delta=1e-5, metrics={"samples": 600}).model_dump(mode="json")
    app = Identity.generate("app", Role.APP)
    data = envelope.encode(type="model", topic=topic, job="r1-digits", round=3, stage="model",
                           sender="coordinator", key=coord.key, meta=meta,
                           seal_to={"app": app.seal_public})
    assert message_for(doc, topic, _header(data)) == ("models", "model")
    model = channel_messages(doc, "models")["model"]
    bad = {**_header(data), "meta": {k: v for k, v in meta.items() if k != "version"}}
    assert any("version" in e for e in header_errors(doc, model, bad))
    assert header_errors(doc, model, {**_header(data), "sealed": False})  # models are sealed
