"""open_store(url, config): pick a backend from a URL, wrapped in the controls."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .config import Config
from .controls import ControlledStore, with_controls
from .session import Clock
from .store import Store

SCHEMES = ("memory", "sqlite", "redis", "rediss", "unix", "redis+cluster", "redis+sentinel")


def _missing(extra: str, exc: ImportError) -> ValueError:
    return ValueError(
        f"this store needs the {extra!r} extra: pip install 'asyncsession[{extra}]' ({exc})"
    )


def open_backend(url: str, config: Config | None = None, *, clock: Clock | None = None) -> Store:
    """The raw backend for ``url`` (no controls); see ``open_store``."""
    config = config if config is not None else Config()
    if not isinstance(url, str) or ("://" not in url and not url.startswith("sqlite:")):
        raise ValueError(
            f"not a store URL: {url!r} (try memory://, sqlite:///path.db, redis://host)"
        )
    scheme = url.split(":", 1)[0].lower()
    if scheme == "memory":
        from .backends.memory import MemoryStore

        return MemoryStore(config, clock=clock)
    if scheme == "sqlite":
        try:
            from .backends.sqlite import SQLiteStore
        except ImportError as exc:
            raise _missing("sqlite", exc) from exc
        return SQLiteStore(sqlite_path(url), config, clock=clock)
    if scheme in ("redis", "rediss", "unix", "redis+cluster", "redis+sentinel"):
        try:
            from .backends.redis import RedisStore
        except ImportError as exc:
            raise _missing("redis", exc) from exc
        return RedisStore.from_url(url, config, clock=clock)
    raise ValueError(
        f"unknown store URL scheme {scheme!r} in {redact(url)!r}; "
        f"expected one of: {', '.join(s + '://' for s in SCHEMES)}"
    )


def sqlite_path(url: str) -> str:
    """``sqlite:///abs/path.db``, ``sqlite://rel.db``, ``sqlite:rel.db`` and ``sqlite://:memory:``."""
    rest = url.split(":", 1)[1]
    if rest.startswith("//"):
        rest = rest[2:]
        if rest.startswith("/"):  # sqlite:///relative? keep SQLAlchemy's rule: 3 slashes = absolute
            pass
    if not rest:
        raise ValueError("sqlite URL needs a path: sqlite:///path/to/file.db or sqlite://:memory:")
    return rest


def redact(url: str) -> str:
    """The URL without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    if parts.password is None:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return parts._replace(netloc=f"{user}:***@{netloc}").geturl()


def open_store(
    url: str,
    config: Config | None = None,
    *,
    clock: Clock | None = None,
    **control_options: Any,
) -> ControlledStore:
    """A controlled store for ``url``: ``memory://``, ``sqlite:///path.db``,
    ``sqlite://:memory:``, ``redis://``, ``rediss://``, ``unix://``,
    ``redis+cluster://``, ``redis+sentinel://`` (the seed's ``NewOmniStorageStore``)."""
    backend = open_backend(url, config, clock=clock)
    return with_controls(backend, config, **control_options)
