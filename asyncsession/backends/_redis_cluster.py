"""Redis Cluster and Sentinel plumbing for ``RedisStore`` (internal to ``redis.py``).

``ClusterRouter`` sends one batch of commands over a cluster: each command to the
primary serving its key's hash slot, one pipeline per primary, all primaries at once.
It handles what a cluster answers while it changes shape, without ever running a
command twice: ``MOVED`` (the slot has a new owner: update the slot map, resend),
``ASK`` (a key being migrated: a plain read follows it with ``ASKING``; a script,
which may touch other keys of the slot, waits like ``TRYAGAIN``), ``TRYAGAIN`` (the
keys of a slot are split by a migration: wait and resend, within ``retry_for``
seconds), ``NOSCRIPT`` (resend to that node as ``EVAL`` with the source). Each of
those replies means the command did not run. A connection failure or ``CLUSTERDOWN`` is
``StoreUnavailable`` (a write that may have run is never resent) and the slot map is
reloaded in the background.

``slot_tag`` gives, for each of the 16384 slots, a short hash tag that lands in it:
the per-slot expiry sets are named with it. Sentinel and cluster URL parsing live
here too, and ``follow_sentinels``, which tells a store behind Sentinel the moment a
sentinel promotes a new primary.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool
from redis.asyncio.sentinel import Sentinel
from redis.crc import key_slot
from redis.exceptions import (
    AskError,
    ClusterDownError,
    MovedError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from ..errors import StoreUnavailable

logger = logging.getLogger("asyncsession")

SLOTS = 16384
TAG_LENGTH = 4
"""A session id's first characters, the hash tag that places it (``session.user_tag``)."""

_slot_tags: list[bytes] = []


def id_slot(session_id: str) -> int:
    """The hash slot of a session: CRC16 of the id's first ``TAG_LENGTH`` characters."""
    return binascii.crc_hqx(session_id[:TAG_LENGTH].encode(), 0) & (SLOTS - 1)


def slot_tag(slot: int) -> bytes:
    """The shortest decimal string whose CRC16 lands in ``slot`` (table built once)."""
    if not _slot_tags:
        table: list[bytes | None] = [None] * SLOTS
        left, n, crc = SLOTS, 0, binascii.crc_hqx
        while left:
            candidate = b"%d" % n
            s = crc(candidate, 0) & (SLOTS - 1)
            if table[s] is None:
                table[s] = candidate
                left -= 1
            n += 1
        _slot_tags.extend(t for t in table if t is not None)
    return _slot_tags[slot]


def command_slot(command: tuple[Any, ...]) -> int:
    """The slot a batched command goes to: its first key (``EVALSHA sha n key...``)."""
    name = command[0]
    key = command[3] if name == "EVALSHA" else command[1]
    return key_slot(key)


class ClusterRouter:
    """Routes batches of commands to the primaries of a ``RedisCluster`` client."""

    retry_for: float = 3.0
    """Seconds a command may wait out a slot migration before ``StoreUnavailable``."""

    def __init__(
        self,
        client: RedisCluster,
        scripts: Mapping[str, bytes],
        unavailable: Callable[[BaseException], StoreUnavailable],
        *,
        timeout: float | None,
        pack: Callable[[list[tuple[Any, ...]]], bytes] | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self._pack = pack
        self._scripts = scripts
        self._unavailable = unavailable
        self._ready = False
        self._refresh: asyncio.Task[None] | None = None

    @property
    def nodes(self) -> Any:
        return self.client.nodes_manager

    async def ready(self) -> None:
        """Load the slot map if it was never loaded."""
        if not self._ready:
            await self.initialize()

    def _refresh_soon(self) -> None:
        """Reload the slot map in the background (one reload at a time) after a node
        failed: requests meanwhile use the map they have (a ``MOVED`` corrects any slot
        it got wrong), so a hung node never holds up the healthy ones."""
        if self._refresh is None or self._refresh.done():
            self._refresh = asyncio.ensure_future(self._background_refresh())

    async def _background_refresh(self) -> None:
        for attempt in range(3):  # each attempt asks the startup nodes in a new order
            try:
                await self.initialize()
                return
            except StoreUnavailable as exc:
                logger.debug("asyncsession: cluster slot map reload failed: %s", exc)
                await asyncio.sleep(0.1 * (attempt + 1))

    async def aclose(self) -> None:
        """Stop a background reload (the store closes the client)."""
        task, self._refresh = self._refresh, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def initialize(self) -> None:
        """Learn the slot map (``CLUSTER SLOTS``); ``StoreUnavailable`` if no node answers."""
        try:
            async with asyncio.timeout(self.timeout):
                if self._ready:
                    await self.nodes.initialize()
                else:
                    await self.client.initialize()
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            raise self._unavailable(exc) from exc
        self._ready = True

    def primaries(self) -> list[ClusterNode]:
        """The primaries, each once, as the slot map names them."""
        seen: dict[str, ClusterNode] = {}
        for owners in self.nodes.slots_cache.values():
            if owners:
                seen.setdefault(owners[0].name, owners[0])
        return list(seen.values())

    def slots_by_primary(self) -> dict[ClusterNode, list[int]]:
        out: dict[ClusterNode, list[int]] = {}
        for slot, owners in sorted(self.nodes.slots_cache.items()):
            if owners:
                out.setdefault(owners[0], []).append(slot)
        return out

    async def exchange(self, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands``, each to its slot's primary; replies in order.

        A reply is the command's value, its own error reply (a ``ResponseError``), or a
        ``StoreUnavailable`` when its node could not be reached or the cluster could
        not place it in time.
        """
        replies: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        asking: dict[int, ClusterNode] = {}
        deadline = time.monotonic() + self.retry_for
        delay = 0.005
        rounds = 0
        while pending:
            rounds += 1
            if not self._ready:
                try:
                    await self.initialize()
                except StoreUnavailable as exc:
                    for i in pending:
                        replies[i] = exc
                    return replies
            groups: dict[ClusterNode, list[int]] = {}
            for i in pending:
                node = asking.get(i)
                if node is None:
                    try:
                        node = self.nodes.get_node_from_slot(command_slot(commands[i]))
                    except RedisClusterException as exc:
                        replies[i] = self._unavailable(exc)
                        continue
                groups.setdefault(node, []).append(i)
            if len(groups) == 1:
                ((node, group),) = groups.items()
                sent = [await self._send(node, commands, group, asking)]
            else:
                sent = await asyncio.gather(
                    *(self._send(node, commands, group, asking) for node, group in groups.items())
                )
            retry: list[int] = []
            wait = False
            asking = {}
            for group, answer in zip(groups.values(), sent, strict=True):
                if isinstance(answer, StoreUnavailable):
                    self._refresh_soon()
                    for i in group:
                        replies[i] = answer
                    continue
                for i, reply in zip(group, answer, strict=True):
                    if isinstance(reply, MovedError):
                        await self._moved(reply)
                        retry.append(i)
                    elif isinstance(reply, AskError):
                        if commands[i][0] == "EVALSHA":
                            wait = True  # a script may read keys still on the source
                        else:
                            asking[i] = await self._node(reply.host, reply.port)
                        retry.append(i)
                    elif isinstance(reply, TryAgainError):
                        wait = True
                        retry.append(i)
                    elif isinstance(reply, ClusterDownError):
                        self._refresh_soon()
                        replies[i] = self._unavailable(reply)
                    else:
                        replies[i] = reply
            if retry and time.monotonic() >= deadline:
                for i in retry:
                    replies[i] = self._unavailable(
                        TryAgainError(
                            f"slot {command_slot(commands[i])} did not settle within "
                            f"{self.retry_for:g} s (resharding or failover in progress)"
                        )
                    )
                return replies
            if wait or rounds > 2:  # never a tight loop of redirects
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
            pending = retry
        return replies

    async def _moved(self, error: MovedError) -> None:
        try:
            await self.nodes.move_slot(error)
        except Exception:  # an odd address: let a full refresh sort it out
            self._refresh_soon()

    async def _node(self, host: str, port: int) -> ClusterNode:
        """The node an ``ASK`` names (one the slot map does not list yet is added)."""
        node: ClusterNode | None = self.nodes.get_node(host=host, port=port)
        if node is None:
            node = ClusterNode(host, port, "primary", **self.nodes.connection_kwargs)
            self.nodes.set_nodes(self.nodes.nodes_cache, {node.name: node})
        return node

    async def _send(
        self,
        node: ClusterNode,
        commands: Sequence[tuple[Any, ...]],
        group: list[int],
        asking: Mapping[int, ClusterNode],
    ) -> list[Any] | StoreUnavailable:
        """One pipeline to ``node``; ``NOSCRIPT`` replies are resent there as ``EVAL``."""
        wire: list[tuple[Any, ...]] = []
        for i in group:
            if i in asking:
                wire.append(("ASKING",))
            wire.append(commands[i])
        try:
            raw = await self.on_node(node, wire)
            missing = [j for j, reply in enumerate(raw) if isinstance(reply, NoScriptError)]
            if missing:  # did not run: resend as EVAL with the source (caches it again)
                again = await self.on_node(
                    node, [("EVAL", self._scripts[wire[j][1]], *wire[j][2:]) for j in missing]
                )
                for j, reply in zip(missing, again, strict=True):
                    raw[j] = reply
        except StoreUnavailable as exc:
            return exc
        out: list[Any] = []
        position = 0
        for i in group:
            if i in asking:
                position += 1  # the ASKING reply
            out.append(raw[position])
            position += 1
        return out

    async def call(self, node: ClusterNode, command: tuple[Any, ...]) -> Any:
        """One command on ``node`` (``NOSCRIPT`` recovered); its reply or error reply."""
        answer = await self._send(node, [command], [0], {})
        if isinstance(answer, StoreUnavailable):
            raise answer
        return answer[0]

    async def on_node(self, node: ClusterNode, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Write ``commands`` to ``node`` at once and read every reply (error replies in
        place); a transport failure is ``StoreUnavailable``."""
        try:
            conn = node.acquire_connection()
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        try:
            async with asyncio.timeout(self.timeout):
                wire = conn.pack_commands(commands) if self._pack is None else self._pack(commands)
                return await send_and_read(conn, wire, len(commands))
        except (RedisError, OSError, TimeoutError) as exc:
            await conn.disconnect()  # replies may be pending: never reuse it
            self._refresh_soon()
            raise self._unavailable(exc) from exc
        except BaseException:
            await conn.disconnect()
            raise
        finally:
            node.release(conn)


async def send_and_read(conn: Any, wire: bytes | list[bytes], count: int) -> list[Any]:
    """Write ``wire`` (``count`` commands) on ``conn`` at once and read every reply,
    error replies in place; transport failures raise."""
    await conn.send_packed_command(wire, check_health=False)
    replies: list[Any] = []
    for _ in range(count):
        try:
            replies.append(await conn.read_response(disable_decoding=True))
        except ResponseError as exc:
            replies.append(exc)
    return replies


# ----------------------------------------------------------------------- Sentinel


async def follow_sentinels(
    sentinel: Sentinel, service: str, switched: Callable[[], Awaitable[None]]
) -> None:
    """Until cancelled: await ``switched()`` whenever a sentinel publishes
    ``+switch-master`` for ``service`` (and after reconnecting to a sentinel, since an
    announcement may have been missed meanwhile)."""
    await asyncio.gather(*(_follow(client, service, switched) for client in sentinel.sentinels))


async def _follow(client: Redis, service: str, switched: Callable[[], Awaitable[None]]) -> None:
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "socket_timeout": None}  # a quiet channel is fine
    listener = Redis(
        connection_pool=ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )
    name = service.encode()
    missed = False
    try:
        while True:
            pubsub = listener.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                if missed:
                    await switched()
                async for message in pubsub.listen():
                    data = message.get("data")
                    ours = isinstance(data, bytes) and data.split(b" ", 1)[0] == name
                    if message.get("type") == "message" and ours:
                        await switched()
            except (RedisError, OSError) as exc:
                logger.debug("asyncsession: sentinel subscription lost (%s); retrying", exc)
                missed = True
                await asyncio.sleep(0.5)
            finally:
                await pubsub.aclose()  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        await listener.aclose()


# --------------------------------------------------------------------------- URLs


def _hosts(netloc: str, default_port: int) -> list[tuple[str, int]]:
    out = []
    for part in netloc.rsplit("@", 1)[-1].split(","):
        part = part.strip()
        if not part:
            continue
        if part.startswith("["):  # [ipv6]:port
            host, _, rest = part[1:].partition("]")
            port = rest.lstrip(":")
        else:
            host, _, port = part.rpartition(":") if ":" in part else (part, "", "")
        out.append((unquote(host) or "localhost", int(port) if port else default_port))
    if not out:
        raise ValueError("the URL names no host")
    return out


def _credentials(netloc: str) -> dict[str, Any]:
    if "@" not in netloc:
        return {}
    userinfo = netloc.rsplit("@", 1)[0]
    user, sep, password = userinfo.partition(":")
    out: dict[str, Any] = {}
    if sep:
        out["password"] = unquote(password)
        if user:
            out["username"] = unquote(user)
    elif user:
        out["password"] = unquote(user)  # redis://secret@host
    return out


_NUMBER_OPTIONS = ("socket_timeout", "socket_connect_timeout", "health_check_interval")
_INT_OPTIONS = ("max_connections", "db")


def _options(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query):
        if key in _NUMBER_OPTIONS:
            out[key] = float(value)
        elif key in _INT_OPTIONS:
            out[key] = int(value)
        elif key == "ssl":
            out[key] = value.lower() in ("1", "true", "yes", "on")
        else:
            raise ValueError(f"unsupported URL option {key!r}")
    return out


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[[user]:password@]host:port[,host:port...][/][?option=value]``:
    the startup nodes and the client options (password, timeouts, ``ssl``)."""
    parts = urlsplit(url)
    if parts.path not in ("", "/"):
        raise ValueError("Redis Cluster has one database: no /db in a redis+cluster:// URL")
    return _hosts(parts.netloc, 6379), {**_credentials(parts.netloc), **_options(parts.query)}


def parse_sentinel_url(url: str) -> tuple[list[tuple[str, int]], str, dict[str, Any]]:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?...]``:
    the sentinels, the service name, and the options for the primary's connections
    (the password is the primary's; ``sentinel_password`` in ``from_sentinel``)."""
    parts = urlsplit(url)
    path = [unquote(p) for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("a redis+sentinel:// URL needs the service name: .../service_name")
    if len(path) > 2:
        raise ValueError("a redis+sentinel:// URL path is /service_name[/db]")
    options = {**_credentials(parts.netloc), **_options(parts.query)}
    if len(path) == 2:
        options["db"] = int(path[1])
    return _hosts(parts.netloc, 26379), path[0], options
