"""Split large payloads into MQTT-sized chunks and reassemble them with bounded memory.

Pure: no I/O, no clocks (time is an argument). A chunk frame is

    b"HFC1" | 16-byte message id | u32 LE index | u32 LE count | u64 LE total | data

Every non-last chunk carries ceil(total / count) bytes and the last one the rest, so the
receiver can check each frame on its own and copy it straight into place. Whole messages
(envelopes start with b"HFL1") pass through untouched.

A retained message in several chunks is a *retained set* (a broker keeps one retained
message per topic, so frames on the topic itself would leave a late subscriber the last one
only): frame i is retained on `{topic}/chunk/{i}` and a 64-byte manifest on the topic itself,

    b"HFM1" | 16-byte message id | u32 LE count | u64 LE total | SHA-256 of the message (32)

published after the chunks, so a late subscriber that gets a manifest finds its chunks
already retained. A set is delivered only when its chunks are complete *and* the topic's
newest manifest names it, with the same count, total and digest: chunks of two versions
never mix (each version has its own id), and chunks of the version a newer manifest
replaced are dropped at once (`stale`).

The reassembler's bounds count what it maps for each incomplete message (`reserved`), not
what has arrived: the memory it can be made to hold never exceeds them.
"""

from __future__ import annotations

import hashlib
import math
import mmap
import os
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from hfl.errors import Rejected

MAGIC = b"HFC1"
MANIFEST_MAGIC = b"HFM1"
ID_LEN = 16
_HEADER = struct.Struct(f"<4s{ID_LEN}sIIQ")
FRAME_OVERHEAD = _HEADER.size  # 36 bytes
_MANIFEST = struct.Struct(f"<4s{ID_LEN}sIQ32s")
MANIFEST_SIZE = _MANIFEST.size  # 64 bytes
CHUNK_LEVEL = "chunk"  # `{topic}/chunk/{index}`: where frame `index` of a retained set lives
_DONE_MEMORY = 4096  # completed (key, id) pairs remembered so late repeats are dropped
_MANIFEST_MEMORY = 4096  # topics whose newest manifest is remembered (64 bytes each)
PAGE = mmap.PAGESIZE

Payload = bytes | bytearray | memoryview


def whole(payload: Payload, max_payload: int) -> bool:
    """Whether `payload` goes as it is: it fits, and a receiver cannot take it for a chunk
    frame or a manifest."""
    head = bytes(memoryview(payload)[: len(MAGIC)])
    return len(payload) <= max_payload and head not in (MAGIC, MANIFEST_MAGIC)


def split(payload: bytes, max_payload: int, *, msg_id: bytes | None = None) -> list[bytes]:
    """Frames of at most `max_payload` bytes each; `[payload]` when it already fits."""
    if whole(payload, max_payload):
        return [payload]
    return _frames(payload, max_payload, msg_id)


def _frames(payload: bytes, max_payload: int, msg_id: bytes | None) -> list[bytes]:
    data_max = max_payload - FRAME_OVERHEAD
    if data_max <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room past the chunk header")
    msg_id = os.urandom(ID_LEN) if msg_id is None else msg_id
    if len(msg_id) != ID_LEN:
        raise ValueError(f"msg_id must be {ID_LEN} bytes")
    total = len(payload)
    if total == 0:
        raise ValueError("an empty payload has no chunks")
    count = math.ceil(total / data_max)
    size = math.ceil(total / count)  # what the receiver derives; never above data_max
    view = memoryview(payload)  # slices without copying: one copy per frame, not quadratic
    return [
        b"".join((_HEADER.pack(MAGIC, msg_id, i, count, total), view[i * size : (i + 1) * size]))
        for i in range(count)
    ]


@dataclass(frozen=True)
class Manifest:
    """What a retained set's manifest says: which message, in how many chunks, how long,
    and the SHA-256 of the whole message."""

    msg_id: bytes
    count: int
    total: int
    digest: bytes

    def encode(self) -> bytes:
        return _MANIFEST.pack(MANIFEST_MAGIC, self.msg_id, self.count, self.total, self.digest)


def retained_set(payload: bytes, max_payload: int, *,
                 msg_id: bytes | None = None) -> tuple[bytes, list[bytes]]:
    """(manifest, frames) of a retained set: frame i goes on `chunk_topic(topic, i)`, then
    the manifest on the topic itself, all retained (whatever the size: even one frame)."""
    frames = _frames(payload, max_payload, msg_id)
    mid = frames[0][len(MAGIC) : len(MAGIC) + ID_LEN]
    manifest = Manifest(mid, len(frames), len(payload), hashlib.sha256(payload).digest())
    return manifest.encode(), frames


def parse_manifest(payload: Payload, max_message: int) -> Manifest:
    """A manifest checked on its own; Rejected("bad-manifest") for anything malformed,
    Rejected("too-large") for a message over `max_message`."""
    view = memoryview(payload)
    if len(view) != MANIFEST_SIZE:
        raise Rejected("bad-manifest", f"{len(view)} bytes, a manifest has {MANIFEST_SIZE}")
    magic, msg_id, count, total, digest = _MANIFEST.unpack_from(view)
    if magic != MANIFEST_MAGIC:
        raise Rejected("bad-manifest", "no HFM1 magic")
    if count == 0:
        raise Rejected("bad-manifest", "count is 0")
    if total > max_message:
        raise Rejected("too-large", f"{total} bytes > {max_message}")
    if total - math.ceil(total / count) * (count - 1) <= 0:
        raise Rejected("bad-manifest", f"total {total} cannot fill {count} chunks")
    return Manifest(bytes(msg_id), count, total, bytes(digest))


def chunk_topic(topic: str, index: int) -> str:
    """Where frame `index` of a retained set on `topic` is retained."""
    return f"{topic}/{CHUNK_LEVEL}/{index}"


def split_chunk_topic(topic: str) -> tuple[str, int] | None:
    """(topic, index) when `topic` is spelled like a chunk subtopic (`.../chunk/{index}`,
    the index in canonical decimal); None otherwise. Only the spelling: whether the topic
    is one of a tree's is hfl.wire.topics' to say."""
    head, sep, index = topic.rpartition("/")
    base, sep2, level = head.rpartition("/")
    if not (sep and sep2 and base and level == CHUNK_LEVEL):
        return None
    if not index.isascii() or not index.isdigit() or (index != "0" and index[0] == "0") \
            or len(index) > 10:
        return None
    return base, int(index)


def message_id(payload: Payload) -> bytes | None:
    """The id a chunk frame shares with the other chunks of its message; None for a
    payload that is no chunk frame."""
    view = memoryview(payload)
    if len(view) < FRAME_OVERHEAD or view[: len(MAGIC)] != MAGIC:
        return None
    return bytes(view[len(MAGIC) : len(MAGIC) + ID_LEN])


@dataclass(frozen=True)
class _Frame:
    msg_id: bytes
    index: int
    count: int
    total: int
    size: int  # data bytes in every non-last chunk
    data: memoryview


def _parse(payload: memoryview, max_message: int) -> _Frame:
    """Check one frame on its own; raise Rejected for anything inconsistent."""
    if len(payload) < FRAME_OVERHEAD:
        raise Rejected("malformed-chunk", f"short frame ({len(payload)} bytes)")
    _, msg_id, index, count, total = _HEADER.unpack_from(payload)
    if count == 0:
        raise Rejected("malformed-chunk", "count is 0")
    if index >= count:
        raise Rejected("malformed-chunk", f"index {index} >= count {count}")
    if total > max_message:
        raise Rejected("too-large", f"{total} bytes > {max_message}")
    size = math.ceil(total / count)
    last = total - size * (count - 1)
    if last <= 0:
        raise Rejected("malformed-chunk", f"total {total} cannot fill {count} chunks")
    data = payload[FRAME_OVERHEAD:]
    want = last if index == count - 1 else size
    if len(data) != want:
        raise Rejected("malformed-chunk", f"chunk {index}/{count} has {len(data)} bytes, "
                       f"expected {want}")
    return _Frame(bytes(msg_id), index, count, total, size, data)


def reserved(total: int, count: int) -> int:
    """The bytes an incomplete message of `total` bytes in `count` chunks maps: its data and
    one flag per chunk, in whole pages. A 37-byte frame may claim `count == total` (1-byte
    chunks): then the flags are as large as the data, so they are counted too."""
    return -(-(total + count) // PAGE) * PAGE


@dataclass
class _Partial:
    count: int
    total: int
    size: int
    created: float
    reserved: int
    gated: bool  # chunks of a retained set: delivered with its manifest only
    # Data, then one flag per chunk: anonymous memory is mapped lazily, so a message costs
    # the pages that what has arrived of it touched, never more than `reserved`.
    buf: mmap.mmap = field(init=False)
    missing: int = field(init=False)

    def __post_init__(self) -> None:
        self.buf = mmap.mmap(-1, self.reserved)
        self.missing = self.count


class Reassembler:
    """Collects chunks per (key, message id); holds at most `max_pending_bytes` of partials
    in all and `max_key_bytes` per key, counted as `reserved` (what is mapped for them).

    `key` is where the chunks came from (the topic, which names its only sender), so a peer
    cannot complete or poison another topic's message by reusing its id, and a peer that
    opens message after message evicts its own older partials, not the other senders'
    uploads that arrive interleaved with it.

    Retained sets (see the module's docstring): `feed_chunk` takes the frames from a topic's
    chunk subtopics and `feed` its manifest, both under the topic's key. A complete set
    waits, within the same bounds, for the manifest that names it; the newest manifest of
    each key is remembered (at most _MANIFEST_MEMORY keys, 64 bytes each).
    """

    def __init__(self, max_message: int, max_pending_bytes: int, max_pending: int = 4096,
                 ttl: float = 120.0, max_key_bytes: int | None = None) -> None:
        self.max_message = max_message
        self.max_pending_bytes = max_pending_bytes
        self.max_key_bytes = min(max_key_bytes or max_pending_bytes, max_pending_bytes)
        self.max_pending = max_pending
        self.ttl = ttl
        self.evicted = 0
        self.repeats = 0  # chunks received again (a QoS 1 redelivery), dropped
        self.stale = 0  # retained sets dropped when a newer manifest replaced theirs
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()  # key → newest, LRU
        self._partials: OrderedDict[tuple[str, bytes], _Partial] = OrderedDict()  # oldest first
        self._done: OrderedDict[tuple[str, bytes], None] = OrderedDict()
        self._pending_bytes = 0
        self._key_bytes: Counter[str] = Counter()

    @property
    def pending_bytes(self) -> int:
        return self._pending_bytes

    @property
    def pending(self) -> int:
        return len(self._partials)

    def holds(self, key: str, msg_id: bytes) -> bool:
        """Whether chunks of message `msg_id` from `key` wait for the rest."""
        return (key, msg_id) in self._partials

    def feed(self, key: str, payload: Payload, now: float) -> Payload | None:
        """The whole message once its last chunk arrives; a non-chunk payload as is. A
        manifest (HFM1) is the one of the retained set on `key`: the set, once it is both
        complete and named by it, else None."""
        view = memoryview(payload)
        head = view[: len(MAGIC)]
        if head == MANIFEST_MAGIC:
            return self._manifest(key, parse_manifest(view, self.max_message))
        if head != MAGIC:
            return payload
        return self._frame(key, _parse(view, self.max_message), now, gated=False)

    def feed_chunk(self, key: str, index: int, payload: Payload, now: float) -> Payload | None:
        """Frame `index` of the retained set on `key` (from `chunk_topic(key, index)`): the
        set once it is complete and the newest manifest on `key` names it, else None."""
        view = memoryview(payload)
        if view[: len(MAGIC)] != MAGIC:
            raise Rejected("malformed-chunk", f"chunk subtopic {index} holds no HFC1 frame")
        frame = _parse(view, self.max_message)
        if frame.index != index:
            raise Rejected("malformed-chunk", f"frame {frame.index} on chunk subtopic {index}")
        return self._frame(key, frame, now, gated=True)

    def _frame(self, key: str, frame: _Frame, now: float, gated: bool) -> Payload | None:
        pid = (key, frame.msg_id)
        if pid in self._done:
            self.repeats += 1
            return None  # a repeat of a message already delivered
        if frame.count == 1 and not gated:
            self._remember_done(pid)
            return bytes(frame.data)
        part = self._partials.get(pid)
        if part is None:
            part = self._open(pid, frame.total, frame.count, frame.size, now, gated)
        elif (part.count, part.total) != (frame.count, frame.total):
            raise Rejected("malformed-chunk", f"count/total {frame.count}/{frame.total} differ "
                           f"from {part.count}/{part.total} for the same message")
        elif part.gated != gated:
            raise Rejected("malformed-chunk", "one message's chunks both on the topic and on "
                           "its chunk subtopics")
        flag = part.total + frame.index
        if part.buf[flag]:
            self.repeats += 1
            return None
        start = frame.index * part.size
        part.buf[start : start + len(frame.data)] = frame.data
        part.buf[flag] = 1
        part.missing -= 1
        if part.missing:
            return None
        if not gated:
            self._drop(pid)
            self._remember_done(pid)
            return memoryview(part.buf)[: part.total]
        named = self._manifests.get(key)
        if named is None or named.msg_id != frame.msg_id:
            return None  # complete: waits for its manifest (bounded, expires like the rest)
        return self._deliver_set(pid, named)

    def _manifest(self, key: str, m: Manifest) -> Payload | None:
        pid = (key, m.msg_id)
        if pid in self._done:
            self.repeats += 1  # the retained manifest again (a new subscription)
            return None
        old = self._manifests.get(key)
        if old is not None and old.msg_id != m.msg_id:
            replaced = self._partials.get((key, old.msg_id))
            if replaced is not None and replaced.gated:
                self._drop((key, old.msg_id))  # the older version's chunks: never delivered now
                self.stale += 1
        self._manifests[key] = m
        self._manifests.move_to_end(key)
        if len(self._manifests) > _MANIFEST_MEMORY:
            self._manifests.popitem(last=False)
        part = self._partials.get(pid)
        if part is None:
            return None  # its chunks are still to come
        if not part.gated or (part.count, part.total) != (m.count, m.total):
            self._drop(pid)
            raise Rejected("bad-manifest", f"names {m.count} chunks / {m.total} bytes; its "
                           f"chunks say {part.count} / {part.total}"
                           + ("" if part.gated else " and came on the topic itself"))
        if part.missing:
            return None
        return self._deliver_set(pid, m)

    def _deliver_set(self, pid: tuple[str, bytes], m: Manifest) -> memoryview:
        part = self._partials[pid]
        self._drop(pid)
        data = memoryview(part.buf)[: part.total]
        if (part.count, part.total) != (m.count, m.total):
            raise Rejected("bad-manifest", f"names {m.count} chunks / {m.total} bytes; its "
                           f"chunks say {part.count} / {part.total}")
        if hashlib.sha256(data).digest() != m.digest:
            raise Rejected("chunk-digest", "the retained set does not hash to its manifest's "
                           "digest")
        self._remember_done(pid)
        return data

    def expire(self, now: float) -> int:
        """Drop incomplete messages older than `ttl`; how many were dropped."""
        old = [pid for pid, p in self._partials.items() if now - p.created > self.ttl]
        for pid in old:
            self._drop(pid)
        return len(old)

    def _open(self, pid: tuple[str, bytes], total: int, count: int, size: int, now: float,
              gated: bool) -> _Partial:
        key = pid[0]
        cost = reserved(total, count)
        if cost > self.max_key_bytes:
            raise Rejected("too-large", f"{total} bytes in {count} chunks need "
                           f"{cost} > pending bound {self.max_key_bytes}")
        while self._key_bytes[key] + cost > self.max_key_bytes:  # its own oldest first
            self._drop(next(p for p in self._partials if p[0] == key))
            self.evicted += 1
        while self._partials and (self._pending_bytes + cost > self.max_pending_bytes
                                  or len(self._partials) >= self.max_pending):
            self._drop(next(iter(self._partials)))
            self.evicted += 1
        part = _Partial(count, total, size, now, cost, gated)
        self._partials[pid] = part
        self._pending_bytes += cost
        self._key_bytes[key] += cost
        return part

    def _drop(self, pid: tuple[str, bytes]) -> None:
        cost = self._partials.pop(pid).reserved
        self._pending_bytes -= cost
        self._key_bytes[pid[0]] -= cost
        if not self._key_bytes[pid[0]]:
            del self._key_bytes[pid[0]]

    def _remember_done(self, pid: tuple[str, bytes]) -> None:
        self._done[pid] = None
        if len(self._done) > _DONE_MEMORY:
            self._done.popitem(last=False)
