"""Split large payloads into MQTT-sized chunks and reassemble them with bounded memory.

Pure: no I/O, no clocks (time is an argument). A chunk frame is

    b"HFC1" | 16-byte message id | u32 LE index | u32 LE count | u64 LE total | data

Every non-last chunk carries ceil(total / count) bytes and the last one the rest, so the
receiver can check each frame on its own and copy it straight into place. Whole messages
(envelopes start with b"HFL1") pass through untouched.

The reassembler's bounds count what it maps for each incomplete message (`reserved`), not
what has arrived: the memory it can be made to hold never exceeds them.
"""

from __future__ import annotations

import math
import mmap
import os
import struct
from collections import Counter, OrderedDict
from dataclasses import dataclass, field

from hfl.errors import Rejected

MAGIC = b"HFC1"
ID_LEN = 16
_HEADER = struct.Struct(f"<4s{ID_LEN}sIIQ")
FRAME_OVERHEAD = _HEADER.size  # 36 bytes
_DONE_MEMORY = 4096  # completed (key, id) pairs remembered so late repeats are dropped
PAGE = mmap.PAGESIZE

Payload = bytes | bytearray | memoryview


def split(payload: bytes, max_payload: int, *, msg_id: bytes | None = None) -> list[bytes]:
    """Frames of at most `max_payload` bytes each; `[payload]` when it already fits."""
    if len(payload) <= max_payload and not payload.startswith(MAGIC):
        return [payload]
    data_max = max_payload - FRAME_OVERHEAD
    if data_max <= 0:
        raise ValueError(f"max_payload {max_payload} leaves no room past the chunk header")
    msg_id = os.urandom(ID_LEN) if msg_id is None else msg_id
    if len(msg_id) != ID_LEN:
        raise ValueError(f"msg_id must be {ID_LEN} bytes")
    total = len(payload)
    count = math.ceil(total / data_max)
    size = math.ceil(total / count)  # what the receiver derives; never above data_max
    view = memoryview(payload)  # slices without copying: one copy per frame, not quadratic
    return [
        b"".join((_HEADER.pack(MAGIC, msg_id, i, count, total), view[i * size : (i + 1) * size]))
        for i in range(count)
    ]


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
        """The whole message once its last chunk arrives; a non-chunk payload as is."""
        view = memoryview(payload)
        if view[: len(MAGIC)] != MAGIC:
            return payload
        frame = _parse(view, self.max_message)
        pid = (key, frame.msg_id)
        if pid in self._done:
            self.repeats += 1
            return None  # a repeat of a message already delivered
        if frame.count == 1:
            self._remember_done(pid)
            return bytes(frame.data)
        part = self._partials.get(pid)
        if part is None:
            part = self._open(pid, frame, now)
        elif (part.count, part.total) != (frame.count, frame.total):
            raise Rejected("malformed-chunk", f"count/total {frame.count}/{frame.total} differ "
                           f"from {part.count}/{part.total} for the same message")
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
        self._drop(pid)
        self._remember_done(pid)
        return memoryview(part.buf)[: part.total]

    def expire(self, now: float) -> int:
        """Drop incomplete messages older than `ttl`; how many were dropped."""
        old = [pid for pid, p in self._partials.items() if now - p.created > self.ttl]
        for pid in old:
            self._drop(pid)
        return len(old)

    def _open(self, pid: tuple[str, bytes], frame: _Frame, now: float) -> _Partial:
        key = pid[0]
        cost = reserved(frame.total, frame.count)
        if cost > self.max_key_bytes:
            raise Rejected("too-large", f"{frame.total} bytes in {frame.count} chunks need "
                           f"{cost} > pending bound {self.max_key_bytes}")
        while self._key_bytes[key] + cost > self.max_key_bytes:  # its own oldest first
            self._drop(next(p for p in self._partials if p[0] == key))
            self.evicted += 1
        while self._partials and (self._pending_bytes + cost > self.max_pending_bytes
                                  or len(self._partials) >= self.max_pending):
            self._drop(next(iter(self._partials)))
            self.evicted += 1
        part = _Partial(frame.count, frame.total, frame.size, now, cost)
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
