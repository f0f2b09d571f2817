"""The demo app: ``python -m asyncsession demo`` serves it on http://127.0.0.1:8000.

A few HTML pages on plain Starlette: log in with any name, a counter and a form to
set keys in the session, the user's active sessions with revoke buttons, log out
and log out everywhere. Served over plain http on localhost, so the cookie is
created with ``https_only=False``; the library's default is ``Secure``.
"""

from __future__ import annotations

import contextlib
import html
import sys
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route

from ._redact import redact
from .asgi import (
    SessionMiddleware,
    current_session,
    install_exception_handler,
    list_user_sessions,
    login,
    logout,
    logout_everywhere,
    revoke_session,
    update_session,
)
from .config import Config
from .controls import ControlledStore
from .factory import open_store

DEFAULT_DB = "asyncsession-demo.db"
DEMO_CONFIG = Config(max_sessions_per_user=10, default_ttl=timedelta(days=7))


def store_url(backend: str | None) -> str:
    """``--store`` to an ``open_store`` URL (``memory`` is short for ``memory://``)."""
    if backend is None:
        return f"sqlite:///{DEFAULT_DB}"
    if backend == "memory":
        return "memory://"
    return backend


def open_demo_store(backend: str | None) -> tuple[ControlledStore, str]:
    """The demo's store and a printable URL. The default is SQLite; if the ``sqlite``
    extra is missing it falls back to memory (and says so)."""
    url = store_url(backend)
    try:
        return open_store(url, DEMO_CONFIG), url
    except ValueError as exc:
        if backend is not None:
            raise
        print(f"asyncsession demo: {exc}; using the memory backend instead", file=sys.stderr)
        return open_store("memory://", DEMO_CONFIG), "memory://"


# --------------------------------------------------------------------- pages

STYLE = """
body{font:15px/1.45 system-ui,sans-serif;max-width:52rem;margin:2rem auto;padding:0 1rem;color:#222}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:1.8rem}
table{border-collapse:collapse;width:100%}td,th{border-bottom:1px solid #ddd;padding:.35rem;
text-align:left;font-size:.9rem;vertical-align:top}pre{background:#f5f5f5;padding:.6rem;overflow:auto}
form{display:inline}input{padding:.25rem}button{padding:.25rem .7rem;cursor:pointer}
.note{color:#666;font-size:.85rem}.current{font-weight:600}
"""


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        f"<!doctype html><html lang=en><head><meta charset=utf-8>"
        f"<meta name=viewport content='width=device-width,initial-scale=1'>"
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head>"
        f"<body>{body}</body></html>",
        headers={"cache-control": "no-store"},
    )


def _when(value: datetime | None) -> str:
    if value is None:
        return "-"
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _post(action: str, button: str, *, fields: str = "", button_id: str = "") -> str:
    bid = f" id={button_id}" if button_id else ""
    return (
        f"<form method=post action='{action}'>{fields}"
        f"<button type=submit{bid}>{html.escape(button)}</button></form>"
    )


async def home(request: Request) -> HTMLResponse:
    session = current_session(request)
    data = dict(request.session)
    user = session.user_id if session is not None else None
    e = html.escape
    parts = ["<h1>asyncsession demo</h1>"]
    if user is None:
        parts.append(
            "<p id=whoami>Not logged in.</p>"
            "<form id=login-form method=post action='/login'>"
            "<input name=user placeholder='any name' required maxlength=64 autofocus> "
            "<button type=submit id=login>Log in</button></form>"
        )
    else:
        parts.append(
            f"<p id=whoami>Logged in as <b id=user>{e(user)}</b>. "
            + _post("/logout", "Log out", button_id="logout")
            + " "
            + _post("/logout-everywhere", "Log out everywhere else", button_id="logout-everywhere")
            + "</p>"
        )
    parts.append(
        f"<h2>Session data</h2><p>Counter: <b id=counter>{e(str(data.get('counter', 0)))}</b> "
        + _post("/increment", "Increment", button_id="increment")
        + "</p><form id=set-form method=post action='/set'>"
        "<input name=key placeholder=key required maxlength=64> "
        "<input name=value placeholder=value maxlength=1000> "
        "<button type=submit id=set>Set key</button></form>"
        f"<pre id=data>{e(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode())}</pre>"
    )
    if session is None:
        parts.append(
            "<p class=note>No server-side session yet: one is created on the first write.</p>"
        )
    else:
        parts.append(
            f"<p class=note>Session <code>{e(session.short_id)}</code> (a hash; the id itself "
            f"is only in your HttpOnly cookie), version {session.version}, "
            f"expires {_when(session.expires_at)}.</p>"
        )
    if user is not None:
        rows = []
        for s in await list_user_sessions(request):
            this = s.short_id == session.short_id if session else False  # s.id is a handle
            action = (
                "this device"
                if this
                else _post(
                    "/revoke",
                    "Revoke",
                    fields=f"<input type=hidden name=session value='{e(s.short_id)}'>",
                )
            )
            rows.append(
                f"<tr data-session='{e(s.short_id)}' class='{'current' if this else ''}'>"
                f"<td><code>{e(s.short_id)}</code></td><td>{_when(s.created_at)}</td>"
                f"<td>{_when(s.last_accessed_at)}</td><td>{e(s.ip_address or '-')}</td>"
                f"<td>{e((s.user_agent or '-')[:120])}</td><td>{action}</td></tr>"
            )
        parts.append(
            "<h2>Your active sessions</h2><table id=sessions><tr><th>session</th>"
            "<th>created</th><th>last seen</th><th>address</th><th>user agent</th><th></th></tr>"
            + "".join(rows)
            + "</table>"
        )
    parts.append(
        "<p class=note>This demo is served over plain http on localhost, so its cookie is "
        "created with <code>https_only=False</code> (no <code>Secure</code> flag). "
        "The library's default is <code>Secure</code>: keep it in production.</p>"
    )
    return _page("asyncsession demo", "".join(parts))


MAX_FORM_FIELDS = 10
MAX_FORM_BYTES = 16_384


class BadForm(Exception):
    """A form the demo refuses with 400 and this message."""


async def _form(request: Request) -> dict[str, str]:
    """A urlencoded form body (no python-multipart needed), bounded in size and fields."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            # refused whole: a cut form would store what the client did not send
            raise BadForm(f"form too large (at most {MAX_FORM_BYTES} bytes)")
    try:
        parsed = parse_qs(body.decode("utf-8", "replace"), max_num_fields=MAX_FORM_FIELDS)
    except ValueError:
        raise BadForm(f"too many form fields (at most {MAX_FORM_FIELDS})") from None
    return {k: v[0] for k, v in parsed.items()}


async def bad_form(request: Request, exc: Exception) -> Response:
    return PlainTextResponse(str(exc), status_code=400)


def _back() -> RedirectResponse:
    return RedirectResponse("/", status_code=303)


async def do_login(request: Request) -> Response:
    user = (await _form(request)).get("user", "").strip()[:64]
    if not user:
        return PlainTextResponse("a name is required", status_code=400)
    await login(request, user)
    return _back()


async def do_logout(request: Request) -> Response:
    await logout(request)
    return _back()


async def do_logout_everywhere(request: Request) -> Response:
    await logout_everywhere(request, keep_current=True)
    return _back()


async def do_revoke(request: Request) -> Response:
    await revoke_session(request, (await _form(request)).get("session", ""))
    return _back()


def _bump(data: dict[str, Any]) -> None:
    counter = data.get("counter", 0)
    if type(counter) is not int:
        raise BadForm("the counter is not a number (it was set with 'Set key'); set it to 0")
    data["counter"] = counter + 1


async def increment(request: Request) -> Response:
    # update_session: reloads and re-runs _bump if a parallel request got there first
    await update_session(request, _bump)
    return _back()


async def set_key(request: Request) -> Response:
    form = await _form(request)
    key = form.get("key", "").strip()[:64]
    if key:
        request.session[key] = form.get("value", "")[:1000]
    return _back()


class SameOriginPosts:
    """Refuse form posts that do not prove they come from this site (belt and braces on
    top of SameSite=Lax), with 403 and the reason: ``Sec-Fetch-Site`` must be
    ``same-origin`` when the browser sends it; otherwise ``Origin`` must be present,
    not ``null``, and this site's scheme, host and port."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            refused = self.refusal(dict(scope["headers"]), scope.get("scheme", "http"))
            if refused is not None:
                response = PlainTextResponse(refused, status_code=403)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    @staticmethod
    def refusal(headers: dict[bytes, bytes], scheme: str = "http") -> str | None:
        """Why a POST with these headers, over ``scheme``, is refused (None: it is not)."""
        fetch_site = headers.get(b"sec-fetch-site")
        if fetch_site is not None:  # set by the browser itself: a page cannot forge it
            if fetch_site == b"same-origin":
                return None
            return f"cross-site post refused (Sec-Fetch-Site: {fetch_site.decode('latin-1')})"
        origin = headers.get(b"origin")
        if origin is None or origin == b"null":
            return "post refused: the browser sent no usable Origin header (missing or null)"
        host = headers.get(b"host", b"")
        parts = urlsplit(origin.decode("latin-1"))
        # an origin is scheme, host and port: https://host for an http site is another
        if parts.netloc.encode("latin-1") != host or parts.scheme != scheme:
            return "cross-origin post refused"
        return None


def create_app(store: ControlledStore, *, https_only: bool = False) -> Starlette:
    """The demo app on ``store`` (opened at startup and closed at shutdown)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with store:
            yield

    app = Starlette(
        routes=[
            Route("/", home),
            Route("/login", do_login, methods=["POST"]),
            Route("/logout", do_logout, methods=["POST"]),
            Route("/logout-everywhere", do_logout_everywhere, methods=["POST"]),
            Route("/revoke", do_revoke, methods=["POST"]),
            Route("/increment", increment, methods=["POST"]),
            Route("/set", set_key, methods=["POST"]),
        ],
        lifespan=lifespan,
        exception_handlers={BadForm: bad_form},
    )
    install_exception_handler(app)
    app.add_middleware(
        SessionMiddleware,
        store=store,
        cookie_name="asyncsession_demo",
        https_only=https_only,  # plain http on localhost; the library default is True
        max_age=DEMO_CONFIG.default_ttl,
        touch_interval=5,  # keep "last seen" fresh without a write on every request
    )
    app.add_middleware(SameOriginPosts)
    return app


def run(backend: str | None = None, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve the demo with uvicorn until interrupted."""
    import uvicorn

    store, url = open_demo_store(backend)
    print(f"asyncsession demo on http://{host}:{port}  (store: {redact(url)})", file=sys.stderr)
    uvicorn.run(create_app(store), host=host, port=port, log_level="info")
