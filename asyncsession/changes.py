"""Key-level changes to one session: what ``Store.apply`` writes atomically.

A request that changes a few top-level keys of a session should not rewrite (or
conflict on) the keys it never touched. ``Changes`` says which keys to set, which to
delete, and what the caller read of the keys its changes depend on; the backend
checks those expectations and writes the changes in one atomic step. Values are
compared by their JSON (orjson) encoding, so ``1``, ``1.0`` and ``True`` differ.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, NamedTuple, NoReturn

import orjson

from . import codec
from .crypto import SEALED_KEY, KeyNotConfigured, is_sealed
from .errors import InvalidSession, NotSerializable

RESERVED = "the key '\\x00enc' is reserved (it marks encrypted data)"


def reserved_key() -> NotSerializable:
    """Data under the key that marks encrypted data: refused as data the store cannot
    hold (a client can send it where an app stores client-chosen key names, so it is
    reported as ``not_serializable``, which is logged rate-limited)."""
    return NotSerializable(
        RESERVED, details={"path": 'data["\\x00enc"]', "type": "str", "reason": "reserved key"}
    )


class _Absent:
    """The type of ``ABSENT``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "ABSENT"

    def __reduce__(self) -> str:
        return "ABSENT"


ABSENT: Final = _Absent()
"""An expected value meaning "the key did not exist"."""


@dataclass(frozen=True, slots=True)
class Changes:
    """Changes to a session's top-level keys, applied all together or not at all.

    ``set``: keys and their new values. ``delete``: keys to remove (a missing key is
    fine). ``expect``: for each key the changes depend on, the value the caller read
    (``ABSENT`` if the key did not exist); if any differs from what is stored, nothing
    is written and ``apply`` raises ``SessionConflict``. A key neither expected nor
    changed is never looked at, so concurrent changes to different keys never
    conflict. An expected value may be an ``orjson.Fragment`` of its JSON.
    """

    set: Mapping[str, Any] = field(default_factory=dict)
    delete: Collection[str] = ()
    expect: Mapping[str, Any] = field(default_factory=dict)


class Applied(NamedTuple):
    """What ``Store.apply`` left stored: the new version and times."""

    version: int
    updated_at: datetime
    expires_at: datetime | None


class EncodedChanges(NamedTuple):
    """``Changes`` as the backends take them: each key and value as its JSON bytes.

    ``expect``: (key JSON, value JSON or None for absent); ``set``: (key JSON, value
    JSON); ``delete``: key JSON. Key JSON is exactly what orjson writes for the key
    inside the stored data object, so a backend can compare and splice raw members.
    """

    expect: list[tuple[bytes, bytes | None]]
    set: list[tuple[bytes, bytes]]
    delete: list[bytes]


def _key(key: object, what: str) -> bytes:
    if type(key) is not str:
        raise InvalidSession(
            f"Changes.{what} keys must be str, not {type(key).__name__}",
            details={"type": type(key).__name__},
        )
    if key == SEALED_KEY and what == "set":
        raise reserved_key()
    try:
        return orjson.dumps(key)
    except orjson.JSONEncodeError as exc:  # a lone surrogate
        raise InvalidSession(
            f"Changes.{what} key is not valid UTF-8 text", details={"reason": str(exc)}
        ) from exc


def _refuse(what: str, wanted: str, value: object) -> NoReturn:
    raise InvalidSession(
        f"Changes.{what} must be {wanted}, not {type(value).__name__}",
        details={"field": what, "type": type(value).__name__},
    )


def encode_changes(changes: Changes) -> EncodedChanges:
    """Validate and encode ``changes``. A value that is not JSON-native raises
    ``NotSerializable`` with its path (``data["key"]...``), as a full write would."""
    if not isinstance(changes, Changes):
        raise InvalidSession(
            f"apply() needs a Changes, not {type(changes).__name__}",
            details={"type": type(changes).__name__},
        )
    for what in ("set", "expect"):
        if not isinstance(getattr(changes, what), Mapping):
            _refuse(what, "a mapping of keys to values", getattr(changes, what))
    if isinstance(changes.delete, str | bytes) or not isinstance(changes.delete, Collection):
        # a str is a Collection of its letters: Changes(delete="cart") would delete "c", "a"...
        _refuse("delete", 'a collection of keys (["cart"])', changes.delete)
    sets: list[tuple[bytes, bytes]] = []
    for key, value in changes.set.items():
        k = _key(key, "set")
        sets.append((k, _value(key, k, value)))
    deletes = []
    for key in changes.delete:
        k = _key(key, "delete")
        if key in changes.set:
            raise InvalidSession(
                "a key cannot be both set and deleted", details={"key": str(key)[:100]}
            )
        deletes.append(k)
    expects: list[tuple[bytes, bytes | None]] = []
    for key, value in changes.expect.items():
        k = _key(key, "expect")
        if value is ABSENT:
            expects.append((k, None))
        elif type(value) is orjson.Fragment:
            expects.append((k, orjson.dumps(value)))
        else:
            expects.append((k, _value(key, k, value)))
    return EncodedChanges(expects, sets, deletes)


def _value(key: str, k: bytes, value: Any) -> bytes:
    """The JSON of ``value``, refusing what would not round-trip (with its path)."""
    t = type(value)
    if t is str or t is int or t is bool or value is None:
        try:  # orjson refuses ints past 64 bits and lone surrogates: then the slow path
            return orjson.dumps(value)
        except orjson.JSONEncodeError:
            pass
    # '{"key":value}' from the strict encoder: its checks and its error paths
    return codec.encode_data({key: value})[len(k) + 2 : -1]


def apply_to_data(blob: bytes, changes: EncodedChanges, *, keyless: bool = False) -> bytes | None:
    """The encoded data ``blob`` with ``changes`` applied, or None if an expectation
    fails. For backends that keep the data as one JSON object (memory, SQLite).
    ``keyless``: the backend's own merge, run for a store without encryption keys,
    which must never merge into encrypted data (``KeyNotConfigured``)."""
    data: dict[str, Any] = orjson.loads(blob)
    if type(data) is not dict:
        raise codec.CorruptRecord("stored data is not a JSON object")
    if keyless and is_sealed(data):
        raise KeyNotConfigured.no_keys()
    if changes.expect:
        for k, expected in changes.expect:
            key = orjson.loads(k)
            current = data.get(key, ABSENT)
            if current is ABSENT:
                if expected is not None:
                    return None
            elif expected is None or orjson.dumps(current) != expected:
                return None
    for k, value in changes.set:
        data[orjson.loads(k)] = orjson.Fragment(value)
    for k in changes.delete:
        data.pop(orjson.loads(k), None)
    return orjson.dumps(data)


__all__ = ["ABSENT", "Applied", "Changes", "EncodedChanges", "apply_to_data", "encode_changes"]
