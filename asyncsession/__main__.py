"""The ``asyncsession`` command line: ``python -m asyncsession <command> ...``.

Each command is a ``Command``: a name, a help line, a function that adds its
arguments to its subparser, and a function that runs it and returns the exit
status. Add a command by appending to ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .cli import ADMIN_COMMANDS


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535, got {port}")
    return port


def _configure_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default=None,
        metavar="sqlite:PATH|memory|redis://...",
        help="session store (default: SQLite in ./asyncsession-demo.db)",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to bind (default: %(default)s)"
    )
    parser.add_argument("--port", type=_port, default=8000, help="port (default: %(default)s)")


def _run_demo(args: argparse.Namespace) -> int:
    try:
        from .demo import run
    except ImportError as exc:
        print(
            f"the demo needs the 'asgi' extra: pip install 'asyncsession[asgi,sqlite]' ({exc})",
            file=sys.stderr,
        )
        return 2
    try:
        run(args.backend, args.host, args.port)
    except ValueError as exc:
        print(f"asyncsession demo: {exc}", file=sys.stderr)
        return 2
    return 0


COMMANDS: list[Command] = [
    Command(
        "demo", "run the demo web app (log in, counter, your devices)", _configure_demo, _run_demo
    ),
    *(Command(*spec) for spec in ADMIN_COMMANDS),  # stats, list-user, show, revoke...
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="asyncsession", description="asyncsession: server-side sessions for ASGI apps"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
