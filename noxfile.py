"""nox sessions: tests, lint, typecheck, bench, docs. `pip install -e ".[dev]"` (or
`pip install nox`), then `nox` or `nox -s tests`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[all,test]")
    session.run("python", "-m", "pytest", *session.posargs)


REDIS_SUITE = [
    "tests/test_redis.py",
    "tests/test_redis_transport.py",
    "tests/test_cluster.py",
    "tests/test_sentinel.py",
]

REDIS_CLUSTER_OLDEST = "7.2.0"
"""The oldest redis-py the store runs on Redis Cluster with (``server.MIN_CLUSTER_CLIENT``);
one server and Sentinel work from the floor pyproject.toml declares (5.0.2)."""


def _floors(session: nox.Session) -> list[str]:
    out = session.run("python", ".ci/floors.py", silent=True)
    assert isinstance(out, str)
    return out.split()


@nox.session
def oldest(session: nox.Session) -> None:
    """Every library dependency at the lowest version pyproject.toml declares
    (.ci/floors.py: redis-py 5.0.2, starlette 0.37.2, uvicorn 0.29, aiosqlite 0.20,
    orjson 3.9, cryptography 41, ...), the whole suite; then Redis Cluster on 7.2.0.
    Why each floor: 5.0.0 lacks ``aclose``; 5.0.1's hiredis parser ignores
    ``disable_decoding``; older cryptography wheels bundle OpenSSL releases with known
    vulnerabilities (a chosen floor)."""
    session.install("-e", ".[all,test,otel,prometheus]", *_floors(session))
    session.run("python", ".ci/floors.py", "--check")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "-k", "not typechecks")
    session.install(f"redis[hiredis]=={REDIS_CLUSTER_OLDEST}")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", "tests/test_cluster.py")


@nox.session
def redis_newest(session: nox.Session) -> None:
    """The Redis suite and mypy with the newest redis-py."""
    session.install("-e", ".[all,test]")
    session.install("--upgrade", "redis[hiredis]")
    session.run("mypy", "--strict", "asyncsession")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *REDIS_SUITE, *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install("-e", ".[all,test]")
    session.run("mypy", "--strict", "asyncsession")


@nox.session
def bench(session: nox.Session) -> None:
    session.install("-e", ".[all,test,bench]")
    args = session.posargs or ["benchmarks", "--benchmark-only"]
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *args)


@nox.session
def docs(session: nox.Session) -> None:
    session.install("-e", ".[all,docs]")
    session.run("mkdocs", "build", "--strict")
