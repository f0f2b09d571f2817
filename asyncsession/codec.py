"""The one place that turns a ``Session`` into bytes and back (orjson).

A record is a JSON object: a small header of metadata (timestamps as integer
microseconds since the epoch, so they round-trip exactly) followed by ``"d"``,
the session data. The data is encoded once, strictly: anything orjson would
silently change (datetimes, UUIDs, tuples, enums, dataclasses, NaN) is refused,
so what you store is exactly what you read back from any backend.
"""

from __future__ import annotations

import gc
import math
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson

from .errors import InvalidSession, NotSerializable
from .session import Session

RECORD_FORMAT = 1
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
MAX_DEPTH = 254
"""orjson's limit: containers nested at most this deep, ``data`` itself counting as
the first (so a top-level key's value may nest 253 deep); deeper is refused."""
_INT_MIN = -(2**63)
_INT_MAX = 2**64 - 1
_STRICT = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


class CorruptRecord(ValueError):
    """Stored bytes that are not a session record of this library."""


def to_us(when: datetime) -> int:
    """Aware datetime to integer microseconds since the epoch (exact)."""
    return (when - EPOCH) // _ONE_US


def from_us(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def _opt_us(when: datetime | None) -> int | None:
    return None if when is None else to_us(when)


def _opt_dt(us: int | None) -> datetime | None:
    return None if us is None else from_us(us)


def encode_data(data: Any) -> bytes:
    """Encode session data as JSON, refusing anything that would not round-trip exactly."""
    if type(data) is not dict:
        raise NotSerializable(
            f"session data must be a dict, not {type(data).__name__}",
            details={"path": "data", "type": type(data).__name__},
        )
    try:
        # orjson refuses sets, bytes, non-str keys, ints past 64 bits, nesting past 254
        # levels, and (with these options) datetimes, dataclasses and str/int/dict/list
        # subclasses ...
        raw = orjson.dumps(data, option=_STRICT)
    except (orjson.JSONEncodeError, TypeError, RecursionError) as exc:
        raise not_serializable(data) from exc
    # ... but encodes tuples, UUIDs, enums and NaN/Infinity without complaint, changing
    # them. One exact-type pass catches those; orjson already bounded the depth.
    if not _json_native(data):
        raise not_serializable(data)
    return raw


_NATIVE = frozenset({str, int, bool, float, type(None), dict, list})
_NATIVE_NOT_FLOAT = _NATIVE - {float}
_referents = gc.get_referents


def _json_native_by_level(data: dict[str, Any]) -> bool:
    """True if every value under ``data`` has an exact JSON type and no float is NaN or
    infinite. Walks the tree a level at a time with ``gc.get_referents``, which hands
    back every value of every dict and list of a level in one C call (and nothing for
    str, int, float, bool or None), so the per-value work is one ``type`` lookup in C.
    Dict keys only come back for dicts with a non-str key, which orjson has already
    refused. Only called after orjson accepted ``data``, which bounds the depth."""
    refs = _referents(data)
    while refs:
        if not _NATIVE_NOT_FLOAT.issuperset(map(type, refs)):
            for x in refs:  # a float (must be finite) or a type that is not JSON
                t = type(x)
                if t is float:
                    if x - x != 0.0:  # NaN and +-Infinity
                        return False
                elif t not in _NATIVE:
                    return False
        refs = _referents(*refs)
    return True


def _json_native_by_value(data: dict[str, Any]) -> bool:
    """The same check, one value at a time in Python: used if ``gc.get_referents``
    does not behave as ``_json_native_by_level`` needs on this interpreter."""
    return _native_values(data.values())


def _native_values(values: Any) -> bool:
    for x in values:
        t = type(x)
        if t is str or t is int or t is bool or x is None:
            continue
        if t is float:
            if x - x != 0.0:  # NaN and +-Infinity
                return False
        elif t is dict:
            if not _native_values(x.values()):
                return False
        elif t is list:
            if not _native_values(x):
                return False
        else:
            return False
    return True


def _referents_work() -> bool:
    """Whether ``gc.get_referents`` returns exactly the values of dicts and lists here
    (CPython does; another interpreter may not), checked once at import."""
    probe: dict[str, Any] = {"a": None, "b": [1.5, (), "s"], "c": {"d": True}}
    try:
        level1 = _referents(probe)
        level2 = _referents(*level1)
    except Exception:  # pragma: no cover - not CPython
        return False
    return (
        sorted(map(repr, level1)) == sorted(map(repr, probe.values()))
        and sorted(map(repr, level2)) == sorted(map(repr, [1.5, (), "s", True]))
        and not _referents(1, "s", 1.5, None, True)
        and _json_native_by_level(probe) is False  # the tuple
        and _json_native_by_level({"a": [{"b": 1.5}]}) is True
        and _json_native_by_level({"a": [{"b": math.nan}]}) is False
    )


_json_native = _json_native_by_level if _referents_work() else _json_native_by_value


MAX_PATH_SHOWN = 200
"""Characters of a key path an error shows: the keys may be a client's (an app that
stores what it is sent), and each error is logged."""


def _clip(text: str) -> str:
    if len(text) <= MAX_PATH_SHOWN:
        return text
    half = MAX_PATH_SHOWN // 2
    return f"{text[:half]}...{text[-half:]}"


def not_serializable(data: dict[str, Any]) -> NotSerializable:
    """The error for ``data`` that is not JSON-native, naming the first bad path."""
    path, reason, type_name = find_non_json(data)
    path, reason = _clip(path), _clip(reason)
    return NotSerializable(
        f"session data is not JSON-native at {path}: {reason}",
        details={"path": path, "type": type_name, "reason": reason},
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def find_non_json(data: Any) -> tuple[str, str, str]:
    """Path, reason and type name of the first value that is not JSON-native.

    Iterative, so hostile nesting cannot exhaust the Python stack.
    """
    stack: list[tuple[str, Any, int]] = [("data", data, 0)]
    while stack:
        path, value, depth = stack.pop()
        kind = type(value)
        if value is None or kind is bool:
            continue
        if kind is str:
            if not _utf8(value):
                return path, "string is not valid UTF-8 (lone surrogate)", "str"
            continue
        if kind is int:
            if not _INT_MIN <= value <= _INT_MAX:
                return path, "integer does not fit in 64 bits", "int"
            continue
        if kind is float:
            if not math.isfinite(value):
                return path, f"{value!r} has no JSON form", "float"
            continue
        if depth >= MAX_DEPTH:
            return (
                path,
                f"nested deeper than {MAX_DEPTH} levels (data itself is one)",
                kind.__name__,
            )
        if kind is dict:
            items = list(value.items())
            for key, item in reversed(items):
                if type(key) is not str:
                    return f"{path}[{key!r}]", "keys must be str", type(key).__name__
                if not _utf8(key):
                    return f"{path}[{key!r}]", "key is not valid UTF-8 (lone surrogate)", "str"
                stack.append((f"{path}[{orjson.dumps(key).decode()}]", item, depth + 1))
            continue
        if kind is list:
            for index in range(len(value) - 1, -1, -1):
                stack.append((f"{path}[{index}]", value[index], depth + 1))
            continue
        return path, f"{kind.__name__} is not a JSON type", kind.__name__
    return "data", "value does not round-trip through JSON", type(data).__name__


def check_metadata(session: Session) -> None:
    """What ``encode`` checks of the metadata, for backends that keep the metadata in
    their own fields and store only ``encode_data`` (memory, SQLite): the optional
    text fields are ``str`` or ``None`` and every text field is valid UTF-8."""
    org, ip, ua = session.organization_id, session.ip_address, session.user_agent
    if (
        (org is not None and (type(org) is not str or not (org.isascii() or _utf8(org))))
        or (ip is not None and (type(ip) is not str or not (ip.isascii() or _utf8(ip))))
        or (ua is not None and (type(ua) is not str or not (ua.isascii() or _utf8(ua))))
    ):
        raise _bad_metadata(session)
    user = session.user_id
    if user is not None and (type(user) is not str or not (user.isascii() or _utf8(user))):
        raise InvalidSession(
            "session.user_id must be valid UTF-8 text or None", details={"field": "user_id"}
        )


HEADER_FIXED = 256
"""Bytes of a record header besides its text fields: keys, punctuation, six integers
of at most 20 characters each (measured: about 190)."""


def header_bound(session: Session) -> int:
    """An upper bound on the bytes ``encode`` adds around the data: ``HEADER_FIXED``
    plus 6 bytes per character of text (the longest JSON escape, ``\\u001f``)."""
    n = (
        len(session.id)
        + len(session.site_id)
        + len(session.user_id or "")
        + len(session.organization_id or "")
        + len(session.ip_address or "")
        + len(session.user_agent or "")
    )
    return HEADER_FIXED + 6 * n


def record_size(session: Session, data: bytes) -> int:
    """The exact size of the record ``encode(session, data)`` would write."""
    return len(encode(session, data))


def encode(session: Session, data: bytes | None = None) -> bytes:
    """The full record; ``data`` is ``encode_data(session.data)`` when already computed."""
    if data is None:
        data = encode_data(session.data)
    # The timestamps are usually a few shared objects (new sessions: created = updated
    # = last access, expiry = absolute deadline; updates: updated = last access = now):
    # convert each distinct object once.
    created = session.created_at
    c = to_us(created)
    updated = session.updated_at
    m = c if updated is created else to_us(updated)
    accessed = session.last_accessed_at
    a = c if accessed is created else m if accessed is updated else to_us(accessed)
    expires = session.expires_at
    e = None if expires is None else to_us(expires)
    absolute = session.absolute_expires_at
    x = e if absolute is expires else _opt_us(absolute)
    org, ip, ua = session.organization_id, session.ip_address, session.user_agent
    if (
        (org is not None and type(org) is not str)
        or (ip is not None and type(ip) is not str)
        or (ua is not None and type(ua) is not str)
    ):
        raise _bad_metadata(session)
    try:
        header = orjson.dumps(
            {
                "f": RECORD_FORMAT,
                "id": session.id,
                "u": session.user_id,
                "s": session.site_id,
                "o": org,
                "c": c,
                "m": m,
                "a": a,
                "e": e,
                "x": x,
                "ip": ip,
                "ua": ua,
                "n": session.version,
            }
        )
    except orjson.JSONEncodeError as exc:  # a lone surrogate in user id, agent, ...
        raise InvalidSession(
            "session metadata must be valid UTF-8 text", details={"reason": str(exc)}
        ) from exc
    return b"".join((header[:-1], b',"d":', data, b"}"))


def _bad_metadata(session: Session) -> InvalidSession:
    for name in ("organization_id", "ip_address", "user_agent"):
        value = getattr(session, name)
        if value is not None and type(value) is not str:
            return InvalidSession(
                f"session.{name} must be a str or None, not {type(value).__name__}",
                details={"field": name, "type": type(value).__name__},
            )
        if value is not None and not _utf8(value):
            return InvalidSession(
                f"session.{name} must be valid UTF-8 text", details={"field": name}
            )
    raise AssertionError("unreachable")  # pragma: no cover


def _check(value: Any, types: type | tuple[type, ...], name: str) -> Any:
    if type(value) is bool or not isinstance(value, types):
        raise CorruptRecord(f"field {name!r} has type {type(value).__name__}")
    return value


_STR_OR_NONE = (str, type(None))
_INT_OR_NONE = (int, type(None))


_new_session = Session.__new__


def decode(
    raw: bytes | bytearray | memoryview | str,
    accessed: int | None = None,
    expires: int | bool | None = False,
) -> Session:
    """Parse a record; anything that is not one raises ``CorruptRecord``.

    ``accessed`` / ``expires`` (integer microseconds; ``expires`` None for none) replace
    the record's own, for a backend that keeps them in fields of their own (Redis
    ``touch`` does not rewrite the record); ``False`` keeps the record's.
    """
    try:
        r = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise CorruptRecord("not JSON") from exc
    if type(r) is not dict or r.get("f") != RECORD_FORMAT:
        raise CorruptRecord("not a session record")
    try:
        data, sid, user, site, org = r["d"], r["id"], r["u"], r["s"], r["o"]
        c, m, a, e, x, ip, ua, n = r["c"], r["m"], r["a"], r["e"], r["x"], r["ip"], r["ua"], r["n"]
    except KeyError as exc:
        raise CorruptRecord(f"missing field {exc.args[0]!r}") from exc
    if accessed is not None:
        a = accessed
    if expires is not False:
        e = expires
    # orjson gives exact types, so ``type(v) is int`` also refuses booleans
    if not (
        type(data) is dict
        and type(sid) is str
        and type(site) is str
        and type(c) is int
        and type(m) is int
        and type(a) is int
        and type(n) is int
        and (user is None or type(user) is str)
        and (org is None or type(org) is str)
        and (e is None or type(e) is int)
        and (x is None or type(x) is int)
        and (ip is None or type(ip) is str)
        and (ua is None or type(ua) is str)
    ):
        raise _wrong_type(r)
    s = _new_session(Session)
    s.id = sid
    s.user_id = user
    s.site_id = site
    s.organization_id = org
    s.data = data
    s.ip_address = ip
    s.user_agent = ua
    s.version = n
    try:
        # the timestamps are mostly a few equal values: convert each distinct one once
        created = from_us(c)
        updated = created if m == c else from_us(m)
        s.created_at = created
        s.updated_at = updated
        s.last_accessed_at = created if a == c else updated if a == m else from_us(a)
        expires_at = None if e is None else from_us(e)
        s.expires_at = expires_at
        s.absolute_expires_at = expires_at if x == e else None if x is None else from_us(x)
    except OverflowError as exc:
        raise CorruptRecord(f"bad timestamp: {exc}") from exc
    return s


def _wrong_type(r: dict[str, Any]) -> CorruptRecord:
    if type(r["d"]) is not dict:
        return CorruptRecord("field 'd' is not an object")
    for name, types in (
        ("id", str),
        ("u", _STR_OR_NONE),
        ("s", str),
        ("o", _STR_OR_NONE),
        ("c", int),
        ("m", int),
        ("a", int),
        ("e", _INT_OR_NONE),
        ("x", _INT_OR_NONE),
        ("ip", _STR_OR_NONE),
        ("ua", _STR_OR_NONE),
        ("n", int),
    ):
        try:
            _check(r[name], types, name)
        except CorruptRecord as exc:
            return exc
    return CorruptRecord("a field has the wrong type")  # an overriding timestamp field
