"""Store URLs: every form docs/backends.md lists opens the backend it names (without
connecting), and the refused forms say what to write instead."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest

from asyncsession import MemoryStore, open_backend, open_store
from asyncsession.factory import sqlite_path

SQLITE = [
    ("sqlite:///sessions.db", "sessions.db"),  # SQLAlchemy: three slashes, relative
    ("sqlite:///data/sessions.db", "data/sessions.db"),
    ("sqlite:////srv/app/sessions.db", "/srv/app/sessions.db"),  # four: absolute
    ("sqlite:sessions.db", "sessions.db"),  # shorthand
    ("sqlite:/srv/app/sessions.db", "/srv/app/sessions.db"),
    ("sqlite:///:memory:", ":memory:"),
    ("sqlite://:memory:", ":memory:"),
    ("sqlite://", ":memory:"),  # SQLAlchemy's in-memory form
]


@pytest.mark.parametrize(("url", "path"), SQLITE)
def test_sqlite_urls_read_as_sqlalchemy(url: str, path: str) -> None:
    assert sqlite_path(url) == path


@pytest.mark.parametrize(("url", "path"), SQLITE)
def test_sqlite_urls_open_that_file(
    url: str, path: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiosqlite")
    monkeypatch.chdir(tmp_path)
    store: Any = open_backend(url)
    assert store.path == (path if path == ":memory:" else os.path.abspath(path))


async def test_relative_sqlite_url_creates_the_file_in_the_working_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiosqlite")
    monkeypatch.chdir(tmp_path)
    async with open_store("sqlite:///sessions.db") as store:
        assert await store.list_by_user("alice") == []
    assert (tmp_path / "sessions.db").is_file()


def test_memory_url() -> None:
    assert isinstance(open_backend("memory://"), MemoryStore)


def _kwargs(store: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = store.client.connection_pool.connection_kwargs
    return kwargs


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://localhost:6379/2", {"host": "localhost", "port": 6379, "db": 2}),
        ("redis://:secret@cache.internal:6380/1", {"password": "secret", "db": 1}),
        ("redis://app:secret@cache.internal/3", {"username": "app", "db": 3}),
        ("rediss://cache.internal:6380/0", {"host": "cache.internal", "port": 6380}),
        ("unix:///run/redis/redis.sock?db=4", {"path": "/run/redis/redis.sock", "db": 4}),
    ],
)
async def test_redis_urls(url: str, expected: dict[str, Any]) -> None:
    pytest.importorskip("redis")
    store = open_backend(url)
    try:
        kwargs = _kwargs(store)
        assert {k: kwargs.get(k) for k in expected} == expected
        if url.startswith("rediss:"):
            assert "SSL" in store.client.connection_pool.connection_class.__name__  # type: ignore[attr-defined]
    finally:
        await store.close()


def _skip_cluster_before_7_2(url: str) -> None:
    from .redis_servers import cluster_client_reason

    reason = cluster_client_reason()
    if url.startswith("redis+cluster") and reason is not None:
        pytest.skip(reason)  # (a ValueError saying so, tested with the cluster)


async def test_cluster_and_sentinel_urls() -> None:
    pytest.importorskip("redis")
    from redis.asyncio.cluster import RedisCluster

    from .redis_servers import cluster_client_reason

    if cluster_client_reason() is None:  # (redis-py < 7.2 refuses a cluster)
        cluster: Any = open_backend("redis+cluster://:secret@10.0.0.1:7000,10.0.0.2:7000")
        try:
            assert isinstance(cluster.client, RedisCluster)
        finally:
            await cluster.close()
    sentinel: Any = open_backend("redis+sentinel://10.0.0.5:26379,10.0.0.6:26379/mymaster/2")
    try:
        assert sentinel.client.connection_pool.service_name == "mymaster"
        assert _kwargs(sentinel)["db"] == 2
    finally:
        await sentinel.close()


@pytest.mark.parametrize(
    ("url", "options", "check"),
    [
        ("rediss://cache.internal:6380/0", {}, True),
        ("rediss://cache.internal:6380/0?ssl_check_hostname=false", {}, False),
        ("rediss://cache.internal:6380/0", {"ssl_check_hostname": False}, False),
        ("rediss://cache.internal:6380/0?ssl_cert_reqs=none", {}, None),
        ("redis://cache.internal:6380/0", {}, None),
    ],
)
async def test_tls_urls_check_the_host_name(url: str, options: dict[str, Any], check: Any) -> None:
    """A ``rediss://`` URL checks the server's host name against its certificate
    unless told not to (redis-py before 6.0 does not by default); a URL that checks
    no certificate (``ssl_cert_reqs=none``) is left as it says."""
    pytest.importorskip("redis")
    from asyncsession.backends.redis import RedisStore

    store = RedisStore.from_url(url, **options)
    try:
        assert _kwargs(store).get("ssl_check_hostname") is check
    finally:
        await store.close()
    from .redis_servers import cluster_client_reason

    urls = ["redis+sentinel://h:1/m?ssl=true"]
    if cluster_client_reason() is None:  # (redis-py >= 7.2)
        urls.append("redis+cluster://10.0.0.1:7000?ssl=true")
    for tls_url in urls:
        other: Any = open_backend(tls_url)
        try:
            kwargs = (
                other.client.get_connection_kwargs()
                if "cluster" in tls_url
                else other._sentinel.sentinel_kwargs
            )
            assert kwargs.get("ssl_check_hostname") is True, tls_url
        finally:
            await other.close()


REFUSED = [
    ("sqlite://sessions.db", "write 'sqlite:///sessions.db'"),
    ("sqlite://data/sessions.db", "write 'sqlite:///data/sessions.db'"),
    ("sqlite://localhost/srv/x.db", "names a host, not a file"),
    ("sqlite:///", "sqlite URL needs a path"),
    ("sqlite:", "sqlite URL needs a path"),
    ("sqlite:///x.db?mode=ro", "no ?query"),
    ("http://example.com", "unknown store URL scheme 'http'"),
    ("mysql://u:hunter2@h/db", "unknown store URL scheme 'mysql'"),
    ("sessions.db", "not a store URL"),
    ("", "not a store URL"),
    ("redis+cluster://10.0.0.1:7000/1", "one database"),
    ("redis+sentinel://10.0.0.5:26379", "service name"),
    ("redis://localhost:6379/abc", "abc"),
]


@pytest.mark.parametrize(("url", "message"), REFUSED)
def test_refused_urls_say_what_to_write(url: str, message: str) -> None:
    if url.startswith("redis"):
        pytest.importorskip("redis")
    with pytest.raises(ValueError) as info:
        open_backend(url)
    assert message in str(info.value)
    assert "hunter2" not in str(info.value)


def test_a_misspelt_redis_option_is_refused_at_once() -> None:
    """``socket_timout=1`` was accepted, then every call failed (a 503 that reads
    as an outage): redis-py takes any keyword and fails only when it connects."""
    pytest.importorskip("redis")
    from asyncsession.backends.redis import RedisStore

    with pytest.raises(ValueError, match=r"'socket_timout'.*did you mean 'socket_timeout'"):
        RedisStore.from_url("redis://localhost:6379/0", socket_timout=1.0)
    with pytest.raises(ValueError, match="did you mean 'socket_timeout'"):
        open_backend("redis://localhost:6379/0?socket_timout=1")  # in the URL too
    with pytest.raises(ValueError, match="no option 'bogus'"):
        RedisStore.from_url("unix:///tmp/redis.sock", bogus=1)
    options = {  # what users pass: all taken
        "socket_timeout": 1.0,
        "client_name": "app",
        "retry_on_timeout": True,
        "max_connections": 4,
        "health_check_interval": 30,
        "decode_responses": True,
        "username": "u",
        "password": "p",
        "ssl_ca_certs": None,
        "single_connection_client": False,
    }
    store = RedisStore.from_url("redis://localhost:6379/0", **options)
    assert store.client.connection_pool.connection_kwargs["client_name"] == "app"


def _url_tables() -> tuple[list[str], list[str]]:
    """The example URLs of docs/backends.md's accepted table, and the refused ones."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "backends.md").read_text()
    section = text.split("\n## Store URLs\n", 1)[1].split("\n## ", 1)[0]
    accepted, refused = section.split("\nRefused", 1)
    ok = [
        url
        for row in accepted.splitlines()
        if row.startswith("| `")
        for url in re.findall(r"`([^`]+)`", row.rsplit("|", 2)[1])
    ]
    rows = [row for row in refused.splitlines() if row.startswith("| `")]
    bad = [url for row in rows for url in re.findall(r"`([^`]+)`", row.split("|")[1])]
    return ok, bad


DOC_ACCEPTED, DOC_REFUSED = _url_tables()


def test_the_url_table_is_complete() -> None:
    schemes = {url.split(":", 1)[0] for url in DOC_ACCEPTED}
    assert schemes == {"memory", "sqlite", "redis", "rediss", "unix", "redis+cluster"} | {
        "redis+sentinel"
    }
    assert len(DOC_REFUSED) >= 6


@pytest.mark.parametrize("url", DOC_ACCEPTED)
async def test_every_documented_url_opens(
    url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("aiosqlite")
    pytest.importorskip("redis")
    _skip_cluster_before_7_2(url)
    monkeypatch.chdir(tmp_path)
    store = open_backend(url)  # builds the backend; nothing connects yet
    await store.close()


@pytest.mark.parametrize("url", DOC_REFUSED)
def test_every_documented_refusal_is_refused(url: str) -> None:
    pytest.importorskip("redis")
    try:
        open_backend(url)
    except ValueError:
        return
    raise AssertionError(f"{url} was accepted")
