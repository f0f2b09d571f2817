"""Session data encrypted at rest, through real stores: memory, SQLite, Redis.

No plaintext in what the backend keeps (memory internals, the SQLite file, every Redis
key and value), key rotation end to end with ``reencrypt``, tampered records as a coded
error and a violation that carries no data, concurrent ``apply`` with nothing lost, and
a round trip of arbitrary JSON-native data.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import pickle
import secrets
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings

from asyncsession import (
    Changes,
    Config,
    ControlledStore,
    ErrorCode,
    Session,
    SessionCorrupt,
    SessionNotFound,
    SessionTooLarge,
    Store,
    ViolationEvent,
    codec,
    generate_key,
    generate_session_id,
    new_session,
    session_handle,
    with_controls,
)
from asyncsession.crypto import SEALED_KEY, KeyRing, is_sealed, key_id

from .backends import load
from .clock import FakeClock
from .test_model import json_data

KEY_A = generate_key()
KEY_B = generate_key()
KEY_C = generate_key()
BACKENDS = ["memory", "sqlite_file", "redis", "redis_plain_ids"]
"""``redis_plain_ids``: Redis with ``Config(hash_ids=False)`` (ids kept as they are)."""


def kid(key: str) -> bytes:
    return key_id(base64.urlsafe_b64decode(key))


class Backend:
    """One raw store of a backend and the controlled stores a test puts over it."""

    def __init__(self, name: str, raw: Store, clock: FakeClock) -> None:
        self.name = name
        self.raw = raw
        self.clock = clock
        self.violations: list[ViolationEvent] = []

    def controlled(self, *keys: str | bytes, **config: Any) -> ControlledStore:
        scope = replace(self.raw.config, encryption_keys=keys, **config)
        return with_controls(self.raw, scope, on_violation=self.violations.append)

    def needs_scan(self) -> None:
        """``reencrypt`` and ``stored`` scan the backend: on a backend whose scan does not
        list records kept under handles yet, that is an expected failure."""
        if not scan_sees_handles(self.raw):
            pytest.xfail("this Redis backend's _scan does not list records under handles yet")

    async def stored(self, *session_ids: str) -> dict[str, dict[str, Any]]:
        """The data of the records of ``session_ids`` (else of every record, by a scan)
        as the backend keeps it: storage id -> data."""
        if session_ids:
            keys = [self.raw.handle(session_id) for session_id in session_ids]
        else:
            self.needs_scan()
            keys = [entry.session_id async for batch in self.raw._scan(100) for entry in batch]
        out = {}
        for key in keys:
            session = await self.raw._load(key)
            assert session is not None
            out[key] = session.data
        return out

    async def raw_bytes(self) -> bytes:
        """Everything the backend keeps, as bytes a copy of the storage would hold."""
        if self.name == "memory":
            return pickle.dumps(self.raw._entries) + pickle.dumps(  # type: ignore[attr-defined]
                self.raw._users  # type: ignore[attr-defined]
            )
        if self.name.startswith("sqlite"):
            return _file_bytes(self.raw.path)  # type: ignore[attr-defined]
        client = self.raw.client  # type: ignore[attr-defined]
        prefix = self.raw.config.key_prefix
        out = b""
        async for key in client.scan_iter(match=prefix + "*", count=1000):
            out += key + (await client.dump(key) or b"")
            kind = (await client.type(key)).decode()
            if kind == "hash":
                for k, v in (await client.hgetall(key)).items():
                    out += k + v
            elif kind == "string":
                out += await client.get(key)
            elif kind == "zset":
                out += b"".join(await client.zrange(key, 0, -1))
            elif kind == "set":
                out += b"".join(await client.smembers(key))
        return out


def scan_sees_handles(store: Store) -> bool:
    """Whether ``store._scan`` lists records kept under handles (``Config.hash_ids``):
    a Redis layout that only recognizes plain ids in key names does not."""
    layout = getattr(store, "_layout", None)
    if layout is None or not store.config.hash_ids:
        return True
    key = layout.session_key(session_handle(generate_session_id()))
    return layout.id_of(key) is not None


def _file_bytes(path: str) -> bytes:
    """A SQLite database and its journals as a file copy would hold them."""
    out = b""
    for suffix in ("", "-wal", "-journal"):
        if os.path.exists(path + suffix):
            with open(path + suffix, "rb") as f:
                out += f.read()
    return out


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    spec = load(request.param.removesuffix("_plain_ids"))
    assert spec is not None
    reason = spec.skip_reason()
    if reason:
        pytest.skip(reason)
    clock = FakeClock()
    config = Config(
        cleanup_interval=0,
        max_session_size=4096,
        hash_ids=not request.param.endswith("_plain_ids"),
    )
    raw = await spec.open_raw(config, clock, uuid.uuid4().hex[:12])
    try:
        yield Backend(request.param, raw, clock)
    finally:
        await raw.close()


# ------------------------------------------------------------------ what is stored


@pytest.mark.parametrize("encrypted", [True, False])
async def test_no_plaintext_data_at_rest(backend: Backend, encrypted: bool) -> None:
    """With encryption on, no byte of the data is in storage after create, update and
    apply; with it off the same probe finds it (so the probe can see plaintext)."""
    store = backend.controlled(*([KEY_A] if encrypted else []))
    marker = f"secret-{secrets.token_hex(8)}"
    session = await store.create(new_session("u-1", data={"card": marker, "n": 1}))
    session.data["more"] = marker + "-updated"
    await store.update(session)
    await store.apply(session.id, Changes(set={"applied": marker + "-applied"}))
    loaded = await store.get(session.id)
    assert loaded.data == {
        "card": marker,
        "n": 1,
        "more": marker + "-updated",
        "applied": marker + "-applied",
    }
    dump = await backend.raw_bytes()
    assert b"u-1" in dump  # the metadata stays readable
    if backend.raw.config.hash_ids:
        assert session.id.encode() not in dump  # ids are kept as handles
    if encrypted:
        assert marker.encode() not in dump
        assert b"card" not in dump  # keys are data too
        (data,) = (await backend.stored(session.id)).values()
        assert is_sealed(data)
    else:
        assert marker.encode() in dump


# ------------------------------------------------------------------ key rotation


async def test_key_rotation_end_to_end(backend: Backend) -> None:
    backend.needs_scan()
    old = backend.controlled(KEY_A)
    other_site = backend.controlled(KEY_A, site_id="other")
    plain = backend.controlled()
    s1 = await old.create(new_session("u-1", data={"v": 1}))
    s2 = await old.create(new_session("u-2", data={"v": 2}))
    s3 = await other_site.create(new_session("u-3", data={"v": 3}))
    s4 = await plain.create(new_session("u-4", data={"v": 4}))  # written before encryption
    gone = await old.create(new_session(None, ttl=10, data={"v": 5}))
    backend.clock.advance(20)  # ``gone`` expired, not purged: left for the purge
    ring_a = KeyRing([base64.urlsafe_b64decode(KEY_A)])
    assert {ring_a.token_key_id(d) for d in (await backend.stored()).values()} == {kid(KEY_A), None}

    rotated = backend.controlled(KEY_B, KEY_A)
    assert (await rotated.get(s1.id)).data == {"v": 1}  # the old key still reads
    assert (await rotated.get(s4.id)).data == {"v": 4}  # and plaintext
    s1 = await rotated.get(s1.id)
    s1.data["v"] = 11
    await rotated.update(s1)  # a write seals with the new key
    assert await rotated.reencrypt() == 3  # s2, s3 (other site), s4 (plaintext)
    stored = await backend.stored()
    assert len(stored) == 5
    key_ids = [ring_a.token_key_id(data) for data in stored.values()]
    assert key_ids.count(kid(KEY_B)) == 4  # everything live is under the new key
    assert key_ids.count(kid(KEY_A)) == 1  # the expired one is left alone
    assert await rotated.reencrypt() == 0  # nothing left to do

    new = backend.controlled(KEY_B)
    assert (await new.get(s1.id)).data == {"v": 11}
    assert (await new.get(s2.id)).data == {"v": 2}
    assert (await new.get(s4.id)).data == {"v": 4}
    assert (await backend.controlled(KEY_B, site_id="other").get(s3.id)).data == {"v": 3}
    assert [s.data for s in await new.list_by_user("u-2")] == [{"v": 2}]
    resealed = await new.get(s2.id)
    assert resealed.version == s2.version + 1  # compare-and-set: the version moved
    assert resealed.updated_at == s2.updated_at  # times unchanged
    assert resealed.expires_at == s2.expires_at
    with pytest.raises(SessionNotFound):
        await new.get(gone.id)
    assert not backend.violations


async def test_reencrypt_never_loses_a_concurrent_write(backend: Backend) -> None:
    """Writers racing reencrypt over the same sessions: every write survives."""
    backend.needs_scan()
    old = backend.controlled(KEY_A)
    ids = [(await old.create(new_session(f"u-{n}", data={"n": n}))).id for n in range(20)]
    rotated = backend.controlled(KEY_B, KEY_A)

    async def writer(session_id: str) -> None:
        for round_ in range(3):
            await rotated.apply(session_id, Changes(set={f"w{round_}": True}))
            await asyncio.sleep(0)

    results = await asyncio.gather(rotated.reencrypt(), *(writer(i) for i in ids))
    assert 0 <= results[0] <= 20
    for session_id in ids:
        data = (await backend.controlled(KEY_B).get(session_id)).data
        assert data == {"n": data["n"], "w0": True, "w1": True, "w2": True}


async def test_reencrypt_keeps_a_touch_made_meanwhile(
    backend: Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that touches a session between reencrypt's read and its write (another
    worker, an idle timeout sliding) keeps its slide: the reseal changes the data's key
    and the version, not the times it read (it wrote them back, and the user was logged
    out at the old idle deadline)."""
    backend.needs_scan()
    old = backend.controlled(KEY_A, idle_timeout=timedelta(minutes=5))
    made = await old.create(new_session("u-1", data={"v": 1}))
    rotated = backend.controlled(KEY_B, KEY_A, idle_timeout=timedelta(minutes=5))
    load = rotated._load

    async def load_then_touch(storage_id: str) -> Session | None:
        found = await load(storage_id)
        backend.clock.advance(240)
        await old.touch(made.id)  # another worker, between the read and the write
        return found

    monkeypatch.setattr(rotated, "_load", load_then_touch)
    assert await rotated.reencrypt() == 1
    monkeypatch.undo()
    got = await backend.controlled(KEY_B).get(made.id)
    assert got.data == {"v": 1} and got.version == made.version + 1
    assert got.last_accessed_at == backend.clock()
    assert got.expires_at == backend.clock() + timedelta(minutes=5)
    stored = await backend.stored(made.id)
    ring = KeyRing([base64.urlsafe_b64decode(KEY_B)])
    assert [ring.token_key_id(d) for d in stored.values()] == [kid(KEY_B)]


async def test_reencrypt_needs_keys(backend: Backend) -> None:
    with pytest.raises(ValueError, match="encryption_keys"):
        await backend.controlled().reencrypt()


# ------------------------------------------------------------ records that fail


async def _tamper(backend: Backend, session_id: str, flip: int = 20) -> None:
    """Flip one bit of the ciphertext of the session's record, in place."""
    for storage_id in await backend.stored(session_id):
        session = await backend.raw._load(storage_id)
        assert session is not None and is_sealed(session.data)
        raw = bytearray(bytes.fromhex(session.data[SEALED_KEY]))
        raw[flip] ^= 0x04
        data = orjson.dumps({SEALED_KEY: bytes(raw).hex()})
        session.version += 1
        record = codec.encode(session, data) if backend.raw.stores_header else data
        assert await backend.raw._replace(session, record, backend.raw.config, backend.clock())


async def test_tampered_record_is_a_coded_error_logged_without_data(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = backend.controlled(KEY_A)
    marker = f"secret-{secrets.token_hex(8)}"
    session = await store.create(new_session("u-1", data={"card": marker}))
    await _tamper(backend, session.id)
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        with pytest.raises(SessionCorrupt) as info:
            await store.get(session.id)
        assert isinstance(info.value, SessionNotFound)  # the middleware: an unknown cookie
        assert info.value.code is ErrorCode.SESSION_CORRUPT
        assert info.value.http_status == 404
        assert "authentication" in info.value.details["reason"]
        with pytest.raises(SessionCorrupt):
            await store.apply(session.id, Changes(set={"x": 1}))
        assert await store.list_by_user("u-1") == []
    assert [v.type for v in backend.violations] == ["decryption_failed"] * 3
    assert all(v.code is ErrorCode.SESSION_CORRUPT for v in backend.violations)
    records = [r for r in caplog.records if getattr(r, "violation", None) == "decryption_failed"]
    # a client can replay such a cookie at will: one WARNING per interval, DEBUG after
    assert [r.levelno for r in records] == [logging.WARNING] + [logging.DEBUG] * 2
    with caplog.at_level(logging.DEBUG, "asyncsession"):
        for _ in range(200):
            with pytest.raises(SessionCorrupt):
                await store.get(session.id)
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(loud) == 1 and len(backend.violations) == 203  # every one still counted
    token = str(next(iter((await backend.stored(session.id)).values()))[SEALED_KEY])
    for text in (caplog.text, repr([r.__dict__ for r in records]), repr(backend.violations)):
        assert marker not in text and token not in text and session.id not in text
        assert KEY_A not in text
    # never overwritten by a failed apply: the record is as tampered
    assert next(iter((await backend.stored(session.id)).values()))[SEALED_KEY] == token


async def test_unknown_key_and_keys_removed(backend: Backend) -> None:
    session = await backend.controlled(KEY_A).create(new_session("u-1", data={"a": 1}))
    with pytest.raises(SessionCorrupt) as info:
        await backend.controlled(KEY_C).get(session.id)
    assert f"key id {kid(KEY_A).hex()}" in info.value.details["reason"]
    with pytest.raises(SessionCorrupt) as info:
        await backend.controlled().get(session.id)  # encryption turned off, record sealed
    assert "encryption_keys is empty" in info.value.details["reason"]
    assert [v.type for v in backend.violations] == ["decryption_failed"] * 2


async def test_size_limit_is_on_the_plaintext(backend: Backend) -> None:
    """A session just under the limit as plaintext fits, though sealed it is larger."""
    store = backend.controlled(KEY_A)  # max_session_size=4096
    session = new_session("u-1", data={"blob": ""})
    session.data["blob"] = "x" * 3600
    created = await store.create(session)
    stored = next(iter((await backend.stored(created.id)).values()))
    assert len(orjson.dumps(stored)) > 4096  # what is stored is over the limit ...
    assert (await store.get(created.id)).data["blob"] == "x" * 3600  # ... and it counts the plain
    created.data["blob"] = "x" * 4096
    with pytest.raises(SessionTooLarge):
        await store.update(created)
    with pytest.raises(SessionTooLarge):
        await store.apply(created.id, Changes(set={"blob": "x" * 4096}))
    with pytest.raises(SessionTooLarge):
        await store.create(new_session("u-1", data={"blob": "y" * 4096}))
    assert [v.type for v in backend.violations] == ["size_exceeded"] * 3


# ------------------------------------------------------------------- concurrency


async def test_concurrent_different_key_applies_lose_nothing(backend: Backend) -> None:
    store = backend.controlled(KEY_A)
    session = await store.create(new_session("u-1", data={"base": 0}))
    tasks = 120

    async def write(n: int) -> None:
        await store.apply(session.id, Changes(set={f"k{n}": n}))

    await asyncio.gather(*(write(n) for n in range(tasks)))
    loaded = await store.get(session.id)
    assert loaded.data == {"base": 0, **{f"k{n}": n for n in range(tasks)}}
    assert loaded.version == session.version + tasks
    (data,) = (await backend.stored(session.id)).values()
    assert is_sealed(data)


async def test_expectations_still_conflict(backend: Backend) -> None:
    store = backend.controlled(KEY_A)
    session = await store.create(new_session("u-1", data={"n": 1}))
    await store.apply(session.id, Changes(set={"n": 2}, expect={"n": 1}))
    with pytest.raises(Exception, match="changed concurrently"):
        await store.apply(session.id, Changes(set={"n": 3}, expect={"n": 1}))
    assert (await store.get(session.id)).data == {"n": 2}


# ------------------------------------------------------------------- round trip


@pytest.mark.parametrize("name", ["memory", "sqlite_memory"])
@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=json_data)
def test_hypothesis_round_trip_through_a_store(name: str, data: dict[str, Any]) -> None:
    async def check() -> None:
        spec = load(name)
        assert spec is not None
        raw = await spec.open_raw(Config(cleanup_interval=0), FakeClock(), "h")
        try:
            store = with_controls(raw, Config(cleanup_interval=0, encryption_keys=[KEY_A]))
            session = await store.create(new_session("u-1", data=data))
            back = await store.get(session.id)
            assert back.data == data and repr(back.data) == repr(data)
            await store.apply(session.id, Changes(set={"extra": 1}))
            assert (await store.get(session.id)).data == {**data, "extra": 1}
        finally:
            await raw.close()

    asyncio.run(check())


async def test_raw_store_with_keys_encrypts_too() -> None:
    """Encryption is the store's config, not only the controls layer's."""
    from asyncsession import MemoryStore

    store = MemoryStore(Config(cleanup_interval=0, encryption_keys=[KEY_A]))
    session = await store.create(new_session("u-1", data={"a": "hidden"}))
    assert b"hidden" not in pickle.dumps(store._entries)
    assert (await store.get(session.id)).data == {"a": "hidden"}
    await store.apply(session.id, Changes(set={"b": 2}))
    assert (await store.get(session.id)).data == {"a": "hidden", "b": 2}
    await store.close()


def test_idle_timeout_slides_with_encryption() -> None:
    async def check() -> None:
        clock = FakeClock()
        from asyncsession import MemoryStore

        config = Config(cleanup_interval=0, encryption_keys=[KEY_A], idle_timeout=60)
        store = with_controls(MemoryStore(config, clock=clock), config)
        session = await store.create(new_session("u-1", data={"a": 1}))
        clock.advance(timedelta(seconds=50))
        applied = await store.apply(session.id, Changes(set={"b": 2}))
        assert applied.expires_at == clock.now + timedelta(seconds=60)
        await store.close()

    asyncio.run(check())


# ------------------------------------------------------------------- middleware


async def test_middleware_writes_sealed_and_treats_a_tampered_session_as_unknown(
    backend: Backend,
) -> None:
    """Through ``SessionMiddleware``: a session's changes are saved sealed (``apply``),
    read back, and once its record is altered the cookie is an unknown one: a fresh,
    empty session, never the stored data, and a ``decryption_failed`` violation."""
    from .test_asgi import client, cookie_id, make_app

    store = backend.controlled(KEY_A)
    app = make_app(store)
    marker = f"secret-{secrets.token_hex(8)}"
    async with client(app) as http:
        first = await http.post("/set", params={"key": "card", "value": marker})
        assert first.status_code == 200
        session_id = cookie_id(first)
        second = await http.post("/set", params={"key": "n", "value": "2"})  # an apply
        assert second.json() == {"card": marker, "n": "2"}
        assert (await http.get("/read")).json() == {"card": marker, "n": "2"}
        (data,) = (await backend.stored(session_id)).values()
        assert is_sealed(data)
        await _tamper(backend, session_id)
        after = await http.get("/read")
        assert after.status_code == 200 and after.json() == {}
        assert marker not in after.text
        fresh = await http.post("/set", params={"key": "k", "value": "v"})
        assert fresh.json() == {"k": "v"}
        assert cookie_id(fresh) != session_id
    assert "decryption_failed" in [v.type for v in backend.violations]


async def test_a_session_under_a_key_this_instance_lacks_is_an_outage_not_a_logout(
    backend: Backend,
) -> None:
    """A rolling key rotation: an instance already on ``B,A`` writes the session under
    B; the next request reaches one still on ``A``. It answered 200 with a fresh
    session and expired the cookie (outside race run: 375 of 1,379 users logged
    out); now 503 with the cookie untouched, and the instance that has the key
    still serves the session."""
    from .test_asgi import client, cookie_id, make_app, set_cookies

    new, old = backend.controlled(KEY_B, KEY_A), backend.controlled(KEY_A)
    async with client(make_app(new)) as on_new, client(make_app(old)) as on_old:
        first = await on_new.post("/set", params={"key": "cart", "value": "book"})
        session_id = cookie_id(first)
        jar = {"cookie": f"session={session_id}"}
        on_new.cookies.clear()
        for request in (
            on_old.get("/read", headers=jar),
            on_old.post("/set", params={"key": "k", "value": "v"}, headers=jar),
        ):
            response = await request
            assert response.status_code == 503, response.text
            assert set_cookies(response) == []
        after = await on_new.get("/read", headers=jar)
        assert after.json() == {"cart": "book"}
    # (and still reported, as any record that does not open)
    assert "decryption_failed" in [v.type for v in backend.violations]


async def test_a_store_without_keys_never_merges_into_encrypted_data(backend: Backend) -> None:
    """A blind write (``apply`` without a base) from an instance without keys over a
    record another instance sealed: the backend's own merge (SQL, Lua, memory) put
    the new key beside the sealed blob, and the record no longer opened anywhere
    (review: all of the user's data lost). Now refused as a key this store lacks,
    the record untouched."""
    sealed, keyless = backend.controlled(KEY_A), backend.controlled()
    session = await sealed.create(new_session("u", data={"cart": ["book"]}))
    with pytest.raises(SessionCorrupt) as info:
        await keyless.apply(session.id, Changes(set={"mine": 1}))
    assert info.value.details.get("key_not_configured") is True
    assert (await sealed.get(session.id)).data == {"cart": ["book"]}


async def test_tossed_cookies_with_one_under_a_key_this_instance_lacks(
    backend: Backend,
) -> None:
    """Several cookies, one of them the user's session sealed under a key this
    instance lacks and one an attacker's session it can read: the attacker's was
    adopted and the user's write landed in it (review). Now 503, no cookie sent."""
    from .test_asgi import client, make_app, set_cookies

    new, old = backend.controlled(KEY_B, KEY_A), backend.controlled(KEY_A)
    victim = await new.create(new_session("victim", data={"cart": ["book"]}))
    attacker = await old.create(new_session("attacker"))
    jar = {"cookie": f"session={victim.id}; session={attacker.id}"}
    async with client(make_app(old)) as on_old:
        response = await on_old.post("/set", params={"key": "note", "value": "x"}, headers=jar)
        assert response.status_code == 503 and set_cookies(response) == []
    assert (await old.get(attacker.id)).data == {}
    assert (await new.get(victim.id)).data == {"cart": ["book"]}
