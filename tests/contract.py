"""Reading docs/asyncapi.yaml as a contract: which channel a topic is, which documented
message a real envelope is, and whether its header and tensors are what the document says.

Used by tests/test_asyncapi.py (the document against the code) and by the fleet test of the
examples (the document against what travels on a real broker)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import yaml

from hfl.wire.chunks import Reassembler
from hfl.wire.topics import Topics

DOCUMENT = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"
# One sample id per channel parameter; the parameter names are those of hfl.wire.topics.Topics.
SAMPLE = {"app": "app-1", "job": "r1-m", "model": "m", "agg": "site-a", "agent": "agent-1",
          "role": "agent", "id": "agent-1", "index": "0", "sender": "site-a",
          "to": "agent-1"}
_PARAM = re.compile(r"\{([^}]+)\}")
DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I8": "i1",
          "U64": "<u8", "U32": "<u4", "U8": "u1"}


@functools.cache
def document() -> dict[str, Any]:
    return yaml.safe_load(DOCUMENT.read_text(encoding="utf-8"))


def params(address: str) -> list[str]:
    return _PARAM.findall(address)


def sample_topic(address: str, values: dict[str, str] = SAMPLE) -> str:
    return _PARAM.sub(lambda m: values[m.group(1)], address)


def route_kind(topic: str) -> str:
    """The route kind (hfl.wire.topics) of a topic; for a chunk subtopic of a retained set, its
    topic's kind + "/chunk"."""
    t = Topics()
    cut = t.chunk_of(topic)
    return f"{t.parse(cut[0]).kind}/chunk" if cut is not None else t.parse(topic).kind


def channel_routes(doc: dict[str, Any]) -> dict[str, str]:
    """channel name → the route kind (`route_kind`) its address parses to."""
    return {name: route_kind(sample_topic(ch["address"])) for name, ch in doc["channels"].items()}


def is_frame(message: dict[str, Any]) -> bool:
    """Whether a documented message is a retained set's manifest or chunk, not an envelope."""
    return "x-hfl-frame" in message


def channel_of(doc: dict[str, Any], topic: str) -> str:
    """The channel whose address a concrete topic fits (a parameter is one level)."""
    levels = topic.split("/")
    for name, ch in doc["channels"].items():
        want = ch["address"].split("/")
        if len(want) == len(levels) and all(
                w == t or _PARAM.fullmatch(w) for w, t in zip(want, levels, strict=True)):
            return name
    raise LookupError(f"no channel for {topic}")


def resolve(doc: dict[str, Any], ref: str) -> Any:
    """The object a local reference points to, following references to references."""
    if not ref.startswith("#/"):
        raise LookupError(f"not a local reference: {ref}")
    node: Any = doc
    for part in ref[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    if isinstance(node, dict) and set(node) == {"$ref"}:
        return resolve(doc, node["$ref"])
    return node


def channel_messages(doc: dict[str, Any], channel: str) -> dict[str, dict[str, Any]]:
    """message name → message object, for the messages of one channel."""
    return {name: resolve(doc, m["$ref"])
            for name, m in doc["channels"][channel]["messages"].items()}


def header_errors(doc: dict[str, Any], message: dict[str, Any],
                  header: dict[str, Any]) -> list[str]:
    """Why `header` is not this message's header (empty when it is)."""
    root = {**doc, **message["x-hfl-header"]}  # refs resolve against the whole document
    validator = jsonschema.Draft7Validator(root)
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(header)]


def message_for(doc: dict[str, Any], topic: str, header: dict[str, Any]) -> tuple[str, str]:
    """(channel, message name) of the one documented message `header` is; AssertionError
    with every candidate's complaint otherwise."""
    channel = channel_of(doc, topic)
    fits, why = [], {}
    for name, msg in channel_messages(doc, channel).items():
        if is_frame(msg):
            continue
        errors = header_errors(doc, msg, header)
        if errors:
            why[name] = errors[:3]
        else:
            fits.append(name)
    assert len(fits) == 1, f"{header['type']}/{header['stage']} on {channel}: {fits or why}"
    return channel, fits[0]


def body_errors(message: dict[str, Any], tensors: dict[str, np.ndarray]) -> list[str]:
    """Tensors against the message's `x-hfl-body`: names, dtypes and shapes (symbolic
    dimensions match any size; `[...]` any shape; a `{placeholder}` name any other name)."""
    documented = message["x-hfl-body"]["tensors"]
    named = {t["name"]: t for t in documented if not t["name"].startswith("{")}
    wildcard = next((t for t in documented if t["name"].startswith("{")), None)
    errors = [f"missing tensor {n}" for n, t in named.items()
              if n not in tensors and not t.get("optional")]
    for name, array in tensors.items():
        doc = named.get(name, wildcard)
        if doc is None:
            errors.append(f"undocumented tensor {name}")
            continue
        if array.dtype != np.dtype(DTYPES[doc["dtype"]]):
            errors.append(f"{name}: {array.dtype}, documented {doc['dtype']}")
        shape = doc["shape"]
        if shape != ["..."]:
            fixed = [d if isinstance(d, int) else None for d in shape]
            if len(shape) != array.ndim or any(
                    f is not None and f != n for f, n in zip(fixed, array.shape, strict=True)):
                errors.append(f"{name}: shape {list(array.shape)}, documented {shape}")
    return errors


class WireReassembler:
    """Whole messages out of what a subscriber to `#` sees: messages sent whole or chunked on
    their topic, and retained sets (frames on the chunk subtopics, a manifest on the topic)."""

    def __init__(self, topics: Topics | None = None) -> None:
        self.topics = topics or Topics()
        self.reassembler = Reassembler(max_message=64 << 20, max_pending_bytes=256 << 20)

    def feed(self, topic: str, payload: bytes) -> tuple[str, bytes] | None:
        """(the topic the message counts as received on, the message) once one is whole."""
        if not payload:
            return None  # a cleared retained message
        cut = self.topics.chunk_of(topic)
        if cut is None:
            data = self.reassembler.feed(topic, payload, 0.0)
        else:
            topic, index = cut
            data = self.reassembler.feed_chunk(topic, index, payload, 0.0)
        return None if data is None else (topic, bytes(data))
