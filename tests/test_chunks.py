"""hfl.wire.chunks: round trips, strict validation, bounded memory."""

from __future__ import annotations

import contextlib
import os
import random
import struct
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hfl.errors import Rejected
from hfl.wire.chunks import FRAME_OVERHEAD, MAGIC, Reassembler, reserved, split

MID = bytes(range(16))


def frame(index: int, count: int, total: int, data: bytes, msg_id: bytes = MID) -> bytes:
    return MAGIC + msg_id + struct.pack("<IIQ", index, count, total) + data


def feed_all(r: Reassembler, frames: list[bytes], key: str = "t") -> list[object]:
    return [out for f in frames if (out := r.feed(key, f, 0.0)) is not None]


def test_small_payload_passes_through() -> None:
    payload = b"HFL1" + b"x" * 100
    assert split(payload, 1000) == [payload]
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    assert r.feed("t", payload, 0.0) is payload


def test_frames_fit_and_share_one_data_size() -> None:
    payload = os.urandom(10_000)
    frames = split(payload, 1000, msg_id=MID)
    assert all(len(f) <= 1000 for f in frames)
    sizes = {len(f) - FRAME_OVERHEAD for f in frames[:-1]}
    assert len(sizes) == 1
    assert b"".join(f[FRAME_OVERHEAD:] for f in frames) == payload


def test_split_needs_room_for_the_header() -> None:
    with pytest.raises(ValueError):
        split(b"x" * 100, FRAME_OVERHEAD)


def test_payload_that_looks_like_a_chunk_is_framed() -> None:
    payload = MAGIC + b"not a frame"
    frames = split(payload, 1000)
    assert frames != [payload]
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    assert bytes(feed_all(r, frames)[0]) == payload  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(size=st.integers(0, 20_000), max_payload=st.integers(FRAME_OVERHEAD + 1, 5_000),
       seed=st.integers(0, 2**32 - 1))
def test_round_trip_shuffled_and_duplicated(size: int, max_payload: int, seed: int) -> None:
    rng = random.Random(seed)
    payload = rng.randbytes(size)
    frames = split(payload, max_payload)
    assert all(len(f) <= max(max_payload, size) for f in frames)
    fed = frames + rng.sample(frames, k=min(len(frames), 3))  # some chunks twice
    rng.shuffle(fed)
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    outs = feed_all(r, fed + frames)  # and the whole message again, late
    if frames == [payload]:
        assert len(outs) == len(fed) + 1  # whole messages pass through every time
    else:
        assert len(outs) == 1  # a chunked one completes once
    assert all(bytes(o) == payload for o in outs)  # type: ignore[call-overload]
    assert r.pending_bytes == 0


def test_interleaved_messages_and_keys_stay_apart() -> None:
    a, b = os.urandom(5000), os.urandom(7000)
    fa, fb = split(a, 600, msg_id=MID), split(b, 600, msg_id=MID)  # same id, other key
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    outs: dict[str, bytes] = {}
    for i in range(max(len(fa), len(fb))):
        for key, frames in (("a", fa), ("b", fb)):
            if i < len(frames) and (out := r.feed(key, frames[i], 0.0)) is not None:
                outs[key] = bytes(out)
    assert outs == {"a": a, "b": b}


MALFORMED = {
    "short": MAGIC + b"\0" * 10,
    "index >= count": frame(3, 3, 30, b"x" * 10),
    "count 0": frame(0, 0, 30, b"x" * 10),
    "total 0": frame(0, 2, 0, b""),
    "count > total": frame(0, 6, 5, b"x"),
    "non-last too short": frame(0, 3, 30, b"x" * 9),
    "non-last too long": frame(0, 3, 30, b"x" * 11),
    "last wrong size": frame(2, 3, 25, b"x" * 10),
    "single chunk wrong size": frame(0, 1, 30, b"x" * 29),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_frames_are_rejected(case: str) -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    with pytest.raises(Rejected) as e:
        r.feed("t", MALFORMED[case], 0.0)
    assert e.value.reason == "malformed-chunk"


@pytest.mark.parametrize("other", [frame(1, 4, 30, b"x" * 10), frame(1, 3, 29, b"x" * 10)])
def test_count_or_total_change_for_one_message_is_rejected(other: bytes) -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20)
    assert r.feed("t", frame(0, 3, 30, b"x" * 10), 0.0) is None
    with pytest.raises(Rejected) as e:
        r.feed("t", other, 0.0)
    assert e.value.reason == "malformed-chunk"


def test_too_large_is_rejected_before_allocating() -> None:
    r = Reassembler(max_message=1000, max_pending_bytes=1 << 20)
    with pytest.raises(Rejected) as e:
        r.feed("t", frame(0, 2, 2**40, b"x"), 0.0)
    assert e.value.reason == "too-large"
    assert r.pending_bytes == 0


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_after_magic_only_rejects(tail: bytes) -> None:
    r = Reassembler(max_message=1 << 16, max_pending_bytes=1 << 20)
    with contextlib.suppress(Rejected):  # anything else escapes and fails the test
        r.feed("t", MAGIC + tail, 0.0)
    assert r.pending_bytes <= 1 << 20


@settings(max_examples=50, deadline=None)
@given(totals=st.lists(st.integers(100, 50_000), min_size=1, max_size=60),
       bound=st.integers(60_000, 200_000), max_pending=st.integers(1, 10))
def test_memory_bound_holds_and_evictions_count(totals: list[int], bound: int,
                                                max_pending: int) -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=bound, max_pending=max_pending)
    for i, total in enumerate(totals):
        msg_id = i.to_bytes(16, "little")
        first = split(bytes(total), max(FRAME_OVERHEAD + 1, total // 2 + FRAME_OVERHEAD),
                      msg_id=msg_id)[0]
        assert r.feed("t", first, float(i)) is None  # never the last chunk: stays incomplete
        assert r.pending_bytes <= bound
        assert r.pending <= max_pending
    assert r.evicted == len(totals) - r.pending


def test_evicts_oldest_first() -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=25_000)
    msgs = [os.urandom(10_000) for _ in range(3)]
    frames = [split(m, 4000, msg_id=bytes([i]) * 16) for i, m in enumerate(msgs)]
    for f in frames:
        r.feed("t", f[0], 0.0)
    assert r.evicted == 1 and r.pending_bytes == 2 * reserved(10_000, 3)
    assert feed_all(r, frames[0][1:]) == []  # the first one was evicted: a new partial
    assert [bytes(o) for o in feed_all(r, frames[2][1:])] == [msgs[2]]  # type: ignore[arg-type]


def test_a_sender_flooding_partials_evicts_only_its_own() -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=100_000, max_key_bytes=25_000)
    honest = os.urandom(10_000)
    frames = split(honest, 4000, msg_id=b"h" * 16)
    r.feed("updates/honest", frames[0], 0.0)
    for i in range(20):  # first chunks of messages that never complete, on one topic
        r.feed("updates/flood", split(bytes(10_000), 4000, msg_id=bytes([i]) * 16)[0], 1.0)
    assert r.evicted == 18 and r.pending == 3  # the flood keeps its 2 newest
    assert [bytes(o) for o in feed_all(r, frames[1:], "updates/honest")] == [honest]  # type: ignore[arg-type]
    with pytest.raises(Rejected, match="too-large"):
        r.feed("updates/flood", split(bytes(30_000), 4000, msg_id=b"x" * 16)[0], 2.0)


def test_interleaved_uploads_of_many_senders_all_complete() -> None:
    """The whole round arrives at once: each sender's message stays whole however many send."""
    r = Reassembler(max_message=1 << 20, max_pending_bytes=10 * reserved(50_000, 10),
                    max_key_bytes=2 * reserved(50_000, 10))
    msgs = {f"updates/a{i}": os.urandom(50_000) for i in range(10)}
    frames = {k: split(m, 5000, msg_id=os.urandom(16)) for k, m in msgs.items()}
    done = {}
    for j in range(len(frames["updates/a0"])):  # chunk j of every sender, then chunk j+1
        for k, fs in frames.items():
            out = r.feed(k, fs[j], 0.0)
            if out is not None:
                done[k] = bytes(out)
    assert done == msgs and r.evicted == 0 and r.pending_bytes == 0


def test_expire_drops_old_partials() -> None:
    r = Reassembler(max_message=1 << 20, max_pending_bytes=1 << 20, ttl=10.0)
    old = split(os.urandom(3000), 1000, msg_id=b"a" * 16)
    new = split(os.urandom(3000), 1000, msg_id=b"b" * 16)
    r.feed("t", old[0], 0.0)
    r.feed("t", new[0], 8.0)
    assert r.expire(5.0) == 0
    assert r.expire(15.0) == 1
    assert r.pending_bytes == reserved(3000, 3)
    assert r.expire(100.0) == 1
    assert r.pending_bytes == 0


def test_the_bound_counts_what_a_claim_makes_the_receiver_hold() -> None:
    """A 37-byte frame may claim a message of 1-byte chunks (count == total). Its per-chunk
    flags were a zeroed bytearray outside the bound: 16 frames claiming 128 MiB each pinned
    2 GiB of flags for 600 bytes sent. Now they are mapped lazily with the data and both
    are counted, so the bound holds for everything held."""
    n = 16 << 20
    bound = 4 * n
    r = Reassembler(max_message=n, max_pending_bytes=bound)
    tracemalloc.start()
    try:
        for k in range(8):
            assert r.feed("t", frame(0, n, n, b"x", msg_id=k.to_bytes(16, "little")), 0.0) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20  # nothing the size of a claim is allocated up front
    assert r.pending_bytes <= bound
    assert r.pending_bytes == r.pending * reserved(n, n) >= r.pending * 2 * n  # data + flags
