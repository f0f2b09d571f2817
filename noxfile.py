"""nox sessions: tests, lint, typecheck, bench, docs. `pip install -e ".[dev]"` (or
`pip install nox`), then `nox` or `nox -s tests`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[all,test]")
    session.run("python", "-m", "pytest", *session.posargs)


REDIS_OLDEST = "5.0.2"
"""The lowest redis-py pyproject.toml declares: the oldest that passes the Redis suite
(5.0.0 has no ``aclose``; 5.0.1's hiredis parser ignores ``disable_decoding``)."""

REDIS_SUITE = [
    "tests/test_redis.py",
    "tests/test_redis_transport.py",
    "tests/test_cluster.py",
    "tests/test_sentinel.py",
]


@nox.session
def redis_oldest(session: nox.Session) -> None:
    """The Redis suite with the oldest redis-py pyproject.toml declares."""
    session.install("-e", ".[all,test]", f"redis[hiredis]=={REDIS_OLDEST}")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *REDIS_SUITE, *session.posargs)


@nox.session
def redis_newest(session: nox.Session) -> None:
    """The Redis suite and mypy with the newest redis-py."""
    session.install("-e", ".[all,test]")
    session.install("--upgrade", "redis[hiredis]")
    session.run("mypy", "--strict", "asyncsession")
    session.run("python", "-m", "pytest", "-p", "no:cacheprovider", *REDIS_SUITE, *session.posargs)


CRYPTO_OLDEST = "41.0.0"
"""The lowest cryptography pyproject.toml declares. AESGCM has been in it since 2.0 and
releases back to 2.2 pass the encryption tests here, but older wheels bundle OpenSSL
releases with known vulnerabilities: the floor is a choice, tested like any other."""


@nox.session
def crypto_oldest(session: nox.Session) -> None:
    """The encryption tests with the oldest cryptography pyproject.toml declares."""
    session.install("-e", ".[all,test]", f"cryptography=={CRYPTO_OLDEST}")
    session.run(
        "python",
        "-m",
        "pytest",
        "-p",
        "no:cacheprovider",
        "tests/test_crypto.py",
        "tests/test_encryption.py",
    )


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
