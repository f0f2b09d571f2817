"""The check at open: a server the scripts can run on, or a clear error naming why."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from ...errors import StoreUnavailable

MIN_VERSION = (7, 0)
"""The scripts use ``PEXPIRETIME``, ``PEXPIREAT ... GT`` and ``ZMSCORE`` (Redis 7.0)."""

PROBES: tuple[tuple[Any, ...], ...] = (
    ("PEXPIRETIME", b"asyncsession:probe"),
    ("PEXPIREAT", b"asyncsession:probe", 1, "GT"),
    ("ZMSCORE", b"asyncsession:probe", "x"),
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
) -> None:
    """``StoreUnavailable`` naming the version if the server behind ``call`` reports a
    Redis older than 7.0 or refuses a command the scripts need."""
    info = await call("INFO", "server")
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
    for probe in PROBES:
        try:
            await call(*probe)
        except StoreUnavailable as exc:
            cause = exc.__cause__
            raise unavailable(
                RuntimeError(
                    f"{product} {version} at {where} cannot run asyncsession's scripts: "
                    f"{' '.join(str(a) for a in probe[:1])} failed ({cause})"
                )
            ) from cause
