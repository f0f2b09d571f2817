"""open_store(url, config): pick a backend from a URL, wrapped in the controls."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote, urlsplit

from .config import Config
from .controls import ControlledStore, with_controls
from .session import Clock
from .store import Store

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")
EXAMPLES = [s + ":///" if s == "sqlite" else s + "://" for s in SCHEMES]


def _missing(extra: str, exc: ImportError) -> ValueError:
    return ValueError(
        f"this store needs the {extra!r} extra: pip install 'asyncsession[{extra}]' ({exc})"
    )


def open_backend(url: str, config: Config | None = None, *, clock: Clock | None = None) -> Store:
    """The raw backend for ``url`` (no controls); see ``open_store``."""
    config = config if config is not None else Config()
    if not isinstance(url, str) or ("://" not in url and not url.startswith("sqlite:")):
        raise ValueError(
            f"not a store URL: {url!r} (try memory://, sqlite:///sessions.db, redis://host)"
        )
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from .backends.memory import MemoryStore

        return MemoryStore(config, clock=clock)
    if scheme == "sqlite":
        path = sqlite_path(url)  # a bad URL says so even without the extra
        try:
            from .backends.sqlite import SQLiteStore
        except ImportError as exc:
            raise _missing("sqlite", exc) from exc
        return SQLiteStore(path, config, clock=clock)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel"):
        try:
            from .backends.redis import RedisStore
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        return RedisStore.from_url(url, config, clock=clock)
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {redact(url)!r}; "
        f"expected one of: {', '.join(EXAMPLES)}"
    )


SQLITE_FORMS = (
    "sqlite:///relative/path.db (from the working directory), "
    "sqlite:////absolute/path.db, or sqlite:///:memory:"
)


def sqlite_path(url: str) -> str:
    """The database path of a ``sqlite:`` URL, read as SQLAlchemy does.

    ``sqlite:///rel.db`` is relative to the working directory, ``sqlite:////abs.db``
    absolute; ``sqlite:PATH`` is a shorthand for either. ``sqlite://``,
    ``sqlite://:memory:`` and ``sqlite:///:memory:`` are an in-memory database.
    ``sqlite://name.db`` (a host, not a path) is refused with what to write.
    """
    rest = url.split(":", 1)[1]
    if "?" in rest or "#" in rest:
        raise ValueError(f"sqlite URLs take no ?query or #fragment: {url!r}; write {SQLITE_FORMS}")
    if rest.startswith("//"):
        host, slash, path = rest[2:].partition("/")
        if host == ":memory:" and not path:
            return ":memory:"
        if host:
            raise ValueError(
                f"{url!r} names a host, not a file; as in SQLAlchemy, write "
                f"'sqlite:///{host}{slash}{path}' for that file in the working directory "
                "(three slashes), or sqlite:////absolute/path.db (four)"
            )
        if not slash:  # "sqlite://": SQLAlchemy's in-memory database
            return ":memory:"
        rest = path  # after "sqlite:///": "rel.db" or "/abs.db"
    if not rest:
        raise ValueError(f"sqlite URL needs a path: {SQLITE_FORMS}")
    return rest


_SECRET_OPTION = re.compile(r"(?i)((?:^|&)[^=&]*(?:pass|secret|token)[^=&]*=)[^&]*")


def _cut_userinfo(url: str) -> tuple[int, int] | None:
    """Where the user part of ``url`` starts and ends (after its '@') when a bare
    '/', '?' or '#' in it (a base64 password) makes ``urlsplit`` see none; else None."""
    start = url.find("://")
    if start < 0:
        return None
    start += 3
    end = url.rfind("@")
    if end < start:
        return None
    try:
        if "@" in urlsplit(url).netloc:
            return None
    except ValueError:
        pass
    return start, end + 1


def url_secrets(url: str) -> list[str]:
    """The secrets ``redact`` hides in ``url`` (and their pieces at '/', '?', '#',
    which a parser's message may quote alone), longest first, to scrub from any text
    that may quote them."""
    found: list[str] = []
    cut = _cut_userinfo(url)
    if cut is not None:
        userinfo = url[cut[0] : cut[1] - 1]
    else:
        try:
            netloc = urlsplit(url).netloc
        except ValueError:
            netloc = ""
        userinfo = netloc.rsplit("@", 1)[0] if "@" in netloc else ""
    if userinfo:
        user, colon, password = userinfo.partition(":")
        found.append(password if colon else user)
    query = url.partition("?")[2]
    found += [m.group(0).split("=", 1)[1] for m in _SECRET_OPTION.finditer(query)]
    pieces = [p for s in found for p in re.split(r"[/?#&]", s)]
    every = {t for t in (*found, *(unquote(s) for s in found), *pieces) if len(t) >= 3}
    return sorted(every, key=len, reverse=True)  # (shorter: no secret, and would mangle)


def redact(url: str) -> str:
    """The URL without its secrets: the password of its user part (all of a user part
    without a colon, which the cluster and sentinel forms take as the password, as a
    ``redis://`` URL may name a user alone), and the value of every query option that
    names a password, secret or token (``?password=...``)."""
    cut = _cut_userinfo(url)
    if cut is not None:  # a password with a bare '/', '?' or '#' cut the user part short
        return redact(f"{url[: cut[0]]}***@{url[cut[1] :]}")
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc, query = parts.netloc, parts.query
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, colon, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if colon else f"***@{host}"
    query = _SECRET_OPTION.sub(r"\1***", query)
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    redacted = parts._replace(netloc=netloc, query=query).geturl()
    if not netloc and url[len(parts.scheme) :].startswith(":///"):  # unix:///path?...
        redacted = f"{parts.scheme}://{redacted[len(parts.scheme) + 1 :]}"
    return redacted


def open_store(
    url: str,
    config: Config | None = None,
    *,
    clock: Clock | None = None,
    **control_options: Any,
) -> ControlledStore:
    """A controlled store for ``url``, wrapped in ``config``'s controls.

    ``memory://``; ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``,
    ``sqlite:///:memory:``; ``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://``, ``redis+sentinel://``. Every form, with an example each,
    is in the backends page's URL table. ``control_options`` go to ``with_controls``
    (``on_violation``, ``on_event``, ``logger``).
    """
    backend = open_backend(url, config, clock=clock)
    return with_controls(backend, config, **control_options)
