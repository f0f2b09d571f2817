"""The deadline of the current request's store work, handed down to a store that can
keep it itself.

``SessionMiddleware`` bounds all of one request's store calls by one budget. Around
each call it either wraps the call in ``asyncio.timeout`` or, for a store whose
``honours_deadline`` is true, sets ``DEADLINE`` (an event-loop time) for the call to
read: such a store answers every call made while it is set by that time at the
latest, with ``StoreUnavailable`` past it (``RedisStore``: its transport already
keeps a deadline per call, so the request's costs nothing more).
"""

from __future__ import annotations

from contextvars import ContextVar

DEADLINE: ContextVar[float | None] = ContextVar("asyncsession_deadline", default=None)
"""Loop time by which the store call under way must be answered (None: no bound)."""
