"""nox sessions: tests, lint, typecheck, bench, docs. `pip install -e ".[dev]"` (or
`pip install nox`), then `nox` or `nox -s tests`."""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]


@nox.session
def tests(session: nox.Session) -> None:
    session.install("-e", ".[all,test]")
    session.run("python", "-m", "pytest", *session.posargs)


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
