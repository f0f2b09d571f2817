"""The check at open: a server the scripts can run on, or a clear error naming why."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import ResponseError

from ...errors import StoreUnavailable
from .scripts import PROBE_SCRIPT
from .transport import wrong_type

MIN_VERSION = (7, 0)
"""The scripts use ``PEXPIRETIME``, ``PEXPIREAT ... GT`` and ``ZMSCORE`` (Redis 7.0)."""

PROBE_KEY = b"s:!probe"
"""The probes' key after the store's ``key_prefix`` (so an ACL user limited to the
prefix may run them), in the sessions' namespace under a name no id takes (ids are
``[A-Za-z0-9_-]``); a node of a cluster gets it with a hash tag of a slot it serves."""

MIN_CLUSTER_CLIENT = (7, 2)
"""redis-py for Redis Cluster: before 7.2 a MOVED that names the node it was sent to
demotes that node to a replica in the slot map (one primary then goes unscanned),
and a dead node's retry closes every node's connections mid-read (requests to the
healthy nodes fail too). Single servers and Sentinel work from 5.0.2."""


def cluster_client_problem(version: str) -> str | None:
    """Why redis-py ``version`` cannot run the store on Redis Cluster, or None."""
    release = tuple(int(part) for part in re.findall(r"\d+", version)[:2])
    if release >= MIN_CLUSTER_CLIENT:
        return None
    needed = ".".join(map(str, MIN_CLUSTER_CLIENT))
    return (
        f"Redis Cluster needs redis-py {needed} or newer (installed: {version}); older "
        "releases mistake a redirection for a failover and let one dead node fail "
        f"requests to the others: pip install 'redis[hiredis]>={needed}'"
    )


PROBES: tuple[tuple[Any, ...], ...] = (
    ("PEXPIRETIME",),
    ("PEXPIREAT", 1, "GT"),
    ("ZMSCORE", "x"),
)
"""Commands (on a key that does not exist: no effect) the scripts need beyond 6.2's."""


def server_version(info: Any) -> tuple[str, str]:
    """``(product, version)`` from an ``INFO server`` reply (parsed or raw)."""
    if isinstance(info, bytes):
        fields = dict(
            line.split(":", 1) for line in info.decode(errors="replace").splitlines() if ":" in line
        )
    elif isinstance(info, dict):
        if len(info) == 1 and isinstance(next(iter(info.values())), dict):
            (info,) = info.values()  # a cluster client's reply, keyed by node
        fields = {str(k): str(v) for k, v in info.items()}
    else:
        raise ValueError(f"unexpected INFO reply: {info!r:.60}")
    for product in ("valkey", "dragonfly"):
        if f"{product}_version" in fields:
            return product.capitalize(), fields[f"{product}_version"].strip()
    return "Redis", fields.get("redis_version", "unknown").strip()


def _numbers(version: str) -> tuple[int, ...]:
    out = []
    for part in version.split(".")[:2]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


async def check_server(
    call: Callable[..., Awaitable[Any]],
    where: str,
    unavailable: Callable[[BaseException], StoreUnavailable],
    key: bytes | None,
) -> None:
    """``StoreUnavailable`` naming the version if the server behind ``call`` reports a
    Redis older than 7.0 or refuses a command the scripts need.

    A server that refuses ``INFO`` itself (an ACL user without ``+info``, a
    Redis-protocol server without it) has its version unknown: the probes alone
    decide (they run the commands Redis 7.0 added)."""
    try:
        info = await call("INFO", "server")
    except StoreUnavailable as exc:
        if not isinstance(exc.__cause__, ResponseError):
            raise  # the server is down, not refusing
        if "DB index" in str(exc.__cause__):  # SELECT on connect: not INFO's fault
            raise unavailable(
                RuntimeError(
                    f"the server at {where} has no such database ({exc.__cause__}): Redis "
                    "has databases 0 to 15 unless its 'databases' setting says more"
                )
            ) from exc.__cause__
        product, version = "A server", "(version unknown: INFO refused)"
    else:
        try:
            product, version = server_version(info)
        except ValueError as exc:
            raise unavailable(exc) from exc
    if product == "Redis" and _numbers(version) < MIN_VERSION:
        raise unavailable(
            RuntimeError(
                f"Redis {version} at {where} is too old: asyncsession needs Redis >= 7.0 "
                "(its scripts use PEXPIRETIME, PEXPIREAT ... GT and ZMSCORE)"
            )
        )
    for name, *rest in PROBES if key is not None else ():
        await _probe(call, where, unavailable, f"{product} {version}", name, key, *rest)


async def check_scripts(
    call: Callable[..., Awaitable[Any]],
    where: str,
    unavailable: Callable[[BaseException], StoreUnavailable],
    key: bytes,
) -> None:
    """``StoreUnavailable`` if the server, its scripts loaded, refuses to run one (an
    ACL user without ``+evalsha``): at open, not on every call after it."""
    await _probe(call, where, unavailable, "The server", "EVALSHA", PROBE_SCRIPT.sha, 1, key)


async def _probe(
    call: Callable[..., Awaitable[Any]],
    where: str,
    unavailable: Callable[[BaseException], StoreUnavailable],
    server: str,
    *probe: Any,
) -> None:
    try:
        await call(*probe)
    except StoreUnavailable as exc:
        if wrong_type(exc):
            return  # the command exists: an app's own key of that name is no sorted set
        cause = exc.__cause__
        raise unavailable(
            RuntimeError(
                f"{server} at {where} cannot run asyncsession's scripts: "
                f"{probe[0]} failed ({cause})"
            )
        ) from cause
