"""The admin CLI (``python -m asyncsession stats|list-user|show|revoke|revoke-user|purge``),
in-process and as a subprocess, against stores that outlive the process: a SQLite file
and Redis under a unique key prefix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from asyncsession import Config, SessionNotFound, new_session, open_store, short_hash
from asyncsession.__main__ import main

from . import backend_redis, redis_servers


@dataclass
class Filled:
    url: str
    prefix: str = "session:"
    ids: dict[str, list[str]] = field(default_factory=dict)  # "site/user" -> ids
    expired: list[str] = field(default_factory=list)

    @property
    def all_ids(self) -> list[str]:
        return [i for ids in self.ids.values() for i in ids] + self.expired

    def args(self, *rest: str) -> list[str]:
        return [*rest, "--store", self.url, "--prefix", self.prefix]


async def fill(url: str, prefix: str) -> Filled:
    """shop: alice x3 (one big), bob x1, one anonymous, 2 expired (carol);
    blog: alice x1. The expired ones expired a few seconds ago (Redis itself drops
    keys a grace period after their deadline)."""
    out = Filled(url, prefix)

    def cfg(site: str) -> Config:
        return Config(site_id=site, key_prefix=prefix, cleanup_interval=0)

    async with open_store(url, cfg("shop")) as shop:
        for user, n in (("alice", 3), ("bob", 1)):
            for k in range(n):
                s = new_session(user, 3600, ip_address="10.1.2.3", user_agent="Firefox")
                s.data["blob"] = "x" * (5000 if (user, k) == ("alice", 0) else 10)
                out.ids.setdefault(f"shop/{user}", []).append((await shop.create(s)).id)
        out.ids["shop/-"] = [(await shop.create(new_session(None, 3600))).id]
    past = datetime.now(UTC) - timedelta(seconds=65)
    async with open_store(url, cfg("shop"), clock=lambda: past) as old:
        for _ in range(2):
            out.expired.append((await old.create(new_session("carol", 60, now=past))).id)
    async with open_store(url, cfg("blog")) as blog:
        out.ids["blog/alice"] = [(await blog.create(new_session("alice", 3600))).id]
    return out


@pytest.fixture
def sqlite_store(tmp_path: Path) -> Filled:
    pytest.importorskip("aiosqlite")
    return asyncio.run(fill(f"sqlite:{tmp_path / 'sessions.db'}", "session:"))


@pytest.fixture
def redis_store() -> Iterator[Filled]:
    reason = backend_redis.skip_reason()
    if reason or backend_redis.using_fakeredis():
        pytest.skip(reason or "the CLI needs a real Redis server (REDIS_URL)")
    prefix = f"test:cli-{uuid.uuid4().hex[:12]}:"
    filled = asyncio.run(fill(backend_redis.REDIS_URL, prefix))
    yield filled

    async def clean() -> None:
        from redis.asyncio import Redis

        client = Redis.from_url(backend_redis.REDIS_URL)
        try:
            await backend_redis.delete_prefix(client, prefix)
        finally:
            await client.aclose()

    asyncio.run(clean())


@pytest.fixture
def redis_cluster_store() -> Iterator[Filled]:
    too_old = redis_servers.cluster_client_reason()
    if too_old is not None:
        pytest.skip(too_old)
    reason = redis_servers.skip_reason()
    if reason is not None:
        if redis_servers.REQUIRE:
            raise AssertionError(f"ASYNCSESSION_REQUIRE_SERVERS=1 but {reason}")
        pytest.skip(reason)
    url = redis_servers.shared_cluster().url
    prefix = f"test:cli-{uuid.uuid4().hex[:12]}:"
    filled = asyncio.run(fill(url, prefix))
    yield filled

    async def clean() -> None:
        async with open_store(url, Config(key_prefix=prefix, cleanup_interval=0)) as store:
            backend: Any = store.store
            async for batch in backend._scan(1000):
                for entry in batch:
                    await backend._delete(entry.session_id, Config(site_id=entry.site_id))
            await backend._purge(datetime.now(UTC) + timedelta(days=365))

    asyncio.run(clean())


@pytest.fixture(params=["sqlite", "redis", "redis_cluster"])
def store(request: pytest.FixtureRequest) -> Filled:
    filled: Filled = request.getfixturevalue(f"{request.param}_store")
    return filled


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(err: str, command: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"asyncsession {command}: error: "), err
    assert "Traceback" not in err


def assert_no_full_ids(text: str, filled: Filled, allowed: str = "") -> None:
    for session_id in filled.all_ids:
        if session_id != allowed:
            assert session_id not in text


# ------------------------------------------------------------------------ stats


def test_stats_table_and_json(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, err = run(capsys, *store.args("stats", "--top", "2"))
    assert status == 0, err
    assert_no_full_ids(out, store)
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["site", "sessions", "live"]
    shop = next(line.split() for line in lines if line.startswith("shop"))
    blog = next(line.split() for line in lines if line.startswith("blog"))
    # site, sessions, live, expired, users, anonymous
    assert shop[:6] == ["shop", "7", "5", "2", "2", "1"]
    assert blog[:6] == ["blog", "1", "1", "0", "1", "0"]
    assert "largest 2 sessions" in out
    assert short_hash(store.ids["shop/alice"][0]) in out  # the 5 KB one

    status, out, _ = run(capsys, *store.args("stats", "--json", "--top", "1"))
    assert status == 0
    report = json.loads(out)
    sites = {s["site"]: s for s in report["sites"]}
    assert sites["shop"] == {
        "site": "shop",
        "sessions": 7,
        "live": 5,
        "expired_not_purged": 2,
        "users": 2,
        "anonymous": 1,
        "bytes": sites["shop"]["bytes"],
    }
    assert sites["blog"]["sessions"] == 1
    assert report["scanned"] == 8
    (big,) = report["largest"]
    assert big["session"] == short_hash(store.ids["shop/alice"][0])
    assert (big["site"], big["user"]) == ("shop", "alice") and big["size"] > 5000


def test_stats_one_site_and_a_site_without_sessions(
    sqlite_store: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, _ = run(capsys, *sqlite_store.args("stats", "--site", "blog", "--json"))
    assert status == 0
    assert [s["site"] for s in json.loads(out)["sites"]] == ["blog"]
    status, out, err = run(capsys, *sqlite_store.args("stats", "--site", "nosuch"))
    assert status == 1 and out == ""
    assert_one_line_error(err, "stats")
    assert "no sessions for site 'nosuch'" in err


def test_stats_progress_bar_on_stderr(
    sqlite_store: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    status, out, err = run(capsys, *sqlite_store.args("stats", "--progress", "--batch", "2"))
    assert status == 0
    assert "scanning [" in err and "/ ~8 sessions" in err
    assert "scanning" not in out
    status, _, err = run(capsys, *sqlite_store.args("stats"))  # not a terminal: no bar
    assert status == 0 and err == ""


def test_stats_of_an_empty_memory_store(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "stats", "--store", "memory://") == (0, "no sessions\n", "")


# ------------------------------------------------------------ users, sessions


def test_list_user(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop"))
    assert status == 0
    assert_no_full_ids(out, store)
    for session_id in store.ids["shop/alice"]:
        assert short_hash(session_id) in out
    assert short_hash(store.ids["blog/alice"][0]) not in out  # another site
    assert "10.1.2.3" in out and "Firefox" in out
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    listed = json.loads(out)
    assert [s["session"] for s in listed] == [short_hash(i) for i in store.ids["shop/alice"]]
    status, out, err = run(capsys, *store.args("list-user", "carol", "--site", "shop"))
    assert status == 1  # only expired sessions
    assert_one_line_error(err, "list-user")


def test_show(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    first, *others = store.ids["shop/alice"]
    status, out, _ = run(capsys, *store.args("show", first, "--site", "shop"))
    assert status == 0
    assert first in out  # the id typed is fine
    assert_no_full_ids(out, store, allowed=first)
    for other in others:
        assert short_hash(other) in out
    assert "x" * 5000 in out  # the data
    status, out, _ = run(capsys, *store.args("show", first, "--site", "shop", "--json"))
    shown = json.loads(out)
    assert shown["id"] == first and shown["user"] == "alice"
    assert shown["data"] == {"blob": "x" * 5000}
    assert sorted(shown["other_sessions_of_user"]) == sorted(short_hash(i) for i in others)
    assert_no_full_ids(out, store, allowed=first)
    # by the short hash stats and list-user show (the store keeps no id: a scan)
    status, out, _ = run(capsys, *store.args("show", short_hash(first), "--site", "shop", "--json"))
    assert status == 0 and json.loads(out)["data"] == {"blob": "x" * 5000}
    assert json.loads(out)["user"] == "alice"
    assert_no_full_ids(out, store)
    status, _, err = run(capsys, *store.args("show", short_hash(first), "--site", "blog"))
    assert status == 1 and "no session" in err
    assert "belongs to site 'shop' (use --site shop)" in err  # as for a full id
    status, _, err = run(capsys, *store.args("revoke", short_hash(first)))
    assert status == 1 and "belongs to site 'shop'" in err
    assert json.loads(
        run(capsys, *store.args("show", short_hash(first), "--site", "shop", "--json"))[1]
    )


def test_show_errors(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    session_id = store.ids["shop/bob"][0]
    status, out, err = run(capsys, *store.args("show", session_id, "--site", "blog"))
    assert status == 1 and out == ""
    assert_one_line_error(err, "show")
    assert "belongs to site 'shop'" in err and session_id not in err
    status, _, err = run(capsys, *store.args("show", store.expired[0], "--site", "shop"))
    assert status == 1 and "expired" in err
    status, _, err = run(capsys, *store.args("show", "not*an*id", "--site", "shop"))
    assert status == 2
    assert_one_line_error(err, "show")
    status, _, err = run(capsys, *store.args("show", "A" * 43, "--site", "shop"))
    assert status == 1
    assert_one_line_error(err, "show")


def test_revoke(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    bob = store.ids["shop/bob"][0]
    status, out, _ = run(capsys, *store.args("revoke", bob, "--site", "shop"))
    assert status == 0 and short_hash(bob) in out and bob not in out
    status, _, err = run(capsys, *store.args("revoke", bob, "--site", "shop"))
    assert status == 1  # already gone
    assert_one_line_error(err, "revoke")
    # by short hash, as list-user shows it
    target = store.ids["shop/alice"][1]
    status, _, err = run(
        capsys, *store.args("revoke", short_hash(target), "--user", "bob", "--site", "shop")
    )
    assert status == 1 and "no live session" in err  # only bob's are looked at
    status, out, _ = run(
        capsys,
        *store.args("revoke", short_hash(target), "--user", "alice", "--site", "shop", "--json"),
    )
    assert status == 0 and json.loads(out) == {"revoked": short_hash(target), "was_expired": False}
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    assert short_hash(target) not in out and len(json.loads(out)) == 2
    # by short hash alone: a scan of the site finds it
    other = store.ids["shop/alice"][2]
    status, out, _ = run(capsys, *store.args("revoke", short_hash(other), "--site", "shop"))
    assert status == 0 and short_hash(other) in out and other not in out
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    assert short_hash(other) not in out and len(json.loads(out)) == 1
    # an expired session can be revoked too
    status, out, _ = run(capsys, *store.args("revoke", store.expired[0], "--site", "shop"))
    assert status == 0 and "already expired" in out


def test_revoke_user(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    keep = store.ids["shop/alice"][2]
    status, out, _ = run(
        capsys, *store.args("revoke-user", "alice", "--site", "shop", "--keep", keep, "--json")
    )
    assert status == 0 and json.loads(out) == {"user": "alice", "revoked": 2}
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    assert [s["session"] for s in json.loads(out)] == [short_hash(keep)]
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "blog", "--json"))
    assert len(json.loads(out)) == 1  # other sites untouched
    status, out, _ = run(capsys, *store.args("revoke-user", "nobody", "--site", "shop"))
    assert status == 0 and "revoked 0 sessions" in out
    status, out, _ = run(capsys, *store.args("revoke-user", "carol", "--site", "blog"))
    assert status == 0 and "revoked 0 sessions" in out  # carol's are expired


def test_a_user_of_another_site_is_named(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    """``revoke-user`` on the wrong site printed "revoked 0 sessions" and exit 0 while
    the user stayed logged in: it names the site, as ``show`` and ``revoke`` do, and
    exits 1; so does ``list-user``."""
    for command in ("revoke-user", "list-user"):
        status, out, err = run(capsys, *store.args(command, "bob", "--site", "blog"))
        assert status == 1 and out == ""
        assert "the user has sessions on site 'shop' (use --site shop)" in err, err
    status, out, _ = run(capsys, *store.args("list-user", "bob", "--site", "shop", "--json"))
    assert len(json.loads(out)) == 1  # nothing revoked


def test_revoke_user_keeps_a_short_hash(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    """``--keep`` takes the short hash ``list-user`` shows (an admin never sees full
    ids); one that is not the user's revokes nothing."""
    keep = short_hash(store.ids["shop/alice"][1])
    status, _, err = run(
        capsys, *store.args("revoke-user", "alice", "--site", "shop", "--keep", "0" * 12)
    )
    assert status == 1 and "no live session 000000000000" in err and "nothing revoked" in err
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    assert len(json.loads(out)) == 3
    status, out, _ = run(
        capsys, *store.args("revoke-user", "alice", "--site", "shop", "--keep", keep, "--json")
    )
    assert status == 0 and json.loads(out) == {"user": "alice", "revoked": 2}
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--site", "shop", "--json"))
    assert [s["session"] for s in json.loads(out)] == [keep]


@pytest.fixture(params=["sqlite", "redis"])
def plain_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Filled]:
    """A store of an application with ``Config(hash_ids=False)``: alice x2, bob x1,
    one expired (carol)."""
    if request.param == "sqlite":
        pytest.importorskip("aiosqlite")
        filled = Filled(f"sqlite:///{tmp_path / 'plain.db'}")
    else:
        reason = backend_redis.skip_reason()
        if reason or backend_redis.using_fakeredis():
            pytest.skip(reason or "the CLI needs a real Redis server (REDIS_URL)")
        filled = Filled(backend_redis.REDIS_URL, f"test:cli-{uuid.uuid4().hex[:12]}:")

    async def make() -> None:
        config = Config(key_prefix=filled.prefix, cleanup_interval=0, hash_ids=False)
        async with open_store(filled.url, config) as app:
            for user, n in (("alice", 2), ("bob", 1)):
                for _ in range(n):
                    created = await app.create(new_session(user, 3600, data={"u": user}))
                    filled.ids.setdefault(user, []).append(created.id)
        past = datetime.now(UTC) - timedelta(seconds=65)
        async with open_store(filled.url, config, clock=lambda: past) as old:
            filled.expired.append((await old.create(new_session("carol", 60, now=past))).id)

    asyncio.run(make())
    yield filled
    if request.param == "redis":

        async def clean() -> None:
            from redis.asyncio import Redis

            client = Redis.from_url(backend_redis.REDIS_URL)
            try:
                await backend_redis.delete_prefix(client, filled.prefix)
            finally:
                await client.aclose()

        asyncio.run(clean())


def test_output_never_carries_terminal_controls(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """User ids, user agents and data are the clients': an escape sequence in them
    (set the window title, clear the screen) or a bidirectional override is shown
    escaped in tables, ``show`` and errors, and ``--json`` stays valid JSON that
    reads back the exact strings."""
    pytest.importorskip("aiosqlite")
    url = f"sqlite:///{tmp_path / 'evil.db'}"
    evil = "\x1b]0;pwned\x07\x1b[2J\u202e\x9b31m\n(default)  999  forged row"

    async def make() -> str:
        async with open_store(url, Config(cleanup_interval=0)) as app:
            s = new_session(evil, 3600, user_agent=evil, data={"k": evil})
            return str((await app.create(s)).id)

    session_id = asyncio.run(make())
    outputs = []
    for command in (("stats",), ("list-user", evil), ("show", session_id), ("list-user", "x")):
        status, out, err = run(capsys, *command, "--store", url)
        outputs.append(out + err)
    status, out, _ = run(capsys, "show", session_id, "--store", url, "--json")
    assert json.loads(out)["user"] == evil and json.loads(out)["data"] == {"k": evil}
    status, _, err = run(capsys, "list-user", evil + "x", "--store", url, "--json")
    assert status == 1 and "pwned" in json.loads(err)["error"]["message"]
    outputs += [out, err]
    for text in outputs:
        assert not any(c in text for c in "\x1b\x07\u202e\x9b"), text
        assert not any(line.startswith("(default)  999") for line in text.splitlines()), text
    assert "\\u001b]0;pwned" in outputs[0]  # shown, escaped


def test_commands_never_move_plain_ids(
    plain_store: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without ``--plain-ids``, a command that meets a session stored under its plain
    id (an application with ``Config(hash_ids=False)``) refuses with exit 2 and moves
    nothing: the application still reads every session. With the flag, each works.
    (``revoke-user`` without ``--keep`` deletes them all either way, as asked.)"""
    store = plain_store
    alice, bob = store.ids["alice"], store.ids["bob"][0]
    commands = [
        ("list-user", "alice"),
        ("show", alice[0]),
        ("show", short_hash(alice[0])),
        ("revoke", alice[0]),
        ("revoke", short_hash(alice[0])),
        ("revoke-user", "alice", "--keep", alice[1]),
        ("revoke-user", "alice", "--keep", short_hash(alice[1])),
    ]
    for command in commands:
        status, out, err = run(capsys, *store.args(*command))
        assert status == 2, (command, out, err)
        assert_one_line_error(err, command[0])
        assert "--plain-ids" in err and "Nothing was changed" in err, err
        assert_no_full_ids(out + err, store)

    async def read_all() -> dict[str, Any]:
        config = Config(key_prefix=store.prefix, cleanup_interval=0, hash_ids=False)
        async with open_store(store.url, config) as app:
            return {i: (await app.get(i)).data for i in [*alice, bob]}

    # a purge of the site removes the expired one (gone either way), and nothing else
    status, out, err = run(capsys, *store.args("purge", "--site", "", "--json"))
    assert status == 0 and json.loads(out)["purged"] == 1, err
    assert asyncio.run(read_all()) == {
        alice[0]: {"u": "alice"},
        alice[1]: {"u": "alice"},
        bob: {"u": "bob"},
    }
    status, out, _ = run(capsys, *store.args("list-user", "alice", "--plain-ids", "--json"))
    assert status == 0 and [s["session"] for s in json.loads(out)] == [short_hash(i) for i in alice]
    status, out, _ = run(capsys, *store.args("show", alice[0], "--plain-ids", "--json"))
    assert status == 0 and json.loads(out)["data"] == {"u": "alice"}
    status, out, _ = run(
        capsys,
        *store.args(
            "revoke-user", "alice", "--plain-ids", "--keep", short_hash(alice[1]), "--json"
        ),
    )
    assert status == 0 and json.loads(out) == {"user": "alice", "revoked": 1}
    status, out, _ = run(capsys, *store.args("revoke", bob, "--plain-ids"))
    assert status == 0
    with pytest.raises(SessionNotFound):
        asyncio.run(read_all())


def test_purge(store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *store.args("purge", "--site", "blog"))
    assert (status, out) == (0, "no expired sessions on site 'blog'\n")
    status, out, _ = run(capsys, *store.args("purge", "--json"))
    assert status == 0 and json.loads(out) == {"purged": 2, "by_site": {"shop": 2}}
    status, out, _ = run(capsys, *store.args("stats", "--json"))
    assert all(s["expired_not_purged"] == 0 for s in json.loads(out)["sites"])


def test_purge_one_site(sqlite_store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *sqlite_store.args("purge", "--site", "shop"))
    assert status == 0 and "shop" in out and "2" in out
    status, out, _ = run(capsys, *sqlite_store.args("stats", "--json"))
    assert {s["site"]: s["sessions"] for s in json.loads(out)["sites"]} == {"shop": 5, "blog": 1}


# -------------------------------------------------------------------- bad input


def test_bad_inputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("aiosqlite")
    not_db = tmp_path / "notes.txt"
    not_db.write_text("this is not a database\n" * 100)
    cases = [
        (["--store", "http://example.com"], 2, "unknown store URL scheme 'http'"),
        (["--store", "ftp://user:hunter2@host/x"], 2, "unknown store URL scheme"),
        (["--store", "nonsense"], 2, "not a store URL"),
        ([], 2, "no store given"),
        (["--store", f"sqlite:{tmp_path / 'missing.db'}"], 3, "no SQLite database"),
        (["--store", f"sqlite:{not_db}"], 3, "not a database"),
        (["--store", f"redis://127.0.0.1:{redis_servers.free_port()}/0"], 3, "unavailable"),
        (["--store", "memory://", "--site", "no spaces"], 2, "site_id"),
    ]
    for extra, expected, message in cases:
        status, out, err = run(capsys, "stats", *extra)
        assert status == expected, (extra, err)
        assert out == ""
        assert_one_line_error(err, "stats")
        assert message in err, (extra, err)
        assert "hunter2" not in err
    assert not (tmp_path / "missing.db").exists()  # the CLI never creates a database
    assert not_db.read_text().startswith("this is not a database")


COMMAND_ARGS = {
    "stats": [],
    "list-user": ["nobody"],
    "show": ["A" * 43],
    "revoke": ["A" * 43],
    "revoke-user": ["nobody"],
    "purge": [],
}


def assert_json_error(err: str, command: str, code: str, status: int) -> str:
    """One line on stderr, a JSON object of exactly this shape; returns the message."""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    report = json.loads(lines[0])
    assert list(report) == ["error"]
    error = report["error"]
    assert set(error) == {"command", "code", "status", "message"}, error
    assert (error["command"], error["code"], error["status"]) == (command, code, status), error
    assert isinstance(error["message"], str) and error["message"], error
    return str(error["message"])


@pytest.mark.parametrize("command", sorted(COMMAND_ARGS))
def test_json_errors_of_every_command(
    command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With --json every failure is one JSON line on stderr with a code, and the exit
    status of the plain-text mode."""
    pytest.importorskip("aiosqlite")
    args = [command, *COMMAND_ARGS[command], "--json"]
    cases = [
        (["--store", "http://example.com"], "BAD_INPUT", 2, "unknown store URL scheme"),
        (["--store", "sqlite://sessions.db"], "BAD_INPUT", 2, "sqlite:///sessions.db"),
        ([], "BAD_INPUT", 2, "no store given"),
        (["--store", f"sqlite:///{tmp_path / 'missing.db'}"], "STORE_UNAVAILABLE", 3, "no SQLite"),
        (["--store", "memory://", "--site", "no spaces"], "BAD_INPUT", 2, "site_id"),
    ]
    for extra, code, status, message in cases:
        got, out, err = run(capsys, *args, *extra)
        assert (got, out) == (status, ""), (extra, err)
        assert message in assert_json_error(err, command, code, status), (extra, err)
    # argparse's own usage errors, too
    for argv in ([*args, "--no-such-option"], [command, "--json", "--top", "x"]):
        with pytest.raises(SystemExit) as exited:
            main(argv)
        captured = capsys.readouterr()
        assert (exited.value.code, captured.out) == (2, "")
        assert_json_error(captured.err, command, "BAD_INPUT", 2)


@pytest.mark.parametrize("command", ["stats", "list-user", "show", "revoke"])
def test_json_not_found_errors(
    command: str, sqlite_store: Filled, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = ["--site", "nosuch"] if command == "stats" else ["--site", "shop"]
    argv = sqlite_store.args(command, *COMMAND_ARGS[command], "--json", *extra)
    status, out, err = run(capsys, *argv)
    # list-user still prints its (empty) list, so stdout stays valid JSON
    assert (status, out) == (1, "[]\n" if command == "list-user" else "")
    assert_json_error(err, command, "NOT_FOUND", 1)


def test_plurals(sqlite_store: Filled, capsys: pytest.CaptureFixture[str]) -> None:
    status, out, _ = run(capsys, *sqlite_store.args("stats", "--top", "1"))
    assert status == 0 and "largest 1 session\n" in out
    status, out, _ = run(capsys, *sqlite_store.args("revoke-user", "bob", "--site", "shop"))
    assert status == 0 and "revoked 1 session of user 'bob'" in out


def test_site_help_of_commands_that_default_to_every_site(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command, default in (("stats", "every site"), ("purge", "every site"), ("show", "empty")):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        assert f"--site SITE only this site (default: {default}" in out or (
            command == "show" and "(default: the empty site)" in out
        ), out


def test_wrong_redis_password(capsys: pytest.CaptureFixture[str]) -> None:
    if backend_redis.skip_reason() or backend_redis.using_fakeredis():
        pytest.skip("needs a real Redis server")
    url = backend_redis.REDIS_URL.replace("redis://", "redis://no-such-user:s3cr3t-pw@", 1)
    status, out, err = run(capsys, "stats", "--store", url)
    assert status == 3 and out == ""
    assert_one_line_error(err, "stats")
    assert "s3cr3t-pw" not in err and "AuthenticationError" in err


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=s3cr3t-pw",
        "redis+cluster://s3cr3t-pw@127.0.0.1:1",
        "redis+sentinel://s3cr3t-pw@127.0.0.1:1/main",
        "redis+sentinel://127.0.0.1:1/main?sentinel_password=s3cr3t-pw",
        "redis://:s3cr3t-pw/Zm9v@127.0.0.1:1/0",  # base64: a bare '/'
        "redis://app:s3cr3t-pw?x@127.0.0.1:1/0",
    ],
)
def test_no_password_in_errors_of_any_url_form(
    url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A password in the query or in a user part without a colon (the cluster and
    sentinel forms) is never printed: nothing listens on port 1 (an option the URL
    form does not take is refused with the URL, redacted, in the message)."""
    status, out, err = run(capsys, "stats", "--store", url)
    assert status in (2, 3) and out == ""
    assert_one_line_error(err, "stats")
    assert "s3cr3t-pw" not in err and "Zm9v" not in err
    assert "***" in err or "redis-py 7.2" in err  # (redis-py < 7.2 refuses a cluster first)


def test_store_from_environment(
    sqlite_store: Filled, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ASYNCSESSION_STORE", sqlite_store.url)
    status, out, _ = run(capsys, "stats", "--json")
    assert status == 0 and json.loads(out)["scanned"] == 8


# ------------------------------------------------------------------- subprocess


def test_subprocess(sqlite_store: Filled, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("ASYNCSESSION_STORE", None)

    def cli(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "asyncsession", *argv],
            capture_output=True,
            text=True,
            env=env,
            timeout=120,
        )

    done = cli("stats", "--store", sqlite_store.url, "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["scanned"] == 8
    done = cli("list-user", "alice", "--store", sqlite_store.url, "--site", "shop")
    assert done.returncode == 0 and short_hash(sqlite_store.ids["shop/alice"][0]) in done.stdout
    done = cli("revoke-user", "alice", "--store", sqlite_store.url, "--site", "shop")
    assert done.returncode == 0 and "revoked 3" in done.stdout
    done = cli("stats", "--store", f"sqlite:{tmp_path / 'nope.db'}")
    assert done.returncode == 3 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    done = cli("show", "x", "--store", "gopher://host")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    done = cli("stats")  # argparse itself: usage on stderr, status 2
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_demo_speaks_the_same_vocabulary(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from asyncsession.__main__ import build_parser
    from asyncsession.demo import store_url

    monkeypatch.delenv("ASYNCSESSION_STORE", raising=False)
    assert build_parser().parse_args(["demo"]).store is None
    assert store_url(None) == "sqlite:///asyncsession-demo.db"
    assert build_parser().parse_args(["demo", "--store", "memory://"]).store == "memory://"
    assert build_parser().parse_args(["demo", "--backend", "memory"]).store == "memory"  # old name
    monkeypatch.setenv("ASYNCSESSION_STORE", "redis://localhost:6379/1")
    assert build_parser().parse_args(["demo"]).store == "redis://localhost:6379/1"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    help_text = capsys.readouterr().out
    assert "--store URL" in help_text and "--backend" not in help_text


def test_migrate_moves_a_legacy_sqlite_file(
    tmp_path: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    """``asyncsession migrate`` on a file the release before hashed ids wrote
    (tests/fixtures/legacy_sqlite.db): every stored session moves, once; afterwards no
    id is in the file, and the sessions still read by their ids."""
    import shutil
    from pathlib import Path

    fixtures = Path(__file__).parent / "fixtures"
    manifest = json.loads((fixtures / "legacy_sqlite.json").read_text())
    path = tmp_path / "legacy.db"
    shutil.copyfile(fixtures / "legacy_sqlite.db", path)
    url = f"sqlite:///{path}"
    status, out, _ = run(capsys, "migrate", "--store", url, "--json")
    moved = json.loads(out)["moved"]
    assert status == 0 and moved > 0
    status, out, _ = run(capsys, "migrate", "--store", url)
    assert status == 0 and out.strip() == "moved 0 sessions to hashed ids"
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("legacy"))
    ids = [s["id"] for s in manifest["sessions"]]
    assert not [i for i in ids if i.encode() in raw]
    status, _, err = run(capsys, "migrate", "--store", url, "--plain-ids")
    assert status == 2 and "--plain-ids" in err

    written = datetime.fromisoformat(manifest["clock"])

    async def read_back() -> int:
        found = 0
        for s in manifest["sessions"]:
            if s["fate"] != "live":
                continue
            config = Config(site_id=s["site"], cleanup_interval=0)
            async with open_store(
                url, config, clock=lambda: written + timedelta(minutes=1)
            ) as store:
                got = await store.get(s["id"])
                assert got.data == s["data"]
                found += 1
        return found

    assert asyncio.run(read_back()) > 0


def test_a_reader_that_stops_early_gets_no_error(tmp_path: Path) -> None:
    """``asyncsession stats --top N | head -1``: the pipe closes while stats still
    writes (more than a pipe buffer of it); no "error: BrokenPipeError" line and a
    clean exit (a newcomer's report)."""
    url = f"sqlite:///{tmp_path / 'many.db'}"

    async def many() -> None:
        async with open_store(url, Config(cleanup_interval=timedelta(0))) as s:
            for n in range(3_000):
                await s.create(new_session(f"user-with-a-longish-name-{n:05d}", data={"n": n}))

    asyncio.run(many())
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncsession", "stats", "--store", url, "--top", "3000"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    assert proc.stdout.readline()  # what `head -1` reads
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0, err
    assert "error" not in err.lower() and "Traceback" not in err, err


def test_a_missing_extra_is_named_before_a_missing_database(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Without the sqlite extra, a SQLite path that does not exist (yet) exited 3 "no
    SQLite database": installing the extra is what to fix first (exit 2, named)."""
    for loaded in [m for m in sys.modules if m.startswith(("asyncsession.backends.sqlite",))]:
        monkeypatch.delitem(sys.modules, loaded)
    monkeypatch.setitem(sys.modules, "aiosqlite", None)  # (an import of it fails)
    status, out, err = run(capsys, "stats", "--store", f"sqlite:///{tmp_path}/none.db")
    assert (status, out) == (2, ""), err
    assert "pip install 'asyncsession[sqlite]'" in err
