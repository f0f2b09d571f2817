"""Hostile input corpus, through every backend and through the middleware.

Every bad input named in issues 2-5, random bytes as session ids and cookies, stored
records overwritten behind the store's back (random bytes, other valid-looking JSON,
garbage in single fields), and huge or cyclic data. Each input must give a clear
``SessionError`` (or, through the middleware, a fresh session), within a time bound,
without a crash, and leave every other session exactly as it was (checked against a
population of sessions on two sites sharing the backend).

Random inputs per test: ``ASYNCSESSION_HOSTILE_RANDOM`` (default 200).
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import logging
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import Any

import pytest

from asyncsession import (
    Config,
    ControlledStore,
    ErrorCode,
    InvalidSession,
    NotSerializable,
    Session,
    SessionConflict,
    SessionError,
    SessionNotFound,
    SessionTooLarge,
    Store,
    StoreClosed,
    ViolationEvent,
    codec,
    generate_session_id,
    new_session,
    session_handle,
    short_hash,
    with_controls,
)

from .asgi_calls import call_app, http_scope
from .clock import FakeClock
from .conftest import BACKENDS, Harness

RANDOM_INPUTS = int(os.environ.get("ASYNCSESSION_HOSTILE_RANDOM", "200"))
BOUND = 30.0  # seconds: an operation that takes longer is a hang
HOOKS = (
    "_insert",
    "_load",
    "_replace",
    "_touch",
    "_rotate",
    "_delete",
    "_delete_by_user",
    "_list_by_user",
    "_purge",
    "_purge_report",
)
BACKEND_NAMES = [b.name for b in BACKENDS]
TRIED: Counter[str] = Counter()  # inputs tried, by kind (printed with -s)


@pytest.fixture(scope="module", autouse=True)
def report_inputs() -> Iterator[None]:
    yield
    print(f"\nhostile inputs tried: {sum(TRIED.values())} {dict(TRIED)}")


async def bounded(call: Awaitable[Any]) -> Any:
    return await asyncio.wait_for(call, BOUND)


async def outcome(call: Callable[[], Awaitable[Any]]) -> BaseException | Any:
    """The value, or the exception; only ``SessionError`` may escape an operation."""
    try:
        return await bounded(call())
    except SessionError as exc:
        return exc


def spy(raw: Store) -> Counter[str]:
    """Count calls of the raw backend's storage hooks (any call reaches storage)."""
    calls: Counter[str] = Counter()
    for name in HOOKS:
        original = getattr(raw, name)

        def counting(*args: Any, _name: str = name, _original: Any = original) -> Any:
            calls[_name] += 1
            return _original(*args)

        setattr(raw, name, counting)
    return calls


class Population:
    """Sessions on two sites over one raw backend, and a snapshot to compare against."""

    def __init__(self, raw: Store, clock: FakeClock, **config: Any) -> None:
        self.raw = raw
        self.clock = clock
        self.violations: list[ViolationEvent] = []
        base: dict[str, Any] = {"cleanup_interval": 0, "max_sessions_per_user": 3}
        base.update(config)
        self.a = with_controls(
            raw, Config(site_id="a", **base), on_violation=self.violations.append
        )
        self.b = with_controls(raw, Config(site_id="b", **base))
        self.ids: list[str] = []
        self.before: dict[str, Session | None] = {}

    async def fill(self) -> Population:
        for store in (self.a, self.b):
            for user, data in (
                ("alice", {"cart": [1, 2, 3], "n": 1}),
                ("alice", {"theme": "dark"}),
                ("bob", {"role": "admin", "big": 2**63}),
                (None, {"anon": True}),
            ):
                s = new_session(user, timedelta(hours=1), now=self.clock(), data=data)
                self.ids.append((await store.create(s)).id)
        self.before = await self.snapshot()
        self.violations.clear()
        return self

    async def snapshot(self) -> dict[str, Any]:
        """Each session as stored (under its handle), and each user's listed handles."""
        raw = self.raw
        out: dict[str, Any] = {i: await raw._load(raw.handle(i)) for i in self.ids}
        for store in (self.a, self.b):
            for user in ("alice", "bob"):
                listed = await store.list_by_user(user)
                out[f"{store.config.site_id}/{user}"] = [s.id for s in listed]
        return out

    async def unchanged(self, *, except_ids: tuple[str, ...] = ()) -> None:
        now = await self.snapshot()
        handles = {self.raw.handle(i) for i in except_ids}
        for key, value in self.before.items():
            if key in except_ids:
                continue
            got = now[key]
            if isinstance(value, list):
                got = [i for i in got if i not in handles]
                value = [i for i in value if i not in handles]
            assert got == value, f"{key} changed"


@pytest.fixture
async def population(harness: Harness, clock: FakeClock) -> Population:
    raw = await harness.raw(Config(cleanup_interval=0))
    return await Population(raw, clock).fill()


# ------------------------------------------------------------------ session ids

BAD_IDS: list[Any] = [
    "",
    "*",
    "a\nb",
    "x" * 10_000,
    "short",
    "a" * 15,
    "a" * 129,
    "a b c d e f g h i j",
    "k*" * 20,
    "?" * 20,
    "[a-z]" * 5,
    "session:*AAAAAAAAAAA",
    "{AAAAAAAAAAAAAAAA}",
    "AAAAAAAAAAAAAAAA\r\nDEL x",
    "AAAAAAAAAAAAAAAA\x00",
    "' OR '1'='1' --aaaa",
    "%%%%%%%%%%%%%%%%%%%%",
    "ÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄÄ",
    "\U0001f600" * 20,
    "A" * 20 + "\udcff",
    None,
    123,
    1.5,
    b"AAAAAAAAAAAAAAAAAAAAAAAA",
    ["AAAAAAAAAAAAAAAAAAAA"],
    object(),
]


def _id_ops(store: ControlledStore, bad: Any, clock: FakeClock) -> list[Callable[[], Any]]:
    def with_id() -> Session:
        s = new_session("alice", now=clock())
        s.id = bad
        return s

    ops: list[Callable[[], Any]] = [
        lambda: store.get(bad),
        lambda: store.touch(bad),
        lambda: store.rotate(bad),
        lambda: store.delete(bad),
        lambda: store.update(with_id()),
        lambda: store.create(with_id()),
    ]
    if bad is not None:  # keep=None means "keep none"
        ops.append(lambda: store.delete_by_user("alice", keep=bad))
    return ops


@pytest.mark.parametrize("bad", BAD_IDS, ids=[f"id{i}" for i in range(len(BAD_IDS))])
async def test_malformed_ids_never_reach_the_backend(
    population: Population, clock: FakeClock, bad: Any
) -> None:
    calls = spy(population.raw)
    for op in _id_ops(population.a, bad, clock):
        TRIED["bad id"] += 1
        result = await outcome(op)
        assert isinstance(result, InvalidSession), repr(result)
        assert result.code is ErrorCode.SESSION_INVALID and result.http_status == 400
        if isinstance(bad, str) and len(bad) > 20:
            assert bad not in str(result) and bad not in repr(result.details)
    assert sum(calls.values()) == 0, f"a malformed id reached the backend: {dict(calls)}"
    assert {v.type for v in population.violations} == {"invalid_session"}
    await population.unchanged()


def _random_ids(rng: random.Random, count: int) -> Iterator[Any]:
    for _ in range(count):
        raw = rng.randbytes(rng.choice([0, 1, 15, 16, 43, 47, 128, 129, 500]))
        yield rng.choice(
            [
                raw,
                raw.decode("latin-1"),
                raw.decode("utf-8", "replace"),
                raw.decode("utf-8", "surrogateescape"),
                # mostly well formed, so some reach the backend as a lookup of nothing
                "".join(rng.choice("ABCdef012_-") for _ in range(len(raw))),
            ]
        )


async def test_random_bytes_as_session_ids(population: Population, clock: FakeClock) -> None:
    store = population.a
    calls = spy(population.raw)
    rng = random.Random(20261126)
    looked_up = 0
    for bad in _random_ids(rng, RANDOM_INPUTS):
        TRIED["random id"] += 1
        well_formed = isinstance(bad, str) and 16 <= len(bad) <= 128 and bad.isascii()
        well_formed = well_formed and all(c.isalnum() or c in "_-" for c in bad)
        for op in (store.get, store.touch, store.rotate, store.delete):
            result = await outcome(lambda op=op, bad=bad: op(bad))  # type: ignore[misc]
            if well_formed:
                # None, or False from delete (nothing deleted)
                assert result in (None, False) or isinstance(result, SessionNotFound), repr(result)
            else:
                assert isinstance(result, InvalidSession), repr(result)
        looked_up += well_formed
    # one storage call per operation per well-formed id (a miss also asks _adopt
    # whether a record is stored under the plain id, which the spy does not count)
    assert sum(calls.values()) == 4 * looked_up
    assert looked_up > 0  # the corpus does exercise the backend path too
    await population.unchanged()


# ---------------------------------------------------------------- users, sites


BAD_USERS: list[Any] = ["", "x" * 257, "a\x00b", True, 1.5, ["x"], {"u": 1}, b"alice"]


@pytest.mark.parametrize("bad", BAD_USERS, ids=[f"user{i}" for i in range(len(BAD_USERS))])
async def test_bad_user_ids(population: Population, clock: FakeClock, bad: Any) -> None:
    store = population.a
    calls = spy(population.raw)
    s = new_session(None, now=clock())
    s.user_id = bad
    for op in (
        lambda: store.create(s),
        lambda: store.list_by_user(bad),
        lambda: store.delete_by_user(bad),
    ):
        TRIED["bad user"] += 1
        result = await outcome(op)
        assert isinstance(result, InvalidSession), repr(result)
    with pytest.raises(InvalidSession):
        new_session(bad)
    for op in (lambda: store.list_by_user(None), lambda: store.delete_by_user(None)):
        assert isinstance(await outcome(op), InvalidSession)
    assert sum(calls.values()) == 0
    await population.unchanged()


LITERAL_USERS = [
    "%",
    "_",
    "*",
    "?",
    "[a]",
    "a%",
    "a_",
    "a'b",
    '"',
    "\\",
    "' OR '1'='1",
    "alice' --",
    "u:1",
    "u",
    "u:",
    "{u}",
    "u}",
    "ü",
    "\U0001f600",
    " ",
    "a\nb",
    "1",
    "01",
]


async def test_dangerous_user_ids_are_matched_literally(
    population: Population, clock: FakeClock
) -> None:
    """SQL wildcards and quotes, Redis glob and key separators: stored and matched as
    themselves, one user never sees or deletes another's sessions."""
    store = population.a
    mine: dict[str, str] = {}
    for user in LITERAL_USERS:
        TRIED["literal user"] += 1
        mine[user] = store.handle((await store.create(new_session(user, now=clock()))).id)
    for user in LITERAL_USERS:
        assert [s.id for s in await store.list_by_user(user)] == [mine[user]], user
        assert [s.id for s in await population.b.list_by_user(user)] == []
    for wildcard in ("%", "_", "*", "?", "[a]", "u"):
        assert await store.delete_by_user(wildcard) == 1
        del mine[wildcard]
        for user, session_id in mine.items():
            assert [s.id for s in await store.list_by_user(user)] == [session_id], user
    await population.unchanged()


@pytest.mark.parametrize(
    "site", ["a:b", "{a}", "a}", "a b", "x" * 65, "a'b", "a%", "a\x00", "a\n", "ü", None, 7]
)
def test_bad_site_ids_are_refused(site: Any) -> None:
    TRIED["bad site"] += 1
    with pytest.raises(ValueError, match="site_id"):
        Config(site_id=site)


@pytest.mark.parametrize(
    ("args", "fields", "what"),
    [
        (("u", "1h"), {}, "ttl"),
        (("u", [3600]), {}, "ttl"),
        (("u",), {"data": [1]}, "data"),
        (("u",), {"data": "text"}, "data"),
        (("u",), {"now": datetime(2030, 1, 1)}, "now"),  # naive: a raw TypeError later
        (("u",), {"now": "2030"}, "now"),
    ],
)
def test_bad_new_session_arguments_are_coded_errors(
    args: tuple[Any, ...], fields: dict[str, Any], what: str
) -> None:
    """Not a raw ``TypeError`` from ``timedelta`` or ``dict()`` deep inside."""
    TRIED["bad new_session"] += 1
    with pytest.raises(InvalidSession, match=what) as info:
        new_session(*args, **fields)
    assert info.value.code == "SESSION_INVALID" and what in info.value.details
    assert new_session("u", data=MappingProxyType({"a": 1})).data == {"a": 1}  # any mapping


@pytest.mark.parametrize(
    ("helper", "arg"),
    [(short_hash, None), (short_hash, 3), (session_handle, "bad id"), (session_handle, None)],
)
def test_id_helpers_refuse_what_is_no_id(helper: Callable[[Any], str], arg: Any) -> None:
    """A coded error, not a raw TypeError, nor a handle made for an invalid id."""
    TRIED["bad id helper"] += 1
    with pytest.raises(InvalidSession) as info:
        helper(arg)
    assert info.value.code == "SESSION_INVALID"


def test_generate_session_id_takes_the_user_ids_new_session_takes() -> None:
    user = uuid.uuid4()
    for given, normal in ((4711, "4711"), (user, str(user))):
        assert generate_session_id(given)[:4] == generate_session_id(normal)[:4]
        assert new_session(given).id[:4] == generate_session_id(given)[:4]
    for bad in (True, "", "a\x00b", "u" * 10_000):
        with pytest.raises(InvalidSession):
            generate_session_id(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["sqlite:///x.db", None, {}])
def test_with_controls_needs_a_store(store: Any) -> None:
    with pytest.raises(TypeError, match=r"needs a Store.*open_store"):
        with_controls(store)


@pytest.mark.parametrize("prefix", ["{x}", "a{", "a}", "a\nb", "a\rb", None, 3])
def test_bad_key_prefixes_are_refused(prefix: Any) -> None:
    TRIED["bad prefix"] += 1
    with pytest.raises(ValueError, match="key_prefix"):
        Config(key_prefix=prefix)


async def test_sites_that_differ_by_a_wildcard_stay_apart(harness: Harness, clock: Any) -> None:
    raw = await harness.raw(Config(cleanup_interval=0))
    sites = ["a_b", "aXb", "a.b", "a-b", "a", "ab", "A_B"]
    stores = {s: with_controls(raw, Config(site_id=s, cleanup_interval=0)) for s in sites}
    ids = {}
    for site, store in stores.items():
        TRIED["literal site"] += 1
        ids[site] = (await store.create(new_session("alice", now=clock()))).id
    for site, store in stores.items():
        assert [s.id for s in await store.list_by_user("alice")] == [raw.handle(ids[site])]
        for other, session_id in ids.items():
            if other != site:
                with pytest.raises(SessionNotFound):
                    await store.get(session_id)
    assert await stores["a_b"].delete_by_user("alice") == 1
    for site in sites[1:]:
        listed = [s.id for s in await stores[site].list_by_user("alice")]
        assert listed == [raw.handle(ids[site])]


# ------------------------------------------------------------------------- data


class Color(enum.Enum):
    RED = 1


@dataclasses.dataclass
class Point:
    x: int


def _cyclic() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


def _deep_list(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = [value]
    return value


def _deep_dict(depth: int) -> Any:
    value: Any = "bottom"
    for _ in range(depth):
        value = {"k": value}
    return value


NOT_JSON: list[tuple[str, Any, type[SessionError]]] = [
    ("datetime", datetime(2024, 1, 1, tzinfo=UTC), NotSerializable),
    ("date", date(2024, 1, 1), NotSerializable),
    ("uuid", uuid.uuid4(), NotSerializable),
    ("tuple", (1, 2), NotSerializable),
    ("dataclass", Point(1), NotSerializable),
    ("enum", Color.RED, NotSerializable),
    ("nan", float("nan"), NotSerializable),
    ("inf", float("inf"), NotSerializable),
    ("-inf", float("-inf"), NotSerializable),
    ("bytes", b"x", NotSerializable),
    ("bytearray", bytearray(b"x"), NotSerializable),
    ("set", {1}, NotSerializable),
    ("frozenset", frozenset({1}), NotSerializable),
    ("int key", {1: "x"}, NotSerializable),
    ("tuple key", {(1,): "x"}, NotSerializable),
    ("2**64", 2**64, NotSerializable),
    ("-(2**63)-1", -(2**63) - 1, NotSerializable),
    ("object", object(), NotSerializable),
    ("lone surrogate", "\udcff", NotSerializable),
    ("lone surrogate key", {"\udcff": 1}, NotSerializable),
    ("surrogate-escaped bytes", b"caf\xe9".decode("utf-8", "surrogateescape"), NotSerializable),
    ("str subclass", type("S", (str,), {})("x"), NotSerializable),
    ("dict subclass", type("D", (dict,), {})(), NotSerializable),
    ("cycle", _cyclic(), NotSerializable),
    ("depth 10,000 list", _deep_list(10_000), NotSerializable),
    ("depth 10,000 dict", _deep_dict(10_000), NotSerializable),
    # built when the test runs, not held by the module for the whole session
    ("50 MB string", lambda: "x" * 50_000_000, SessionTooLarge),
    ("50 MB key", lambda: {"k" * 50_000_000: 1}, SessionTooLarge),
    ("1M small values", lambda: list(range(1_000_000)), SessionTooLarge),
]


@pytest.mark.parametrize(
    ("value", "error"), [(v, e) for _, v, e in NOT_JSON], ids=[n for n, _, _ in NOT_JSON]
)
async def test_bad_data_is_refused_and_changes_nothing(
    population: Population, clock: FakeClock, value: Any, error: type[SessionError]
) -> None:
    """Non-JSON values of every kind, nested deep in the data too, and data far over
    the size limit (default 1 MiB): a clear error, fast, on create and on update."""
    if callable(value) and getattr(value, "__name__", "") == "<lambda>":
        value = value()
    store = population.a
    calls = spy(population.raw)
    victim_id = population.ids[0]
    for data, path in (
        ({"v": value}, 'data["v"]'),
        ({"outer": [{"x": 1}, {"inner": value}]}, 'data["outer"][1]["inner"]'),
    ):
        TRIED["bad data"] += 2
        result = await outcome(lambda: store.create(new_session("carol", data=data)))  # noqa: B023
        assert type(result) is error, repr(result)
        if error is NotSerializable:
            assert result.details["path"].startswith(path), result.details
        victim = await store.get(victim_id)
        victim.data["new"] = data
        result = await outcome(lambda: store.update(victim))  # noqa: B023
        assert type(result) is error, repr(result)
        if error is NotSerializable:
            assert result.details["path"].startswith('data["new"]' + path[4:]), result.details
    assert calls["_insert"] == calls["_replace"] == 0
    assert await store.list_by_user("carol") == []
    await population.unchanged()


async def test_one_byte_over_the_size_limit(harness: Harness, clock: FakeClock) -> None:
    raw = await harness.raw(Config(cleanup_interval=0))
    population = await Population(raw, clock).fill()
    probe = with_controls(raw, Config(site_id="a", cleanup_interval=0, max_session_size=0))
    s = await probe.create(new_session("carol", data={"blob": "x" * 100}, now=clock()))
    # the stored record (under the handle) with a 100-char blob
    size = len(codec.encode(dataclasses.replace(await probe.get(s.id), id=raw.handle(s.id))))
    await probe.delete(s.id)
    store = with_controls(raw, Config(site_id="a", cleanup_interval=0, max_session_size=size))
    TRIED["size"] += 2
    fits = await store.create(new_session("carol", data={"blob": "x" * 100}, now=clock()))
    over = new_session("carol", data={"blob": "x" * 101}, now=clock())
    result = await outcome(lambda: store.create(over))
    assert isinstance(result, SessionTooLarge) and result.details["size"] == size + 1
    fits.data["blob"] = "y" * 101
    assert isinstance(await outcome(lambda: store.update(fits)), SessionTooLarge)
    assert (await store.get(fits.id)).data == {"blob": "x" * 100}
    await population.unchanged()


async def test_none_and_wrong_types_for_sessions(population: Population) -> None:
    store = population.a
    calls = spy(population.raw)
    for bad in (None, "session", {"id": "x"}, 42, Session):
        TRIED["not a session"] += 2
        assert isinstance(await outcome(lambda: store.create(bad)), InvalidSession)  # noqa: B023
        assert isinstance(await outcome(lambda: store.update(bad)), InvalidSession)  # noqa: B023
    assert sum(calls.values()) == 0
    await population.unchanged()


async def test_update_of_deleted_expired_or_stale(population: Population, clock: Any) -> None:
    store = population.a
    gone = await store.create(new_session("carol", timedelta(minutes=5), now=clock()))
    await store.delete(gone.id)
    short = await store.create(new_session("carol", timedelta(seconds=5), now=clock()))
    live = await store.create(new_session("carol", timedelta(minutes=5), now=clock()))
    stale = await store.get(live.id)
    await store.update(await store.get(live.id))
    clock.advance(6)
    TRIED["bad update"] += 3
    assert type(await outcome(lambda: store.update(gone))) is SessionNotFound
    assert isinstance(await outcome(lambda: store.update(short)), SessionNotFound)
    assert isinstance(await outcome(lambda: store.update(stale)), SessionConflict)
    assert (await store.get(live.id)).version == 1
    with pytest.raises(SessionNotFound):
        await store.get(gone.id)
    await population.unchanged()


async def test_every_operation_after_close(harness: Harness, clock: Any) -> None:
    raw = await harness.raw(Config(cleanup_interval=0))
    store = with_controls(raw, Config(site_id="a", cleanup_interval=0))
    s = await store.create(new_session("alice", now=clock()))
    await store.close()
    for op in (
        lambda: store.create(new_session("bob")),
        lambda: store.get(s.id),
        lambda: store.update(s),
        lambda: store.touch(s.id),
        lambda: store.rotate(s.id),
        lambda: store.delete(s.id),
        lambda: store.delete_by_user("alice"),
        lambda: store.list_by_user("alice"),
        lambda: store.purge_expired(),
        lambda: store.get("*"),
    ):
        TRIED["after close"] += 1
        result = await outcome(op)
        assert isinstance(result, StoreClosed) and result.http_status == 503, repr(result)


# ------------------------------------------------------ records corrupted in place


def _record_of(session: Session) -> bytes:
    return codec.encode(session)


async def _poke_memory(raw: Any, session_id: str, variant: Any) -> None:
    entry = raw._entries[session_id]
    field = "blob" if hasattr(entry, "blob") else "data"  # the encoded data bytes
    setattr(entry, field, variant)


async def _poke_sqlite(raw: Any, session_id: str, variant: Any) -> None:
    column, value = variant
    assert column.isidentifier()

    def write(c: Any) -> None:
        c.execute(f"UPDATE sessions SET {column} = ? WHERE id = ?", (value, session_id))

    await raw._run(write)


async def _poke_redis(raw: Any, session_id: str, variant: Any) -> None:
    kind, *args = variant
    client, key = raw.client, raw.session_key(session_id)
    if kind == "replace":  # the whole key, as another type
        await client.delete(key)
        await args[0](client, key)
    elif kind == "hset":
        await client.hset(key, args[0], args[1])
    elif kind == "hdel":
        await client.hdel(key, args[0])


RANDOM_BYTES = random.Random(7).randbytes(64)
OTHER_RECORD = "other"  # placeholder: the encoded record of another session

CORRUPTIONS: dict[str, list[tuple[str, Any]]] = {
    "memory": [
        ("random bytes", RANDOM_BYTES),
        ("json list", b"[1,2]"),
        ("json string", b'"x"'),
        ("json null", b"null"),
        ("truncated", b'{"a":1'),
        ("invalid utf-8", b"\xff\xfe"),
        ("empty", b""),
        ("other valid data", b'{"admin":true}'),
    ],
    "sqlite": [
        ("random bytes", ("data", RANDOM_BYTES)),
        ("json list", ("data", b"[1]")),
        ("truncated", ("data", b'{"a":')),
        ("empty", ("data", b"")),
        ("text data", ("data", "not json")),
        ("other valid data", ("data", b'{"admin":true}')),
        ("version text", ("version", "x")),
        ("created text", ("created", "abc")),
        ("expires text", ("expires", "zzz")),
        ("expires real", ("expires", 1.5)),
        ("user int", ("user_id", 7)),
        ("site moved", ("site_id", "b")),
    ],
    "redis": [
        ("key is random bytes", ("replace", lambda c, k: c.set(k, RANDOM_BYTES))),
        ("key is a list", ("replace", lambda c, k: c.rpush(k, b"x"))),
        ("key is json", ("replace", lambda c, k: c.set(k, b'{"f":1,"d":{}}'))),
        ("record random bytes", ("hset", "r", RANDOM_BYTES)),
        ("record json list", ("hset", "r", b"[1]")),
        ("record truncated", ("hset", "r", b'{"f":1,"id":')),
        ("record of another session", ("hset", "r", OTHER_RECORD)),
        ("record missing", ("hdel", "r")),
        ("site missing", ("hdel", "s")),
        ("expiry garbage", ("hset", "e", "abc")),
        ("deadline garbage", ("hset", "x", "qq")),
        ("created garbage", ("hset", "c", "zz")),
        ("accessed garbage", ("hset", "a", "zz")),
        ("version garbage", ("hset", "n", "x")),
        ("index key garbage", ("hset", "i", "bogus")),
    ],
}
POKE = {"memory": _poke_memory, "sqlite": _poke_sqlite, "redis": _poke_redis}


def _family(backend: str) -> str | None:
    """Which poke helper reaches this backend's storage (None: none does)."""
    for family in POKE:
        if backend.startswith(family):
            return None if backend.startswith("redis_") else family
    return None


def _corruption_cases() -> list[Any]:
    cases = []
    for name in BACKEND_NAMES:
        family = _family(name)
        for label, variant in CORRUPTIONS.get(family or "", []):
            cases.append(pytest.param(name, variant, id=f"{name}-{label}"))
    return cases


@pytest.mark.parametrize(("harness", "variant"), _corruption_cases(), indirect=["harness"])
async def test_corrupted_records(harness: Harness, clock: FakeClock, variant: Any) -> None:
    """A record overwritten behind the store's back: reading it is ``SessionNotFound``
    (with an ``invalid_session`` violation) or, where the damage is in a field the
    read does not use, the session; every other operation gives a value or a
    ``SessionError``, in bounded time; nothing else changes; the user can still log
    in at the limit and log out everywhere; purge keeps working; deleting the damaged
    record works."""
    family = _family(harness.name)
    assert family is not None
    TRIED["corrupt record"] += 1
    raw = await harness.raw(Config(cleanup_interval=0))
    population = await Population(raw, clock, max_sessions_per_user=3).fill()
    store = population.a
    victim = await store.create(new_session("carol", timedelta(minutes=1), now=clock()))
    peers = [
        await store.create(new_session("carol", timedelta(hours=2), now=clock())) for _ in range(2)
    ]
    if isinstance(variant, tuple) and variant[-1] == OTHER_RECORD:
        variant = (*variant[:-1], _record_of(await store.get(population.ids[0])))
    await POKE[family](raw, raw.handle(victim.id), variant)
    population.violations.clear()

    got = await outcome(lambda: store.get(victim.id))
    if isinstance(got, SessionError):
        assert isinstance(got, SessionNotFound), repr(got)
        if got.details.get("corrupt"):
            assert [v.type for v in population.violations] == ["invalid_session"]
    else:
        assert isinstance(got, Session) and got.id == victim.id
    for op in (
        lambda: store.touch(victim.id),
        lambda: store.update(victim),
        lambda: store.list_by_user("carol"),
        lambda: store.rotate(victim.id),
    ):
        result = await outcome(op)
        assert not isinstance(result, BaseException) or isinstance(result, SessionError)
    listed = await store.list_by_user("carol")
    assert {raw.handle(p.id) for p in peers} <= {s.id for s in listed}
    for s in listed:
        assert isinstance(s.data, dict)
    await population.unchanged()
    # the damaged session named as the one to keep, or the one to delete (a revoke):
    # a value or a SessionError, never the backend's own decoding error
    for op in (
        lambda: store.delete_by_user("carol", keep=victim.id, only=peers[1].id),
        lambda: store.delete_by_user("carol", keep=peers[0].id, only=victim.id),
    ):
        result = await outcome(op)
        assert not isinstance(result, BaseException) or isinstance(result, SessionError), result

    # the user is at the limit (3, counting the damaged one): a login still works
    login = await outcome(lambda: store.create(new_session("carol", now=clock())))
    assert isinstance(login, Session), repr(login)
    # expiry of the damaged record does not block purging anyone else's
    doomed = await store.create(new_session("dave", timedelta(minutes=1), now=clock()))
    clock.advance(timedelta(minutes=2))
    purged = await outcome(lambda: store.purge_expired())
    assert isinstance(purged, int), repr(purged)
    assert await raw._load(raw.handle(doomed.id)) is None
    # logout everywhere, then the damaged record can be deleted like any other
    assert isinstance(await outcome(lambda: store.delete_by_user("carol")), int)
    assert await store.list_by_user("carol") == []
    await store.delete(victim.id)
    with pytest.raises(SessionNotFound):
        await store.get(victim.id)
    await population.unchanged()  # an hour of ttl: still live, still the same


# ------------------------------------------------------------------- middleware

starlette = pytest.importorskip("starlette")

from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import JSONResponse, PlainTextResponse  # noqa: E402
from starlette.routing import Route  # noqa: E402

from asyncsession import SessionMiddleware, install_exception_handler  # noqa: E402


async def _read(request: Request) -> JSONResponse:
    return JSONResponse(dict(request.session))


async def _write(request: Request) -> JSONResponse:
    request.session["k"] = "v"
    return JSONResponse(dict(request.session))


async def _bad(request: Request) -> PlainTextResponse:
    request.session["when"] = datetime.now(UTC)
    return PlainTextResponse("never sent")


async def _huge(request: Request) -> PlainTextResponse:
    kind = request.query_params["kind"]
    request.session["huge"] = _deep_list(10_000) if kind == "deep" else "x" * 50_000_000
    return PlainTextResponse("never sent")


async def _put(request: Request) -> PlainTextResponse:
    """Stores what the client sends, unchecked (as many apps do with form state)."""
    for key, value in (await request.json()).items():
        request.session[key] = value
    return PlainTextResponse("stored")


def _app(store: Store) -> Starlette:
    app = Starlette(
        routes=[
            Route("/read", _read),
            Route("/write", _write, methods=["POST"]),
            Route("/bad", _bad, methods=["POST"]),
            Route("/huge", _huge, methods=["POST"]),
            Route("/put", _put, methods=["POST"]),
        ]
    )
    app.add_middleware(SessionMiddleware, store=store, cookie_name="session")
    install_exception_handler(app)
    return app


async def _request(
    app: Any, headers: list[tuple[bytes, bytes]], path: str = "/read", query: bytes = b""
) -> tuple[int, list[bytes], bytes]:
    """Call the app with exactly these headers; (status, set-cookie values, body)."""
    messages = await call_app(app, http_scope(headers, path, query), bounded)
    start = messages[0]
    cookies = [v for k, v in start["headers"] if k == b"set-cookie"]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    return start["status"], cookies, body


def _cookie_id(cookies: list[bytes]) -> str:
    (cookie,) = [c for c in cookies if not c.split(b";")[0].endswith(b"=")]
    return cookie.split(b";")[0].split(b"=", 1)[1].decode()


PLANTED = "A" * 43


def _bad_cookie_headers() -> list[tuple[str, list[tuple[bytes, bytes]], int]]:
    """(name, headers, lookups allowed: one per distinct well-formed id, at most 4)."""
    real = b"B" * 43
    planted = PLANTED.encode()
    return [
        ("10k id", [(b"cookie", b"session=" + b"A" * 10_000)], False),
        ("1 MB header", [(b"cookie", b"x=" + b"y" * 1_000_000 + b"; session=" + real)], True),
        ("1000 cookies", [(b"cookie", b"; ".join(b"c%d=%d" % (i, i) for i in range(1000)))], False),
        (
            "200 headers",
            [(b"cookie", b"session=" + (real if i % 2 else planted)) for i in range(200)],
            2,
        ),
        ("duplicated", [(b"cookie", b"session=" + real + b"; session=" + planted)], 2),
        (
            "duplicated headers",
            [(b"cookie", b"session=" + real), (b"cookie", b"session=" + planted)],
            2,
        ),
        ("open quote", [(b"cookie", b'session="' + real)], False),
        ("close quote", [(b"cookie", b"session=" + real + b'"')], False),
        ("empty quotes", [(b"cookie", b'session=""')], False),
        ("mixed quotes", [(b"cookie", b"session='" + real + b'"')], False),
        ("quote inside", [(b"cookie", b'session=AAAA"AAAAAAAAAAAAAAAAAAAA')], False),
        ("escaped", [(b"cookie", b'session="\\"' + real + b'"')], False),
        ("non-ascii utf-8", [(b"cookie", "session=AAAAAAAAAAAAAAAAAAAé".encode())], False),
        ("latin-1", [(b"cookie", b"session=AAAAAAAAAAAAAAAAAAA\xff\xfe")], False),
        ("NUL", [(b"cookie", b"session=AAAAAAAAAAAAAAAAAAAA\x00")], False),
        ("CRLF", [(b"cookie", b"session=AAAAAAAAAAAAAAAA\r\nSet-Cookie: x=1")], False),
        ("empty value", [(b"cookie", b"session=")], False),
        ("no value", [(b"cookie", b"session")], False),
        ("only separators", [(b"cookie", b";;;;;;=;=;=")], False),
        ("glob", [(b"cookie", b"session=*AAAAAAAAAAAAAAAAAAAAAAA")], False),
        ("sql", [(b"cookie", b"session=' OR '1'='1' --AAAAAAAA")], False),
        ("redis injection", [(b"cookie", b"session=AAAAAAAAAAAAAAAA:*\r\nFLUSHALL")], False),
        ("percent-encoded", [(b"cookie", b"session=" + b"%41" * 16)], False),
        ("base64 padding", [(b"cookie", b"session=" + b"A" * 42 + b"=")], False),
        ("short", [(b"cookie", b"session=abc")], False),
    ]


BAD_COOKIES = _bad_cookie_headers()


@pytest.fixture
async def site(harness: Harness, clock: FakeClock) -> AsyncIterator[tuple[Population, Any]]:
    raw = await harness.raw(Config(cleanup_interval=0))
    population = await Population(raw, clock).fill()
    yield population, _app(population.a)


@pytest.mark.parametrize(
    ("headers", "lookups"), [(h, k) for _, h, k in BAD_COOKIES], ids=[n for n, _, _ in BAD_COOKIES]
)
async def test_bad_cookies_get_a_fresh_session(
    site: tuple[Population, Any], headers: list[tuple[bytes, bytes]], lookups: int
) -> None:
    population, app = site
    calls = spy(population.raw)
    TRIED["bad cookie"] += 1
    status, cookies, body = await _request(app, headers)
    assert status == 200 and body == b"{}"
    assert calls["_load"] == int(lookups), "an ill-formed cookie reached the store"
    status, cookies, _ = await _request(app, headers, "/write")
    assert status == 200
    fresh = _cookie_id(cookies)
    assert fresh.encode() not in b"".join(v for _, v in headers)
    assert (await population.a.get(fresh)).data == {"k": "v"}
    await population.unchanged()


async def test_more_session_cookies_than_are_read_are_ambiguous(
    site: tuple[Population, Any],
) -> None:
    """200 distinct well-formed ids, more than are read (4): the one that matters may
    be among the unread ones, so none is looked up, the request is anonymous, and a
    write answers 409 and sets nothing (a new session's cookie would replace the
    client's own)."""
    population, app = site
    calls = spy(population.raw)
    TRIED["bad cookie"] += 1
    headers = [(b"cookie", b"session=%043d" % i) for i in range(200)]
    status, cookies, body = await _request(app, headers)
    assert status == 200 and body == b"{}" and cookies == []
    assert calls["_load"] == 0
    status, cookies, _ = await _request(app, headers, "/write")
    assert status == 409 and cookies == []
    await population.unchanged()


async def test_random_bytes_as_cookies(site: tuple[Population, Any]) -> None:
    population, app = site
    rng = random.Random(1126)
    for _ in range(RANDOM_INPUTS):
        TRIED["random cookie"] += 1
        junk = rng.randbytes(rng.choice([1, 16, 43, 47, 130, 4096]))
        headers = rng.choice(
            [
                [(b"cookie", b"session=" + junk)],
                [(b"cookie", junk)],
                [(b"cookie", b"a=1; session=" + junk + b"; b=2")],
                [(junk.lower() or b"x", junk), (b"cookie", b"session=" + junk)],
            ]
        )
        status, _, _ = await _request(app, headers)
        assert status == 200
    await population.unchanged()


async def test_unknown_and_other_site_ids_are_never_adopted(
    site: tuple[Population, Any],
) -> None:
    population, app = site
    other_site = population.ids[4]  # a session of site b
    for sent in (PLANTED, other_site, population.ids[0] + "x"):
        TRIED["unknown cookie"] += 1
        status, cookies, body = await _request(
            app, [(b"cookie", b"session=" + sent.encode())], "/write"
        )
        assert status == 200 and body == b'{"k":"v"}'
        fresh = _cookie_id(cookies)
        assert fresh != sent
    await population.unchanged()


@pytest.mark.parametrize(
    "harness", [n for n in BACKEND_NAMES if _family(n) is not None], indirect=True
)
async def test_cookie_of_a_corrupted_record_gets_a_fresh_session(
    harness: Harness, clock: FakeClock
) -> None:
    family = _family(harness.name)
    assert family is not None
    raw = await harness.raw(Config(cleanup_interval=0))
    population = await Population(raw, clock).fill()
    app = _app(population.a)
    victim = await population.a.create(new_session(None, data={"x": 1}, now=clock()))
    await POKE[family](raw, raw.handle(victim.id), CORRUPTIONS[family][0][1])
    TRIED["corrupt cookie"] += 1
    status, cookies, body = await _request(app, [(b"cookie", b"session=" + victim.id.encode())])
    assert status == 200 and body == b"{}"
    status, cookies, _ = await _request(
        app, [(b"cookie", b"session=" + victim.id.encode())], "/write"
    )
    assert status == 200 and _cookie_id(cookies) != victim.id
    await population.unchanged()


async def test_oversized_writes_do_not_flood_the_logs(
    site: tuple[Population, Any], caplog: pytest.LogCaptureFixture
) -> None:
    """20 requests that grow the session past the size limit: each a 413, and a
    handful of records at WARNING or above, not two per request (outside review)."""
    population, app = site
    sid = population.ids[3]
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        for _ in range(20):
            status, _, _ = await _request(
                app, [(b"cookie", b"session=" + sid.encode())], "/huge", b"kind=big"
            )
            assert status == 413
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= 2, [r.getMessage()[:80] for r in loud]
    assert sum("SIZE_EXCEEDED" in r.getMessage() for r in caplog.records) >= 20
    await population.unchanged()


@pytest.mark.parametrize(
    "body",
    [
        b'{"f": NaN}',
        b'{"f": -Infinity}',
        b'{"i": 123456789012345678901234567890}',
        b'{"k%s": ' * 300 % tuple(b"%04d" % n + b"k" * 2000 for n in range(300))
        + b"1"
        + b"}" * 300,
    ],
    ids=["nan", "infinity", "bigint", "deep-long-keys"],
)
async def test_client_data_json_cannot_hold_does_not_flood_the_logs(
    site: tuple[Population, Any], caplog: pytest.LogCaptureFixture, body: bytes
) -> None:
    """What Starlette's request.json() accepts and strict JSON refuses (NaN, integers
    past 64 bits, nesting past 250 levels) stored as sent, 20 times: each refused by
    the app's handler (400), the stored session unchanged, a handful of records at
    WARNING or above (not two per request), none longer than a few hundred characters
    however long the client's keys (outside review: a 501 KB record per request)."""
    population, app = site
    sid = population.ids[3]
    before = await population.a.get(sid)
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        for _ in range(20):
            scope = http_scope([(b"cookie", b"session=" + sid.encode())], "/put")
            messages = await call_app(app, scope, bounded, body=body)
            assert messages[0]["status"] == 400
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) <= 3, [r.getMessage()[:80] for r in loud]
    assert max(len(r.getMessage()) for r in caplog.records) < 1_000
    assert sum("NOT_SERIALIZABLE" in r.getMessage() for r in caplog.records) >= 20
    assert await population.a.get(sid) == before
    await population.unchanged()


async def test_non_json_session_data_is_refused_and_changes_nothing(
    site: tuple[Population, Any], caplog: pytest.LogCaptureFixture
) -> None:
    population, app = site
    sid = population.ids[3]  # site a's anonymous session
    before = await population.a.get(sid)
    TRIED["bad handler data"] += 1
    with caplog.at_level(logging.DEBUG, "asyncsession"):  # (ERROR once per interval)
        status, _, _ = await _request(app, [(b"cookie", b"session=" + sid.encode())], "/bad")
    assert status == 400  # the app's handler (install_exception_handler) answers
    assert "SESSION_NOT_SERIALIZABLE" in caplog.text
    assert await population.a.get(sid) == before
    await population.unchanged()


@pytest.mark.parametrize(
    ("kind", "code", "answer"), [("deep", "NOT_SERIALIZABLE", 400), ("big", "SIZE_EXCEEDED", 413)]
)
async def test_huge_session_data_is_refused_and_changes_nothing(
    site: tuple[Population, Any],
    caplog: pytest.LogCaptureFixture,
    kind: str,
    code: str,
    answer: int,
) -> None:
    """A handler that puts 10,000-deep nesting or 50 MB into the session: refused,
    answered by the app's own handler for it (400 from install_exception_handler; 500
    without one), or 413 for data past the size limit (a client can drive that where
    the app stores what it sends); the stored session (and every other) is left as it
    was."""
    population, app = site
    sid = population.ids[3]
    before = await population.a.get(sid)
    TRIED["huge handler data"] += 1
    with caplog.at_level(logging.DEBUG, "asyncsession"):  # (rate-limited above DEBUG)
        status, _, _ = await _request(
            app, [(b"cookie", b"session=" + sid.encode())], "/huge", b"kind=" + kind.encode()
        )
    assert status == answer
    assert f"SESSION_{code}" in caplog.text
    assert await population.a.get(sid) == before
    await population.unchanged()
