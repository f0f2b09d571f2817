"""open_store(url, config): pick a backend from a URL, wrapped in the controls."""

from __future__ import annotations

from typing import Any

from ._redact import redact
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
