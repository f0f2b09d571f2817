"""Session model, ids, config validation, errors, codec and open_store."""

from __future__ import annotations

import base64
import enum
import math
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from asyncsession import (
    Config,
    ErrorCode,
    InvalidSession,
    NotSerializable,
    SessionError,
    codec,
    generate_session_id,
    is_valid_session_id,
    new_session,
    open_store,
    short_hash,
)
from asyncsession._redact import redact, url_secrets
from asyncsession.factory import sqlite_path
from asyncsession.session import _anonymous_session

# ------------------------------------------------------------------------ ids, model


def test_generate_session_id() -> None:
    ids = {generate_session_id() for _ in range(2000)}
    assert len(ids) == 2000
    for session_id in list(ids)[:50]:
        assert len(session_id) == 43 and is_valid_session_id(session_id)
        assert len(base64.urlsafe_b64decode(session_id + "=")) == 32


def test_generate_uses_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncsession.session as mod

    calls: list[int] = []

    def fake(n: int) -> str:
        calls.append(n)
        return "A" * 43

    monkeypatch.setattr(mod.secrets, "token_urlsafe", fake)
    assert generate_session_id() == "A" * 43 and calls == [32]


def test_new_session_fields() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    s = new_session(
        7, timedelta(hours=2), now=now, data={"a": 1}, user_agent="UA", ip_address="::1"
    )
    assert s.user_id == "7" and s.data == {"a": 1}
    assert s.created_at == s.updated_at == s.last_accessed_at == now
    assert s.expires_at == s.absolute_expires_at == now + timedelta(hours=2)
    assert s.version == 0 and s.site_id == ""
    assert s.created_at.tzinfo is UTC
    assert new_session(uuid.UUID(int=5)).user_id == str(uuid.UUID(int=5))
    assert new_session(None).user_id is None
    assert new_session("u", 60, now=now).expires_at == now + timedelta(seconds=60)
    assert new_session("u").expires_at is None


def test_the_middlewares_anonymous_session_is_new_sessions() -> None:
    """``_anonymous_session`` (the middleware's new sessions, built without the checks
    its arguments never need) makes what ``new_session`` makes from the same
    arguments, field by field, takes the data as it is, and refuses a naive clock
    with the same coded error."""
    now = datetime(2030, 1, 1, tzinfo=UTC)
    data = {"n": 1}
    fast = _anonymous_session(data, now, "203.0.113.9", "UA/1")
    slow = new_session(None, data=data, now=now, ip_address="203.0.113.9", user_agent="UA/1")
    assert is_valid_session_id(fast.id) and fast.id != slow.id
    fast.id = slow.id
    assert fast == slow
    assert fast.data is data  # (the middleware's own copy: taken, not copied again)
    assert fast.created_at is fast.updated_at is fast.last_accessed_at is now
    with pytest.raises(InvalidSession, match="timezone-aware") as info:
        _anonymous_session({}, datetime(2030, 1, 1), None, None)
    assert info.value.code is ErrorCode.SESSION_INVALID


@pytest.mark.parametrize("bad", ["", True, 1.5, ["x"], "x" * 257, "a\x00b"])
def test_new_session_bad_user(bad: Any) -> None:
    with pytest.raises(InvalidSession) as info:
        new_session(bad)
    assert info.value.code is ErrorCode.SESSION_INVALID


def test_new_session_bad_ttl_and_fields() -> None:
    with pytest.raises(InvalidSession):
        new_session("u", 0)
    with pytest.raises(InvalidSession):
        new_session("u", timedelta(seconds=-1))
    # a number no timedelta holds, NaN, or a deadline past the year 9999: the clear
    # error, not a raw OverflowError/ValueError
    for ttl in (1e20, float("nan"), float("inf"), 8e13, True, "60"):
        with pytest.raises(InvalidSession, match="ttl") as info:
            new_session("u", ttl)  # type: ignore[arg-type]
        assert info.value.details["ttl"] is not None
    with pytest.raises(TypeError):
        new_session("u", colour="red")


def test_is_expired_and_ttl() -> None:
    now = datetime(2030, 1, 1, tzinfo=UTC)
    s = new_session("u", 60, now=now)
    assert not s.is_expired(now + timedelta(seconds=59))
    assert s.is_expired(now + timedelta(seconds=60))
    assert s.ttl(now) == timedelta(seconds=60)
    assert s.ttl(now + timedelta(days=1)) == timedelta(0)
    assert new_session("u").ttl() == timedelta.max
    assert not new_session("u").is_expired()


def test_repr_hides_id() -> None:
    s = new_session("u", data={"secret": "v"})
    assert s.id not in repr(s) and short_hash(s.id) in repr(s)
    assert "v" not in repr(s).split("keys=")[1].replace("['secret']", "")


def test_short_hash() -> None:
    assert short_hash("abc") == "ba7816bf8f01"


# -------------------------------------------------------------------------- config


def test_config_defaults_are_the_seeds() -> None:
    c = Config()
    assert c.max_session_size == 1024 * 1024
    assert c.default_ttl == timedelta(hours=24)
    assert c.cleanup_interval == timedelta(minutes=5)
    assert c.key_prefix == "session:"
    assert c.max_sessions_per_user == 0 and c.eviction == "oldest" and c.idle_timeout is None


def test_config_seconds() -> None:
    c = Config(default_ttl=60, idle_timeout=30.5, cleanup_interval=0)
    assert c.default_ttl == timedelta(seconds=60)
    assert c.idle_timeout == timedelta(seconds=30.5)
    assert c.cleanup_interval == timedelta(0)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"max_session_size": -1}, "max_session_size"),
        ({"max_sessions_per_user": -5}, "max_sessions_per_user"),
        ({"max_sessions_per_user": True}, "max_sessions_per_user"),
        ({"default_ttl": 0}, "default_ttl"),
        ({"default_ttl": timedelta(seconds=-1)}, "default_ttl"),
        ({"idle_timeout": 0}, "idle_timeout"),
        ({"cleanup_interval": -1}, "cleanup_interval"),
        ({"eviction": "random"}, "eviction"),
        ({"site_id": "a:b"}, "site_id"),
        ({"site_id": "{x}"}, "site_id"),
        ({"key_prefix": "a{b}"}, "key_prefix"),
        ({"default_ttl": "1h"}, "default_ttl"),
        ({"default_ttl": 1e20}, "default_ttl"),  # past a timedelta: was a raw OverflowError
        ({"idle_timeout": float("nan")}, "idle_timeout"),
    ],
)
def test_config_validation_names_the_field(changes: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=f"Config.{field}"):
        Config(**changes)


def test_config_frozen() -> None:
    with pytest.raises(AttributeError):
        Config().site_id = "x"  # type: ignore[misc]


# -------------------------------------------------------------------------- errors


def test_error_details_and_str() -> None:
    e = NotSerializable("bad", details={"path": 'data["x"]'})
    assert isinstance(e, SessionError)
    assert e.code is ErrorCode.SESSION_NOT_SERIALIZABLE and e.http_status == 400
    assert "SESSION_NOT_SERIALIZABLE" in str(e) and e.details["path"] == 'data["x"]'


# --------------------------------------------------------------------------- codec

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
TOP_KEYS = st.text(max_size=10).filter(lambda key: key != "\x00enc")  # reserved
json_data = st.dictionaries(TOP_KEYS, json_values, max_size=8)


@settings(max_examples=300, deadline=None)
@given(json_data)
def test_json_native_data_roundtrips_exactly(data: dict[str, Any]) -> None:
    s = new_session("u", 60, data=data)
    s.site_id = "x"
    back = codec.decode(codec.encode(s))
    assert back == s
    assert repr(back.data) == repr(data)  # same types too (int stays int, -0.0 stays -0.0)


class Colour(enum.Enum):
    RED = 1


class Level(enum.IntEnum):
    LOW = 1


class Name(enum.StrEnum):
    A = "a"


non_json = st.sampled_from(
    [
        datetime(2024, 1, 1),
        uuid.UUID(int=1),
        (1, 2),
        Colour.RED,
        Level.LOW,
        Name.A,
        float("nan"),
        float("inf"),
        -math.inf,
        b"x",
        {1, 2},
        frozenset(),
        2**64,
        -(2**63) - 1,
        object(),
        {1: "int key"},
        {("t",): "tuple key"},
    ]
)


@settings(max_examples=300, deadline=None)
@given(json_data, non_json, st.lists(st.text(max_size=5), min_size=1, max_size=4))
def test_non_json_values_rejected_with_path(
    data: dict[str, Any], bad: Any, path: list[str]
) -> None:
    target: dict[str, Any] = data
    for key in path[:-1]:
        target[key] = {}
        target = target[key]
    target[path[-1]] = bad
    with pytest.raises(NotSerializable) as info:
        codec.encode_data(data)
    assert info.value.details["path"].startswith("data[")
    assert info.value.code is ErrorCode.SESSION_NOT_SERIALIZABLE


def test_deep_nesting_and_huge_strings() -> None:
    deep: Any = []
    for _ in range(10_000):
        deep = [deep]
    with pytest.raises(NotSerializable, match="nested deeper"):
        codec.encode_data({"deep": deep})

    def nest(levels: int) -> Any:
        value: Any = 1
        for _ in range(levels):
            value = [value]
        return value

    # the documented limit, exactly: data itself and 253 levels below a key
    assert orjson.loads(codec.encode_data({"k": nest(253)})) == {"k": nest(253)}
    with pytest.raises(NotSerializable, match="deeper than 254 levels") as info:
        codec.encode_data({"k": nest(254)})
    assert info.value.details["path"].startswith('data["k"][0]')
    big = codec.encode_data({"s": "x" * 5_000_000})
    assert len(big) > 5_000_000


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[]", b"{}", b'{"f":1}', b"\xff\xfe", b'{"f":2,"id":"x"}', b"null"],
)
def test_decode_rejects_non_records(raw: bytes) -> None:
    with pytest.raises(codec.CorruptRecord):
        codec.decode(raw)


def test_decode_rejects_wrong_types() -> None:
    s = new_session("u", 60)
    good = codec.encode(s)
    assert codec.decode(good) == s
    import orjson

    for key, value in [("n", "1"), ("n", True), ("d", []), ("u", 5), ("c", "x"), ("c", 2**63 - 1)]:
        record = orjson.loads(good)
        record[key] = value
        with pytest.raises(codec.CorruptRecord):
            codec.decode(orjson.dumps(record))


# ----------------------------------------------------------------------- factory


async def test_open_store_memory() -> None:
    store = open_store("memory://", Config(site_id="x"))
    async with store:
        s = await store.create(new_session("u"))
        assert (await store.get(s.id)).site_id == "x"


@pytest.mark.parametrize("url", ["ftp://x", "nonsense", "", "mysql://u:hunter2@h/db"])
def test_open_store_bad_url(url: str) -> None:
    with pytest.raises(ValueError) as info:
        open_store(url)
    assert "hunter2" not in str(info.value)


def test_redact_and_sqlite_path() -> None:
    assert redact("redis://user:pw@host:6379/0") == "redis://user:***@host:6379/0"
    assert redact("redis://:pw@host") == "redis://:***@host"
    assert redact("redis://host") == "redis://host"
    # a password in the query, and a user part without a colon (the cluster and
    # sentinel forms take it as the password): never printed
    assert redact("redis://h:1/0?password=S3CRET&db=2") == "redis://h:1/0?password=***&db=2"
    assert redact("redis+cluster://S3CRET@h:1,h:2") == "redis+cluster://***@h:1,h:2"
    assert (
        redact("redis+sentinel://S3CRET@h:1/main/0?sentinel_password=X&socket_timeout=1")
        == "redis+sentinel://***@h:1/main/0?sentinel_password=***&socket_timeout=1"
    )
    assert redact("unix:///tmp/r.sock?Password=x&db=1") == "unix:///tmp/r.sock?Password=***&db=1"
    assert redact("unix:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert "kk" not in redact("rediss://u:p@h/0?ssl_keyfile_password=kk")
    # a base64 password with a bare '/', '?' or '#': urlsplit sees no user part
    for url in ("redis://:Zm9v/YmFy@h:1/0", "redis://app:s3cr?et@h/0", "redis://a:b#cdef@h/0"):
        assert redact(url).startswith("redis://***@h/") or redact(url) == "redis://***@h:1/0"
        assert not any(s in redact(url) for s in ("Zm9v", "YmFy", "s3cr", "cdef")), url
    assert url_secrets("redis://app:s3cr?et@h/0") == ["s3cr?et", "s3cr"]
    assert url_secrets("redis://h:1/0?password=S3CRET") == ["S3CRET"]
    assert sqlite_path("sqlite:////tmp/x.db") == "/tmp/x.db"  # the full table: test_urls.py


def test_import_without_extras_runs_memory() -> None:
    import subprocess
    import sys

    code = (
        "import sys, builtins\n"
        "real = builtins.__import__\n"
        "def guard(name, *a, **k):\n"
        "    if name.split('.')[0] in {'redis', 'aiosqlite', 'starlette'}:\n"
        "        raise ImportError('blocked ' + name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = guard\n"
        "import asyncio, asyncsession as a\n"
        "async def main():\n"
        "    async with a.MemoryStore.with_controls(a.Config()) as s:\n"
        "        x = await s.create(a.new_session('u'))\n"
        "        print((await s.get(x.id)).user_id)\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "u"


@pytest.mark.parametrize("field", ["user_agent", "ip_address", "organization_id"])
async def test_bad_metadata_is_invalid_session_not_a_crash(field: str) -> None:
    from asyncsession import MemoryStore

    async with MemoryStore.with_controls(Config(cleanup_interval=0)) as store:
        for bad in ("\ud800", 123):
            s = new_session("u")
            setattr(s, field, bad)
            with pytest.raises(InvalidSession):
                await store.create(s)
        assert await store.list_by_user("u") == []


def test_lone_surrogate_user_id_rejected() -> None:
    with pytest.raises(InvalidSession):
        new_session("\ud800")


# ------------------------------------------------- fast paths agree with slow ones


def test_level_walk_is_the_check_in_use() -> None:
    """On CPython the strict check walks a level at a time (gc.get_referents); the
    tests above exercise that path, and the per-value walk stays as its fallback."""
    import platform

    if platform.python_implementation() == "CPython":
        assert codec._json_native is codec._json_native_by_level


mixed_values = st.recursive(
    json_scalars | non_json,
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)


@settings(max_examples=500, deadline=None)
@given(st.dictionaries(st.text(max_size=10), mixed_values, max_size=8))
def test_level_walk_agrees_with_value_walk(data: dict[str, Any]) -> None:
    import orjson

    try:
        orjson.dumps(data, option=codec._STRICT)
    except (TypeError, orjson.JSONEncodeError):
        return  # refused before either walk runs
    assert codec._json_native_by_level(data) == codec._json_native_by_value(data)


metadata_text = st.none() | st.text(max_size=60)


@settings(max_examples=300, deadline=None)
@given(
    st.text(min_size=1, max_size=40),
    metadata_text,
    metadata_text,
    metadata_text,
    st.from_regex(r"[A-Za-z0-9._-]{0,64}", fullmatch=True),
    st.integers(min_value=0, max_value=2**63 - 1),
    st.datetimes(timezones=st.just(UTC)),
)
def test_header_bound_is_an_upper_bound(
    user: str,
    org: str | None,
    ip: str | None,
    agent: str | None,
    site: str,
    version: int,
    when: datetime,
) -> None:
    """Memory and SQLite store only the data and count the header by this bound, so
    it must never be below the real header (control characters escape to 6 bytes)."""
    s = new_session(None, 60, data={"k": 1})
    s.user_id = user.encode("utf-8", "replace").decode()
    s.organization_id, s.ip_address, s.user_agent = org, ip, agent
    s.site_id, s.version = site, version
    s.created_at = s.updated_at = s.last_accessed_at = when
    for text in (org, ip, agent):
        if text is not None and not codec._utf8(text):
            return  # refused before the size is counted
    data = codec.encode_data(s.data)
    exact = codec.record_size(s, data)
    assert exact <= len(data) + codec.header_bound(s)
    worst = new_session(None, 60)
    worst.user_id = "\x01" * 256
    worst.user_agent = worst.ip_address = worst.organization_id = "\x1f" * 500
    worst.site_id = "x" * 64
    worst.version = 2**64 - 1
    worst.created_at = worst.updated_at = datetime(1, 1, 1, tzinfo=UTC)
    raw = codec.encode_data({})
    assert codec.record_size(worst, raw) <= len(raw) + codec.header_bound(worst)
