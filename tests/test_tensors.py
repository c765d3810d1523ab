"""hfl.wire.tensors: safetensors bodies written by our one-copy writer and read by our strict
zero-copy parser, both checked against the safetensors library."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from hfl.errors import Rejected
from hfl.wire.tensors import ALLOWED_DTYPES, all_finite, dump, load

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(FAST, max_examples=300)

names = st.text(min_size=1, max_size=12).filter(lambda s: s.isprintable() and s != "__metadata__")
arrays = st.sampled_from(sorted(ALLOWED_DTYPES.values(), key=str)).flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
)
tensor_dicts = st.dictionaries(names, arrays, max_size=6)


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit-exact equality (NaN payloads and -0.0 included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def raw_body(header: Any, data: bytes = b"") -> bytes:
    """A safetensors body from a header given as an object, str or bytes."""
    if not isinstance(header, (str, bytes)):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    return struct.pack("<Q", len(header)) + header + data


def entry(dtype: str, shape: list[Any], begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def rejected(buf: bytes, **kw: Any) -> Rejected:
    with pytest.raises(Rejected) as info:
        load(buf, **kw)
    assert info.value.reason == "malformed-body"
    return info.value


# ---------------------------------------------------------------------- round trips


@FAST
@given(tensor_dicts)
def test_round_trip(tensors: dict[str, np.ndarray]) -> None:
    out = load(dump(tensors))
    assert set(out) == set(tensors)
    for name, a in tensors.items():
        assert same(out[name], a), name


def test_empty_mapping_is_a_valid_body() -> None:
    body = dump({})
    assert load(body) == {}
    assert load(memoryview(body)) == {}


def test_zero_and_scalar_shapes() -> None:
    tensors = {
        "scalar": np.array(3.5, dtype=np.float64),
        "empty": np.zeros((0, 7), dtype=np.int32),
        "empty2": np.zeros((3, 0), dtype=np.uint8),
        "vec": np.arange(5, dtype=np.int64),
    }
    out = load(dump(tensors))
    for name, a in tensors.items():
        assert same(out[name], a)


def test_dump_normalises_layout_and_byte_order() -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    tensors = {
        "fortran": np.asfortranarray(base),
        "strided": base[:, ::2],
        "big": base.astype(">f4"),
        "big_int": np.arange(5, dtype=">i8"),
    }
    out = load(dump(tensors))
    for name, a in tensors.items():
        assert out[name].dtype == a.dtype.newbyteorder("<")
        np.testing.assert_array_equal(out[name], a)


@pytest.mark.parametrize(
    "bad",
    [
        {"": np.zeros(1, np.float32)},
        {"a\nb": np.zeros(1, np.float32)},
        {"__metadata__": np.zeros(1, np.float32)},
        {1: np.zeros(1, np.float32)},
        {"x": [1.0, 2.0]},
        {"x": np.zeros(2, dtype=np.bool_)},
        {"x": np.zeros(2, dtype=np.complex64)},
        {"x": np.zeros(2, dtype=np.int16)},
        {"x": np.array(["a"], dtype=object)},
    ],
)
def test_dump_refuses_programmer_errors(bad: dict[Any, Any]) -> None:
    with pytest.raises(ValueError):
        dump(bad)


# ---------------------------------------------------------------------- zero copy


def test_views_over_bytes_are_zero_copy_and_read_only() -> None:
    body = bytes(dump({"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, np.int8)}))
    out = load(body)
    for a in out.values():
        assert a.base is body
        assert np.shares_memory(a, np.frombuffer(body, np.uint8))
        assert not a.flags.writeable
    assert out["w"].flags.aligned


def test_views_over_bytearray_are_writeable_and_shared() -> None:
    buf = bytearray(dump({"w": np.zeros(4, np.float64)}))
    w = load(buf)["w"]
    assert w.base is buf
    w[2] = 7.0
    assert load(bytes(buf))["w"][2] == 7.0


def test_views_over_memoryview_slice() -> None:
    body = dump({"w": np.arange(6, dtype=np.int32).reshape(2, 3)})
    frame = b"junk" + body + b"tail"
    view = memoryview(frame)[4 : 4 + len(body)]
    w = load(view)["w"]
    np.testing.assert_array_equal(w, np.arange(6).reshape(2, 3))
    assert np.shares_memory(w, np.frombuffer(frame, np.uint8))
    assert not w.flags.writeable


def test_non_byte_memoryview_is_read_as_bytes() -> None:
    body = dump({"w": np.arange(8, dtype=np.uint8)})
    assert len(body) % 4 == 0  # safetensors pads its header to 8 bytes
    view = memoryview(body).cast("I")
    np.testing.assert_array_equal(load(view)["w"], np.arange(8))


def test_non_contiguous_buffer_is_rejected() -> None:
    body = dump({"w": np.arange(8, dtype=np.uint8)})
    rejected(memoryview(body + body)[::2])  # type: ignore[arg-type]


# ---------------------------------------------------------------------- compatibility


def test_reads_safetensors_save_with_metadata() -> None:
    tensors = {
        "weight": np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32),
        "bias": np.arange(4, dtype=np.float64),
        "steps": np.array([7], dtype=np.int64),
        "mask": np.zeros((2, 2), dtype=np.uint8),
        "half": np.ones(5, dtype=np.float16),
    }
    body = st_save(tensors, metadata={"format": "np", "note": "hi"})
    out = load(body)
    assert set(out) == set(tensors)
    for name, a in tensors.items():
        assert same(out[name], a)


@FAST
@given(tensor_dicts, st.dictionaries(names, st.text(max_size=8), max_size=3))
def test_the_library_reads_what_dump_writes(tensors: dict[str, np.ndarray],
                                            metadata: dict[str, str]) -> None:
    """Our writer against the reference implementation: same tensors, same metadata."""
    body = bytes(dump(tensors, metadata=metadata))
    out = st_load(body)
    assert set(out) == set(tensors)
    for name, a in tensors.items():
        assert same(out[name], np.asarray(a, a.dtype.newbyteorder("<")))
    size = int.from_bytes(body[:8], "little")
    assert size % 8 == 0
    assert json.loads(body[8 : 8 + size]).get("__metadata__", {}) == metadata


def test_dump_aligns_every_tensor() -> None:
    tensors = {"a": np.ones(3, np.int8), "b": np.ones(5, np.float64), "c": np.ones(1, np.int32),
               "d": np.ones(7, np.float16)}
    for a in load(dump(tensors)).values():
        assert a.flags.aligned


# ---------------------------------------------------------------------- malicious headers

F32x2 = 8  # bytes of a float32 tensor of shape [2]

MALICIOUS: dict[str, bytes] = {
    "overlap": raw_body({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, b"\0" * 12),
    "gap": raw_body({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 12, 20)}, b"\0" * 20),
    "leading-gap": raw_body({"a": entry("F32", [2], 4, 12)}, b"\0" * 12),
    "past-end": raw_body({"a": entry("F32", [2], 0, 8)}, b"\0" * 4),
    "trailing-bytes": raw_body({"a": entry("F32", [2], 0, 8)}, b"\0" * 12),
    "shape-overflow": raw_body({"a": entry("F32", [2**40, 2**40], 0, 8)}, b"\0" * 8),
    "shape-wraps-to-span": raw_body({"a": entry("U8", [2**32, 2**32, 0, 8], 0, 8)}, b"\0" * 8),
    "empty-but-absurd": raw_body({"a": entry("F32", [0, 2**62, 2**62], 0, 0)}),
    "too-many-dims": raw_body({"a": entry("U8", [1] * 33, 0, 1)}, b"\0"),
    "size-mismatch": raw_body({"a": entry("F32", [3], 0, 8)}, b"\0" * 8),
    "reversed-offsets": raw_body({"a": entry("U8", [0], 8, 0)}, b"\0" * 8),
    "negative-offset": raw_body({"a": entry("U8", [8], -8, 0)}, b"\0" * 8),
    "negative-dim": raw_body({"a": entry("U8", [-1], 0, 0)}),
    "bool-dim": raw_body({"a": entry("U8", [True], 0, 1)}, b"\0"),
    "bool-offset": raw_body({"a": entry("U8", [1], False, True)}, b"\0"),
    "float-dim": raw_body({"a": entry("U8", [1.0], 0, 1)}, b"\0"),
    "string-dim": raw_body({"a": entry("U8", ["1"], 0, 1)}, b"\0"),
    "shape-not-list": raw_body({"a": {"dtype": "U8", "shape": 1, "data_offsets": [0, 1]}}, b"\0"),
    "offsets-three": raw_body(
        {"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 1]}}, b"\0"
    ),
    "unknown-dtype": raw_body({"a": entry("BF16", [1], 0, 2)}, b"\0\0"),
    "bool-dtype": raw_body({"a": entry("BOOL", [1], 0, 1)}, b"\0"),
    "dtype-not-str": raw_body({"a": entry(["F32"], [1], 0, 4)}, b"\0" * 4),  # type: ignore[arg-type]
    "extra-key": raw_body({"a": {**entry("U8", [1], 0, 1), "x": 1}}, b"\0"),
    "missing-key": raw_body({"a": {"dtype": "U8", "shape": [1]}}, b"\0"),
    "entry-not-object": raw_body({"a": [1, 2, 3]}),
    "empty-name": raw_body({"": entry("U8", [1], 0, 1)}, b"\0"),
    "control-name": raw_body({"a\u0000": entry("U8", [1], 0, 1)}, b"\0"),
    "surrogate-name": raw_body(
        '{"\\ud800": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"
    ),
    "metadata-not-object": raw_body({"__metadata__": ["x"]}),
    "metadata-non-str": raw_body({"__metadata__": {"k": 1}}),
    "duplicate-keys": raw_body(
        '{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        ' "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
        b"\0",
    ),
    "duplicate-inner-keys": raw_body(
        '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"\0"
    ),
    "nan": raw_body('{"__metadata__": {}, "a": NaN}'),
    "infinity": raw_body('{"a": {"dtype": "U8", "shape": [Infinity], "data_offsets": [0, 1]}}'),
    "list-json": raw_body("[]"),
    "number-json": raw_body("3"),
    "string-json": raw_body('"x"'),
    "null-json": raw_body("null"),
    "not-json": raw_body("{nope"),
    "trailing-junk-json": raw_body("{} {}"),
    "bad-utf8": raw_body(b'{"\xff": 1}'),
    "huge-int": raw_body(
        '{"a": {"dtype": "U8", "shape": [' + "9" * 5000 + '], "data_offsets": [0, 1]}}'
    ),
    "deep-nesting": raw_body('{"__metadata__": ' + "[" * 100_000 + "]" * 100_000 + "}"),
    "header-past-end": struct.pack("<Q", 100) + b"{}",
    "header-huge": struct.pack("<Q", 2**63) + b"{}",
    "short-prefix": b"\x02\0\0",
    "empty": b"",
}


@pytest.mark.parametrize("name", sorted(MALICIOUS))
def test_malicious_header_is_rejected(name: str) -> None:
    rejected(MALICIOUS[name])


def test_header_limit() -> None:
    body = dump({"w": np.zeros(3, np.float32)})
    header_len = struct.unpack_from("<Q", body)[0]
    assert load(body, max_header=header_len)
    rejected(body, max_header=header_len - 1)


def test_tensor_count_limit() -> None:
    body = dump({f"t{i}": np.zeros(1, np.uint8) for i in range(5)})
    assert len(load(body, max_tensors=5)) == 5
    rejected(body, max_tensors=4)


def test_metadata_does_not_count_against_tensor_limit() -> None:
    body = st_save({"a": np.zeros(1, np.uint8)}, metadata={"k": "v"})
    assert list(load(body, max_tensors=1)) == ["a"]


def test_zero_size_tensors_share_a_boundary() -> None:
    header = {
        "a": entry("U8", [0], 0, 0),
        "b": entry("F32", [2], 0, 8),
        "c": entry("I64", [0, 3], 8, 8),
    }
    out = load(raw_body(header, b"\0" * 8))
    assert out["a"].shape == (0,) and out["c"].shape == (0, 3) and out["b"].shape == (2,)


# ---------------------------------------------------------------------- fuzz


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_only_reject(data: bytes) -> None:
    try:
        load(data)
    except Rejected as r:
        assert r.reason == "malformed-body"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
fuzzy_entries = st.fixed_dictionaries(
    {},
    optional={
        "dtype": st.sampled_from(["F32", "U8", "I64", "BF16", ""]) | json_values,
        "shape": st.lists(st.integers(-2, 4), max_size=3) | json_values,
        "data_offsets": st.lists(st.integers(-2, 20), max_size=3) | json_values,
        "extra": json_values,
    },
)


@FUZZ
@given(
    st.dictionaries(st.text(max_size=4), fuzzy_entries | json_values, max_size=4),
    st.binary(max_size=24),
)
def test_structured_garbage_headers_only_reject(header: dict[str, Any], data: bytes) -> None:
    try:
        out = load(raw_body(json.dumps(header), data))
    except Rejected as r:
        assert r.reason == "malformed-body"
    else:  # anything accepted must describe the data region exactly
        assert sum(a.nbytes for a in out.values()) == len(data)


# ---------------------------------------------------------------------- all_finite


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_all_finite_catches_non_finite(dtype: type, bad: float) -> None:
    a = np.zeros((3, 4), dtype=dtype)
    assert all_finite({"ok": a, "i": np.arange(3)})
    a[2, 1] = bad
    assert not all_finite({"ok": np.zeros(2), "bad": a})


def test_all_finite_integers_and_empty() -> None:
    assert all_finite({})
    assert all_finite({"i": np.array([np.iinfo(np.int64).max]), "e": np.zeros((0,), np.float32)})
