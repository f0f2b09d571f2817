"""Store configuration: one frozen dataclass, validated on construction."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal, get_args

from .crypto import KeyRing, parse_keys
from .session import as_duration

Eviction = Literal["oldest", "lru", "reject"]
"""The type of ``Config.eviction``.

What ``create`` (and a ``login`` or ``rotate`` binding a user) does for a user
already at ``max_sessions_per_user``: ``"oldest"`` (the default) evicts the
session created first, ``"lru"`` the least recently used one (by
``last_accessed_at``), each with an ``evicted`` event; ``"reject"`` refuses with
``SessionLimitExceeded`` and writes nothing. ``EVICTION_POLICIES`` lists the
values."""
EVICTION_POLICIES: tuple[str, ...] = get_args(Eviction)
"""The values of ``Eviction``."""

MiB = 1024 * 1024

_SITE_RE = re.compile(r"[A-Za-z0-9._-]{0,64}")  # fullmatch: "$" would accept a final "\n"


def _duration(name: str, value: timedelta | float | int | None) -> timedelta | None:
    return as_duration(value, f"Config.{name}")


@dataclass(frozen=True, slots=True)
class Config:
    """Settings shared by every backend and the controls layer.

    Defaults: 1 MiB sessions, 24 h TTL, cleanup every 5 minutes, keys under
    ``"session:"``. Durations accept ``timedelta`` or seconds and are stored as
    ``timedelta``.
    """

    site_id: str = ""
    max_session_size: int = MiB
    max_sessions_per_user: int = 0
    eviction: Eviction = "oldest"
    default_ttl: timedelta = field(default=timedelta(hours=24))
    idle_timeout: timedelta | None = None
    cleanup_interval: timedelta = field(default=timedelta(minutes=5))
    key_prefix: str = "session:"
    rotation_grace: timedelta = field(default=timedelta(seconds=60))
    """How long a rotated id (``rotate``, ``login``) is remembered as rotated rather
    than unknown, so a request still carrying it answers 409 instead of logging the
    client out; 0 turns the records off."""
    logout_grace: timedelta = field(default=timedelta(seconds=10))
    """How long an id a logout ended (``logout()``, ``clear()``: ``Store.delete(...,
    leave_record=True)``) is remembered as ended rather than unknown, so a request the
    browser sent before the logout's answer leaves a newer login's cookie alone. It
    needs to cover requests already on their way, no more: a client that never got
    the logout's cookie (a lost response) cannot write for this long (409 ``ended``).
    0 turns the records off."""
    hash_ids: bool = True
    """Keep each session under ``session_handle(id)`` (a SHA-256 of the id) instead of
    the id, so a copy of the storage (a dump, backup or replica) holds no id a client
    could present. Records written before (under the plain id) are still read and moved
    on first touch or by ``asyncsession migrate``. False keeps ids in the clear (and
    does not read hashed records)."""
    encryption_keys: Sequence[bytes | str] = field(default=(), repr=False)
    """Keys that encrypt session data at rest (AES-256-GCM; extra ``crypto``): each 32
    random bytes, or their urlsafe base64 text as ``asyncsession keygen`` prints. The
    first key encrypts, every key decrypts; empty (the default): data is stored in the
    clear. Stored as a tuple of raw keys; never shown in ``repr``."""
    _keyring: KeyRing | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.site_id, str) or not _SITE_RE.fullmatch(self.site_id):
            raise ValueError(
                "Config.site_id must be at most 64 characters of letters, digits, '.', '_' or '-'"
                f", got {self.site_id!r}"
            )
        for name in ("max_session_size", "max_sessions_per_user"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"Config.{name} must be an int, got {value!r}")
            if value < 0:
                raise ValueError(f"Config.{name} must be >= 0 (0 means no limit), got {value}")
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(
                f"Config.eviction must be one of {', '.join(EVICTION_POLICIES)}"
                f", got {self.eviction!r}"
            )
        ttl = _duration("default_ttl", self.default_ttl)
        if ttl is None or ttl <= timedelta(0):
            raise ValueError(
                "Config.default_ttl must be a positive timedelta or seconds (every session "
                f"expires: a session without one gets it), got {self.default_ttl!r}"
            )
        object.__setattr__(self, "default_ttl", ttl)
        idle = _duration("idle_timeout", self.idle_timeout)
        if idle is not None and idle <= timedelta(0):
            raise ValueError(
                f"Config.idle_timeout must be positive or None, got {self.idle_timeout!r}"
            )
        object.__setattr__(self, "idle_timeout", idle)
        interval = _duration("cleanup_interval", self.cleanup_interval)
        if interval is None or interval < timedelta(0):
            raise ValueError(
                "Config.cleanup_interval must be >= 0 (0 turns cleanup off), got "
                f"{self.cleanup_interval!r}"
            )
        object.__setattr__(self, "cleanup_interval", interval)
        for name in ("rotation_grace", "logout_grace"):
            value = getattr(self, name)
            grace = _duration(name, value)
            if grace is None or grace < timedelta(0):
                raise ValueError(f"Config.{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, grace)
        if not isinstance(self.hash_ids, bool):
            raise ValueError(f"Config.hash_ids must be a bool, got {self.hash_ids!r}")
        if not isinstance(self.key_prefix, str) or any(c in self.key_prefix for c in "{}\r\n"):
            raise ValueError(
                "Config.key_prefix must be a string without braces or newlines"
                f", got {self.key_prefix!r}"
            )
        # encryption: validated and the ciphers built once, here
        keys = parse_keys(self.encryption_keys)
        object.__setattr__(self, "encryption_keys", keys)
        object.__setattr__(self, "_keyring", KeyRing(keys) if keys else None)

    @property
    def keyring(self) -> KeyRing | None:
        """The ``KeyRing`` built from ``encryption_keys``; None when they are empty."""
        return self._keyring


def default_config() -> Config:
    """A ``Config`` with every default: 1 MiB sessions, 24 h TTL, cleanup every 5 minutes."""
    return Config()
