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
from typing import NoReturn

from .cli import ADMIN_COMMANDS, BAD_INPUT, ERROR_CODES, report_error, store_option


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
    store_option(parser, otherwise="SQLite in ./asyncsession-demo.db")
    # the old name, kept for a release; not shown in --help
    parser.add_argument(
        "--backend", dest="store", default=argparse.SUPPRESS, help=argparse.SUPPRESS
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
        run(args.store, args.host, args.port)
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


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are a JSON line (status 2) when ``json_errors``."""

    json_errors = False
    command: str | None = None  # for the top parser: the command named on the line
    children: dict[str, argparse.ArgumentParser] | None = None  # the top parser's

    def error(self, message: str) -> NoReturn:
        child = (self.children or {}).get(self.command or "")
        if not self.json_errors:
            if child is None:
                super().error(message)
            # an option the command does not take (found by the top parser): the
            # command's usage and name, not the top parser's
            child.print_usage(sys.stderr)
            self.exit(BAD_INPUT, f"{child.prog}: error: {message}\n")
        command = self.command or self.prog.split()[-1]
        report_error(command, message, ERROR_CODES[BAD_INPUT], BAD_INPUT, as_json=True)
        sys.exit(BAD_INPUT)


def build_parser(*, json_errors: bool = False) -> _Parser:
    parser = _Parser(
        prog="asyncsession", description="asyncsession: server-side sessions for ASGI apps"
    )
    parser.json_errors = json_errors
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.children = {}
    for command in COMMANDS:
        child = sub.add_parser(command.name, help=command.help, description=command.help)
        parser.children[command.name] = child
        child.json_errors = json_errors
        command.configure(child)
        child.set_defaults(run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(json_errors="--json" in argv)
    first = next((a for a in argv if not a.startswith("-")), None)  # the command's place
    parser.command = first if first in {c.name for c in COMMANDS} else None
    args = parser.parse_args(argv)
    status: int = args.run(args)
    return status


if __name__ == "__main__":
    sys.exit(main())
