"""RedisStore: sessions shared by many app servers, on ``redis.asyncio``.

Each session is one hash: the record exactly as ``codec.encode`` wrote it (field
``r``) plus the few fields the Lua scripts need (site, version, timestamps as
integer microseconds, the user index key), so ``touch`` updates two small fields
and never rewrites the data. Every hook is one Lua script (or one ``HMGET``), sent
by SHA through the batching transport (``transport.py``): one round trip, atomic on
the server. Expiry decisions use the ``now`` passed in from the store's clock;
native ``PEXPIREAT`` TTLs (a grace period after the deadline) only garbage-collect
what purging did not reach. See ``docs/backends.md`` for the key layout.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from datetime import datetime
from typing import Any, ClassVar, Concatenate, ParamSpec, TypeVar
from urllib.parse import parse_qsl, urlsplit

import orjson
import redis
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool, ConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from ... import codec
from ..._redact import redact
from ...changes import Applied, EncodedChanges
from ...config import Config
from ...controls import ControlledStore, with_controls
from ...errors import (
    InvalidSession,
    SessionError,
    SessionLimitExceeded,
    StoreUnavailable,
    short_hash,
)
from ...session import Clock, Session, is_seconds, user_tag
from ...store import (
    NO_EVICTIONS,
    InsertResult,
    KeepGone,
    Miss,
    Outcome,
    PurgedSession,
    ScanEntry,
    Store,
    absolute_deadline,
)
from . import rotation
from .apply import apply_args, parse_reply
from .cluster import ClusterOps
from .layout import TAG_LENGTH, ClusterLayout, SingleLayout, slot_tag
from .scripts import (
    ADOPT,
    ADOPT_READ,
    APPLY,
    DELETE,
    DELETE_BY_USER,
    INSERT,
    LIST,
    PURGE,
    REPLACE,
    RESEAL,
    SCAN,
    SCRIPTS,
    TOUCH,
    VERIFY_READ,
    _Script,
)
from .sentinel import follow_sentinels
from .server import PROBE_KEY, check_scripts, check_server, cluster_client_problem
from .transport import Raw, Transport, UnexpectedReply, leading_ints, reply_shape
from .urls import (
    TLS_OPTIONS,
    check_client_options,
    check_db_path,
    parse_cluster_url,
    parse_sentinel_url,
    tls_defaults,
)

logger = logging.getLogger("asyncsession")

PURGE_BATCH = 1_000
"""Expired sessions one purge script call removes (each call is atomic and short)."""

USER_BATCH = 500
"""Sessions one ``list_by_user``/``delete_by_user`` script call handles: a user with a
huge index is served in several short calls, never one long one."""

SCAN_KEYS = 100
"""Session keys one admin-scan script call reads (calls of a batch share a round trip)."""

ADOPT_ATTEMPTS = 8
"""Reads of a session stored under its plain id that ``_adopt`` makes while the record
keeps changing under it before it gives up (``StoreUnavailable``)."""

DEFAULT_REDIS_OPTIONS: dict[str, Any] = {"socket_connect_timeout": 5.0}
"""Options ``from_url`` passes to redis-py unless the URL or the caller sets them."""

BOUNDED_REDIS_OPTIONS: dict[str, Any] = {"socket_timeout": None}
"""Also passed by ``from_url`` (``redis://``, ``rediss://``, ``unix://``,
``redis+cluster://``) when the store's ``timeout`` bounds every call: past it the
call fails and its work is cancelled (redis-py then drops that connection), so
redis-py's own read/write timeout adds nothing but its cost (with one set, redis-py
wraps each write in ``asyncio.wait_for``: on Python 3.11 an extra task per command)."""

SENTINEL_TIMEOUT = 1.0
"""Seconds a sentinel may take to connect or answer before the next one is asked (at
most a quarter of the store's ``timeout``): redis-py asks them in turn, so without it
one hung sentinel (of three healthy ones) used up every call's deadline."""

DEFAULT_TIMEOUT = 5.0
"""Seconds one round trip (connect, write, all replies) may take before the store
gives up with ``StoreUnavailable``."""

_OUTCOMES = {
    b"ok": Outcome.OK,
    b"missing": Outcome.MISSING,
    b"expired": Outcome.EXPIRED,
    b"other_site": Outcome.OTHER_SITE,
    b"conflict": Outcome.CONFLICT,
    b"user_changed": Outcome.USER_CHANGED,
}

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _guarded(
    hook: Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[RedisStore, _P], Coroutine[Any, Any, _T]]:
    """A hook whose reply handling may meet garbage (a reply of the wrong type from a
    broken server or proxy): anything but a ``SessionError`` or a corrupt record is
    ``StoreUnavailable``, never a raw ``TypeError``/``KeyError``."""

    async def run(self: RedisStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await hook(self, *args, **kwargs)
        except codec.CorruptRecord:
            raise
        except SessionError as exc:
            if isinstance(exc.__cause__, UnexpectedReply):  # (the transport's read check)
                await self._out_of_step()
            raise
        except RuntimeError as exc:  # (the store's own, its message safe to show)
            raise self._unavailable(exc) from exc
        except Exception as exc:
            # a reply of a shape never asked for: the connections may be out of step
            # (a reply left on one is read as the next request's), so they are closed
            await self._out_of_step()
            shown = exc if isinstance(exc, UnexpectedReply) else None
            kind = type(exc).__name__
        # raised here, outside the handler, so that no exception keeps the original as
        # its context: a KeyError's text is the reply itself, a record maybe
        shown = shown or UnexpectedReply(f"unexpected reply ({kind})")
        raise self._unavailable(shown) from shown

    functools.update_wrapper(run, hook)
    return run


TRIM_EVERY = 4
"""One insert in this many trims the expiry set (``_insert_args``)."""


def _us(when: datetime | None) -> int | bytes:
    return b"" if when is None else codec.to_us(when)


def _glob_escape(raw: bytes) -> bytes:
    """``raw`` as a literal ``SCAN MATCH`` pattern."""
    for special in (b"\\", b"*", b"?", b"[", b"]"):
        raw = raw.replace(special, b"\\" + special)
    return raw


def _rehome(record: bytes, handle: str) -> bytes:
    """A stored record with ``handle`` as its own id; one that does not parse as a
    record moves as it is (reading it reports it corrupt, as before the move)."""
    try:
        fields = orjson.loads(record)
    except orjson.JSONDecodeError:
        return record
    if type(fields) is not dict or "id" not in fields:
        return record
    fields["id"] = handle
    return orjson.dumps(fields)


def _resends(kwargs: dict[str, Any]) -> bool:
    """Whether connections made with ``kwargs`` send a command again after a
    connection error (redis-py 6+'s default ``Redis(...)``: up to 10 times)."""
    retry = kwargs.get("retry")
    count = getattr(retry, "get_retries", None)
    if callable(count):
        return bool(count() != 0)
    return retry is not None or bool(kwargs.get("retry_on_error") or kwargs.get("retry_on_timeout"))


def _without_retries(client: Redis) -> Redis | None:
    """A client on a pool of its own with ``client``'s connection settings (address,
    TLS, ACL user, credential provider, timeouts, health checks, size) but no
    retries, if ``client`` resends commands; else None. A script the server ran
    whose reply was lost must not run again: the second run sees the first one's
    effect and its caller would be told a conflict (or "already exists") for a
    write that was applied, or a counter would count twice."""
    pool = client.connection_pool
    if not _resends(pool.connection_kwargs):
        return None
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0), "retry_on_error": []}
    if "retry_on_timeout" in kwargs:
        kwargs["retry_on_timeout"] = False
    size = pool.max_connections
    own: ConnectionPool
    if type(pool) is ConnectionPool:
        own = ConnectionPool(connection_class=pool.connection_class, max_connections=size, **kwargs)
    elif type(pool) is BlockingConnectionPool:
        own = BlockingConnectionPool(
            connection_class=pool.connection_class,
            max_connections=size,
            timeout=pool.timeout,
            **kwargs,
        )
    else:  # a pool of another kind (Sentinel's): its own settings stand
        logger.warning(
            "asyncsession: the Redis client's %s resends commands after a connection "
            "error; a write whose reply was lost may then be applied twice (give the "
            "store a client with retry=Retry(NoBackoff(), 0))",
            type(pool).__name__,
        )
        return None
    # (the provider given again: redis-py 8 then re-authenticates this pool's
    # connections too when a streaming provider rotates its credentials)
    return Redis(connection_pool=own, credential_provider=kwargs.get("credential_provider"))


def _describe(pool: ConnectionPool) -> str:
    """Where a client connects, for error messages (never with its password)."""
    if isinstance(pool, SentinelConnectionPool):
        return f"redis+sentinel://.../{pool.service_name}"
    kw = pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    return f"redis://{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


class RedisStore(Store):
    """Redis backend (the seed's production backend). Needs Redis >= 7.0.

    One server (``redis.asyncio.Redis``, also behind Sentinel: ``from_sentinel``) or a
    Redis Cluster (``redis.asyncio.cluster.RedisCluster``, ``redis+cluster://`` URLs),
    with the same atomicity: on a cluster every script's keys share one hash slot.
    """

    backend_name = "redis"

    expiry_grace_ms: ClassVar[int] = 60_000
    """How long after its logical deadline Redis itself drops a session key: a
    backstop for when ``purge_expired`` does not run, with room for clock skew
    between app servers and Redis."""

    honours_deadline: bool = True
    """Every call answers by the request deadline ``SessionMiddleware`` sets
    (``asyncsession._deadline``): each hook's commands go through the transport,
    which keeps it."""

    max_in_flight: ClassVar[int] = 8
    """Slots for batches on the wire at once (each holds one pooled connection for its
    round trip; a batch split in two, ``transport.SPLIT_AT``, takes two slots); on one
    server at most half the pool's ``max_connections``, so the app's own commands on
    the same client always find a connection."""

    def __init__(
        self,
        client: Redis | RedisCluster,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
    ) -> None:
        if timeout is not None and (not is_seconds(timeout) or not 0 < timeout < float("inf")):
            raise ValueError(f"timeout must be positive seconds or None, not {timeout!r}")
        super().__init__(config, clock=clock)
        self.timeout = timeout
        self.client = client
        self._owns_client = False
        self._owns_pool = False  # a pool of its own beside the client given (no retries)
        self._sentinel: Sentinel | None = None
        self._service = ""
        self._tasks: set[asyncio.Task[Any]] = set()
        self._finishing: set[asyncio.Task[Any]] = set()  # work a caller may not stop
        self._cluster: ClusterOps | None = None
        self._inserts = 0  # inserts so far, modulo TRIM_EVERY: 0 trims (see _insert_args)
        self._layout: SingleLayout
        if isinstance(client, RedisCluster):
            problem = cluster_client_problem(redis.__version__)
            if problem is not None:
                raise ValueError(problem)
            retries = client.retry.get_retries()
            if retries != 0:
                # (a cluster client cannot be copied without its retries as a pool can)
                logger.warning(
                    "asyncsession: the RedisCluster client resends commands after a "
                    "connection error or timeout (%d retries); a write whose reply was "
                    "lost may then be applied twice and its caller told a conflict "
                    "(give it retry=Retry(NoBackoff(), 0); from_url does unless "
                    "given retry= or cluster_error_retry_attempts=)",
                    retries,
                )
            layout = ClusterLayout(self.config.key_prefix)
            self._layout = layout
            self._where = "redis+cluster://" + ",".join(node.name for node in client.get_nodes())
            self._password: str | None = client.get_connection_kwargs().get("password")
            in_flight = self.max_in_flight
            self._cluster = ClusterOps(
                client,
                layout.xprefix,
                timeout=timeout,
                unavailable=self._unavailable,
            )
        elif isinstance(client, Redis):
            own = _without_retries(client)
            if own is not None:
                client = self.client = own
                self._owns_pool = True
            pool = client.connection_pool
            self._layout = SingleLayout(self.config.key_prefix)
            self._where = _describe(pool)
            self._password = pool.connection_kwargs.get("password")
            in_flight = min(self.max_in_flight, pool.max_connections // 2)
        else:
            raise TypeError(
                "RedisStore needs a redis.asyncio.Redis or redis.asyncio.cluster.RedisCluster, "
                f"not {type(client).__name__}"
            )
        self._sprefix = self._layout.sprefix
        self._transport = Transport(
            client,
            timeout=timeout,
            max_in_flight=in_flight,
            unavailable=self._unavailable,
            merge_reads=not self._layout.cluster,
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on its own connection pool (closed by ``close()``).

        ``redis://``, ``rediss://`` and ``unix://`` URLs as redis-py reads them (a
        ``/db`` path that is not a number is a ``ValueError``); extra keyword
        arguments go to ``redis.asyncio.Redis.from_url`` (one it does not take is a
        ``ValueError``).
        ``redis+cluster://[[user]:password@]host:port[,host:port...]`` opens a Redis
        Cluster client on those startup nodes;
        ``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db]`` asks
        those sentinels for the primary of ``service`` (see ``from_sentinel``). Both
        accept ``?socket_timeout=``, ``socket_connect_timeout=``, ``max_connections=``,
        ``health_check_interval=``, ``ssl=true`` and the TLS options ``ssl_ca_certs=``,
        ``ssl_certfile=``, ``ssl_keyfile=``, ``ssl_cert_reqs=``, ``ssl_check_hostname=``,
        ``ssl_ciphers=`` (for Sentinel they apply to the sentinels too).
        ``timeout`` bounds each call's wait for Redis: a free slot, the slot map,
        redis-py's retries and redirections, the reply (``None``: no bound); with a
        bound, the client has no ``socket_timeout`` unless given one
        (``BOUNDED_REDIS_OPTIONS``).
        """
        scheme = url.split(":", 1)[0].lower()
        if scheme not in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel"):
            raise ValueError(
                f"RedisStore does not support {scheme}:// (got {redact(url)!r}); use redis://, "
                "rediss://, unix://, redis+cluster:// or redis+sentinel://"
            )
        try:
            if scheme == "redis+sentinel":
                sentinels, service, parsed = parse_sentinel_url(url)
            elif scheme == "redis+cluster":
                nodes, parsed = parse_cluster_url(url)
            elif scheme != "unix":
                check_db_path(url)
        except ValueError as exc:
            raise ValueError(f"{exc} (got {redact(url)!r})") from None
        store: RedisStore
        query = urlsplit(url).query
        tls = tls_defaults(scheme, query, redis_options)
        if scheme == "redis+sentinel":
            store = cls.from_sentinel(
                sentinels,
                service,
                config,
                clock=clock,
                timeout=timeout,
                **{**tls, **parsed, **redis_options},
            )
        elif scheme == "redis+cluster":
            bounded = BOUNDED_REDIS_OPTIONS if timeout is not None else {}
            options = {**DEFAULT_REDIS_OPTIONS, **bounded, **tls, **parsed, **redis_options}
            startup = [ClusterNode(host, port) for host, port in nodes]
            # redis-py's cluster client sends a command again after a connection error
            # or a timeout (3 to 10 times by version): a script the node ran whose reply
            # was lost would run twice, and its caller be told "already exists" or a
            # conflict for its own write. Redirections (MOVED, ASK) are not retries and
            # still happen; the next call after an error reloads the slot map.
            if "cluster_error_retry_attempts" not in options:  # (yours, if given)
                options.setdefault("retry", Retry(NoBackoff(), 0))
            cluster = RedisCluster(startup_nodes=startup, **options)
            store = cls(cluster, config, clock=clock, timeout=timeout)
        else:  # (options in the URL win over keyword arguments)
            check_client_options({**dict(parse_qsl(query)), **redis_options})
            bounded = BOUNDED_REDIS_OPTIONS if timeout is not None else {}
            options = {**DEFAULT_REDIS_OPTIONS, **bounded, **tls, **redis_options}
            store = cls(Redis.from_url(url, **options), config, clock=clock, timeout=timeout)
        store._owns_client = True
        store._where = redact(url)
        return store

    @classmethod
    def from_sentinel(
        cls,
        sentinels: Sequence[tuple[str, int]],
        service_name: str,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        sentinel_kwargs: dict[str, Any] | None = None,
        **redis_options: Any,
    ) -> RedisStore:
        """A store on the primary that ``sentinels`` name for ``service_name``.

        Every connection asks the sentinels for the current primary, and once the store
        is open (``async with``) it listens for the sentinels' ``+switch-master`` and drops
        its connections to a demoted primary at once, so after a failover it follows the
        new primary. Reads go to the primary too (sessions need read-your-writes).
        ``redis_options`` configure the connections to the primary (``password``,
        ``db``...); ``sentinel_kwargs`` those to the sentinels (default: the ``socket_*``
        and TLS (``ssl``, ``ssl_*``) options of ``redis_options``, with connect and read
        timeouts of at most ``SENTINEL_TIMEOUT`` or a quarter of ``timeout``, so a hung
        sentinel costs each lookup that long before the next one is asked).
        """
        if not sentinels:
            raise ValueError("from_sentinel needs at least one (host, port) sentinel")
        options = {**DEFAULT_REDIS_OPTIONS, **redis_options}
        if sentinel_kwargs is None:
            sentinel_kwargs = {
                k: v for k, v in options.items() if k.startswith("socket_") or k in TLS_OPTIONS
            }
            cap = SENTINEL_TIMEOUT if timeout is None else min(SENTINEL_TIMEOUT, timeout / 4)
            for name in ("socket_timeout", "socket_connect_timeout"):
                given = sentinel_kwargs.get(name)
                sentinel_kwargs[name] = cap if given is None else min(float(given), cap)
        sentinel = Sentinel(  # type: ignore[no-untyped-call, unused-ignore]
            list(sentinels), sentinel_kwargs=sentinel_kwargs, **options
        )
        store = cls(sentinel.master_for(service_name), config, clock=clock, timeout=timeout)
        store._owns_client = True
        store._sentinel = sentinel
        store._service = service_name
        hosts = ",".join(f"{host}:{port}" for host, port in sentinels)
        store._where = f"redis+sentinel://{hosts}/{service_name}"
        return store

    @classmethod
    def with_controls(
        cls,
        client: Redis | RedisCluster,
        config: Config | None = None,
        *,
        clock: Clock | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        **options: Any,
    ) -> ControlledStore:
        """A controlled store over ``client``: the seed's ``NewWithControls``
        (``timeout`` as in ``RedisStore(...)``)."""
        store = cls(client, config, clock=clock, timeout=timeout)
        return with_controls(store, config, **options)

    # ------------------------------------------------------------------ keys

    def session_key(self, session_id: str) -> bytes:
        """``{prefix}s:{session_id}`` (ids are validated: [A-Za-z0-9_-] only); on a
        cluster ``{prefix}s:{{tag}}{rest}``, the id's first 4 characters as hash tag."""
        return self._layout.session_key(session_id)

    def index_key(self, site_id: str, user_id: str) -> bytes:
        """``{prefix}u:{len(site)}:{site}:{user}``: injective in (site, user). On a
        cluster ``{prefix}u:{{user_tag}}:{len(site)}:{site}:{user}``: the slot of the
        user's sessions."""
        return self._layout.index_key(site_id, user_id)

    @property
    def expiry_key(self) -> bytes:
        """``{prefix}expiry``: sorted set of session ids by deadline (us), for purging.
        A cluster has one per hash slot: ``expiry_key_for``."""
        if self._layout.cluster:
            raise AttributeError("on Redis Cluster the expiry set is per slot: expiry_key_for(id)")
        return self._layout.expiry_key_for("")

    def expiry_key_for(self, session_id: str) -> bytes:
        """The expiry set ``session_id`` is scheduled in: ``expiry_key`` on one server,
        ``{prefix}x:{{slot tag}}`` (the session's hash slot) on a cluster."""
        return self._layout.expiry_key_for(session_id)

    def _rotated_id(self, session_id: str) -> str:
        return self._layout.rotated_id(session_id)

    # ------------------------------------------------------------ transport

    def _unavailable(self, exc: BaseException) -> StoreUnavailable:
        text = f"{type(exc).__name__}: {exc}"
        if self._password:
            text = text.replace(self._password, "***")
        if len(text) > 300:
            text = text[:300] + "..."
        if isinstance(exc, RuntimeError) and (
            "Event loop is closed" in text or "different loop" in text
        ):  # not an outage: the client's connections belong to another event loop
            text += (
                "; a Redis client is bound to the event loop it first ran on: serve the "
                "app from one loop (in tests, `with TestClient(app) as client:`)"
            )
        error = StoreUnavailable(
            f"Redis at {self._where} is unavailable ({text})",
            details={"backend": "redis", "url": self._where, "error": type(exc).__name__},
        )
        error.__cause__ = exc
        return error

    async def _call(self, *args: Any) -> Any:
        return await self._transport.command(*args)

    def _eval(
        self, script: _Script, keys: Sequence[bytes], args: Sequence[Any]
    ) -> Coroutine[Any, Any, Any]:
        """One script call through the batching transport: ``EVALSHA`` by the script's
        SHA (``NOSCRIPT`` recovered), routed by its first key on a cluster; an error
        reply or a failure is ``StoreUnavailable``. (The transport's coroutine itself,
        no frame of its own: every frame between a request and its reply costs each
        caller's task again at every suspension.)"""
        return self._transport.request((None, ("EVALSHA", script.sha, len(keys), *keys, *args)))

    async def _open(self) -> None:
        """Check the server(s) (Redis >= 7.0 with the commands the scripts use), load
        the scripts (every primary of a cluster), so first calls need no ``NOSCRIPT``
        recovery. Behind Sentinel, start following ``+switch-master``. An open that
        fails leaves no connection of a client the store made open (an app that
        retries its start-up would collect them); the store may be opened again."""
        try:
            await self._check_servers()
        except BaseException:
            if self._owns_client or self._owns_pool:
                with contextlib.suppress(Exception):
                    await self._disconnect()
            raise
        self._sentinel_follow()

    async def _check_servers(self) -> None:
        probe = self.config.key_prefix.encode() + PROBE_KEY
        if self._cluster is None:
            await check_server(self._call, self._where, self._unavailable, probe)
            for script in SCRIPTS:
                await self._call("SCRIPT", "LOAD", script.source)
            await check_scripts(self._call, self._where, self._unavailable, probe)
        else:
            cluster = self._cluster
            await cluster.ready()
            # a probe key in a slot each node serves: a MOVED from a node asked
            # directly makes redis-py < 7.2 mark that slot's own primary a replica
            owned = {node.name: slots[0] for node, slots in cluster.slots_by_primary()}
            for node in cluster.primaries():

                async def on_node(*command: Any, node: ClusterNode = node) -> Any:
                    return await cluster.call(node, *command)

                slot = owned.get(node.name)
                key = None if slot is None else probe + b"{" + slot_tag(slot) + b"}"
                where = f"{self._where} ({node.name})"
                await check_server(on_node, where, self._unavailable, key)
                for script in SCRIPTS:
                    await cluster.call(node, "SCRIPT", "LOAD", script.source)
                if key is not None:
                    await check_scripts(on_node, where, self._unavailable, key)

    async def _disconnect(self) -> None:
        """Close every connection of the client (and of the sentinel clients); each
        pool connects again on its next use."""
        if isinstance(self.client, Redis):
            await self.client.connection_pool.disconnect()
        else:
            await self.client.aclose()
        for client in self._sentinel.sentinels if self._sentinel is not None else ():
            await client.connection_pool.disconnect()

    def _sentinel_follow(self) -> None:
        if self._sentinel is not None and not any(
            t.get_name() == "asyncsession-sentinel" for t in self._tasks
        ):
            follow = asyncio.ensure_future(
                follow_sentinels(self._sentinel, self._service, self._switched)
            )
            follow.set_name("asyncsession-sentinel")
            self._tasks.add(follow)
            follow.add_done_callback(self._tasks.discard)

    async def _switched(self) -> None:
        """A sentinel promoted a new primary: drop every connection (in use or not) to
        the old one; the next request connects to the new primary."""
        assert isinstance(self.client, Redis)
        await self.client.connection_pool.disconnect(inuse_connections=True)

    async def _close(self) -> None:
        if self._finishing:  # a login across cluster slots: let it end whole
            _, late = await asyncio.wait(
                set(self._finishing), timeout=4 * (self.timeout or DEFAULT_TIMEOUT)
            )
            for task in late:  # (a store without timeout, a server that never answers)
                task.cancel()
            if late:
                await asyncio.wait(late)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._transport.aclose()
        if self._owns_pool:  # (also from_url with a retry: the pool is not the client's)
            await self._disconnect()
        elif self._owns_client:
            await self.client.aclose()
        if self._sentinel is not None and self._owns_client:
            for client in self._sentinel.sentinels:
                await client.aclose()

    # ------------------------------------------------------------ reads

    @_guarded
    async def _load(self, session_id: str) -> Session | None:
        """The session stored under ``session_id``, checked to be that key's: a
        record names the id it was written under, field ``h`` the one a rotation
        gave it. A reply that matches neither is read again by a script that names
        its key (``_verify_read``): never another request's session handed over."""
        key = self.session_key(session_id)
        raw = await self._transport.request((key, None))
        try:
            session = self._decode(session_id, raw)
        except codec.CorruptRecord:  # (or another request's reply, a WRONGTYPE put in
            return await self._verify_read(session_id, key)  # its place: looked at again)
        if session is None or session.id == session_id:
            return session
        if raw[3] is None or raw[3].decode("utf-8", "replace") != session_id:
            return await self._verify_read(session_id, key)
        session.id = session_id
        return session

    async def _verify_read(self, session_id: str, key: bytes) -> Session | None:
        reply = await self._eval(VERIFY_READ, (key,), (session_id,))
        if not (
            type(reply) is list
            and len(reply) == 2
            and reply[0] == key
            and type(reply[1]) is list
            and len(reply[1]) == 3
        ):
            # another request's reply on this connection (a server or proxy out of
            # step with redis-py): _guarded closes the connections
            raise UnexpectedReply("a read's reply was for another key: connections reset")
        session = self._decode(session_id, reply[1])
        if session is not None:
            session.id = session_id
        return session

    async def _out_of_step(self) -> None:
        """Close the idle connections of the client's pool (a single server's:
        redis-py opens new ones), so a reply left on one is never read as another
        request's. Connections in use are left to their requests (closing them would
        put their writes in doubt); one out of step meets the checks again."""
        logger.warning(
            "asyncsession: Redis answered with a reply of a shape never asked for, or of "
            "another request (a server or proxy out of step); idle connections are closed"
        )
        pool = getattr(self.client, "connection_pool", None)
        if pool is not None:
            with contextlib.suppress(Exception):
                await pool.disconnect(inuse_connections=False)

    def _decode(self, session_id: str, raw: Raw | Sequence[Any]) -> Session | None:
        """The session in a read's ``raw`` fields, under the id its record names."""
        record, accessed, expires = raw[0], raw[1], raw[2]
        if record is None:
            if accessed is None and expires is None:
                return None
            raise codec.CorruptRecord("session hash has no record")
        if record == b"WRONGTYPE":
            raise codec.CorruptRecord("session key is not a hash")
        try:
            a = int(accessed)  # type: ignore[arg-type]
            e = int(expires) if expires else None
        except (TypeError, ValueError) as exc:
            # (not str(exc): int() quotes the value, which may be any stored bytes, a
            # record with its session id among them; violations log this message)
            raise codec.CorruptRecord(f"bad timestamp field: {type(exc).__name__}") from exc
        return codec.decode(record, a, e)

    async def _missing(
        self, session_id: str, key: str, scope: Config, now: datetime, plain: bool
    ) -> Miss:
        """One script for a lookup that found nothing: whether a record is stored
        under the plain id, and the rotation record (an unknown or stale cookie costs
        two round trips, not three: outside review)."""
        if not (plain and (scope.rotation_grace or scope.logout_grace)):
            return await super()._missing(session_id, key, scope, now, plain)
        return await self._missing_read(session_id, key, scope, now)

    @_guarded
    async def _missing_read(self, session_id: str, key: str, scope: Config, now: datetime) -> Miss:
        keys = (
            self.session_key(session_id),
            self.session_key(key),
            rotation.rotation_key(self, key),
        )
        found = await self._eval(ADOPT_READ, keys, ())
        if int(found[0]):  # stored under the plain id: move it
            return Miss.MOVED if await self._adopt(session_id, key, found) else Miss.UNKNOWN
        if int(found[1]):  # moved meanwhile by a concurrent adopt
            return Miss.MOVED
        return rotation.kind(found[2] if len(found) > 2 else None, scope, now)

    @_guarded
    async def _adopt(self, session_id: str, handle: str, found: Any = None) -> bool:
        """Move a session stored under the plain ``session_id`` (the layout before
        ``Config.hash_ids``) to ``handle``. One read-only script says whether there is
        one (when there is not: that is all); the record is rebuilt here with the
        handle as its own id; one script then checks the plain key still holds what
        was read and moves it: the hash (every field, its native expiry), its
        user-index member (same score) and expiry-set member. Concurrent calls for one
        id: one moves, the others find the handle's key and answer True too. On a
        cluster the handle keeps the id's first 4 characters: every key in one slot."""
        okey, hkey = self.session_key(session_id), self.session_key(handle)
        for _ in range(ADOPT_ATTEMPTS):
            if found is None:  # (else: the first read, done by the caller)
                found = await self._eval(ADOPT_READ, (okey, hkey), ())
            if not int(found[0]):
                return bool(int(found[1]))
            record, ikey = bytes(found[1]), bytes(found[2])
            keys = [okey, hkey, self.expiry_key_for(session_id)]
            if ikey and self._layout.same_slot(ikey, okey):  # (else a damaged 'i')
                keys.append(ikey)
            digest = hashlib.sha1(record).hexdigest()  # (a change check)
            args = (session_id, handle, digest, _rehome(record, handle), ikey)
            reply = await self._eval(ADOPT, keys, args)
            if reply != b"changed":
                return reply in (b"moved", b"found")
            found = None
        raise RuntimeError(
            f"session {short_hash(session_id)} stored under its plain id kept changing "
            f"while it was moved to its handle ({ADOPT_ATTEMPTS} reads)"
        )

    @_guarded
    async def _list_by_user(self, user_id: str, scope: Config, now: datetime) -> list[Session]:
        """The user's index ``USER_BATCH`` members per script call (stale members
        leave the index as they are met)."""
        ikey = self.index_key(scope.site_id, user_id)
        sessions = []
        start = 0
        while start >= 0:
            flat = await self._eval(LIST, (ikey,), (self._sprefix, start, USER_BATCH))
            if type(flat) is not list or len(flat) < 2 or flat[1] != ikey:
                raise UnexpectedReply("a listing's reply was for another index")
            start = int(flat[0])
            for j in range(2, len(flat), 4):
                session_id = flat[j].decode()
                try:
                    session = self._decode(session_id, (flat[j + 1], flat[j + 2], flat[j + 3]))
                except codec.CorruptRecord as exc:  # invisible, as to get()
                    logger.warning(
                        "asyncsession: skipped a stored record that is not a valid session: %s",
                        exc,
                        extra={"backend": "redis", "session": short_hash(session_id)},
                    )
                    continue
                if session is None or session.site_id != scope.site_id:
                    continue
                if session.user_id != user_id:  # (the script reads this user's index
                    raise UnexpectedReply("a listing's reply was for another user")  # only)
                session.id = session_id
                if session.expires_at is None or now < session.expires_at:
                    sessions.append(session)
        sessions.sort(key=lambda s: s.created_at)
        return sessions

    # ------------------------------------------------------------ writes

    def _px(self, expires_at: datetime | None) -> int | bytes:
        """Native expiry (ms since the epoch) for a deadline: rounded up, plus the grace."""
        if expires_at is None:
            return b""
        return -(-codec.to_us(expires_at) // 1000) + self.expiry_grace_ms

    def _times(self, session: Session, now: datetime) -> tuple[int | bytes, ...]:
        """The scripts' time arguments of a write: created, accessed, expires,
        absolute deadline, native expiry (ms), now (us; b'' = never)."""
        return (
            codec.to_us(session.created_at),
            codec.to_us(session.last_accessed_at),
            _us(session.expires_at),
            _us(absolute_deadline(session)),
            self._px(session.expires_at),
            codec.to_us(now),
        )

    def _trim_cutoff(self, now: datetime) -> int:
        """Writes drop a few expiry entries due before this (us) whose session key is
        gone: past the deadline plus the grace, Redis's own expiry has dropped it."""
        return codec.to_us(now) - self.expiry_grace_ms * 1000

    def _insert_args(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> tuple[Any, ...]:
        """The insert script's ARGV (also the tail of ``rotate_into``'s): the record,
        the key prefix, then site, version, created, accessed, expires, absolute, px,
        now, limit, eviction, id, trim cutoff and trim count in one argument, each
        followed by ``,`` (none of them can hold one; ``''`` = never): redis-py encodes
        three arguments instead of fifteen, and ``insert.lua`` splits them again.

        The trim count: one insert in ``TRIM_EVERY`` (a store's first, fifth, ...)
        drops up to ``2 * TRIM_EVERY`` expiry entries whose key is gone, the others
        none, so the common anonymous create runs ``insert_first.lua`` (five
        commands, no trim) and the expiry set still loses two entries per insert on
        average."""
        us = codec.to_us
        created, accessed = session.created_at, session.last_accessed_at
        c = us(created)
        a = c if accessed is created else us(accessed)  # (a new session: one object)
        e, x = session.expires_at, absolute_deadline(session)
        expires = px = absolute = ""
        if e is not None:
            e_us = us(e)
            expires = str(e_us)
            px = str(-(-e_us // 1000) + self.expiry_grace_ms)  # as _px
        if x is not None:
            absolute = expires if x is e else str(us(x))
        n = us(now)
        count = self._inserts  # the first insert of a store trims (a short-lived one too)
        self._inserts = (count + 1) % TRIM_EVERY
        return (
            record,
            self._sprefix,
            (
                f"{scope.site_id},{session.version},{c},{a},{expires},{absolute},{px},{n},"
                f"{scope.max_sessions_per_user},{scope.eviction},{session.id},"
                f"{n - self.expiry_grace_ms * 1000},{0 if count else 2 * TRIM_EVERY},"
            ).encode(),
        )

    @_guarded
    async def _insert(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> InsertResult:
        self._check_user_tag(session)
        user = session.user_id
        keys = [self.session_key(session.id), self.expiry_key_for(session.id)]
        if user is not None:
            keys.append(self.index_key(scope.site_id, user))
        reply = await self._eval(INSERT, keys, self._insert_args(session, record, scope, now))
        result = self._inserted(reply, scope)
        if result is None:
            raise UnexpectedReply(f"unexpected {reply_shape(reply)} reply to insert")
        return result

    @staticmethod
    def _inserted(reply: Any, scope: Config) -> InsertResult | None:
        """The result of an insert script's reply (also the tail of ``rotate_into``'s):
        ``exists`` and ``limit`` raised, ``ok`` with its evicted ids; None for any other tag."""
        tag = reply[0]
        if tag == b"exists":
            raise InvalidSession("a session with this id already exists")
        if tag == b"limit":
            limit = scope.max_sessions_per_user
            raise SessionLimitExceeded(
                f"user already has {reply[1]} sessions (limit {limit})",
                details={"limit": limit, "count": int(reply[1])},
            )
        if tag != b"ok":
            return None
        if len(reply) == 1:
            return NO_EVICTIONS
        return InsertResult([victim.decode() for victim in reply[1:]])

    def _check_user_tag(self, session: Session) -> None:
        """On a cluster a user session's id must carry its user's tag (its slot)."""
        user = session.user_id
        if self._layout.cluster and user is not None and session.id[:TAG_LENGTH] != user_tag(user):
            raise InvalidSession(
                "on Redis Cluster a user session's id must start with its user's tag (the "
                "hash slot of the user's index): mint it with new_session(user_id, ...) or "
                "generate_session_id(user_id)",
                details={"user_tag": user_tag(user)},
            )

    @_guarded
    async def _replace(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        user = session.user_id
        ikey = b"" if user is None else self.index_key(scope.site_id, user)
        keys = [self.session_key(session.id), self.expiry_key_for(session.id)]
        if ikey and (not self._layout.cluster or session.id[:TAG_LENGTH] == user_tag(user)):
            # declared (the script compares it with the hash's own 'i' first); a user
            # changed on a cluster is in another slot, refused before it is touched
            keys.append(ikey)
        reply = await self._eval(
            REPLACE,
            keys,
            (
                record,
                scope.site_id,
                ikey,
                session.version - 1,
                session.version,
                *self._times(session, now),
                session.id,
                scope.max_sessions_per_user,
                self._sprefix,
                self._trim_cutoff(now),
            ),
        )
        return _OUTCOMES[reply]

    @_guarded
    async def _reseal_write(
        self, session: Session, record: bytes, scope: Config, now: datetime
    ) -> Outcome:
        reply = await self._eval(
            RESEAL,
            (self.session_key(session.id),),
            (record, scope.site_id, session.version - 1, session.version, codec.to_us(now)),
        )
        return _OUTCOMES[reply]

    @_guarded
    async def _touch(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        idle = scope.idle_timeout
        reply = await self._eval(
            TOUCH,
            (self.session_key(session_id), self.expiry_key_for(session_id)),
            (
                scope.site_id,
                codec.to_us(now),
                b"" if idle is None else codec.to_us(now + idle),
                self.expiry_grace_ms,
                session_id,
                self._sprefix,
            ),
        )
        return _OUTCOMES[reply]

    @_guarded
    async def _apply(
        self,
        session_id: str,
        changes: EncodedChanges,
        scope: Config,
        now: datetime,
        limit: int,
        base: Session | None = None,
    ) -> Applied | Outcome:
        """One script edits the record in place (see ``apply.py``)."""
        keys = (self.session_key(session_id), self.expiry_key_for(session_id))
        args = apply_args(session_id, changes, scope, now, limit, self.expiry_grace_ms, base)
        return parse_reply(await self._eval(APPLY, keys, args), now, keys[0])

    @_guarded
    async def _rotate(self, session_id: str, new_id: str, scope: Config, now: datetime) -> Outcome:
        return await rotation.rotate(self, session_id, new_id, scope, now)

    @_guarded
    async def _recorded(self, session_id: str, scope: Config, now: datetime) -> Miss:
        return await rotation.recorded(self, session_id, scope, now)

    @_guarded
    async def _rotate_into(
        self,
        session_id: str,
        version: int | None,
        session: Session,
        record: bytes,
        scope: Config,
        now: datetime,
    ) -> InsertResult | Outcome:
        return await rotation.rotate_into(self, session_id, version, session, record, scope, now)

    @_guarded
    async def _delete(self, session_id: str, scope: Config) -> Outcome:
        reply = await self._eval(
            DELETE,
            (self.session_key(session_id), self.expiry_key_for(session_id)),
            (scope.site_id, session_id),
        )
        return _OUTCOMES[reply]

    async def _end(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        try:
            return await self._end_once(session_id, scope, now)
        except StoreUnavailable:
            if not self._layout.cluster:
                raise
            # a slot being migrated answers TRYAGAIN to a script declaring a key not
            # moved yet (the record's, which does not exist): the logout matters more
            # than its record (review: 503 for every logout in the slot meanwhile)
            return await self._delete(session_id, scope)

    @_guarded
    async def _end_once(self, session_id: str, scope: Config, now: datetime) -> Outcome:
        return await rotation.end(self, session_id, scope, now)

    @_guarded
    async def _delete_by_user(
        self,
        user_id: str,
        keep: str | None,
        scope: Config,
        now: datetime,
        only: str | None = None,
    ) -> list[str]:
        """``USER_BATCH`` sessions per script call, from the front of the index, until
        the index holds nothing but ``keep``; each call first checks that ``keep`` is
        still in the index (a login takes it out), and stops if not. With ``only``:
        one call, for that session alone."""
        keys = (self.index_key(scope.site_id, user_id), self._layout.user_expiry_key(user_id))
        args: tuple[Any, ...] = (
            keep or b"",
            codec.to_us(now),
            self._sprefix,
            scope.site_id,
            USER_BATCH,
            only or b"",
        )
        deleted: list[str] = []
        while True:
            reply = await self._eval(DELETE_BY_USER, keys, args)
            if int(reply[0]) < 0:  # keep is gone: stop, with what the batches before deleted
                return KeepGone(deleted)
            deleted += [session_id.decode() for session_id in reply[1:]]
            if not int(reply[0]):
                return deleted

    async def _purge(self, now: datetime) -> int:
        """Remove expired sessions ``PURGE_BATCH`` at a time (each batch one script call).
        On a cluster every slot's expiry set, on every primary, batched per node."""
        return len(await self._purge_sessions(now, report=False))

    async def _purge_report(self, now: datetime) -> list[PurgedSession]:
        """``_purge`` that also returns what it removed (for ``expired`` events)."""
        return await self._purge_sessions(now, report=True)

    @_guarded
    async def _purge_sessions(self, now: datetime, *, report: bool) -> list[PurgedSession]:
        removed: list[PurgedSession] = []
        unnamed = PurgedSession("", None, "")  # counted, not reported

        def collect(rows: list[Any], count: int) -> None:
            if not report:
                removed.extend([unnamed] * count)
                return
            for j in range(0, len(rows), 3):
                session_id, site, ikey = rows[j].decode(), rows[j + 1].decode(), rows[j + 2]
                user = self._layout.user_of(ikey) if ikey else None
                removed.append(PurgedSession(site, user, session_id))

        flag = b"1" if report else b""
        cutoff = codec.to_us(now)
        if self._cluster is not None:
            await self._cluster.purge((cutoff, PURGE_BATCH, self._sprefix, flag), collect)
            return removed
        while True:
            reply = await self._eval(
                PURGE, (self.expiry_key,), (cutoff, PURGE_BATCH, self._sprefix, flag)
            )
            count, seen = leading_ints(reply, 2, "purge")
            collect(list(reply[2:]), count)
            if seen < PURGE_BATCH:
                return removed

    def _entry(self, session_id: str, site: bytes, ikey: bytes, expires: bytes, size: Any) -> Any:
        """A ``ScanEntry`` from a session's stored fields."""
        return ScanEntry(
            site.decode(),
            self._layout.user_of(ikey) if ikey else None,
            session_id,
            int(size),
            codec.from_us(int(expires)) if expires else None,
        )

    async def _scan(self, batch: int) -> AsyncIterator[Sequence[ScanEntry]]:
        """``SCAN`` over the session keys with ``COUNT batch`` (never ``KEYS``), then
        the fields of each batch (one server: short scripts of ``SCAN_KEYS`` keys
        each; a cluster: per key), sharing a round trip. ``size`` is the stored
        record (data plus its metadata header). On a cluster: each primary in turn."""
        pattern = _glob_escape(self._sprefix) + b"*"
        try:
            if self._cluster is None:
                cursor = 0
                while True:
                    cursor, keys = await self._call(
                        "SCAN", cursor, "MATCH", pattern, "COUNT", batch
                    )
                    yield await self._scan_rows(keys)
                    if int(cursor) == 0:
                        return
            cluster = self._cluster
            await cluster.ready()
            for node in cluster.primaries():
                cursor = 0
                while True:
                    cursor, keys = await cluster.scan(node, cursor, pattern, batch)
                    yield await self._scan_rows(keys)
                    if cursor == 0:
                        break
        except (SessionError, codec.CorruptRecord):
            raise
        except Exception as exc:
            raise self._unavailable(exc) from exc

    async def _scan_rows(self, keys: list[bytes]) -> list[ScanEntry]:
        """The entries of one ``SCAN`` batch (keys that are not sessions skipped)."""
        pairs = [(key, sid) for key in keys if (sid := self._layout.id_of(key)) is not None]
        if not pairs:
            return []
        if self._cluster is None:
            chunks = [pairs[i : i + SCAN_KEYS] for i in range(0, len(pairs), SCAN_KEYS)]
            replies = await asyncio.gather(
                *(self._eval(SCAN, [key for key, _ in chunk], ()) for chunk in chunks)
            )
            rows = [row for reply in replies for row in reply]
        else:
            got = await asyncio.gather(
                *(
                    asyncio.gather(
                        self._call("HMGET", key, "s", "i", "e"), self._call("HSTRLEN", key, "r")
                    )
                    for key, _ in pairs
                )
            )
            # (a session of the default site has site b"": present, so kept)
            rows = [[*fields, size] if fields[0] is not None else None for fields, size in got]
        return [
            self._entry(sid, row[0], row[1] or b"", row[2] or b"", row[3])
            for (_, sid), row in zip(pairs, rows, strict=True)
            if row
        ]

    @_guarded
    async def _scan_estimate(self) -> int | None:
        """Sessions with a deadline (the expiry set); sessions that never expire are not
        counted, so this can be low. On a cluster: the sum over every slot's set."""
        if self._cluster is None:
            return int(await self._call("ZCARD", self.expiry_key))
        return await self._cluster.count()
