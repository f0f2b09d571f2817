"""Parsing of ``redis+cluster://`` and ``redis+sentinel://`` URLs, and the checks
redis-py's own ``from_url`` does not make (a ``/db`` path that is not a number)."""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit


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
_BOOL_OPTIONS = ("ssl", "ssl_check_hostname")
_TEXT_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_ciphers")
_CERT_REQS = ("none", "optional", "required")
TLS_OPTIONS = ("ssl", "ssl_check_hostname", "ssl_cert_reqs", *_TEXT_OPTIONS)
"""Options that also configure the connections to the sentinels (TLS to them too)."""


def _options(query: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in parse_qsl(query):
        if key in _NUMBER_OPTIONS:
            out[key] = float(value)
        elif key in _INT_OPTIONS:
            out[key] = int(value)
        elif key in _BOOL_OPTIONS:
            out[key] = value.lower() in ("1", "true", "yes", "on")
        elif key in _TEXT_OPTIONS:
            out[key] = value
        elif key == "ssl_cert_reqs":
            if value.lower() not in _CERT_REQS:
                raise ValueError(f"ssl_cert_reqs must be one of {', '.join(_CERT_REQS)}")
            out[key] = value.lower()
        else:
            raise ValueError(f"unsupported URL option {key!r}")
    return out


def tls_defaults(scheme: str, url_query: str, options: dict[str, Any]) -> dict[str, Any]:
    """``ssl_check_hostname=True`` for a TLS URL (``rediss://``, or ``ssl=true``) that
    checks certificates and does not say: redis-py before 6.0 defaults it to False, so
    any certificate the CA signed would pass for any host. ``options`` are those given
    besides the URL; ``url_query`` the URL's own (they win, as in redis-py)."""
    given = {**options, **dict(parse_qsl(url_query))}
    tls = scheme == "rediss" or (
        scheme in ("redis+cluster", "redis+sentinel")
        and str(given.get("ssl", "")).lower() in ("1", "true", "yes", "on")
    )
    reqs = str(given.get("ssl_cert_reqs", "required")).lower()
    if tls and "ssl_check_hostname" not in given and reqs not in ("none", "cert_none", "0"):
        return {"ssl_check_hostname": True}
    return {}


@functools.cache
def _client_options() -> frozenset[str]:
    """The keyword arguments the installed redis-py takes for a ``Redis.from_url``
    client: its own, its pool's and its connection classes' (their signatures)."""
    from redis.asyncio import ConnectionPool, Redis
    from redis.asyncio.connection import (
        AbstractConnection,
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    names: set[str] = set()
    for cls in (Redis, ConnectionPool, AbstractConnection, Connection, SSLConnection):
        names |= _keywords(cls)
    names |= _keywords(UnixDomainSocketConnection) | _keywords(Redis.from_url)
    return frozenset(names)


def _keywords(call: Any) -> set[str]:
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(call).parameters.values()
    return {p.name for p in params if p.kind in kinds} - {"self"}


def check_client_options(options: dict[str, Any]) -> None:
    """A ``ValueError`` naming an option redis-py does not take (a misspelt
    ``socket_timout`` was accepted, then every call failed as an outage)."""
    known = _client_options()
    for name in options:
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"redis-py takes no option {name!r}{hint}")


def check_db_path(url: str) -> None:
    """A ``redis://`` or ``rediss://`` URL's path is empty or ``/<db number>``:
    redis-py reads ``redis://host/abc`` as database 0, which would silently share it."""
    path = unquote(urlsplit(url).path)
    db = path[1:] if path.startswith("/") else path
    if db and not db.isdigit():
        raise ValueError(f"the database in a Redis URL is a number: /0, /1 ... (not {path!r})")


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], dict[str, Any]]:
    """``redis+cluster://[[user]:password@]host:port[,host:port...][/][?option=value]``:
    the startup nodes and the client options (password, timeouts, ``ssl`` and the
    ``ssl_*`` certificate options, which every node's connections use)."""
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
        if not path[1].isdigit():
            raise ValueError(f"the database in a Redis URL is a number (not {path[1]!r})")
        options["db"] = int(path[1])
    return _hosts(parts.netloc, 26379), path[0], options
