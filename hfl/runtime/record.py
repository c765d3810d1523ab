"""A dataclass's state as a checkpoint record (`hfl.runtime.state.Record`), from its declared
fields: written once, at the class, instead of an `export` and a `restore` kept in step by
hand.

`dump(obj)` walks the dataclass's fields with their type hints: an `np.ndarray` field (or an
optional one, left out while None) goes into the arrays under its name; any other field goes
into the JSON document through pydantic (`TypeAdapter(type).dump_python(mode="json")`: models,
sets — sorted, so that a record does not depend on hash order — dicts, lists, optionals).
`load(cls, record, **context)` does the reverse (`validate_python`); a key the record lacks
leaves the field's default (records from before the field existed), hooked fields too.

The exceptions are declared at the field, in its metadata:
- `transient`: not state (a live object rebuilt elsewhere, soft state, or the record's own
  key); `load` takes it from `context` when given there, else the field's default.
- `stored(key=..., dump=..., load=...)`: the field under another name, and/or a hook pair for
  a value that is not plain data. `dump(value)` gives `(doc value, array or None)`, the
  array stored under the same key; `load(doc value, array or None, obj, context)` gives the
  value back, once the object is built from the plain fields (so it can use them).

The document carries `"schema": SCHEMA`. A record without one is schema 1 (before this
module); `load` brings an older record up through the class's `record_migrations`
(`{from_version: function(record) -> record of from_version + 1}`), by default `MIGRATIONS`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from pydantic import TypeAdapter

from hfl.runtime.state import Record

SCHEMA = 2
SCHEMA_KEY = "schema"
_META = "hfl.record"


def unchanged(record: Record) -> Record:
    """Schema 1 → 2: the layout is the same; 2 only adds the "schema" key (set by `load`)."""
    return record


# The default migrations, from each version to the next.
MIGRATIONS: Mapping[int, Callable[[Record], Record]] = {1: unchanged}


@dataclasses.dataclass(frozen=True)
class Stored:
    key: str | None = None
    dump: Callable[[Any], tuple[Any, np.ndarray | None]] | None = None
    load: Callable[[Any, np.ndarray | None, Any, Mapping[str, Any]], Any] | None = None
    transient: bool = False


transient: Mapping[str, Stored] = types.MappingProxyType({_META: Stored(transient=True)})


def stored(key: str | None = None,
           dump: Callable[[Any], tuple[Any, np.ndarray | None]] | None = None,
           load: Callable[[Any, np.ndarray | None, Any, Mapping[str, Any]], Any] | None = None,
           ) -> Mapping[str, Stored]:
    """Field metadata: stored under `key` (default: the field's name), through the hooks
    `dump`/`load` if given (both or neither)."""
    if (dump is None) != (load is None):
        raise TypeError("stored(): give both dump and load, or neither")
    return types.MappingProxyType({_META: Stored(key, dump, load)})


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    key: str
    how: str  # "transient", "hook", "array", "doc"
    spec: Stored
    adapter: TypeAdapter | None = None
    is_set: bool = False


def _array_type(tp: Any) -> bool:
    if tp is np.ndarray or typing.get_origin(tp) is np.ndarray:
        return True
    args = typing.get_args(tp)
    return (typing.get_origin(tp) in (typing.Union, types.UnionType)
            and any(_array_type(a) for a in args)
            and all(a is type(None) or _array_type(a) for a in args))


_PLANS: dict[type, tuple[_Field, ...]] = {}


def _plan(cls: type) -> tuple[_Field, ...]:
    """The class's fields and how each is stored, worked out once per class."""
    if cls not in _PLANS:
        _PLANS[cls] = _make_plan(cls)
    return _PLANS[cls]


def _make_plan(cls: type) -> tuple[_Field, ...]:
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    hints = typing.get_type_hints(cls)
    plan = []
    for f in dataclasses.fields(cls):
        spec = f.metadata.get(_META, Stored())
        key = spec.key or f.name
        if spec.transient:
            plan.append(_Field(f.name, key, "transient", spec))
        elif spec.dump is not None:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise TypeError(f"{cls.__name__}.{f.name}: a field with hooks needs a default")
            plan.append(_Field(f.name, key, "hook", spec))
        elif _array_type(hints[f.name]):
            plan.append(_Field(f.name, key, "array", spec))
        else:
            tp = hints[f.name]
            plan.append(_Field(f.name, key, "doc", spec, TypeAdapter(tp),
                               typing.get_origin(tp) in (set, frozenset)))
    keys = [f.key for f in plan if f.how != "transient"]
    if SCHEMA_KEY in keys or len(set(keys)) != len(keys):
        raise TypeError(f"{cls.__name__}: stored keys clash: {keys}")
    return tuple(plan)


def dump(obj: Any) -> Record:
    """`obj`'s state: its fields but the transient ones. Arrays are not copied."""
    doc: dict[str, Any] = {SCHEMA_KEY: SCHEMA}
    arrays: dict[str, np.ndarray] = {}
    for f in _plan(type(obj)):
        value = getattr(obj, f.name)
        if f.how == "transient":
            continue
        if f.how == "array":
            if value is not None:
                arrays[f.key] = value
        elif f.how == "hook":
            assert f.spec.dump is not None
            doc[f.key], array = f.spec.dump(value)
            if array is not None:
                arrays[f.key] = array
        else:
            assert f.adapter is not None
            out = f.adapter.dump_python(value, mode="json")
            doc[f.key] = sorted(out) if f.is_set else out
    return doc, arrays


def migrate(record: Record, migrations: Mapping[int, Callable[[Record], Record]]) -> Record:
    """`record` brought up to `SCHEMA`."""
    doc, arrays = record
    version = doc.get(SCHEMA_KEY, 1)
    if not isinstance(version, int) or version > SCHEMA:
        raise ValueError(f"checkpoint schema {version!r}: this version reads up to {SCHEMA}")
    while version < SCHEMA:
        if version not in migrations:
            raise ValueError(f"no migration of checkpoints from schema {version}")
        doc, arrays = migrations[version]((doc, arrays))
        version += 1
    return {**doc, SCHEMA_KEY: SCHEMA}, arrays


def load(cls: type, record: Record, **context: Any) -> Any:
    """An instance of the dataclass `cls` from `record`; `context` gives transient fields
    (by name) and whatever the fields' load hooks need."""
    doc, arrays = migrate(record, getattr(cls, "record_migrations", MIGRATIONS))
    plan = _plan(cls)
    kwargs: dict[str, Any] = {}
    for f in plan:
        if f.how == "transient":
            if f.name in context:
                kwargs[f.name] = context[f.name]
        elif f.how == "array":
            if f.key in arrays:
                kwargs[f.name] = arrays[f.key]
        elif f.how == "doc" and f.key in doc:
            assert f.adapter is not None
            kwargs[f.name] = f.adapter.validate_python(doc[f.key])
    obj = cls(**kwargs)
    for f in plan:
        if f.how == "hook" and (f.key in doc or f.key in arrays):
            assert f.spec.load is not None
            setattr(obj, f.name, f.spec.load(doc.get(f.key), arrays.get(f.key), obj, context))
    return obj
