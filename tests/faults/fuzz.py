"""Hostile input for the aggregator and the coordinator: hypothesis strategies for MQTT
payloads that each must be refused and counted, never crash a node, never change a job.

Every case is one MQTT message on a topic the node subscribes to:

- `raw`: arbitrary bytes;
- `mangled`: a genuine signed envelope with bytes flipped, cut off or appended;
- `signed`: a well-signed envelope from an enrolled member, on that member's own topic, with
  hostile content: any type or stage, random meta and tensors (odd dtypes, shapes, NaN),
  sometimes sealed for the node - for jobs the node does not run, or as a member the job
  does not include, so no case can pass for a real contribution;
- `chunk`: a chunk frame: garbage after the magic, a lone chunk of a message that never
  completes (held, then evicted to keep the memory bound), or a one-chunk message of garbage.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from hfl.crypto.identity import Identity, Roster
from hfl.wire import envelope
from hfl.wire.chunks import MAGIC
from hfl.wire.messages import Kind

Case = tuple[str, bytes]
_FRAME = struct.Struct("<4s16sIIQ")


@dataclass(frozen=True)
class Target:
    """A node under fuzz: the topics it takes input on and who may sign on each."""

    topics: list[str]  # concrete topics it subscribes to
    signers: dict[str, Identity]  # topic → the member whose own topic it is (signed cases)
    templates: list[Case]  # genuine signed messages to mangle
    seal_for: Identity  # the node: signed cases are sometimes sealed for it
    roster: Roster


_KIND_OF = {"/updates/": "update", "/tasks": "task", "/partials/": "partial",
            "/requests": "request", "/status/": "status"}
JOBS = st.sampled_from(["r0-m", "decoy", "r1-x", "j" * 64]) | st.text(min_size=0, max_size=70)
KINDS = st.sampled_from([k.value for k in Kind]) | st.text(max_size=12)
STAGES = st.sampled_from(["update", "advert", "shares", "masked", "unshares", "train",
                          "partial", "request", "open", ""]) | st.text(max_size=12)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner,
                                                                max_size=4),
    max_leaves=12)
META_KEYS = st.sampled_from(["metrics", "spec", "num_params", "origin", "weight", "agents",
                             "releases", "failure", "request_id", "models", "ids", "to",
                             "owners", "survivors", "clip_bit", "state", "group"])
META = st.dictionaries(META_KEYS | st.text(max_size=8), JSON, max_size=5)
DTYPES = st.sampled_from(["float32", "float64", "float16", "int64", "int32", "uint32", "uint8",
                          "int8", "bool"])


@st.composite
def tensors(draw) -> dict[str, np.ndarray]:
    out = {}
    for name in draw(st.lists(st.sampled_from(["delta", "params", "sum", "y", "c_pk", "s_pk",
                                               "b_commit", "signature", "blob", "offsets",
                                               "shares", "x"]), max_size=3, unique=True)):
        shape = tuple(draw(st.lists(st.integers(0, 20), max_size=3)))
        dtype = np.dtype(draw(DTYPES))
        size = int(np.prod(shape, dtype=np.int64))
        raw = draw(st.binary(min_size=size * dtype.itemsize, max_size=size * dtype.itemsize))
        out[name] = np.frombuffer(raw, dtype).reshape(shape).copy()
    return out


def cases(t: Target) -> st.SearchStrategy[Case]:
    topic = st.sampled_from(t.topics)

    @st.composite
    def raw(draw) -> Case:
        return draw(topic), draw(st.binary(min_size=1, max_size=600))

    @st.composite
    def mangled(draw) -> Case:
        tpc, data = draw(st.sampled_from(t.templates))
        buf = bytearray(data)
        how = draw(st.sampled_from(["flip", "cut", "append"]))
        if how == "flip":  # at distinct places, so two flips never cancel out
            for at in draw(st.lists(st.integers(0, len(buf) - 1), min_size=1, max_size=4,
                                    unique=True)):
                buf[at] ^= draw(st.integers(1, 255))
        elif how == "cut":
            del buf[draw(st.integers(0, len(buf) - 1)):]
            buf = buf or bytearray(b"\0")
        else:
            buf += draw(st.binary(min_size=1, max_size=64))
        assert bytes(buf) != data
        return tpc, bytes(buf)

    @st.composite
    def signed(draw) -> Case:
        tpc = draw(st.sampled_from(sorted(t.signers)))
        who = t.signers[tpc]
        sealed = draw(st.booleans())
        # Mostly the kind this topic carries, so that most cases reach the machine.
        kind = draw(st.sampled_from([_KIND_OF[k] for k in _KIND_OF if k in tpc]) | KINDS)
        try:
            data = envelope.encode(
                type=kind, topic=tpc, job=draw(JOBS), round=draw(st.integers(0, 2**40)),
                stage=draw(STAGES), sender=who.id, key=who.key, tensors=draw(tensors()),
                meta=draw(META),  # a fresh nonce: not a repeat of an earlier case
                seal_to={t.seal_for.id: t.seal_for.seal_public} if sealed else None)
        except ValueError:  # a header the encoder itself refuses: send it unsigned instead
            data = draw(st.binary(min_size=1, max_size=64))
        return tpc, data

    @st.composite
    def chunk(draw) -> Case:
        how = draw(st.sampled_from(["garbage", "lone", "single"]))
        if how == "garbage":
            return draw(topic), MAGIC + draw(st.binary(max_size=80))
        if how == "lone":  # one chunk of a message that never completes: up to 64 MB held
            count = draw(st.integers(2, 1000))
            size = draw(st.integers(1, 1 << 16))
            index = draw(st.integers(0, count - 1))
            head = _FRAME.pack(MAGIC, bytes(16), index, count, size * count)
            return draw(topic), head + bytes(size)
        body = draw(st.binary(min_size=1, max_size=200))
        return draw(topic), _FRAME.pack(MAGIC, bytes(16), 0, 1, len(body)) + body

    return st.one_of(raw(), mangled(), signed(), chunk())


def unique_chunk_ids(found: list[Case], start: int = 0) -> list[Case]:
    """Give each chunk case a message id of its own (hypothesis favours zeros), so every
    case is one message with one outcome."""
    out = []
    for k, (tpc, data) in enumerate(found, start):
        if data.startswith(MAGIC) and len(data) >= _FRAME.size:
            data = data[:4] + k.to_bytes(16, "little") + data[20:]
        out.append((tpc, data))
    return out


def draw_cases(strategy: st.SearchStrategy[Case], n: int, seed: int = 0) -> list[Case]:
    """`n` cases from `strategy`, the same ones every run (but for signed cases' nonces)."""
    found: list[Case] = []
    batch = 0
    while len(found) < n:
        collect = _collector(strategy, found, min(n - len(found), 5000), seed + batch)
        collect()
        batch += 1
    return unique_chunk_ids(found[:n])


def _collector(strategy: st.SearchStrategy[Case], found: list[Case], n: int,
               seed: int) -> Callable[[], None]:
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(case: Case) -> None:
        found.append(case)

    # A fixed seed for each batch: reproducible, and different batches differ.
    return _seeded(collect, seed)


def _seeded(fn: Callable[[], None], seed: int) -> Callable[[], None]:
    from hypothesis import seed as hseed

    return hseed(seed)(fn)


def accounted(tally: dict) -> int:
    """Messages a node refused or dropped, each counted once: rejections by reason (an
    evicted incomplete message once), repeats, empty payloads, sealed for someone else, and
    incomplete messages still held."""
    gate = tally["gate"]
    return (sum(tally["rejected"].values()) + gate.get("duplicates", 0)
            + gate.get("chunk_repeats", 0) + gate.get("empty", 0) + gate.get("not_for_us", 0)
            + tally["pending"]["messages"])
