"""One warning per process when the middleware's Secure cookie meets plain http.

HTTP clients never send a ``Secure`` cookie back over http (browsers and curl at
most to localhost), so behind a dev server without TLS every request starts a new,
empty session, silently.
"""

from __future__ import annotations

import ipaddress
import logging

from starlette.types import Scope

logger = logging.getLogger("asyncsession.asgi")

PLAIN_SCHEMES = ("http", "ws")
FIX = (
    "HTTP clients (httpx, requests) never send a Secure cookie back over plain http, and "
    "browsers and curl only to localhost, so every request starts a new, empty session. "
    "For local development "
    "pass SessionMiddleware(..., https_only=False); otherwise serve over https, or behind "
    "a proxy that sets the scheme (uvicorn --proxy-headers --forwarded-allow-ips=PROXY "
    "reads X-Forwarded-Proto)"
)

_LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost"})

warned = False
"""Whether this process has logged the warning (tests reset it)."""


def warn(what: str) -> None:
    """Log ``what`` and the fix once per process."""
    global warned
    if warned:
        return
    warned = True
    logger.warning("%s while https_only=True: %s", what, FIX)


def request(scope: Scope) -> None:
    """A plain-http request: warn if it comes from another machine (a dev server
    reached over the network, or a proxy that does not pass the scheme on)."""
    if warned:
        return
    client = scope.get("client")
    if not client or client[0] in _LOOPBACK:  # the common case, without parsing
        return
    try:
        loopback = ipaddress.ip_address(client[0]).is_loopback
    except ValueError:  # a unix socket or a test client's name: not an address
        return
    if not loopback:
        warn("a plain-http request came from a non-loopback address")


def cookie_set() -> None:
    """A Secure session cookie went out on a plain-http response."""
    if not warned:
        warn("a Secure session cookie was set on a plain-http response")
