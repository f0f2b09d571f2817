# ruff: noqa: ASYNC240 - these tests read the database files on purpose
"""SQLite with ids hashed at rest: what the files hold, and a file from before.

The legacy file (tests/fixtures/legacy_sqlite.db) was written by the release before
hashed ids (tests/fixtures/make_legacy_sqlite.py says how); its manifest says what is
in it. Every test works on a copy.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("aiosqlite")

from asyncsession import (
    Changes,
    Config,
    ControlledStore,
    SessionNotFound,
    SessionRotated,
    new_session,
    session_handle,
    short_hash,
    with_controls,
)
from asyncsession.backends.sqlite import PLAIN_SCHEMA_VERSION, SCHEMA_VERSION, SQLiteStore
from asyncsession.backends.sqlite import writes as sqlite_writes

from .clock import FakeClock
from .test_sqlite import raw_sql

FIXTURES = Path(__file__).parent / "fixtures"
MANIFEST: dict[str, Any] = json.loads((FIXTURES / "legacy_sqlite.json").read_text())
BY_LABEL: dict[str, dict[str, Any]] = {s["label"]: s for s in MANIFEST["sessions"]}
ALL_IDS = [s["id"] for s in MANIFEST["sessions"]]
DELETED = [s["id"] for s in MANIFEST["sessions"] if s["fate"] == "deleted"]
KEPT = {s["id"] for s in MANIFEST["sessions"] if s["fate"] not in ("rotated", "deleted")}
OLD_RELEASE = Path("/work/old-release")


def ident(label: str) -> str:
    return str(BY_LABEL[label]["id"])


def stored_ids(path: str) -> set[str]:
    return {r[0] for r in raw_sql(path, "SELECT id FROM sessions")}


def found_in_files(path: str, ids: list[str]) -> list[str]:
    """The ids whose text appears anywhere in the database, its WAL or its shared
    memory file (whichever exist), or in a SQL dump of every table."""
    blob = b"".join(
        Path(path + s).read_bytes() for s in ("", "-wal", "-shm") if Path(path + s).exists()
    )
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        dump = "\n".join(conn.iterdump()).encode()
    finally:
        conn.close()
    return [i for i in ids if i.encode() in blob or i.encode() in dump]


@pytest.fixture
def legacy(tmp_path: Path) -> str:
    path = str(tmp_path / "sessions.db")
    shutil.copyfile(FIXTURES / "legacy_sqlite.db", path)
    return path


def legacy_config(**changes: Any) -> Config:
    base: dict[str, Any] = {
        "site_id": "site-a",
        "max_sessions_per_user": 3,
        "rotation_grace": timedelta(seconds=MANIFEST["rotation_grace_seconds"]),
        "cleanup_interval": 0,
    }
    base.update(changes)
    return Config(**base)


def legacy_clock() -> FakeClock:
    """A minute after the fixture was written: within its rotation grace."""
    return FakeClock(datetime.fromisoformat(MANIFEST["clock"]) + timedelta(minutes=1))


# ------------------------------------------------------------- a file from before


def test_fixture_is_what_the_release_before_wrote(legacy: str) -> None:
    assert raw_sql(legacy, "PRAGMA user_version") == [(PLAIN_SCHEMA_VERSION,)]
    assert stored_ids(legacy) == KEPT  # all plain ids
    assert raw_sql(legacy, "SELECT count(*) FROM rotations") == [(2,)]
    # written without secure_delete: deleted sessions linger in free space and free pages
    assert len(DELETED) == 41 and len(found_in_files(legacy, DELETED)) > 30
    assert raw_sql(legacy, "PRAGMA freelist_count")[0][0] > 10


async def test_legacy_file_nobody_logged_out_and_moved_on_first_touch(legacy: str) -> None:
    clock = legacy_clock()
    store = SQLiteStore.with_controls(legacy, legacy_config(), clock=clock)
    raw: SQLiteStore = store.store  # type: ignore[assignment]
    site_b = with_controls(raw, legacy_config(site_id="site-b"))
    plain = SQLiteStore.with_controls(legacy, legacy_config(hash_ids=False), clock=clock)
    try:
        await _first_touches(legacy, store, site_b, plain, clock)
    finally:
        await plain.close()
        await store.close()
    assert found_in_files(legacy, ALL_IDS) == []


async def _first_touches(
    path: str,
    store: ControlledStore,
    site_b: ControlledStore,
    plain: ControlledStore,
    clock: FakeClock,
) -> None:
    def where(label: str) -> tuple[bool, bool]:
        """(stored under the plain id, stored under the handle)"""
        ids = stored_ids(path)
        return ident(label) in ids, session_handle(ident(label)) in ids

    # opening moved nothing: the schema version says handles may be here now
    assert raw_sql(path, "PRAGMA user_version") == [(PLAIN_SCHEMA_VERSION,)]
    got = await store.get(ident("anon-1"))
    assert raw_sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert (got.id, got.user_id, got.data) == (ident("anon-1"), None, BY_LABEL["anon-1"]["data"])
    assert where("anon-1") == (False, True)
    assert where("anon-2") == (True, False)  # nothing else moved

    # ids rotated (rotate, login) by the release before still answer "rotated"
    for label in ("carol-before-rotate", "dave-anonymous"):
        with pytest.raises(SessionRotated):
            await store.get(ident(label))
    with pytest.raises(SessionNotFound):  # expired before (read: moved all the same)
        await store.get(ident("old-expired"))
    assert where("old-expired") == (False, True)
    with pytest.raises(SessionNotFound):  # deleted before
        await store.get(ident("deleted"))
    assert await site_b.get(ident("anon-b")) is not None
    with pytest.raises(SessionNotFound):  # another site's session stays another site's
        await store.get(ident("anon-b"))

    # the user index: listed (as handles) in creation order, moved or not
    alice = [ident(f"alice-{i}") for i in (1, 2, 3)]
    handles = [session_handle(i) for i in alice]
    assert [s.id for s in await store.list_by_user("alice")] == handles
    assert (await store.get(alice[1])).user_id == "alice"
    assert where("alice-2") == (False, True)
    assert [s.id for s in await store.list_by_user("alice")] == handles  # order kept
    # the per-user limit counts moved and unmoved rows alike: the oldest (unmoved) goes
    new = await store.create(new_session("alice", now=clock()))
    assert [s.id for s in await store.list_by_user("alice")] == [*handles[1:], store.handle(new.id)]
    with pytest.raises(SessionNotFound):
        await store.get(alice[0])
    assert where("alice-1") == (False, False)

    # delete_by_user keeps an unmoved session named by its id (moved first)
    assert where("bob-2") == (True, False)
    assert await store.delete_by_user("bob", keep=ident("bob-2")) == 1
    assert where("bob-2") == (False, True) and where("bob-1") == (False, False)
    assert [s.id for s in await store.list_by_user("bob")] == [session_handle(ident("bob-2"))]
    assert len(await site_b.list_by_user("bob")) == 1  # site-b's bob untouched

    # writes on sessions not yet moved: each moves it, then writes
    fresh = await plain.get(ident("anon-2"))  # read without moving
    fresh.data["cart"] = 3
    await store.update(fresh)
    assert where("anon-2") == (False, True)
    assert (await store.get(ident("anon-2"))).data == {**BY_LABEL["anon-2"]["data"], "cart": 3}

    await store.touch(ident("erin-soon"))
    assert where("erin-soon") == (False, True)
    assert (await store.get(ident("erin-soon"))).last_accessed_at == clock()

    applied = await store.apply(ident("carol"), Changes(set={"seen": True}))
    assert applied.version == 1 and where("carol") == (False, True)

    rotated = await site_b.rotate(ident("bob-b"))
    assert (await site_b.get(rotated)).data == BY_LABEL["bob-b"]["data"]
    with pytest.raises(SessionRotated):
        await site_b.get(ident("bob-b"))
    assert where("bob-b") == (False, False)

    assert await site_b.delete(ident("anon-b")) is True
    assert where("anon-b") == (False, False)

    # migrate_ids moves the rest; what is left of the old layout goes with it
    left = {i for i in stored_ids(path) if "." not in i}
    assert left == {ident("dave")}  # alice's moved when she was listed
    assert len(found_in_files(path, DELETED)) > 30  # still in free space
    assert await store.migrate_ids() == 1
    assert {i for i in stored_ids(path) if "." not in i} == set()
    assert found_in_files(path, ALL_IDS) == []  # database, WAL, shared memory, and dump
    assert os.path.getsize(path + "-wal") == 0
    assert await store.migrate_ids() == 0
    assert (await store.get(ident("dave"))).data == BY_LABEL["dave"]["data"]

    # purge: the expired rows
    clock.advance(timedelta(hours=2))
    assert await store.purge_expired() == 2  # old-expired, erin-soon
    assert raw_sql(path, "SELECT count(*) FROM rotations") == [(0,)]


async def test_every_legacy_session_reads_by_its_id(legacy: str) -> None:
    """Nobody is logged out: each live session of either site reads by its id, as it
    was, and is then stored under its handle only."""
    clock = legacy_clock()
    backend = SQLiteStore(legacy, legacy_config(site_id=""), clock=clock)
    sites = {
        site: with_controls(backend, legacy_config(site_id=site)) for site in ("site-a", "site-b")
    }
    live = [s for s in MANIFEST["sessions"] if s["fate"] in ("live", "expiring")]
    try:
        for s in live:
            got = await sites[s["site"]].get(s["id"])
            assert (got.id, got.site_id, got.user_id, got.data) == (
                s["id"],
                s["site"],
                s["user"],
                s["data"],
            )
            assert got.version == 0
        users = {s["user"] for s in live if s["user"] is not None}
        for site, store in sites.items():
            for user in users:
                assert [x.id for x in await store.list_by_user(user)] == [
                    session_handle(s["id"]) for s in live if (s["site"], s["user"]) == (site, user)
                ]
    finally:
        await backend.close()
    assert stored_ids(legacy) == {session_handle(s["id"]) for s in live} | {ident("old-expired")}


async def test_legacy_file_purge_before_any_move(legacy: str) -> None:
    """Purge on a file where nothing has moved yet: the expired rows go, by their
    plain ids; expired events name them by short hash, as for any session."""
    clock = legacy_clock()
    clock.advance(timedelta(hours=1))
    events: list[Any] = []
    store = SQLiteStore.with_controls(legacy, legacy_config(), clock=clock, on_event=events.append)
    try:
        assert await store.purge_expired() == 2
        assert ident("erin-soon") not in stored_ids(legacy)
        assert ident("old-expired") not in stored_ids(legacy)
        expired = sorted(e.session for e in events if e.type == "expired")
        assert expired == sorted(short_hash(ident(x)) for x in ("erin-soon", "old-expired"))
        assert await store.migrate_ids() == len(stored_ids(legacy))
        assert all("." in i for i in stored_ids(legacy))
    finally:
        await store.close()
    assert found_in_files(legacy, ALL_IDS) == []


async def test_concurrent_first_touch_moves_once_and_loses_no_write(
    legacy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    outcomes: list[int] = []
    real_adopt = sqlite_writes._adopt

    def adopt(c: sqlite3.Connection, session_id: str, handle: str) -> int:
        outcome = real_adopt(c, session_id, handle)
        outcomes.append(outcome)
        return outcome

    monkeypatch.setattr(sqlite_writes, "_adopt", adopt)
    store = SQLiteStore.with_controls(legacy, legacy_config(), clock=legacy_clock())
    session_id = ident("anon-2")
    try:

        async def one(i: int) -> Any:
            if i % 2:
                return await store.get(session_id)
            return await store.apply(session_id, Changes(set={f"k{i}": i}))

        got = await asyncio.gather(*(one(i) for i in range(100)))
        final = await store.get(session_id)
    finally:
        await store.close()
    assert Counter(type(g).__name__ for g in got) == {"Session": 50, "Applied": 50}
    assert all(g.data.items() >= BY_LABEL["anon-2"]["data"].items() for g in got[1::2])
    assert final.data == {**BY_LABEL["anon-2"]["data"], **{f"k{i}": i for i in range(0, 100, 2)}}
    assert final.version == 50
    assert outcomes.count(sqlite_writes._ADOPT_MOVED) >= 1  # the move, once; others saw it
    ids = stored_ids(legacy)
    assert session_id not in ids and session_handle(session_id) in ids
    assert len(ids) == len(KEPT)  # no row gained or lost


async def test_adopt_drops_a_plain_row_when_the_handle_row_exists(legacy: str) -> None:
    store = SQLiteStore(legacy, legacy_config(), clock=legacy_clock())
    session_id = ident("anon-1")
    try:
        await store.get(session_id)  # moved
        # a process of the release before writes the plain row again (a copy)
        raw_sql(
            legacy,
            "INSERT INTO sessions SELECT ?, site_id, user_id, org_id, created, updated, accessed,"
            " expires, absolute, ip, ua, version, '{\"stale\": 1}' FROM sessions WHERE id = ?",
            (session_id, session_handle(session_id)),
        )
        assert await store._adopt(session_id, session_handle(session_id)) is True
        assert session_id not in stored_ids(legacy)
        assert (await store.get(session_id)).data == BY_LABEL["anon-1"]["data"]  # not the copy
    finally:
        await store.close()


async def test_adopt_with_nothing_to_move_takes_no_write_lock(
    legacy: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # no rotation records: their check on a miss is a read on the writer's connection
    store = SQLiteStore(legacy, legacy_config(rotation_grace=0), clock=legacy_clock())
    writes: list[str] = []
    real_run = store._run

    async def run(fn: Any, *args: Any) -> Any:
        writes.append(fn.__name__)
        return await real_run(fn, *args)

    try:
        await store.get(ident("anon-1"))  # opens the store, moves anon-1
        monkeypatch.setattr(store, "_run", run)
        await store.get(ident("anon-1"))  # found under the handle
        with pytest.raises(SessionNotFound):
            await store.get("x" * 43)  # nowhere
        assert await store._adopt(ident("anon-1"), session_handle(ident("anon-1"))) is True
        assert writes == []
    finally:
        await store.close()


def test_release_before_refuses_a_file_with_handles(legacy: str) -> None:
    if not (OLD_RELEASE / "asyncsession").is_dir():
        pytest.skip("the release before hashed ids is not checked out at /work/old-release")

    async def touch() -> None:
        async with SQLiteStore(legacy, legacy_config(), clock=legacy_clock()) as store:
            await store.get(ident("anon-1"))

    asyncio.run(touch())
    code = (
        "import asyncio, sys, asyncsession\n"
        "assert not hasattr(asyncsession, 'session_handle'), asyncsession.__file__\n"
        "from asyncsession import Config\n"
        "from asyncsession.backends.sqlite import SQLiteStore\n"
        "async def main():\n"
        "    async with SQLiteStore(sys.argv[1], Config(cleanup_interval=0)) as s:\n"
        "        await s.get('a' * 43)\n"
        "asyncio.run(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, legacy],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(OLD_RELEASE)},
        cwd=OLD_RELEASE.parent,  # not this checkout's directory
        check=False,
    )
    assert done.returncode != 0
    assert "StoreUnavailable" in done.stderr
    assert f"schema version {SCHEMA_VERSION}, newer than" in done.stderr
    assert "upgrade asyncsession" in done.stderr


async def test_plain_ids_store_leaves_the_schema_for_the_release_before(tmp_path: Path) -> None:
    """``hash_ids=False`` keeps a file the release before can open; ``hash_ids=True``
    then moves it on (several stores opening at once: one migration)."""
    path = str(tmp_path / "sessions.db")
    async with SQLiteStore(path, Config(hash_ids=False, cleanup_interval=0)) as plain:
        s = await plain.create(new_session("alice"))
    assert raw_sql(path, "PRAGMA user_version") == [(PLAIN_SCHEMA_VERSION,)]
    assert stored_ids(path) == {s.id}
    stores = [SQLiteStore(path, Config(cleanup_interval=0)) for _ in range(8)]
    try:
        got = await asyncio.gather(*(st.get(s.id) for st in stores))
    finally:
        for st in stores:
            await st.close()
    assert {g.id for g in got} == {s.id}
    assert raw_sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert stored_ids(path) == {session_handle(s.id)}
    async with SQLiteStore(path, Config(hash_ids=False, cleanup_interval=0)) as plain:
        await plain.create(new_session("bob"))  # opens a version 3 file, leaves it so
    assert raw_sql(path, "PRAGMA user_version") == [(SCHEMA_VERSION,)]


# ---------------------------------------------------------------------- dump


async def _exercise(store: ControlledStore, clock: FakeClock) -> list[str]:
    """Sessions through every write path; every id any of them ever had."""
    ids: list[str] = []

    async def make(user: str | None, ttl: float = 3600, **data: Any) -> str:
        s = await store.create(
            new_session(user, ttl=ttl, now=clock(), data={"secret": f"s{len(ids)}", **data})
        )
        ids.append(s.id)
        clock.advance(1)
        return s.id

    anon = await make(None)
    alice = [await make("alice") for _ in range(5)]  # limit 3: two evicted
    bob = [await make("bob") for _ in range(3)]
    short = [await make("carol", ttl=5) for _ in range(2)]
    s = await store.get(alice[-1])
    s.data["more"] = "x" * 300  # grows the row: moved within the page
    await store.update(s)
    await store.touch(alice[-2])
    await store.apply(anon, Changes(set={"k": 1}))
    ids.append(await store.rotate(anon))
    ids.append(await store.rotate(bob[0], user_id="dave"))
    login = new_session("erin", now=clock(), data={"secret": "login"})
    ids.append(login.id)
    await store.rotate_into(await make(None), login)
    await store.delete_by_user("bob", keep=bob[1])
    await store.delete(alice[-3])
    clock.advance(10)
    assert await store.purge_expired() == len(short)
    assert short[0] in ids
    return ids


@pytest.mark.parametrize("hash_ids", [True, False])
async def test_files_hold_no_session_id(tmp_path: Path, hash_ids: bool) -> None:
    """Database, WAL and shared memory, read as bytes while the store is open and
    after it closed: no id (live, rotated, evicted, deleted or purged) appears. With
    ``hash_ids=False`` the same check finds the live ones: it can fail."""
    path = str(tmp_path / "sessions.db")
    clock = FakeClock()
    store = SQLiteStore.with_controls(
        path, legacy_config(hash_ids=hash_ids, site_id="", rotation_grace=60), clock=clock
    )
    try:
        ids = await _exercise(store, clock)
        assert os.path.exists(path + "-wal") and os.path.exists(path + "-shm")
        open_found = found_in_files(path, ids)
        live = [i for i in ids if await _exists(store, i)]
    finally:
        await store.close()
    closed_found = found_in_files(path, ids)
    assert len(ids) == 15 and len(live) == 6  # 9 evicted, rotated, deleted or purged
    if hash_ids:
        assert open_found == [] and closed_found == []
    else:
        assert set(live) <= set(open_found) and set(live) <= set(closed_found)


async def _exists(store: ControlledStore, session_id: str) -> bool:
    try:
        await store.get(session_id)
    except SessionNotFound:
        return False
    return True


async def test_a_listed_handle_revokes_and_keeps_a_session_not_yet_moved(legacy: str) -> None:
    """A "your devices" page lists the user's sessions by handle; revoking one of them,
    or logging out everywhere but one, by those handles works before any of them was
    touched (listing moves them)."""
    alice = [s for s in MANIFEST["sessions"] if s["user"] == "alice" and s["fate"] == "live"]
    assert len(alice) == 3 and all(s["site"] == "site-a" for s in alice)
    async with SQLiteStore.with_controls(legacy, legacy_config(), clock=legacy_clock()) as store:
        listed = await store.list_by_user("alice")
        assert sorted(s.id for s in listed) == sorted(store.handle(s["id"]) for s in alice)
        gone, kept, other = listed
        assert await store.delete(gone.id) is True
        by_handle = {store.handle(s["id"]): s["id"] for s in alice}
        with pytest.raises(SessionNotFound):
            await store.get(by_handle[gone.id])
        assert await store.delete_by_user("alice", keep=kept.id) == 1
        assert (await store.get(by_handle[kept.id])).user_id == "alice"
        with pytest.raises(SessionNotFound):
            await store.get(by_handle[other.id])


async def test_migrate_after_first_touches_still_leaves_no_plain_id(legacy: str) -> None:
    """Every row already moved by first touches: migrate moves nothing, and still
    rebuilds the file, so the plain ids the release before left in free pages go."""
    async with SQLiteStore(legacy, legacy_config(), clock=legacy_clock()) as store:
        for s in MANIFEST["sessions"]:
            await store._adopt(s["id"], store.handle(s["id"]))
        assert await store.migrate_ids() == 0
    assert found_in_files(legacy, ALL_IDS) == []
