"""Memory backend: our rows beside a baseline and a peer, in the same run.

Rows (all through the same ``abench`` harness, all storing ``PAYLOAD``):

* ours: ``ControlledStore`` over ``MemoryStore`` (per-user limit 5, 1 MiB size check,
  strict JSON check) and the raw ``MemoryStore``: create, get, update, touch;
  ``delete_by_user`` for users with 1, 5 and 25 sessions.
* baseline: a dict of ``orjson`` bytes (``d[k] = orjson.dumps(data)`` /
  ``orjson.loads(d[k])``): the least any in-process store of encoded sessions can do.
* peer: starsessions ``InMemoryStore`` with its default ``JsonSerializer``, called the
  way its middleware calls them (serialize + ``write``, ``read`` + deserialize).

Every row runs at each ``--bench-sizes`` number of stored sessions. Stored sessions
belong to users with 2 sessions each (typical), plus 1,000 users at the limit of 5.
The background cleanup and the memory footprint are in ``bench_memory_cleanup.py``.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from conftest import PAYLOAD, AsyncBench, Runner, interleave, paired, touch_row, update_row
from starsessions.serializers import JsonSerializer
from starsessions.stores.memory import InMemoryStore

from asyncsession import (
    Config,
    ControlledStore,
    MemoryStore,
    Session,
    generate_session_id,
    new_session,
    with_controls,
)

SUITE = "memory"
LIMIT = 5
LIMIT_USERS = 1_000
READ = {"baseline": 0.5, "peer": 2.0}  # issue 2 targets: controlled get
WRITE = {"baseline": 0.4, "peer": 2.0}  # issue 2 targets: controlled create
LIFETIME = 86_400  # starsessions lifetime/ttl arguments (seconds)


# ----------------------------------------------------------------- fixtures


@dataclass
class Ours:
    raw: MemoryStore
    ctl: ControlledStore
    ids: list[str]  # ids of the 2-session users' sessions (never evicted), shuffled
    users: list[str]  # users with 2 sessions each
    limit_users: list[str]  # users with LIMIT sessions each
    created: list[str] = field(default_factory=list)  # made by the last create round


@dataclass
class Dicts:
    """The baseline dict and the peer store, filled like ours."""

    keys: list[str]
    base: dict[str, bytes]
    peer: InMemoryStore
    created: list[str] = field(default_factory=list)


def _fill_users(stored: int) -> tuple[list[str], list[str]]:
    limit_users = [f"limit-{n}" for n in range(min(LIMIT_USERS, stored // (2 * LIMIT)))]
    users = [f"user-{n}" for n in range(max(1, (stored - len(limit_users) * LIMIT) // 2))]
    return users, limit_users


@pytest.fixture(scope="module")
def ours(runner: Runner, stored: int) -> Iterator[Ours]:
    raw = MemoryStore(Config(cleanup_interval=0))
    ctl = with_controls(raw, Config(max_sessions_per_user=LIMIT, cleanup_interval=0))
    users, limit_users = _fill_users(stored)

    async def fill() -> list[str]:
        for user in limit_users:
            for _ in range(LIMIT):
                await ctl.create(new_session(user, data=PAYLOAD))
        ids = []
        for n in range(stored - len(raw)):
            session = await ctl.create(new_session(users[n // 2], data=PAYLOAD))
            ids.append(session.id)
        return ids

    ids = runner.run(fill())
    assert len(raw) == stored
    random.Random(1).shuffle(ids)
    yield Ours(raw, ctl, ids, users, limit_users)
    runner.run(ctl.close())


@pytest.fixture(scope="module")
def dicts(stored: int) -> Iterator[Dicts]:
    keys = [generate_session_id() for _ in range(stored)]
    # Exact-size copies: a bytes object straight from orjson.dumps keeps its whole
    # write buffer (4-8 KiB resident each here), which would make the fill 8 GB at 1M.
    base = {key: bytes(memoryview(orjson.dumps(PAYLOAD))) for key in keys}
    peer = InMemoryStore()
    # what its serializer writes (json.dumps, with spaces), serialized once for speed
    written = JsonSerializer().serialize(PAYLOAD)
    peer.data = {key: bytes(memoryview(written)) for key in keys}
    random.Random(1).shuffle(keys)
    yield Dicts(keys, base, peer)
    base.clear()
    peer.data.clear()


def _create_setup(
    world: Ours, runner: Runner, owners: list[str], batch: list[Session], evicting: bool
) -> Callable[[int, int], None]:
    """Untimed before each create round: build this round's ``Session`` objects and,
    unless the creates evict (which keeps the size), delete the last round's ones so
    the store stays at its size."""

    def setup(start: int, n: int) -> None:
        if not evicting:
            runner.run(_delete(world.raw, world.created))
        world.created.clear()
        batch[:] = [new_session(owners[(start + k) % len(owners)], data=PAYLOAD) for k in range(n)]
        world.created.extend(s.id for s in batch)

    return setup


async def _delete(store: MemoryStore, ids: list[str]) -> None:
    for session_id in ids:
        await store.delete(session_id)


# ------------------------------------------------------------ harness floor


def test_harness(abench: AsyncBench) -> None:
    """An empty awaited coroutine: the floor every row below includes."""

    async def op(i: int) -> None:
        return None

    abench.describe(suite=SUITE, role="harness", op="noop", label="harness (await noop)")
    abench(op)


# --------------------------------------------------------------------- read


@pytest.mark.parametrize("kind", ["controlled", "raw"])
def test_get(abench: AsyncBench, ours: Ours, stored: int, kind: str) -> None:
    store = ours.ctl if kind == "controlled" else ours.raw
    ids = ours.ids
    get = store.get

    async def op(i: int) -> Session:
        return await get(ids[i % len(ids)])

    abench.describe(
        suite=SUITE,
        role="ours",
        op="get",
        compare="read",
        label=f"{kind} get",
        group="memory read",
        stored=stored,
        targets=READ if kind == "controlled" else None,
    )
    abench(op)


def test_get_baseline(abench: AsyncBench, dicts: Dicts, stored: int) -> None:
    keys, base = dicts.keys, dicts.base
    loads = orjson.loads

    async def op(i: int) -> Any:
        return loads(base[keys[i % len(keys)]])

    abench.describe(
        suite=SUITE,
        role="baseline",
        op="read",
        label="dict get + orjson.loads",
        group="memory read",
        stored=stored,
    )
    abench(op)


def test_get_peer(abench: AsyncBench, dicts: Dicts, stored: int) -> None:
    keys, store, serializer = dicts.keys, dicts.peer, JsonSerializer()

    async def op(i: int) -> Any:
        return serializer.deserialize(await store.read(keys[i % len(keys)], LIFETIME))

    abench.describe(
        suite=SUITE,
        role="peer",
        op="read",
        label="starsessions InMemoryStore read + json",
        group="memory read",
        stored=stored,
    )
    abench(op)


# -------------------------------------------------------------------- write


@pytest.mark.parametrize("kind", ["controlled", "controlled-at-limit", "raw"])
def test_create(abench: AsyncBench, runner: Runner, ours: Ours, stored: int, kind: str) -> None:
    store = ours.raw if kind == "raw" else ours.ctl
    owners = ours.limit_users if kind == "controlled-at-limit" else ours.users
    batch: list[Session] = []
    create = store.create

    async def op(i: int) -> Session:
        return await create(batch[i % len(batch)])

    labels = {
        "controlled": "controlled create (limit 5, user has 2)",
        "controlled-at-limit": "controlled create (user at limit 5: evicts oldest)",
        "raw": "raw create",
    }
    abench.describe(
        suite=SUITE,
        role="ours",
        op="create",
        compare="write",
        label=labels[kind],
        group="memory write",
        stored=stored,
        targets=WRITE if kind == "controlled" else None,
    )
    evicting = kind == "controlled-at-limit"
    abench(op, setup=_create_setup(ours, runner, owners, batch, evicting))
    if not evicting:
        runner.run(_delete(ours.raw, ours.created))
    ours.created.clear()
    assert len(ours.raw) == stored  # evicting creates kept the size; the others were undone


def test_create_baseline(abench: AsyncBench, dicts: Dicts, stored: int) -> None:
    base, batch = dicts.base, dicts.created
    dumps = orjson.dumps

    async def op(i: int) -> None:
        base[batch[i % len(batch)]] = dumps(PAYLOAD)

    def setup(start: int, n: int) -> None:
        for key in batch:
            del base[key]
        batch[:] = [generate_session_id() for _ in range(n)]

    abench.describe(
        suite=SUITE,
        role="baseline",
        op="write",
        label="dict set + orjson.dumps",
        group="memory write",
        stored=stored,
    )
    abench(op, setup=setup)
    setup(0, 0)


def test_create_peer(abench: AsyncBench, runner: Runner, dicts: Dicts, stored: int) -> None:
    store, batch, serializer = dicts.peer, dicts.created, JsonSerializer()

    async def op(i: int) -> None:
        await store.write(batch[i % len(batch)], serializer.serialize(PAYLOAD), LIFETIME, LIFETIME)

    def setup(start: int, n: int) -> None:
        for key in batch:
            runner.run(store.remove(key))
        batch[:] = [generate_session_id() for _ in range(n)]

    abench.describe(
        suite=SUITE,
        role="peer",
        op="write",
        label="starsessions InMemoryStore write + json",
        group="memory write",
        stored=stored,
    )
    abench(op, setup=setup)
    setup(0, 0)


@pytest.mark.parametrize("kind", ["controlled", "raw"])
def test_update(abench: AsyncBench, runner: Runner, ours: Ours, stored: int, kind: str) -> None:
    store = ours.ctl if kind == "controlled" else ours.raw
    update_row(abench, runner, store, ours.ids, suite=SUITE, kind=kind, stored=stored)


@pytest.mark.parametrize("kind", ["controlled", "raw"])
def test_touch(abench: AsyncBench, ours: Ours, stored: int, kind: str) -> None:
    store = ours.ctl if kind == "controlled" else ours.raw
    touch_row(abench, store, ours.ids, suite=SUITE, kind=kind, stored=stored)


@pytest.mark.parametrize("per_user", [1, 5, 25])
def test_delete_by_user(
    abench: AsyncBench, runner: Runner, ours: Ours, stored: int, per_user: int
) -> None:
    """Cost per call for a user with ``per_user`` sessions: O(that user's sessions),
    flat in how many other sessions are stored."""
    users: list[str] = []
    delete_by_user = ours.ctl.delete_by_user
    ops = max(20, abench.ops // 10)

    async def op(i: int) -> int:
        deleted = await delete_by_user(users[i % len(users)])
        assert deleted == per_user
        return deleted

    async def make(start: int, n: int) -> None:
        users[:] = [f"dbu-{per_user}-{start + k}" for k in range(n)]
        for user in users:
            for _ in range(per_user):  # raw store: no per-user limit
                await ours.raw.create(new_session(user, data=PAYLOAD))

    abench.describe(
        suite=SUITE,
        role="ours",
        op="delete_by_user",
        label=f"delete_by_user ({per_user} sessions)",
        group="memory delete_by_user",
        stored=stored,
        per_user=per_user,
    )
    abench(op, setup=lambda start, n: runner.run(make(start, n)), ops=ops)
    assert len(ours.raw) == stored


# -------------------------------------------------------- interleaved verdicts


def _references(dicts: Dicts) -> tuple[dict[str, Any], Callable[[], None]]:
    """The baseline and peer variants of the interleaved rows (read: a stored key;
    write: a fresh key each op), and what undoes their writes."""
    keys, base, peer = dicts.keys, dicts.base, dicts.peer
    serializer = JsonSerializer()
    loads, dumps = orjson.loads, orjson.dumps
    base_new: list[str] = []
    peer_new: list[str] = []

    async def base_get(i: int) -> Any:
        return loads(base[keys[i % len(keys)]])

    async def peer_get(i: int) -> Any:
        return serializer.deserialize(await peer.read(keys[i % len(keys)], LIFETIME))

    async def base_set(i: int) -> None:
        base[base_new[i % len(base_new)]] = dumps(PAYLOAD)

    async def peer_set(i: int) -> None:
        key = peer_new[i % len(peer_new)]
        await peer.write(key, serializer.serialize(PAYLOAD), LIFETIME, LIFETIME)

    def fresh_keys(target: dict[str, bytes], made: list[str]) -> Callable[[int, int], None]:
        def setup(start: int, n: int) -> None:
            for key in made:
                del target[key]
            made[:] = [generate_session_id() for _ in range(n)]

        return setup

    variants = {
        "baseline read": (base_get, None),
        "peer read": (peer_get, None),
        "baseline write": (base_set, fresh_keys(base, base_new)),
        "peer write": (peer_set, fresh_keys(peer.data, peer_new)),
    }

    def undo() -> None:
        fresh_keys(base, base_new)(0, 0)
        fresh_keys(peer.data, peer_new)(0, 0)

    return variants, undo


def test_interleaved(benchmark: Any, runner: Runner, ours: Ours, dicts: Dicts, stored: int) -> None:
    """The issue's targets, measured so that load from other processes cannot favour
    one row: controlled get / create, the baseline and the peer take turns, one
    500-operation batch each per round, timed on the thread's CPU clock; the verdict is
    the median over 30 rounds of the per-round speed ratio (reference time / ours)."""
    ctl, ids = ours.ctl, ours.ids
    batch: list[Session] = []
    references, undo = _references(dicts)

    async def our_get(i: int) -> Session:
        return await ctl.get(ids[i % len(ids)])

    async def our_create(i: int) -> Session:
        return await ctl.create(batch[i % len(batch)])

    variants = {
        "controlled get": (our_get, None),
        "controlled create": (our_create, _create_setup(ours, runner, ours.users, batch, False)),
        **references,
    }
    times: dict[str, list[float]] = {}
    benchmark.pedantic(
        lambda: times.update(interleave(runner, variants, ops=500, rounds=30)),
        rounds=1,
        iterations=1,
    )
    runner.run(_delete(ours.raw, ours.created))
    ours.created.clear()
    undo()
    assert len(ours.raw) == stored

    info = benchmark.extra_info
    benchmark.group = f"memory interleaved @ {stored:,} stored"
    info.update(suite=SUITE, role="ours", op="interleaved", label=f"interleaved @ {stored:,}")
    for name, per_op in times.items():
        key = name.replace(" ", "_")
        info[f"{key}_us"] = statistics.median(per_op) * 1e6
        info[f"{key}_best_us"] = min(per_op) * 1e6
    for ours_name, ref_role, prefix in [
        ("controlled get", "baseline read", "get_vs_baseline"),
        ("controlled get", "peer read", "get_vs_peer"),
        ("controlled create", "baseline write", "create_vs_baseline"),
        ("controlled create", "peer write", "create_vs_peer"),
    ]:
        median, best = paired(times, ours_name, ref_role)
        info[prefix] = median
        info[f"{prefix}_best"] = best
    info["targets"] = {
        "get_vs_baseline": {"min": READ["baseline"]},
        "get_vs_peer": {"min": READ["peer"]},
        "create_vs_baseline": {"min": WRITE["baseline"]},
        "create_vs_peer": {"min": WRITE["peer"]},
    }


def test_floor_interleaved(benchmark: Any, runner: Runner, dicts: Dicts, stored: int) -> None:
    """How close the targets are to the least any in-process store can do under the
    contract, in this interpreter: the same interleaved measurement as above, with our
    store replaced by its floor.

    * floor create: ``orjson.dumps`` with the strict options, the exact-type pass
      (``codec._json_native``, the check the contract asks for), one clock read, and
      an exact-size copy of the encoded data, a user index and an expiry bucket put in
      dicts. No ``Session`` copy, no id or user validation, no size limit, no per-user
      count, no events.
    * floor get: dict lookup, ``orjson.loads``, a fresh ``Session`` with the metadata
      the contract returns, one clock read for the expiry check.
    * ``encode only``: ``orjson.dumps`` + the exact-type pass, nothing stored.

    The ratios are informative (no targets): they show which targets any
    implementation could meet here. A floor below a target means the target needs
    less work than the contract asks for."""
    from asyncsession.codec import _STRICT, _json_native
    from asyncsession.session import utcnow

    keys, base = dicts.keys, dicts.base
    loads, dumps = orjson.loads, orjson.dumps
    ttl = LIFETIME
    now0 = utcnow()
    meta = {k: (base[k], "user", now0, now0.replace(year=now0.year + 1)) for k in keys}
    records: dict[str, Any] = {}
    users: dict[str, dict[str, None]] = {}
    buckets: dict[int, dict[str, None]] = {}
    batch: list[Session] = []
    new_session_object = Session.__new__

    def floor_setup(start: int, n: int) -> None:
        records.clear()
        users.clear()
        buckets.clear()
        batch[:] = [new_session(f"floor-{start + k}", data=PAYLOAD) for k in range(n)]

    async def floor_create(i: int) -> None:
        s = batch[i % len(batch)]
        raw = dumps(s.data, option=_STRICT)
        if not _json_native(s.data):
            raise AssertionError
        now = utcnow()
        records[s.id] = (bytes(memoryview(raw)), s.user_id, now)  # exact size, as stored
        users.setdefault(s.user_id or "", {})[s.id] = None
        buckets.setdefault(int(now.timestamp()) + ttl, {})[s.id] = None

    async def encode_only(i: int) -> None:
        s = batch[i % len(batch)]
        dumps(s.data, option=_STRICT)
        if not _json_native(s.data):
            raise AssertionError

    async def floor_get(i: int) -> Session:
        key = keys[i % len(keys)]
        raw, user, created, expires = meta[key]
        s = new_session_object(Session)
        s.id, s.user_id, s.data = key, user, loads(raw)
        s.created_at, s.expires_at = created, expires
        if not utcnow() < expires:
            raise AssertionError
        return s

    references, undo = _references(dicts)
    variants = {
        "floor get": (floor_get, None),
        "floor create": (floor_create, floor_setup),
        "encode only": (encode_only, floor_setup),
        **references,
    }
    times: dict[str, list[float]] = {}
    benchmark.pedantic(
        lambda: times.update(interleave(runner, variants, ops=500, rounds=30)),
        rounds=1,
        iterations=1,
    )
    undo()
    info = benchmark.extra_info
    benchmark.group = f"memory floor @ {stored:,} stored"
    info.update(suite=SUITE, role="ours", op="floor", label=f"contract floor @ {stored:,}")
    for name, per_op in times.items():
        info[f"{name.replace(' ', '_')}_us"] = statistics.median(per_op) * 1e6
    for ours_name, ref_role, prefix in [
        ("floor get", "baseline read", "floor_get_vs_baseline"),
        ("floor get", "peer read", "floor_get_vs_peer"),
        ("floor create", "baseline write", "floor_create_vs_baseline"),
        ("floor create", "peer write", "floor_create_vs_peer"),
        ("encode only", "baseline write", "encode_only_vs_baseline"),
    ]:
        info[prefix], info[f"{prefix}_best"] = paired(times, ours_name, ref_role)
