"""Collect and run the ```python blocks of README.md and docs/*.md (tests/test_doc_examples.py).

Every ```python block runs as written, in a fresh namespace, with a new temporary
directory as the working directory (so ``sqlite:///sessions.db`` lands there). A
marker is an HTML comment on the lines just above the fence (blank lines may
separate them; several may stack); mkdocs does not render it:

``<!-- fragment -->``
    Not a whole program (it uses ``request``, ``app``...). Compiled, then
    type-checked with mypy against the installed package, inside an ``async def`` so
    ``await`` works. Given: ``app`` (Starlette), ``request`` (Request), ``websocket``
    (WebSocket), ``store`` (ControlledStore); everything else must be imported.
``<!-- fragment: exchange_code, refresh -->``
    The same, with these extra names given (typed ``Any``).
``<!-- serve ... -->``
    The block defines an ASGI ``app``. It is served by uvicorn on a free port (as
    behind a TLS proxy: ``X-Forwarded-Proto: https``) and called over http, one
    request per line, with one cookie jar:
    ``METHOD /path[?query] [JSON body] -> STATUS [expected]``, where ``expected`` is
    JSON the answer must contain (objects: those keys, recursively) or text the body
    must contain. A block that defines ``app`` without this marker fails.
``<!-- requires: module -->``
    Skipped unless ``module`` imports (optional extras, e.g. ``prometheus_client``).

Redis URLs in a running block (``redis://``, ``rediss://``, ``unix://``) are replaced
by ``REDIS_URL`` (default ``redis://127.0.0.1:6379/15``); such a block is skipped
without a server (fails with ``ASYNCSESSION_REQUIRE_REDIS=1``), never run on fakeredis,
and the keys it created are deleted afterwards. Any other comment right above a
fence is an error, so a typo in a marker cannot silently skip a check.
"""

from __future__ import annotations

import ast
import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
PYTHON = {"python", "py", "python3"}
REDIS_URL_IN_CODE = re.compile(r"(?<![\w+])(?:rediss?|unix)://[^\s\"']*")
MARKERS = ("fragment", "serve", "requires")

GIVEN = {
    "app": "_starlette_applications.Starlette",
    "request": "_starlette_requests.Request",
    "websocket": "_starlette_websockets.WebSocket",
    "store": "_asyncsession.ControlledStore",
}
PREAMBLE = """\
import typing as _typing
import starlette.applications as _starlette_applications
import starlette.requests as _starlette_requests
import starlette.websockets as _starlette_websockets
import asyncsession as _asyncsession
"""


@dataclass
class Call:
    method: str
    target: str
    body: Any
    status: int
    expected: str

    def __str__(self) -> str:
        return f"{self.method} {self.target} -> {self.status} {self.expected}".rstrip()


@dataclass
class Example:
    page: Path
    line: int  # of the first code line
    source: str
    fragment: bool = False
    given: list[str] = field(default_factory=list)
    calls: list[Call] | None = None
    requires: list[str] = field(default_factory=list)

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page.name
        return f"{page}:{self.line}"

    @property
    def uses_redis(self) -> bool:
        return bool(REDIS_URL_IN_CODE.search(self.source))


class MarkerError(ValueError):
    """A comment above a fence that is not a marker this collector understands."""


def examples(pages: list[Path] | None = None) -> Iterator[Example]:
    for page in pages or PAGES:
        yield from parse(page, page.read_text(encoding="utf-8"))


def parse(page: Path, text: str) -> Iterator[Example]:
    """The python blocks of one Markdown page, with their markers."""
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, lang = match.groups()
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        if lang.lower() in PYTHON:
            body = "\n".join(line[len(indent) :] for line in lines[i + 1 : end])
            example = Example(page, i + 2, textwrap.dedent(body) + "\n")
            for comment in reversed(comments_above(lines, i)):
                apply_marker(example, comment)
            yield example
        i = end + 1


def comments_above(lines: list[str], fence: int) -> list[str]:
    """The HTML comments directly above line ``fence``, nearest first."""
    found: list[str] = []
    j = fence - 1
    while j >= 0:
        if not lines[j].strip():
            j -= 1
            continue
        if not lines[j].rstrip().endswith("-->"):
            break
        start = j
        while start >= 0 and "<!--" not in lines[start]:
            start -= 1
        if start < 0:
            break
        text = "\n".join(lines[start : j + 1]).strip()
        found.append(text.removeprefix("<!--").removesuffix("-->").strip())
        j = start - 1
    return found


def apply_marker(example: Example, comment: str) -> None:
    head, _, rest = comment.partition("\n")
    first = head.split()[0] if head.split() else ""
    word, _, arg = head.partition(":") if ":" in first else head.partition(" ")
    word = word.strip()
    if word == "fragment":
        example.fragment = True
        example.given += [n.strip() for n in arg.split(",") if n.strip()]
    elif word == "requires":
        example.requires += [n.strip() for n in arg.split(",") if n.strip()]
    elif word == "serve":
        lines = (arg + "\n" + rest).splitlines()
        example.calls = [parse_call(line) for line in lines if line.strip()]
    else:
        raise MarkerError(
            f"{example.id}: unknown marker <!-- {head} --> above a python block "
            f"(known: {', '.join(MARKERS)}; see tests/doc_examples.py)"
        )


def parse_call(line: str) -> Call:
    """``METHOD /path [JSON body] -> STATUS [expected]``."""
    request, arrow, answer = line.partition("->")
    if not arrow:
        raise MarkerError(f"serve line without '->': {line!r}")
    parts = request.split(maxsplit=2)
    if len(parts) < 2:
        raise MarkerError(f"serve line needs METHOD and PATH: {line!r}")
    body = json.loads(parts[2]) if len(parts) == 3 else None
    status, _, expected = answer.strip().partition(" ")
    return Call(parts[0].upper(), parts[1], body, int(status), expected.strip())


# --------------------------------------------------------------------- running


def run(example: Example, redis_url: str) -> None:
    """Execute a whole example (the working directory is the caller's business)."""
    source = example.source
    if example.uses_redis:
        source = REDIS_URL_IN_CODE.sub(redis_url, source)
    code = compile("\n" * (example.line - 1) + source, str(example.page), "exec")
    namespace: dict[str, Any] = {"__name__": "docs_example"}
    exec(code, namespace)
    app = namespace.get("app")
    if example.calls is None:
        assert app is None, (
            f"{example.id} defines an ASGI app: add a <!-- serve ... --> marker saying which "
            "requests to make and what they answer (see tests/doc_examples.py)"
        )
        return
    assert app is not None, f"{example.id} has a serve marker but defines no `app`"
    asyncio.run(serve(app, example.calls, example.id))


async def serve(app: Any, calls: list[Call], where: str) -> None:
    """Serve ``app`` with uvicorn on a free port and make ``calls`` over http."""
    import httpx
    import uvicorn

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        lifespan="on",
        log_level="warning",
        proxy_headers=True,
        forwarded_allow_ips="127.0.0.1",
    )
    server = uvicorn.Server(config)

    async def serving() -> None:
        try:
            await server.serve()
        except SystemExit as exc:  # uvicorn's answer to a failed lifespan startup
            raise RuntimeError(f"{where}: the app failed to start (exit {exc.code})") from None

    task = asyncio.create_task(serving())
    try:
        async with asyncio.timeout(30):
            while not server.started:  # startup runs the app's lifespan
                if task.done():
                    task.result()
                    # (uvicorn before 0.30 returns instead of raising SystemExit)
                    raise RuntimeError(f"{where}: the app failed to start (lifespan)")
                await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        jar: dict[str, str] = {}
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers={"x-forwarded-proto": "https"}
        ) as client:
            for call in calls:
                headers = {"cookie": "; ".join(f"{k}={v}" for k, v in jar.items())} if jar else {}
                response = await client.request(
                    call.method, call.target, json=call.body, headers=headers
                )
                client.cookies.clear()  # the jar below plays the browser (Secure over https)
                remember(jar, response.headers.get_list("set-cookie"))
                check(call, response.status_code, response.text, where)
    finally:
        server.should_exit = True
        await task


def remember(jar: dict[str, str], set_cookies: list[str]) -> None:
    for header in set_cookies:
        cookie: SimpleCookie = SimpleCookie()
        cookie.load(header)
        for name, morsel in cookie.items():
            if morsel["max-age"] == "0" or "1970" in morsel["expires"]:
                jar.pop(name, None)
            else:
                jar[name] = morsel.value


def check(call: Call, status: int, text: str, where: str) -> None:
    what = f"{where}: {call.method} {call.target} answered {status} {text[:300]!r}"
    assert status == call.status, f"{what}; expected {call}"
    if not call.expected:
        return
    try:
        expected = json.loads(call.expected)
    except ValueError:
        assert call.expected in text, f"{what}; expected {call}"
        return
    assert contains(json.loads(text), expected), f"{what}; expected {call}"


def contains(actual: Any, expected: Any) -> bool:
    """``expected``'s keys are in ``actual`` with matching values (recursively)."""
    if isinstance(expected, dict):
        return isinstance(actual, dict) and all(
            k in actual and contains(actual[k], v) for k, v in expected.items()
        )
    if isinstance(expected, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(expected)
            and all(contains(a, e) for a, e in zip(actual, expected, strict=True))
        )
    return bool(actual == expected)


# ------------------------------------------------------------------- fragments


def fragment_module(example: Example) -> tuple[str, int]:
    """A module mypy can check, and how many lines come before the fragment's first."""
    given = {**GIVEN, **dict.fromkeys(example.given, "_typing.Any")}
    head = PREAMBLE + "".join(f"{name}: {kind}\n" for name, kind in given.items())
    head += "\n\nasync def __fragment__() -> None:\n"
    body = textwrap.indent(example.source, "    ", lambda line: True)
    return head + body + "    pass\n", head.count("\n")


def compile_fragment(example: Example) -> None:
    flags = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
    source = "\n" * (example.line - 1) + example.source
    compile(source, str(example.page), "exec", flags=flags, dont_inherit=True)


def typecheck(fragments: list[Example], workdir: Path) -> dict[str, list[str]]:
    """mypy over every fragment at once: the errors of each, by ``Example.id``, with
    their Markdown line numbers."""
    files: dict[str, tuple[Example, int]] = {}
    for example in fragments:
        module, offset = fragment_module(example)
        # named by content: mypy's cache (kept between runs) then never mixes two up
        digest = hashlib.sha256(module.encode()).hexdigest()[:16]
        path = workdir / f"docs_fragment_{digest}.py"
        path.write_text(module, encoding="utf-8")
        files[path.name] = (example, offset)
    if not files:
        return {}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--no-error-summary",
            "--show-error-codes",
            "--no-color-output",
            "--check-untyped-defs",
            "--ignore-missing-imports",
            "--cache-dir",
            str(ROOT / ".mypy_cache" / "docs-fragments"),
            *sorted(str(workdir / name) for name in files),
        ],
        capture_output=True,
        text=True,
        cwd=workdir,
        env={**os.environ, "MYPYPATH": str(ROOT)},  # this checkout's package, typed
        timeout=600,
    )
    errors: dict[str, list[str]] = {e.id: [] for e, _ in files.values()}
    for line in done.stdout.splitlines():
        match = re.match(r"^(?:.*[/\\])?(docs_fragment_\w+\.py):(\d+): (error|note): (.*)$", line)
        if match and match.group(1) in files:
            example, offset = files[match.group(1)]
            where = example.line + int(match.group(2)) - offset - 1
            errors[example.id].append(f"{example.page.name}:{where}: {match.group(4)}")
        elif line.strip() and not match:
            errors.setdefault("mypy", []).append(line)
    if done.returncode not in (0, 1):
        errors.setdefault("mypy", []).append(done.stderr[-2000:])
    return errors
