"""Every ```python block of README.md and docs/*.md runs (or, marked as a fragment,
compiles and type-checks): see tests/doc_examples.py for the markers."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from . import backend_redis, redis_servers
from .doc_examples import (
    ROOT,
    Example,
    MarkerError,
    compile_fragment,
    contains,
    examples,
    parse,
    run,
    typecheck,
)

EXAMPLES = list(examples())
FRAGMENTS = [e for e in EXAMPLES if e.fragment]
PROGRAMS = [e for e in EXAMPLES if not e.fragment]


def _skip_without(example: Example) -> None:
    for module in example.requires:
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs {module} (an optional extra)")
    if "RedisCluster" in example.source or "redis+cluster://" in example.source:
        reason = redis_servers.cluster_client_reason()  # (the oldest-versions run)
        if reason is not None:
            pytest.skip(reason)


@pytest.mark.parametrize("example", PROGRAMS, ids=[e.id for e in PROGRAMS])
def test_example_runs(example: Example, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _skip_without(example)
    monkeypatch.chdir(tmp_path)
    if not example.uses_redis:
        run(example, backend_redis.REDIS_URL)
        return
    if not backend_redis.server_reachable():
        if backend_redis.REQUIRE:
            pytest.fail(f"ASYNCSESSION_REQUIRE_REDIS=1 but no Redis at {backend_redis.REDIS_URL}")
        pytest.skip(f"shows a Redis URL: needs a real server at {backend_redis.REDIS_URL}")
    from redis import Redis

    client = Redis.from_url(backend_redis.REDIS_URL)
    before = set(client.scan_iter(match="session:*", count=1000))
    try:
        run(example, backend_redis.REDIS_URL)
    finally:
        created = set(client.scan_iter(match="session:*", count=1000)) - before
        if created:
            client.delete(*created)
        client.close()


@pytest.fixture(scope="module")
def fragment_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    pytest.importorskip("mypy")
    return typecheck(FRAGMENTS, tmp_path_factory.mktemp("fragments"))


@pytest.mark.parametrize("example", FRAGMENTS, ids=[e.id for e in FRAGMENTS])
def test_fragment_compiles_and_typechecks(
    example: Example, fragment_errors: dict[str, list[str]]
) -> None:
    _skip_without(example)
    compile_fragment(example)
    assert not fragment_errors.get("mypy"), "\n".join(fragment_errors["mypy"])
    assert fragment_errors[example.id] == [], "\n".join(fragment_errors[example.id])


def test_every_page_is_collected() -> None:
    pages = {e.page.relative_to(ROOT).as_posix() for e in EXAMPLES}
    assert {"README.md", "docs/index.md", "docs/asgi.md", "docs/migration.md"} <= pages
    assert any(e.calls for e in EXAMPLES), "no ASGI example is served"


# ------------------------------------------------------- the collector itself

PAGE = """\
Text.

<!-- fragment: helper -->
```python
await helper(request)
```

<!-- requires: some_module -->

<!-- serve
GET / -> 200 {"visits": 1}
POST /items {"sku": "x"} -> 201 created
-->
```py
app = None
```

```sh
echo not python
```

    ```python
    x = 1
    ```
"""


def test_parse_markers_and_lines(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    found = list(parse(page, PAGE))
    assert [(e.line, e.fragment, e.given, e.requires) for e in found] == [
        (5, True, ["helper"], []),
        (15, False, [], ["some_module"]),
        (23, False, [], []),
    ]
    first, served, indented = found
    assert first.source == "await helper(request)\n"
    assert indented.source == "x = 1\n"
    assert served.calls is not None
    assert [str(c) for c in served.calls] == [
        'GET / -> 200 {"visits": 1}',
        "POST /items -> 201 created",
    ]
    assert served.calls[1].body == {"sku": "x"}


@pytest.mark.parametrize("comment", ["<!-- fragmnet -->", "<!-- todo: fix me -->", "<!-- -->"])
def test_unknown_marker_is_an_error(comment: str, tmp_path: Path) -> None:
    with pytest.raises(MarkerError):
        list(parse(tmp_path / "page.md", f"{comment}\n```python\nx = 1\n```\n"))


def test_a_failing_example_fails(tmp_path: Path) -> None:
    (broken,) = parse(tmp_path / "p.md", "```python\nfrom asyncsession import MemroyStore\n```\n")
    with pytest.raises(ImportError):
        run(broken, backend_redis.REDIS_URL)
    (unserved,) = parse(tmp_path / "p.md", "```python\napp = object()\n```\n")
    with pytest.raises(AssertionError, match="serve"):
        run(unserved, backend_redis.REDIS_URL)


def test_a_wrong_fragment_fails_typecheck(tmp_path: Path) -> None:
    pytest.importorskip("mypy")
    page = tmp_path / "p.md"
    text = (
        "<!-- fragment -->\n```python\nfrom asyncsession import login\n\n"
        "await login(request, 42, ttl='soon')\n```\n"
    )
    (fragment,) = parse(page, text)
    errors = typecheck([fragment], tmp_path)[fragment.id]
    assert errors and all(e.startswith("p.md:5: ") for e in errors), errors


def test_contains() -> None:
    assert contains({"a": 1, "b": {"c": [1, 2]}}, {"b": {"c": [1, 2]}})
    assert not contains({"a": 1}, {"a": 2})
    assert not contains([1, 2], [1])


SERVED = """\
<!-- serve
GET / -> 200 {"n": %s, "scheme": "https"}
-->
```python
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def home(request):
    return JSONResponse({"n": 1, "scheme": request.url.scheme})

%s
app = Starlette(routes=[Route("/", home)]%s)
```
"""


def test_served_app_is_called_over_http(tmp_path: Path) -> None:
    pytest.importorskip("uvicorn")
    (good,) = parse(tmp_path / "p.md", SERVED % ("1", "", ""))
    run(good, backend_redis.REDIS_URL)
    (wrong,) = parse(tmp_path / "p.md", SERVED % ("2", "", ""))
    with pytest.raises(AssertionError, match=r"GET / answered 200"):
        run(wrong, backend_redis.REDIS_URL)
    broken_lifespan = "def lifespan(app):\n    raise RuntimeError('no')\n"
    (broken,) = parse(tmp_path / "p.md", SERVED % ("1", broken_lifespan, ", lifespan=lifespan"))
    with pytest.raises(RuntimeError, match="failed to start"):
        run(broken, backend_redis.REDIS_URL)
