"""Calling an ASGI app in-process with exactly the headers a test gives (no client
normalisation), for the hostile-cookie tests of test_asgi.py and test_hostile.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any


def http_scope(headers: list[tuple[bytes, bytes]], path: str, query: bytes = b"") -> dict[str, Any]:
    """An https request scope: GET for ``/read``, POST for anything else."""
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET" if path == "/read" else "POST",
        "scheme": "https",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query,
        "headers": [(b"host", b"testserver"), *headers],
        "client": ("127.0.0.1", 1),
        "server": ("testserver", 443),
    }


async def call_app(
    app: Any,
    scope: dict[str, Any],
    wrap: Callable[[Awaitable[None]], Awaitable[Any]] | None = None,
    body: bytes = b"",
) -> list[dict[str, Any]]:
    """The messages the app sent; the first must be ``http.response.start``.
    ``wrap`` bounds the call (a timeout) when given; ``body`` is the request's."""
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    call = app(scope, receive, send)
    await (wrap(call) if wrap is not None else call)
    assert messages[0]["type"] == "http.response.start"
    return messages
