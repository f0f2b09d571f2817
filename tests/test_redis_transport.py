"""The Redis transport: no caller ever hangs, whatever a server (or a bug) does; the
user's pool is respected; the server check at open.

The hostile servers are ``tests/fake_redis_server.py`` on a local port: garbage,
replies of the wrong type, errors mid-batch, a connection closed mid-reply, silence.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

redis = pytest.importorskip("redis")

from redis.asyncio import Redis  # noqa: E402
from redis.asyncio.cluster import ClusterNode, RedisCluster  # noqa: E402
from redis.exceptions import ResponseError  # noqa: E402

from asyncsession import (  # noqa: E402
    Changes,
    Config,
    ControlledStore,
    SessionError,
    StoreUnavailable,
    new_session,
    with_controls,
)
from asyncsession.backends.redis import RedisStore, transport  # noqa: E402

from . import backend_redis, redis_servers  # noqa: E402
from .clock import FakeClock  # noqa: E402
from .fake_redis_server import serve  # noqa: E402

TIMEOUT = 1.0
MARGIN = 2.5  # room for a loaded CI machine; the bugs caught hang, or wait out socket_timeout=5
"""Every call returns or raises within the store's timeout plus this: room for a
machine shared with other test runs. The timeout covers the whole call (waiting for
a slot, the slot map, redis-py's retries, the reply), whatever redis-py does."""

MODES = ["garbage", "wrong_types", "error_mid_batch", "close_mid_reply", "silent"]


def cfg(**changes: Any) -> Config:
    base: dict[str, Any] = {"site_id": "site-a", "max_sessions_per_user": 3, "cleanup_interval": 0}
    base.update(changes)
    return Config(**base)


def client_for(kind: str, port: int) -> Redis | RedisCluster:
    """``single``/``cluster``: a user's client with a ``socket_timeout`` (on Python
    3.11 a lone call then goes in a task of its own); ``bare``: one without, as the
    store builds (a lone call runs in its caller's task, ``Transport._send_inline``)."""
    options: dict[str, Any] = {"socket_timeout": 5, "socket_connect_timeout": 2}
    if kind == "bare":
        return Redis(host="127.0.0.1", port=port, socket_timeout=None, socket_connect_timeout=2)
    if kind == "cluster":
        reason = redis_servers.cluster_client_reason()
        if reason is not None:
            pytest.skip(reason)
        return RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", port)], **options)
    return Redis(host="127.0.0.1", port=port, **options)


async def all_settle(calls: list[Any]) -> list[Any]:
    """Run the calls at once; every one must finish within TIMEOUT + MARGIN."""
    started = time.monotonic()
    tasks = [asyncio.ensure_future(call) for call in calls]
    _, pending = await asyncio.wait(tasks, timeout=TIMEOUT + MARGIN)
    for task in pending:
        task.cancel()
    assert not pending, f"{len(pending)} of {len(tasks)} callers still waiting"
    assert time.monotonic() - started < TIMEOUT + MARGIN
    return [task.exception() or task.result() for task in tasks]


@pytest.mark.parametrize("kind", ["single", "bare", "cluster"])
@pytest.mark.parametrize("mode", MODES)
async def test_64_gets_and_creates_settle_against_a_hostile_server(
    kind: str, mode: str, clock: FakeClock
) -> None:
    async with serve(mode) as fake:
        client = client_for(kind, fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=TIMEOUT)
        controlled = with_controls(store, cfg())
        try:
            ids = [new_session(f"u{i % 5}").id for i in range(64)]
            merges = 0 if kind == "cluster" else 64
            bases = [new_session(None, 60, data={"k": 0}) for _ in range(merges // 4)]
            results = await all_settle(
                [controlled.get(i) for i in ids]
                + [controlled.create(new_session(f"u{i % 5}")) for i in range(64)]
                # anonymous creates that expire, and writes with a base: on one server
                # each kind merged into one script call per batch (a cluster does not
                # merge: left out there, where a silent server's stuck pipelines would
                # only hold the client's close longer)
                + [controlled.create(new_session(None, 60)) for _ in range(merges)]
                + [controlled.apply(s.id, Changes(set={"k": 1}), base=s) for s in bases]
                # a garbled reply to a write's script is the server's fault, never a
                # damaged session (SessionNotFound would log its user out)
                + [controlled.apply(i, Changes(set={"k": 1})) for i in ids[:16]]
                + [controlled.touch(i) for i in ids[16:24]]
                + [controlled.delete(i) for i in ids[24:32]]
            )
        finally:
            # (the client's own close, bounded: a cluster client's waits for a
            # topology refresh it may have started against the silent server, under
            # its lock, for up to its socket timeouts: CI once saw 5 s pass)
            await asyncio.wait_for(client.aclose(), 20 if kind == "cluster" else 5)
    # a reply or a library error; never a raw TypeError, KeyError, redis error...
    for result in results:
        if isinstance(result, BaseException):
            assert isinstance(result, SessionError), repr(result)
    if mode != "error_mid_batch":  # (there some odd replies are errors, some numbers)
        assert all(isinstance(r, StoreUnavailable) for r in results), results[:3]
    assert fake.commands  # the batches did reach the server


@pytest.fixture
async def controlled(clock: FakeClock) -> AsyncIterator[ControlledStore]:
    """A controlled store on the test server (REDIS_URL), or on fakeredis without one,
    under a key prefix of its own that is deleted after."""
    if backend_redis.server_reachable():
        client: Any = Redis.from_url(backend_redis.REDIS_URL)
    elif backend_redis.REQUIRE:
        pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis at {backend_redis.REDIS_URL}")
    else:
        client = backend_redis.fake_client()
    config = cfg(key_prefix=f"transport-{uuid.uuid4().hex[:8]}:")
    store = RedisStore(client, config, clock=clock)
    try:
        async with store:
            yield with_controls(store, config)
    finally:
        await backend_redis.delete_prefix(client, config.key_prefix)
        await client.aclose()


@pytest.mark.parametrize("merged", ["reads", "creates", "users", "writes"])
@pytest.mark.parametrize(
    "bad",
    ["first", [b"ok"], 42, None, ResponseError("WRONGTYPE Operation against a key")],
    ids=["first", "one-item", "int", "nil", "whole-call-wrongtype"],
)
async def test_a_merged_reply_of_the_wrong_shape_fails_each_merged_caller(
    merged: str, bad: Any, controlled: ControlledStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merged call's reply that is not one entry per merged request (a proxy or
    server gone wrong) fails each merged caller with StoreUnavailable: never one
    caller's session handed to the others, never a create or write reported done
    that was not. An error reply to the whole call is the call's failure, not each
    key's (a WRONGTYPE there made every merged read "not found", logging its users
    out: outside check with a fake server). The batch's other requests get their
    own replies."""
    kept = [await controlled.create(new_session(None, 60, data={"n": n})) for n in range(5)]
    loaded = [await controlled.get(s.id) for s in kept[3:]]
    script = {
        "reads": transport.MULTI_GET.sha,
        "creates": transport.MULTI_INSERT.sha,
        "users": transport.MULTI_INSERT_USER.sha,
        "writes": transport.MULTI_APPLY.sha,
    }[merged]
    real = transport.send_recovering

    async def garble(client: Any, commands: Any, **options: Any) -> list[Any]:
        replies = await real(client, commands, **options)
        return [
            # "first": the first merged request's own reply, as if it were all of them
            (reply[0] if bad == "first" else bad) if command[:2] == ("EVALSHA", script) else reply
            for command, reply in zip(commands, replies, strict=True)
        ]

    monkeypatch.setattr(transport, "send_recovering", garble)
    fresh = [new_session(None, 60, data={"n": n}) for n in range(3)]
    users = [new_session(f"user-{n}", 60, data={"n": n}) for n in range(3)]
    results = await all_settle(
        [controlled.get(kept[0].id)]  # (a lone call, to open a batch behind it)
        + [controlled.get(s.id) for s in kept[1:3]]
        + [controlled.create(s) for s in fresh]
        + [controlled.create(s) for s in users]
        + [controlled.apply(s.id, Changes(set={"w": 1}), base=s) for s in loaded]
        + [controlled.apply(kept[0].id, Changes(set={"x": 1}))]  # (no base: as APPLY)
    )
    monkeypatch.setattr(transport, "send_recovering", real)
    groups = {
        "reads": results[1:3],
        "creates": results[3:6],
        "users": results[6:9],
        "writes": results[9:11],
    }
    assert all(isinstance(r, StoreUnavailable) for r in groups.pop(merged))
    for name, others in groups.items():
        assert not any(isinstance(r, BaseException) for r in others), (name, others)
    assert not isinstance(results[11], BaseException), results[11]
    for group, made_here in (("creates", fresh), ("users", users)):
        if merged != group:  # a create reported done is stored
            for made in made_here:
                got = await controlled.get(made.id)
                assert got is not None and got.data == made.data
    if merged != "writes":  # a write reported done is stored
        for s in loaded:
            got = await controlled.get(s.id)
            assert got is not None and got.data["w"] == 1


async def test_a_failed_second_round_fails_only_the_writes_sent_again(
    controlled: ControlledStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A merged write whose session changed since it was loaded goes as APPLY in a
    second round trip. If that round fails, only those writes are in doubt: the
    batch's reads, creates and common writes, done in the first round, get their
    replies (and get them before the second round ends)."""
    kept = [await controlled.create(new_session(None, 60, data={"n": n})) for n in range(4)]
    loaded = [await controlled.get(s.id) for s in kept[2:]]
    await controlled.apply(kept[3].id, Changes(set={"moved": 1}))  # 3's base is stale
    real = transport.send_recovering
    second: list[bool] = []
    early: list[int] = []

    async def failing_second(client: Any, commands: Any, **options: Any) -> list[Any]:
        if all(command[:2] == ("EVALSHA", transport.APPLY.sha) for command in commands):
            for _ in range(5):  # (the round trip's wait: the loop runs the others)
                await asyncio.sleep(0)
            early.append(sum(1 for task in pending if task.done()))
            second.append(True)
            raise redis.exceptions.ConnectionError("dropped")
        return await real(client, commands, **options)

    monkeypatch.setattr(transport, "send_recovering", failing_second)
    fresh = new_session(None, 60, data={"new": True})
    calls = [
        controlled.get(kept[0].id),  # (a lone call, to open a batch behind it)
        controlled.get(kept[1].id),
        controlled.create(fresh),
        controlled.apply(loaded[0].id, Changes(set={"w": 1}), base=loaded[0]),
        controlled.apply(loaded[1].id, Changes(set={"w": 1}), base=loaded[1]),
    ]
    pending = [asyncio.ensure_future(call) for call in calls]
    results = await all_settle(pending)
    monkeypatch.setattr(transport, "send_recovering", real)
    assert second == [True]
    assert early == [4]  # the gets, the create and the common write: answered already
    assert not any(isinstance(r, BaseException) for r in results[:4]), results
    assert isinstance(results[4], StoreUnavailable)
    got = await controlled.get(loaded[0].id)
    assert got is not None and got.data == {"n": 2, "w": 1}
    assert await controlled.get(fresh.id) is not None


class Boom(KeyError):
    """Not a RedisError, not an OSError: what a bug in a dependency could raise."""


@pytest.mark.parametrize("kind", ["single", "bare", "cluster"])
async def test_any_exception_in_a_batch_resolves_every_waiter(
    kind: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An exception of any type inside a batch (here a KeyError from the send) reaches
    every caller of the batch as StoreUnavailable, the leader's included."""
    async with serve("wrong_types") as fake:
        client = client_for(kind, fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=TIMEOUT)
        controlled = with_controls(store, cfg())

        async def broken(client: Any, commands: Any) -> list[Any]:
            await asyncio.sleep(0)
            raise Boom("injected")

        monkeypatch.setattr(transport, "send_batch", broken)
        try:
            ids = [new_session(None).id for _ in range(64)]
            results = await all_settle(
                [controlled.get(i) for i in ids]
                + [controlled.create(new_session("alice")) for _ in range(64)]
            )
        finally:
            await asyncio.wait_for(client.aclose(), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert all(isinstance(r.__cause__, Boom) for r in results)


STUBBORN = TIMEOUT + MARGIN + 1.0
"""How long a stubborn send goes on after it is cancelled: past every deadline."""


def stubborn_send(sent: list[int]) -> Any:
    """A send that loses its cancellation and reads on, as redis-py does when Python
    3.11's ``asyncio.wait_for`` (around its writes) is cancelled as the write
    completes: its retries then wait for the silent server until ``socket_timeout``."""

    async def send(client: Any, commands: Any, **options: Any) -> list[Any]:
        sent.append(len(commands))
        end = time.monotonic() + STUBBORN
        while (left := end - time.monotonic()) > 0:
            with contextlib.suppress(asyncio.CancelledError):  # lost, as in wait_for
                await asyncio.sleep(left)
        raise redis.exceptions.TimeoutError("Timeout reading from socket")

    return send


@pytest.mark.parametrize("kind", ["single", "one-slot", "cluster"])
async def test_callers_settle_even_when_a_send_ignores_its_cancellation(
    kind: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every caller settles by the timeout even if redis-py swallows the cancellation
    that should end its round trip, and (one slot: a pool of 2) even while waiting
    for the slot such a send holds on to."""
    async with serve("silent") as fake:
        if kind == "one-slot":
            client: Redis | RedisCluster = Redis(
                host="127.0.0.1", port=fake.port, max_connections=2, socket_timeout=5
            )
        else:
            client = client_for(kind, fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=TIMEOUT)
        controlled = with_controls(store, cfg())
        sent: list[int] = []
        monkeypatch.setattr(transport, "send_batch", stubborn_send(sent))
        try:
            ids = [new_session(f"u{i % 5}").id for i in range(64)]
            results = await all_settle(
                [controlled.get(i) for i in ids]
                + [controlled.create(new_session(f"u{i % 5}")) for i in range(64)]
                + [controlled.apply(i, Changes(set={"k": 1})) for i in ids[:16]]
                + [controlled.touch(i) for i in ids[16:24]]
                + [controlled.delete(i) for i in ids[24:32]]
            )
            if kind == "cluster":  # the whole-cluster work too, from loading the slot map
                monkeypatch.setattr(client, "initialize", lambda: stubborn_send(sent)(client, []))
                results += await all_settle([store.purge_expired(), store._scan_estimate()])
        finally:
            await asyncio.wait_for(store.close(), STUBBORN + 5)
            await asyncio.wait_for(client.aclose(), 5)
    assert all(isinstance(r, StoreUnavailable) for r in results), results[:3]
    if kind == "one-slot":
        assert sent == [1]  # the batches behind the first waited for its slot, in vain


async def test_a_split_batch_holds_its_slots_until_both_halves_end(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A burst goes as two pipelines (``SPLIT_AT``). Past the deadline both are
    cancelled; one half ends, the other ignores it and reads on (as redis-py can).
    Every caller settles by the deadline, and the batch keeps both its slots until
    that half ends too: the store never holds more connections than slots, so the
    user's pool is never drained behind its back (outside review: the slots were
    freed as soon as the first half ended)."""
    if not backend_redis.server_reachable():
        pytest.skip("needs a real Redis server")
    client = Redis.from_url(backend_redis.REDIS_URL)
    prefix = backend_redis.prefix_for(f"split-{uuid.uuid4().hex[:8]}")
    store = RedisStore(client, cfg(key_prefix=prefix), clock=clock, timeout=0.5)
    tr = store._transport
    real = transport.send_batch
    in_use = [0]
    merged: list[int] = []

    async def send(client: Any, commands: Any, **options: Any) -> list[Any]:
        if not (len(commands) == 1 and commands[0][1] == transport.MULTI_GET.sha):
            return await real(client, commands, **options)
        merged.append(commands[0][2])  # a half's merged read: its key count
        in_use[0] += 1
        try:
            if len(merged) % 2:
                await asyncio.sleep(30)  # this half honours its cancellation
            end = time.monotonic() + 4  # this one loses it and reads on
            while (left := end - time.monotonic()) > 0:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.sleep(left)
            raise redis.exceptions.TimeoutError("Timeout reading from socket")
        finally:
            in_use[0] -= 1

    try:
        async with store:
            monkeypatch.setattr(transport, "send_batch", send)
            ids = [new_session(None).id for _ in range(32)]
            results = await all_settle([store.get(i) for i in ids])
            assert sorted(merged) == [15, 16]  # one at once, then 16 + 15
            assert sum(isinstance(r, StoreUnavailable) for r in results) == 31
            await asyncio.sleep(0.2)  # (the cancellations have run their course)
            assert in_use[0] == 1  # the stubborn half reads on...
            assert tr._busy >= in_use[0]  # ...on a slot still held
            for _ in range(800):  # then the batch ends, and gives its slots back
                if not in_use[0] and not tr._busy and not tr._on_wire:
                    break
                await asyncio.sleep(0.01)
            assert in_use[0] == 0 and tr._busy == 0 and tr._on_wire == 0
    finally:
        await backend_redis.delete_prefix(client, prefix)
        await client.aclose()


async def test_a_cancelled_batch_task_still_resolves_its_waiters(clock: FakeClock) -> None:
    """Closing the loop's tasks mid-batch (the batch task cancelled) fails its
    callers with StoreUnavailable instead of leaving them waiting."""
    async with serve("silent") as fake:
        client = client_for("single", fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=30)
        calls = [asyncio.ensure_future(store.get(new_session(None).id)) for _ in range(10)]
        await asyncio.sleep(0.2)  # the batch is on the wire, the server silent
        assert store._transport._tasks  # calls[0] went alone; the nine others batched
        for task in list(store._transport._tasks):
            task.cancel()
        _, pending = await asyncio.wait(calls[1:], timeout=2)
        assert not pending
        assert all(isinstance(t.exception(), StoreUnavailable) for t in calls[1:])
        calls[0].cancel()
        await client.aclose()


# ------------------------------------------------------------------ a lone call


def test_redis_cluster_needs_redis_py_7_2(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before 7.2 redis-py mistakes a MOVED for a failover and a dead node's retry
    closes every node's connections: a store over a cluster says so at once."""
    from asyncsession.backends.redis import server

    assert server.cluster_client_problem("7.2.0") is None
    assert server.cluster_client_problem("8.2.0") is None
    problem = server.cluster_client_problem("7.1.1")
    assert problem is not None and "redis-py 7.2 or newer (installed: 7.1.1)" in problem
    monkeypatch.setattr(redis, "__version__", "5.0.2")
    cluster = RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)])
    with pytest.raises(ValueError, match=r"installed: 5\.0\.2"):
        RedisStore(cluster, Config())
    RedisStore(Redis(), Config())  # one server: any declared version


def test_lone_calls_run_inline_only_where_redis_py_keeps_the_cancellation() -> None:
    """In the caller's task: a client without ``socket_timeout`` (what the store
    builds). Not a client with ``socket_timeout`` on any Python version (its writes go
    through ``asyncio.wait_for``, which on 3.11 can lose a cancellation, and a send
    that lost one reads on until that timeout: test_callers_settle_even_when_a_send_
    ignores_its_cancellation holds on 3.12+ too), nor a cluster."""
    assert transport.inline_safe(Redis(socket_timeout=None))
    assert not transport.inline_safe(Redis(socket_timeout=5))
    assert not transport.inline_safe(RedisCluster(startup_nodes=[ClusterNode("127.0.0.1", 1)]))
    store = RedisStore.from_url("redis://127.0.0.1:1/0", Config(), timeout=1)
    assert store._transport.inline


async def test_an_inline_call_to_a_silent_server_settles_by_its_deadline(
    clock: FakeClock,
) -> None:
    """A lone call in its caller's task (no task of its own on the transport) to a
    server that never answers: ``StoreUnavailable`` by the timeout, its slot freed,
    and the next call goes the same way; a caller cancelled mid-call frees its slot."""
    async with serve("silent") as fake:
        client = client_for("bare", fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=TIMEOUT)
        try:
            for _ in range(2):
                started = time.monotonic()
                call = asyncio.ensure_future(store.get(new_session(None).id))
                await asyncio.sleep(0.2)
                assert not call.done() and store._transport._busy == 1
                assert not store._transport._tasks  # (the task path would hold one)
                (result,) = await all_settle([call])
                assert isinstance(result, StoreUnavailable), repr(result)
                # by the deadline (with room for a loaded machine): the silent server
                # would hold the call for good
                assert time.monotonic() - started < TIMEOUT + 0.8
                assert store._transport._busy == 0
            call = asyncio.ensure_future(store.get(new_session(None).id))
            await asyncio.sleep(0.2)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert store._transport._busy == 0
        finally:
            await asyncio.wait_for(client.aclose(), 5)


def send_losing_one_cancel(lost: list[int], then: Any = None) -> Any:
    """A send that loses the first cancellation it gets, as Python 3.11's
    ``asyncio.wait_for`` can (redis-py 8 reads pending push notifications under one,
    ``socket_timeout`` or not), then waits on (``then`` None: a silent server),
    raises ``then`` (an exception: the connection failed meanwhile) or returns it
    (the reply arrived as the cancellation landed)."""

    async def send(client: Any, commands: Any, **options: Any) -> list[Any]:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            lost.append(1)
        if then is None:
            await asyncio.sleep(3600)
        if isinstance(then, BaseException):
            raise then
        return [then]

    return send


@pytest.mark.parametrize(
    "reply", [None, [None, None, None, None], redis.exceptions.ConnectionError("reset")]
)
async def test_an_inline_call_that_loses_a_cancellation_still_keeps_its_deadline(
    reply: Any, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog cancels the caller's task again while the call goes on: a lost
    cancellation delays the answer by ``RECANCEL`` at most (StoreUnavailable; a reply
    that came as it was lost is the answer), and every cancellation it sent is taken
    back (the caller's task is not left cancelling)."""
    async with serve("silent") as fake:
        client = client_for("bare", fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=0.3)
        lost: list[int] = []
        monkeypatch.setattr(transport, "send_batch", send_losing_one_cancel(lost, reply))

        async def caller() -> tuple[Any, int]:
            try:
                result: Any = await store._transport.request((b"k", None))  # a read
            except Exception as exc:
                result = exc
            return result, asyncio.current_task().cancelling()  # type: ignore[union-attr]

        try:
            started = time.monotonic()
            result, cancelling = await asyncio.wait_for(caller(), 5)
            took = time.monotonic() - started
        finally:
            await asyncio.wait_for(client.aclose(), 5)
    assert lost == [1]
    assert cancelling == 0
    assert store._transport._busy == 0
    assert took < 0.3 + 10 * transport.RECANCEL + 1.5  # (a lost one for good: 5 s)
    if reply is None or isinstance(reply, BaseException):
        assert isinstance(result, StoreUnavailable), repr(result)
    else:
        assert result == (None, None, None, None)  # the reply (an empty hash)


async def test_an_inline_callers_own_cancellation_is_raised_past_the_deadline(
    clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelled by its own caller as the watchdog cancels it too: the caller's
    cancellation is raised (not turned into StoreUnavailable) and the slot is freed."""
    async with serve("silent") as fake:
        client = client_for("bare", fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=60)
        tr = store._transport

        async def hang(client: Any, commands: Any, **options: Any) -> list[Any]:
            await asyncio.sleep(3600)
            return []

        monkeypatch.setattr(transport, "send_batch", hang)
        try:
            call = asyncio.ensure_future(store.get(new_session(None).id))
            await asyncio.sleep(0.05)
            (entry,) = tr._watched
            tr._watched[0] = (0.0, *entry[1:])  # its deadline: past
            call.cancel()
            tr._check_deadlines()
            with pytest.raises(asyncio.CancelledError):
                await call
            assert tr._busy == 0
        finally:
            await asyncio.wait_for(client.aclose(), 5)


async def test_after_a_batch_the_next_lone_call_goes_in_a_task(clock: FakeClock) -> None:
    """Once a batch was opened (callers about), the next lone call goes in a task of
    its own, so a caller that calls again at once does not take every lone turn; the
    one after it runs inline again."""
    async with serve("silent") as fake:
        client = client_for("bare", fake.port)
        store = RedisStore(client, cfg(), clock=clock, timeout=TIMEOUT)
        tr = store._transport
        try:
            first = await all_settle([store.get(new_session(None).id) for _ in range(5)])
            assert all(isinstance(r, StoreUnavailable) for r in first)  # 1 inline, 4 batched
            for in_a_task in (True, False):
                call = asyncio.ensure_future(store.get(new_session(None).id))
                await asyncio.sleep(0.1)
                assert bool(tr._tasks) is in_a_task
                (result,) = await all_settle([call])
                assert isinstance(result, StoreUnavailable)
        finally:
            await asyncio.wait_for(client.aclose(), 5)


# ------------------------------------------------------------------ the user's pool


async def test_the_users_pool_is_respected(clock: FakeClock) -> None:
    """With the app's client on a pool of 4 connections, the store uses at most half
    and returns them after each exchange: the app's own commands keep working while
    hundreds of store calls are in flight."""
    if not backend_redis.server_reachable():
        pytest.skip("needs a real Redis server")
    client = Redis.from_url(backend_redis.REDIS_URL, max_connections=4)
    prefix = backend_redis.prefix_for(
        f"pool-{uuid.uuid4().hex[:8]}"
    )  # its own: suites may share a database
    config = cfg(key_prefix=prefix, max_sessions_per_user=0)
    store = with_controls(RedisStore(client, config, clock=clock), config)
    try:
        made = await asyncio.gather(*(store.create(new_session("u")) for _ in range(100)))
        stop = asyncio.Event()

        async def load() -> int:
            n = 0
            while not stop.is_set():
                await asyncio.gather(*(store.get(s.id) for s in made))
                await asyncio.gather(*(store.touch(s.id) for s in made[:50]))
                n += 1
            return n

        loads = [asyncio.ensure_future(load()) for _ in range(4)]
        try:
            for i in range(50):  # the app's own commands, while the store is busy
                assert await client.set(f"{prefix}app", i)
                await asyncio.sleep(0)
        finally:
            stop.set()
            rounds = await asyncio.gather(*loads)
        assert min(rounds) >= 1
        assert await client.get(f"{prefix}app") == b"49"
    finally:
        await backend_redis.delete_prefix(client, prefix)
        await client.aclose()


def test_in_flight_is_at_most_half_the_pool() -> None:
    assert RedisStore(Redis(max_connections=4))._transport.max_in_flight == 2
    assert RedisStore(Redis(max_connections=1))._transport.max_in_flight == 1
    assert RedisStore(Redis())._transport.max_in_flight == RedisStore.max_in_flight


async def test_replies_are_bytes_even_from_a_decoding_client(clock: FakeClock) -> None:
    if not backend_redis.server_reachable():
        pytest.skip("needs a real Redis server")
    client = Redis.from_url(backend_redis.REDIS_URL, decode_responses=True)
    prefix = backend_redis.prefix_for(f"decode-{uuid.uuid4().hex[:8]}")
    config = cfg(key_prefix=prefix)
    store = with_controls(RedisStore(client, config, clock=clock), config)
    try:
        async with store:
            s = await store.create(new_session("alice", data={"v": 1}))
            assert (await store.get(s.id)).data == {"v": 1}
            assert [x.id for x in await store.list_by_user("alice")] == [store.handle(s.id)]
    finally:
        await backend_redis.delete_prefix(client, prefix)
        await client.aclose()


# ------------------------------------------------------------------ server check


@pytest.mark.parametrize(
    ("mode", "says"), [("old", "Redis 6.2.14"), ("no_commands", "PEXPIRETIME")]
)
async def test_open_refuses_a_server_the_scripts_cannot_run_on(
    mode: str, says: str, clock: FakeClock
) -> None:
    async with serve(mode) as fake:
        store = RedisStore.from_url(f"redis://127.0.0.1:{fake.port}/0", cfg(), clock=clock)
        with pytest.raises(StoreUnavailable, match=says.replace(".", r"\.")) as info:
            async with store:
                pass
        assert "7.0" in str(info.value)
        await store.close()


async def test_a_server_refusing_info_is_checked_by_its_commands(clock: FakeClock) -> None:
    """An ACL user without ``+info`` (or a Redis-protocol server without ``INFO``):
    the version is unknown, so the probes decide. Commands answered: the store opens;
    ``PEXPIRETIME`` unknown: refused, saying so."""
    async with serve("no_info") as fake:
        store = RedisStore.from_url(f"redis://127.0.0.1:{fake.port}/0", cfg(), clock=clock)
        async with store:
            pass
        names = [command[0].upper() for command in fake.commands]
        assert names.count(b"PEXPIRETIME") == 1 and names.count(b"ZMSCORE") == 1
        assert any(c[:2] == [b"SCRIPT", b"LOAD"] for c in fake.commands)
    async with serve("no_info_old") as fake:
        store = RedisStore.from_url(f"redis://127.0.0.1:{fake.port}/0", cfg(), clock=clock)
        with pytest.raises(StoreUnavailable, match="PEXPIRETIME") as info:
            async with store:
                pass
        assert "version unknown" in str(info.value)
        await store.close()


@pytest.mark.parametrize("kind", ["single", "bare"])
async def test_close_of_a_store_without_timeout_never_hangs(
    kind: str, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``timeout=None`` and a server that never answers: ``close()`` waited for the
    calls on the wire for ever (redis-py 5, no socket timeout). It waits
    ``CLOSE_WAIT`` (20 s; 0.3 here), then cancels them. (A lone call that runs in its
    caller's task reads on the user's client, unbounded as ``timeout=None`` says,
    until that client is closed: then every caller settles.)"""
    monkeypatch.setattr(transport, "CLOSE_WAIT", 0.3)
    async with serve("silent") as fake:
        client = client_for(kind, fake.port)
        if kind == "single":
            client = Redis(host="127.0.0.1", port=fake.port, socket_connect_timeout=2)
        store = RedisStore(client, cfg(), clock=clock, timeout=None)
        calls = [asyncio.ensure_future(store.get(new_session(None).id)) for _ in range(16)]
        calls += [asyncio.ensure_future(store.create(new_session(None))) for _ in range(16)]
        while len(fake.commands) < 2:  # noqa: ASYNC110 - the calls are on the wire
            await asyncio.sleep(0.01)
        started = time.monotonic()
        await asyncio.wait_for(store.close(), 5)
        assert time.monotonic() - started < 2
        await client.aclose()
        _, pending = await asyncio.wait(calls, timeout=2)
        assert not pending
        for call in calls:
            assert call.cancelled() or isinstance(call.exception(), SessionError)


async def test_a_reply_of_the_wrong_shape_is_never_quoted(clock: FakeClock) -> None:
    """A reply of the wrong shape (a proxy mixing up replies) was quoted in the
    ``StoreUnavailable`` message, and so in the middleware's ERROR log: with plain
    ids a record's text starts with the whole session id. Now its type only; and a
    counting reply of another shape is an error, never a made-up count."""
    async with serve("no_info") as fake:
        config = cfg(hash_ids=False)
        store = RedisStore.from_url(f"redis://127.0.0.1:{fake.port}/0", config, clock=clock)
        async with store:
            fake.echo = True
            session = new_session("u")
            calls = [
                lambda: store.get(session.id),
                lambda: store.apply(session.id, Changes(set={"a": 1})),
                lambda: store.create(session),
                # (a count read off such a reply was its first byte: 79 for "+OK")
                lambda: store.purge_expired(),
            ]
            for call in calls:
                with pytest.raises(StoreUnavailable) as info:
                    await call()
                shown = f"{info.value} {info.value.details} {info.value.__cause__}"
                assert session.id not in shown and session.id[4:20] not in shown, shown
                assert "unexpected" in shown


async def test_a_database_the_server_lacks_is_named_at_open(clock: FakeClock) -> None:
    """``redis://host/99`` on a server with 16 databases: the connection's SELECT
    fails, and the open says so (it blamed INFO and the scripts' PEXPIRETIME)."""
    if backend_redis.skip_reason() or backend_redis.using_fakeredis():
        pytest.skip("needs a real Redis server")
    base = backend_redis.REDIS_URL.rsplit("/", 1)[0]
    store = RedisStore.from_url(f"{base}/99999", cfg(), clock=clock)
    with pytest.raises(StoreUnavailable, match="no such database") as info:
        async with store:
            pass
    assert "INFO" not in str(info.value) and "PEXPIRETIME" not in str(info.value)
    await store.close()


async def test_a_failed_open_leaves_no_connection_and_may_be_retried(clock: FakeClock) -> None:
    """A store ``from_url`` made whose open fails (here Redis 6.2) closes the
    connections its check opened (an app retrying its start-up would collect them);
    the same store opens once the server passes."""

    def cleanups() -> list[asyncio.Task[Any]]:
        return [t for t in asyncio.all_tasks() if t.get_name() == "asyncsession-redis-cleanup"]

    async with serve("old") as fake:
        url = f"redis://127.0.0.1:{fake.port}/0"
        store = RedisStore.from_url(url, cfg(cleanup_interval=60), clock=clock)
        for _ in range(3):
            with pytest.raises(StoreUnavailable, match="too old"):
                async with store:
                    pass
            # and no cleanup task left behind to reconnect later (a fresh store each try)
            with pytest.raises(StoreUnavailable, match="too old"):
                async with RedisStore.from_url(url, cfg(cleanup_interval=60), clock=clock):
                    pass
        await fake.until_connected(0)
        assert not store.closed and cleanups() == []
        fake.mode = "no_info"
        async with store:
            assert fake.connected >= 1 and len(cleanups()) == 1
        assert store.closed and cleanups() == []


async def test_a_client_that_resends_commands_never_resends_the_stores() -> None:
    """A client whose retry policy sends a command again after a connection error
    (redis-py 6+'s default ``Redis(...)``): the store takes a pool of its own with the
    same settings and no retries, so a script Redis may have run is never run again
    (a write applied twice, its caller told it conflicted). The server here closes
    the connection mid-reply: the store's create reaches it once and is
    ``StoreUnavailable`` (in doubt); the user's own client, untouched, sends it 4 times."""
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff
    from redis.exceptions import ConnectionError as RedisConnectionError

    async with serve("close_mid_reply") as fake:
        user = Redis(
            port=fake.port, retry=Retry(NoBackoff(), 3), retry_on_error=[RedisConnectionError]
        )
        retry = user.connection_pool.connection_kwargs["retry"]
        store = RedisStore(user, cfg())
        assert store.client is not user
        with pytest.raises(StoreUnavailable):
            await store.create(new_session("u"))
        sent = [c for c in fake.commands if c[0].upper() in (b"EVALSHA", b"EVAL")]
        assert len(sent) == 1
        await store.close()
        with pytest.raises(redis.RedisError):
            await user.execute_command("EVALSHA", "0" * 40, 0)
        assert len([c for c in fake.commands if c[0].upper() == b"EVALSHA"]) == 1 + 4
        assert user.connection_pool.connection_kwargs["retry"] is retry
        await user.aclose()
    # a client that does not resend is used as it is: its pool is the store's
    plain = Redis.from_url("redis://127.0.0.1:1/0")  # (from_url: no retries, any version)
    assert RedisStore(plain, cfg()).client is plain
    await plain.aclose()


async def test_a_store_with_a_pool_of_its_own_leaves_no_connection_after_close() -> None:
    """``from_url`` with a ``retry`` (a pool of its own, no retries) and a client
    given in: after ``close`` the server lists none of the store's connections."""
    if backend_redis.skip_reason() or backend_redis.using_fakeredis():
        pytest.skip("needs a real Redis server")
    from redis.asyncio.retry import Retry
    from redis.backoff import NoBackoff

    name = f"asyncsession-leak-{uuid.uuid4().hex[:8]}"
    prefix = f"test:{name}:"
    admin = Redis.from_url(backend_redis.REDIS_URL)

    async def named() -> int:
        clients = await admin.client_list()
        return sum(c.get("name") == name for c in clients)

    try:
        url, retry = backend_redis.REDIS_URL, Retry(NoBackoff(), 3)
        config = cfg(key_prefix=prefix)
        stores = [RedisStore.from_url(url, config, retry=retry, client_name=name)]
        user = Redis.from_url(url, retry=retry, client_name=name)
        stores.append(RedisStore(user, config))
        for store in stores:
            async with store:
                await store.create(new_session("u"))
                assert await named() >= 1
        await user.aclose()
        assert await backend_redis.named_connections(admin, name) == 0
    finally:
        await backend_redis.delete_prefix(admin, prefix)
        await admin.aclose()


async def test_a_pool_of_its_own_keeps_streaming_credentials_reauthenticated() -> None:
    """redis-py 8 re-authenticates a pool's connections when a streaming credential
    provider rotates; the store's own pool (a client that resends) is registered for
    it as the client's is: the provider hears from both pools."""
    credentials = pytest.importorskip("redis.credentials")
    streaming = getattr(credentials, "StreamingCredentialProvider", None)
    if streaming is None:
        pytest.skip("this redis-py has no streaming credential providers")

    class Provider(streaming):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            self.listeners: list[Any] = []

        def get_credentials(self) -> tuple[str, str]:
            return ("app", "pw")

        async def get_credentials_async(self) -> tuple[str, str]:
            return ("app", "pw")

        def on_next(self, callback: Any) -> None:
            self.listeners.append(callback)

        def on_error(self, callback: Any) -> None:
            pass

        def is_streaming(self) -> bool:
            return True

    provider = Provider()
    user = Redis(port=1, credential_provider=provider)
    store = RedisStore(user, cfg())
    if store.client is user:
        pytest.skip("this redis-py's Redis() does not resend: the store uses its pool")
    assert len(provider.listeners) == 2  # the app's pool and the store's
    await store.close()
    await user.aclose()


async def test_an_acl_user_limited_to_the_key_prefix_opens_and_works(tmp_path: Any) -> None:
    """The user docs/security.md recommends, limited to the store's ``key_prefix``
    (``~app:*``), with every command but the dangerous ones (no ``INFO``: the probes
    decide): the open check's probes use a key under the prefix, so it opens, and
    every operation works."""
    from .redis_servers import Server, _base_args, free_ports, require_servers

    require_servers()
    port = free_ports(1)[0]
    server = Server("acl", port, tmp_path, _base_args(port))
    server.start()
    try:
        server.call("ACL", "SETUSER", "app", "on", ">pw", "~app:*", "+@all", "-@dangerous")
        config = Config(key_prefix="app:", cleanup_interval=0, max_sessions_per_user=2)
        async with RedisStore.from_url(f"redis://app:pw@127.0.0.1:{port}/0", config) as store:
            first = await store.create(new_session("u", data={"n": 1}))
            second = await store.create(new_session("u", data={"n": 2}))
            await store.create(new_session("u"))  # the third evicts the first
            assert len(await store.list_by_user("u")) == 2
            with pytest.raises(SessionError):
                await store.get(first.id)
            moved = await store.rotate(second.id)
            await store.apply(moved, Changes(set={"n": 3}))
            assert (await store.get(moved)).data == {"n": 3}
            assert await store.delete_by_user("u") == 2
            assert await store.purge_expired() == 0
        keys = server.call("KEYS", "*")
        assert all(k.startswith(b"app:") for k in keys), keys
        # a user who may load scripts but not run them fails at open, not on every call
        server.call("ACL", "SETUSER", "noscripts", "on", ">pw", "~app:*", "+@all", "-evalsha")
        url = f"redis://noscripts:pw@127.0.0.1:{port}/0"
        with pytest.raises(StoreUnavailable, match="cannot run asyncsession's scripts: EVALSHA"):
            async with RedisStore.from_url(url, config):
                pass
    finally:
        server.stop()


async def test_the_open_check_works_beside_an_app_key_of_the_probe_name() -> None:
    """The probes run on a key under ``key_prefix`` that no session takes; should an
    app's own key have that name (another type), the probes still tell the commands
    exist (``WRONGTYPE`` is an answer), and the key is left as it was."""
    if backend_redis.skip_reason() or backend_redis.using_fakeredis():
        pytest.skip("needs a real Redis server")
    prefix = f"test:probe-{uuid.uuid4().hex[:8]}:"
    client = Redis.from_url(backend_redis.REDIS_URL)
    try:
        await client.set(f"{prefix}s:!probe", b"the app's", px=60_000)
        async with RedisStore.from_url(backend_redis.REDIS_URL, cfg(key_prefix=prefix)) as store:
            created = await store.create(new_session("u"))
            assert (await store.get(created.id)).user_id == "u"
        assert await client.get(f"{prefix}s:!probe") == b"the app's"
        assert 0 < await client.pttl(f"{prefix}s:!probe") <= 60_000
    finally:
        await backend_redis.delete_prefix(client, prefix)
        await client.aclose()


def test_server_version_reads_every_form_of_info() -> None:
    from asyncsession.backends.redis.server import server_version

    raw = b"# Server\r\nredis_version:7.2.4\r\nvalkey_version:8.0.1\r\n"
    assert server_version(raw) == ("Valkey", "8.0.1")
    assert server_version({"redis_version": "7.0.15"}) == ("Redis", "7.0.15")
    assert server_version({"n1:7000": {"redis_version": "6.2.1"}}) == ("Redis", "6.2.1")
    with pytest.raises(ValueError):
        server_version(42)
