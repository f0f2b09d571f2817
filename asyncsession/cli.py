"""Admin commands: ``asyncsession stats | list-user | show | revoke | revoke-user | purge |
migrate``, and for encryption at rest ``keygen | reencrypt``.

Each command opens the store named by ``--store`` (or ``$ASYNCSESSION_STORE``) for one
site (``--site``), prints a table (or JSON with ``--json``) and exits with a status a
script can act on. Encryption keys come from ``$ASYNCSESSION_ENCRYPTION_KEYS``
(comma separated, the first one encrypts) and are never printed.
Failures are one line on stderr, never a traceback; with ``--json`` that line is
``{"error": {"command", "code", "status", "message"}}``:

====  ===================  ==============================================
0                          done
1     NOT_FOUND            no such session, no sessions for that user or site
2     BAD_INPUT            a bad URL, option or argument, an invalid id or site
3     STORE_UNAVAILABLE    unreachable, wrong password, not a database
130   INTERRUPTED          Ctrl-C
====  ===================  ==============================================

Full session ids are never printed except the one the user typed: other sessions
appear as their short hash (the first 12 hex digits of SHA-256, as in logs), which
``revoke HASH --user USER`` accepts.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import io
import json
import logging
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO, cast

from ._redact import redact, url_secrets
from .config import Config
from .controls import ControlledStore, ViolationEvent
from .crypto import SealBroken, generate_key, is_sealed
from .errors import (
    InvalidSession,
    SessionCorrupt,
    SessionError,
    SessionExpired,
    SessionNotFound,
    StoreClosed,
    StoreUnavailable,
    short_hash,
)
from .factory import open_store, sqlite_path
from .session import Session, is_handle
from .store import PlainIdsFound

OK, NOT_FOUND, BAD_INPUT, UNAVAILABLE, INTERRUPTED = 0, 1, 2, 3, 130
ERROR_CODES = {
    NOT_FOUND: "NOT_FOUND",
    BAD_INPUT: "BAD_INPUT",
    UNAVAILABLE: "STORE_UNAVAILABLE",
    INTERRUPTED: "INTERRUPTED",
}
"""The ``code`` of a ``--json`` error, by exit status."""
STORE_HELP = (
    "memory://, sqlite:///RELATIVE.db, sqlite:////ABSOLUTE.db, "
    "redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://..., unix:///PATH.sock, "
    "redis+cluster://..., redis+sentinel://... "
)
ENV_STORE = "ASYNCSESSION_STORE"
ENV_KEYS = "ASYNCSESSION_ENCRYPTION_KEYS"
SHORT_HASH = re.compile(r"[0-9a-f]{12}")
PLAIN_IDS_FOUND = (
    "this store holds sessions under plain ids, which commands do not move: for an "
    "application with Config(hash_ids=False) pass --plain-ids; for a store written before "
    "ids were hashed, run 'asyncsession migrate' first. Nothing was changed"
)
DEFAULT_PREFIX = Config().key_prefix


class CommandError(Exception):
    """A failure to report as one line, with the exit status to return."""

    def __init__(self, message: str, status: int, code: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code or ERROR_CODES.get(status, "UNEXPECTED")


# ------------------------------------------------------------------ arguments


def store_option(parser: argparse.ArgumentParser, otherwise: str | None = None) -> None:
    """``--store URL``, defaulting to ``$ASYNCSESSION_STORE`` (else None, which the
    command reads as ``otherwise`` says)."""
    shown = f"${ENV_STORE}, else {otherwise}" if otherwise else f"${ENV_STORE}"
    parser.add_argument(
        "--store",
        default=os.environ.get(ENV_STORE) or None,
        metavar="URL",
        help=f"the session store: {STORE_HELP}(default: {shown})",
    )


def _common(parser: argparse.ArgumentParser, *, all_sites: str | None = None) -> None:
    """The options of every admin command; ``all_sites`` says what a missing ``--site``
    covers for the commands that default to every site."""
    store_option(parser)
    if all_sites is None:
        parser.add_argument(
            "--site", default="", help="site id the sessions belong to (default: the empty site)"
        )
    else:
        parser.add_argument("--site", default=None, help=f"only this site (default: {all_sites})")
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="key prefix of the store (Redis; default: %(default)r)",
    )
    parser.add_argument(
        "--plain-ids",
        action="store_true",
        help="the store keeps ids in the clear (an app with Config(hash_ids=False))",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show the library's log messages"
    )


def _configure_stats(parser: argparse.ArgumentParser) -> None:
    _common(parser, all_sites="every site")
    parser.add_argument(
        "--top", type=int, default=10, metavar="N", help="largest sessions to list (default: 10)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=1000,
        metavar="N",
        help="sessions read per step (Redis: SCAN COUNT; default: 1000)",
    )
    progress = parser.add_mutually_exclusive_group()
    progress.add_argument(
        "--progress",
        dest="progress",
        action="store_true",
        default=None,
        help="always show a progress bar on stderr (default: when stderr is a terminal)",
    )
    progress.add_argument("--no-progress", dest="progress", action="store_false")


def _configure_user(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("user", metavar="USER", help="user id")


def _configure_show(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "id", metavar="ID", help="session id (the cookie value), or the short hash tools show"
    )


def _configure_revoke(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument(
        "id", metavar="ID", help="session id, or the short hash list-user and stats show"
    )
    parser.add_argument(
        "--user", help="owner of the session (revoking by short hash: looks only at theirs)"
    )


def _configure_revoke_user(parser: argparse.ArgumentParser) -> None:
    _common(parser)
    parser.add_argument("user", metavar="USER", help="user id")
    parser.add_argument(
        "--keep", metavar="ID", help="session to keep: its id or short hash (e.g. the current one)"
    )


def _configure_keygen(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-n", type=int, default=1, metavar="N", help="how many keys to print (default: 1)"
    )


def _configure_reencrypt(parser: argparse.ArgumentParser) -> None:
    store_option(parser)
    parser.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help="key prefix of the store (Redis; default: %(default)r)",
    )
    parser.add_argument(
        "--batch", type=int, default=500, metavar="N", help="sessions read per step (default: 500)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a line")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="also show the library's log messages"
    )


def _configure_purge(parser: argparse.ArgumentParser) -> None:
    _common(parser, all_sites="every site, in one batched purge")
    parser.add_argument(
        "--batch", type=int, default=1000, metavar="N", help="sessions read per step with --site"
    )


def _configure_migrate(parser: argparse.ArgumentParser) -> None:
    _common(parser, all_sites="every site")
    parser.add_argument(
        "--batch", type=int, default=1000, metavar="N", help="sessions read per step"
    )


# -------------------------------------------------------------------- running


class _ReaderGone(Exception):
    """Whoever reads the command's output closed it (``asyncsession stats | head``)."""


def printable(text: str, *, lines: bool = True) -> str:
    """``text`` with every character a terminal could act on (escape sequences, other
    controls, bidirectional overrides: what ``str.isprintable`` refuses) but the line
    break written as a JSON escape (``\\u001b``). Stored user ids, user agents and
    data are the clients'; an admin's terminal must only show them. Inside JSON
    strings the escapes keep it valid JSON (json.dumps has already escaped the rest).
    ``lines=False`` escapes line breaks too: a field of a table or of ``show`` (a
    stored value must not forge a row)."""
    if text.isprintable():
        return text
    out = []
    for char in text:
        if char.isprintable() or (lines and char == "\n"):
            out.append(char)
        else:  # (json.dumps of one character: \uXXXX, surrogate pairs past U+FFFF)
            out.append(json.dumps(char)[1:-1])
    return "".join(out)


class _Output(io.TextIOBase):
    """stdout for a command: a closed pipe is ``_ReaderGone``, told apart from a
    ``BrokenPipeError`` of the store's own connections (an outage). Everything
    written goes through ``printable``."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(printable(text))
        except BrokenPipeError as exc:
            raise _ReaderGone from exc

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError as exc:
            raise _ReaderGone from exc


def _runner(
    command: Callable[[ControlledStore, argparse.Namespace, TextIO], Awaitable[int]],
) -> Callable[[argparse.Namespace], int]:
    """Wrap ``command`` to open the store, map every failure to a line and a status."""

    def run(args: argparse.Namespace) -> int:
        out = cast(TextIO, _Output(sys.stdout))
        with _quiet_library(args.verbose):
            try:
                return asyncio.run(_with_store(command, args, out))
            except CommandError as exc:
                _fail(str(exc), args, exc.code, exc.status)
                return exc.status
            except KeyboardInterrupt:
                _fail("interrupted", args, ERROR_CODES[INTERRUPTED], INTERRUPTED)
                return INTERRUPTED
            except _ReaderGone:
                # the reader went away (`| head`): it has what it wanted; say nothing,
                # and keep Python's flush at exit from failing on the closed pipe too
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                return 0

    return run


async def _with_store(
    command: Callable[[ControlledStore, argparse.Namespace, TextIO], Awaitable[int]],
    args: argparse.Namespace,
    out: TextIO,
) -> int:
    store = _open(args)
    try:
        try:
            await store.__aenter__()
            return await command(store, args, out)
        finally:
            await store.close()
    except (CommandError, _ReaderGone):
        raise
    except PlainIdsFound as exc:
        raise CommandError(PLAIN_IDS_FOUND, BAD_INPUT) from exc
    except (StoreUnavailable, StoreClosed) as exc:
        raise CommandError(exc.message, UNAVAILABLE) from exc
    except InvalidSession as exc:
        raise CommandError(exc.message, BAD_INPUT) from exc
    except SessionError as exc:
        raise CommandError(exc.message, NOT_FOUND) from exc
    except OSError as exc:
        raise CommandError(f"{type(exc).__name__}: {exc}", UNAVAILABLE) from exc
    except Exception as exc:  # never a traceback; say what it was
        raise CommandError(f"unexpected {type(exc).__name__}: {exc}", 1, "UNEXPECTED") from exc


def _open(args: argparse.Namespace) -> ControlledStore:
    url = args.store
    if not url:
        raise CommandError(f"no store given: use --store URL or set ${ENV_STORE}", BAD_INPUT)
    try:
        config = Config(
            site_id=getattr(args, "site", None) or "",
            key_prefix=args.prefix,
            cleanup_interval=timedelta(0),
            hash_ids=not getattr(args, "plain_ids", False),
            encryption_keys=_env_keys(),
        )
        store = open_store(url, config)  # (first: a missing extra is the thing to fix)
        if url.split(":", 1)[0].lower() == "sqlite":
            path = sqlite_path(url)
            if path != ":memory:" and not os.path.isfile(path):
                raise CommandError(f"no SQLite database at {path!r}", UNAVAILABLE)
    except ValueError as exc:
        raise CommandError(str(exc), BAD_INPUT) from exc
    # Commands must not move a record found under a plain id to its hash: for an
    # application with Config(hash_ids=False) that would lose the session.
    store._moves_plain_ids = False
    return store


def _env_keys() -> tuple[str, ...]:
    """The keys in ``$ASYNCSESSION_ENCRYPTION_KEYS`` (comma separated; blanks ignored).
    A bad one is a ``CommandError`` naming its position, never its value."""
    text = os.environ.get(ENV_KEYS, "")
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    try:
        Config(encryption_keys=keys)
    except ValueError as exc:
        message = str(exc).replace("Config.encryption_keys", f"${ENV_KEYS}")
        raise CommandError(message, BAD_INPUT) from None
    return keys


def _fail(message: str, args: argparse.Namespace, code: str, status: int) -> None:
    url = getattr(args, "store", None) or ""
    if url:  # no password in any message, whatever produced it
        message = message.replace(url, redact(url))
        for secret in url_secrets(url):
            message = message.replace(secret, "***")
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    report_error(args.command, first, code, status, as_json=getattr(args, "json", False))


def report_error(command: str, message: str, code: str, status: int, *, as_json: bool) -> None:
    """One line on stderr: plain text, or with ``--json`` a JSON object a script can parse."""
    if as_json:
        error = {"command": command, "code": code, "status": status, "message": message}
        line = json.dumps({"error": error}, ensure_ascii=False)
    else:
        line = f"asyncsession {command}: error: {message}"
    print(printable(line), file=sys.stderr)


@contextmanager
def _quiet_library(verbose: bool) -> Iterator[None]:
    """The library logs violations (e.g. an id of another site) as warnings; a shell
    user gets the command's own message instead, unless ``--verbose``."""
    log = logging.getLogger("asyncsession")
    level = log.level
    if not verbose:
        log.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        log.setLevel(level)


# ------------------------------------------------------------------- commands


@dataclass
class SiteStats:
    sessions: int = 0
    expired: int = 0
    anonymous: int = 0
    bytes: int = 0
    users: set[str] = field(default_factory=set)

    def as_dict(self, site: str) -> dict[str, Any]:
        return {
            "site": site,
            "sessions": self.sessions,
            "live": self.sessions - self.expired,
            "expired_not_purged": self.expired,
            "users": len(self.users),
            "anonymous": self.anonymous,
            "bytes": self.bytes,
        }


async def _stats(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    if args.top < 0 or args.batch < 1:
        raise CommandError("--top must be >= 0 and --batch >= 1", BAD_INPUT)
    site = args.site
    now = datetime.now(UTC)
    sites: dict[str, SiteStats] = {}
    largest: list[tuple[int, str, str, str | None, datetime | None]] = []
    show = sys.stderr.isatty() if args.progress is None else args.progress
    bar = Progress(await store._scan_estimate() if show else None, enabled=show)
    scanned = 0
    try:
        scan = store._scan(args.batch)
    except NotImplementedError as exc:
        raise CommandError(str(exc), BAD_INPUT) from exc
    async for batch in scan:
        scanned += len(batch)
        bar.update(scanned)
        for entry in batch:
            if site is not None and entry.site_id != site:
                continue
            st = sites.get(entry.site_id)
            if st is None:
                st = sites[entry.site_id] = SiteStats()
            st.sessions += 1
            st.bytes += entry.size
            expired = entry.expires_at is not None and entry.expires_at <= now
            if expired:
                st.expired += 1
            elif entry.user_id is None:
                st.anonymous += 1
            else:
                st.users.add(entry.user_id)
            if args.top:
                item = (
                    entry.size,
                    short_hash(entry.session_id),
                    entry.site_id,
                    entry.user_id,
                    entry.expires_at,
                )
                if len(largest) < args.top:
                    heapq.heappush(largest, item)
                elif item[0] > largest[0][0]:
                    heapq.heapreplace(largest, item)
    bar.done()
    if site is not None and site not in sites:
        raise CommandError(f"no sessions for site {site!r}", NOT_FOUND)
    rows = [sites[name].as_dict(name) for name in sorted(sites)]
    top = sorted(largest, reverse=True)
    if args.json:
        _json(
            {
                "scanned": scanned,
                "at": now.isoformat(),
                "sites": rows,
                "largest": [
                    {
                        "session": h,
                        "site": s,
                        "user": u,
                        "size": size,
                        "expires_at": _iso(e),
                    }
                    for size, h, s, u, e in top
                ],
            },
            out,
        )
        return OK
    if not rows:
        print("no sessions", file=out)
        return OK
    table(
        out,
        ["site", "sessions", "live", "expired (not purged)", "users", "anonymous", "size"],
        [
            [
                r["site"] or "(default)",
                f"{r['sessions']:,}",
                f"{r['live']:,}",
                f"{r['expired_not_purged']:,}",
                f"{r['users']:,}",
                f"{r['anonymous']:,}",
                _bytes(r["bytes"]),
            ]
            for r in rows
        ],
        right={1, 2, 3, 4, 5, 6},
    )
    if top:
        print(f"\nlargest {_count(len(top), 'session')}", file=out)
        table(
            out,
            ["session", "site", "user", "size", "expires"],
            [
                [h, s or "(default)", u or "(anonymous)", _bytes(size), _when(e, now)]
                for size, h, s, u, e in top
            ],
            right={3},
        )
    return OK


async def _user_sessions(store: ControlledStore, user: str) -> list[Session]:
    """The user's live sessions, for commands that show or match only metadata: as
    stored (with encryption at rest, their data sealed, never shown), so ``list-user``
    and ``revoke --user`` work without the keys, or with other keys, as documented."""
    return await store._listed(user)


async def _list_user(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    sessions = await _user_sessions(store, args.user)
    now = datetime.now(UTC)
    if args.json:
        _json([_describe(store, s, now) for s in sessions], out)
    elif sessions:
        table(
            out,
            ["session", "created", "last access", "expires", "ip", "user agent"],
            [
                [
                    s.short_id,
                    _when(s.created_at, now),
                    _when(s.last_accessed_at, now),
                    _when(s.expires_at, now),
                    s.ip_address or "",
                    _clip(s.user_agent or "", 40),
                ]
                for s in sessions
            ],
        )
    if not sessions:
        where = await _user_elsewhere(store, args.user)
        raise CommandError(f"no live sessions for user {args.user!r}{_on(store)}{where}", NOT_FOUND)
    return OK


async def _show(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    session = await _find(store, args.id)
    now = datetime.now(UTC)
    others = []
    if session.user_id is not None:
        others = [s.short_id for s in await store.list_by_user(session.user_id)]
        others = [h for h in others if h != session.short_id]
    info = {"id": args.id, **_describe(store, session, now), "other_sessions_of_user": others}
    if args.json:
        _json({**info, "data": session.data}, out)
        return OK
    for key, value in info.items():
        if key == "other_sessions_of_user":
            value = ", ".join(others) if others else "none"
        elif isinstance(value, str) and key.endswith("_at"):
            value = _when(datetime.fromisoformat(value), now)
        elif value is None:
            value = ""
        print(f"{key.replace('_', ' '):>24}  {printable(str(value), lines=False)}", file=out)
    print(f"{'data':>24}  {json.dumps(session.data, indent=2, ensure_ascii=False)}", file=out)
    return OK


async def _revoke(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    session_id = args.id
    if SHORT_HASH.fullmatch(session_id) and not args.user:
        session_id = await _by_short_hash(store, session_id)  # a scan: any session of the site
        try:
            await _find_stored(store, session_id, open_data=False)  # (no keys needed)
            expired = False
        except CommandError as exc:
            if not isinstance(exc.__cause__, SessionExpired):
                raise
            expired = True
    elif SHORT_HASH.fullmatch(session_id):
        matches = [s.id for s in await _user_sessions(store, args.user) if s.short_id == session_id]
        if not matches:
            raise CommandError(
                f"user {args.user!r} has no live session {session_id}{_on(store)}", NOT_FOUND
            )
        session_id = matches[0]
        expired = False
    else:
        try:
            try:
                session = await _find(store, session_id)
            except CommandError as exc:
                if not isinstance(exc.__cause__, SessionCorrupt):
                    raise
                # sealed data and no keys: revoking needs only the metadata
                session = await _find_stored(store, store.handle(session_id), open_data=False)
        except CommandError as exc:
            if not isinstance(exc.__cause__, SessionExpired):
                raise
            expired = True
        else:
            expired = False
            if args.user and session.user_id != args.user:
                raise CommandError(f"that session belongs to another user{_on(store)}", NOT_FOUND)
    await store.delete(session_id)
    result = {"revoked": short_hash(session_id), "was_expired": expired}
    if args.json:
        _json(result, out)
    else:
        note = " (it had already expired)" if expired else ""
        print(f"revoked session {short_hash(session_id)}{note}", file=out)
    return OK


async def _revoke_user(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    keep = args.keep
    if keep is not None and SHORT_HASH.fullmatch(keep):  # as list-user shows it
        matches = [s.id for s in await _user_sessions(store, args.user) if s.short_id == keep]
        if not matches:
            raise CommandError(
                f"user {args.user!r} has no live session {keep}{_on(store)}; nothing revoked",
                NOT_FOUND,
            )
        keep = matches[0]
    count = await store.delete_by_user(args.user, keep=keep)
    if count == 0 and keep is None:
        where = await _user_elsewhere(store, args.user)
        if where:  # an admin logging a user out everywhere must not read "0" as done
            raise CommandError(
                f"revoked 0 sessions of user {args.user!r}{_on(store)}{where}", NOT_FOUND
            )
    if args.json:
        _json({"user": args.user, "revoked": count}, out)
    else:
        kept = " (kept the one given with --keep)" if args.keep else ""
        print(
            f"revoked {_count(count, 'session')} of user {args.user!r}{_on(store)}{kept}", file=out
        )
    return OK


async def _migrate(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    if args.batch < 1:
        raise CommandError("--batch must be >= 1", BAD_INPUT)
    if not store.config.hash_ids:
        raise CommandError("migrate moves sessions to hashed ids: drop --plain-ids", BAD_INPUT)
    try:
        moved = await store.migrate_ids(args.batch)
    except NotImplementedError as exc:
        raise CommandError(str(exc), BAD_INPUT) from exc
    if args.json:
        _json({"moved": moved}, out)
    else:
        print(f"moved {_count(moved, 'session')} to hashed ids", file=out)
    return OK


async def _purge(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    if args.site is not None:
        removed = {args.site: await _purge_site(store, args.batch)}
    else:
        removed = {}
        try:
            report = await store._purge_report(store.clock())
        except NotImplementedError:
            count = await store.purge_expired()
            removed = {"(all sites)": count} if count else {}
        else:
            for entry in report:
                removed[entry.site_id] = removed.get(entry.site_id, 0) + 1
    total = sum(removed.values())
    if args.json:
        _json({"purged": total, "by_site": removed}, out)
    elif total:
        table(
            out,
            ["site", "purged"],
            [[s or "(default)", f"{n:,}"] for s, n in sorted(removed.items())],
            right={1},
        )
    else:
        where = f" on site {args.site!r}" if args.site is not None else ""
        print(f"no expired sessions{where}", file=out)
    return OK


def _keygen(args: argparse.Namespace) -> int:
    if args.n < 1:
        report_error(
            "keygen", "-n must be at least 1", ERROR_CODES[BAD_INPUT], BAD_INPUT, as_json=False
        )
        return BAD_INPUT
    for _ in range(args.n):
        print(generate_key())
    return OK


async def _reencrypt(store: ControlledStore, args: argparse.Namespace, out: TextIO) -> int:
    ring = store.config.keyring
    if ring is None:
        raise CommandError(
            f"no encryption keys: set ${ENV_KEYS} (comma separated, the new key first)",
            BAD_INPUT,
        )
    if args.batch < 1:
        raise CommandError("--batch must be at least 1", BAD_INPUT)
    failed: list[str] = []  # short hashes of records that do not open (the log is rate-limited)

    def note(event: ViolationEvent) -> None:
        if event.type == "decryption_failed":
            failed.append(event.session or "?")

    store.on_violation = note
    count = await store.reencrypt(batch=args.batch)
    if args.json:
        _json(
            {"reencrypted": count, "key_id": ring.sealing_key_id.hex(), "not_decrypted": failed},
            out,
        )
    else:
        print(
            f"reencrypted {_count(count, 'session')} under key id {ring.sealing_key_id.hex()}",
            file=out,
        )
        if failed:
            shown = ", ".join(failed[:20]) + (", ..." if len(failed) > 20 else "")
            print(
                f"{_count(len(failed), 'session')} did not decrypt with these keys and were "
                f"left as they are: {shown}",
                file=out,
            )
    return OK


async def _purge_site(store: ControlledStore, batch: int) -> int:
    """Delete this site's expired sessions (a purge is otherwise global): a scan, then
    deletes scoped to the site."""
    if batch < 1:
        raise CommandError("--batch must be >= 1", BAD_INPUT)
    now = store.clock()
    site = store.config.site_id
    expired: list[str] = []
    try:
        scan = store._scan(batch)
    except NotImplementedError as exc:
        raise CommandError(str(exc), BAD_INPUT) from exc
    async for entries in scan:
        expired.extend(
            e.session_id
            for e in entries
            if e.site_id == site and e.expires_at is not None and e.expires_at <= now
        )
    for session_id in expired:
        if is_handle(session_id) or not store.config.hash_ids:
            await store.delete(session_id)
        else:  # expired under a plain id: gone either way, as the global purge does
            await store._delete(session_id, store.scope)
    return len(expired)


async def _by_short_hash(store: ControlledStore, short: str) -> str:
    """The storage id (a handle, or a plain id stored before hashing) of this site's
    one session whose short hash is ``short``: a scan of the store."""
    site = store.config.site_id
    found: list[str] = []
    elsewhere: set[str] = set()  # the sites of matches in other sites, for the message
    try:
        scan = store._scan(1000)
    except NotImplementedError as exc:
        raise CommandError(f"{exc}; give the full id", BAD_INPUT) from exc
    async for entries in scan:
        for e in entries:
            if short_hash(e.session_id) == short:
                if e.site_id == site:
                    found.append(e.session_id)
                else:
                    elsewhere.add(e.site_id)
    if not found:
        if len(elsewhere) == 1:
            raise _of_another_site(store, short, *elsewhere)
        raise CommandError(f"no session {short}{_on(store)}", NOT_FOUND)
    if len(set(found)) > 1:  # 48 bits: two sessions of one site in practice never
        raise CommandError(f"several sessions match {short}; give the full id", BAD_INPUT)
    return found[0]


async def _find_stored(
    store: ControlledStore, storage_id: str, *, open_data: bool = True
) -> Session:
    """``_find`` for a storage id found by ``_by_short_hash`` (the store's ``get``
    takes only ids): the same checks and errors. ``open_data=False``: the metadata
    only (the data left as stored), for commands that work without the keys."""
    try:
        session = await store.store._load(storage_id)
    except Exception as exc:
        raise CommandError(f"session {short_hash(storage_id)} is not readable", NOT_FOUND) from exc
    if session is None or session.site_id != store.config.site_id:
        raise CommandError(f"no session {short_hash(storage_id)}{_on(store)}", NOT_FOUND)
    if session.expires_at is not None and store.clock() >= session.expires_at:
        gone = SessionExpired("session expired")
        raise CommandError(f"session {short_hash(storage_id)} has expired", NOT_FOUND) from gone
    if not open_data:
        return session
    try:
        return store._open_data(session, storage_id)
    except SessionCorrupt as exc:
        raise _undecryptable(storage_id, exc) from exc


def _undecryptable(session_id: str, exc: SessionCorrupt) -> CommandError:
    """Encryption at rest: say why a session does not open, never its data."""
    return CommandError(
        f"session {short_hash(session_id)} does not decrypt: {exc.details.get('reason')}"
        f" (check ${ENV_KEYS})",
        NOT_FOUND,
    )


async def _user_elsewhere(store: ControlledStore, user: str) -> str:
    """``"; ... on site 'x' (use --site x)"`` if ``user`` has live sessions on other
    sites than this one (a scan of the store: asked only when this site has none),
    else ``""``."""
    site, now, sites = store.config.site_id, store.clock(), set()
    try:
        async for entries in store._scan(1000):
            for e in entries:
                live = e.expires_at is None or now < e.expires_at
                if e.user_id == user and e.site_id != site and live:
                    sites.add(e.site_id)
    except NotImplementedError:
        return ""
    if not sites:
        return ""
    if len(sites) == 1:
        (other,) = sites
        return f"; the user has sessions on site {other!r} (use --site {other or repr(other)})"
    return f"; the user has sessions on sites {', '.join(map(repr, sorted(sites)))} (use --site)"


def _of_another_site(store: ControlledStore, what: str, site: str) -> CommandError:
    """Not found on this site, but on ``site``: say which, and the flag that reaches it."""
    flag = site or "''"
    return CommandError(
        f"no session {what}{_on(store)}; it belongs to site {site!r} (use --site {flag})",
        NOT_FOUND,
    )


async def _find(store: ControlledStore, session_id: str) -> Session:
    """The session, or a CommandError that says why not (and where it is, if another
    site holds it). A short hash is looked up by a scan."""
    if SHORT_HASH.fullmatch(session_id):
        return await _find_stored(store, await _by_short_hash(store, session_id))
    try:
        return await store.get(session_id)
    except SessionExpired as exc:
        raise CommandError(f"session {short_hash(session_id)} has expired", NOT_FOUND) from exc
    except SessionCorrupt as exc:
        raise _undecryptable(session_id, exc) from exc
    except SessionNotFound as exc:
        try:
            other = await store.store._load(store.handle(session_id))
        except Exception:  # an undecodable record: nothing to point to
            other = None
        if other is not None and other.site_id != store.config.site_id:
            raise _of_another_site(store, "with that id", other.site_id) from exc
        raise CommandError(f"no session with that id{_on(store)}", NOT_FOUND) from exc


# -------------------------------------------------------------------- output


class Progress:
    """A progress bar on stderr, redrawn at most ten times a second."""

    def __init__(self, total: int | None, *, enabled: bool, stream: TextIO | None = None) -> None:
        self.total = total
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.last = 0.0
        self.width = 0

    def update(self, done: int) -> None:
        now = time.monotonic()
        if not self.enabled or now - self.last < 0.1:
            return
        self.last = now
        if self.total:
            fraction = min(done / self.total, 1.0)
            filled = int(fraction * 30)
            line = (
                f"scanning [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%} "
                f"{done:,} / ~{self.total:,} sessions"
            )
        else:
            line = f"scanning... {done:,} sessions"
        self.width = max(self.width, len(line))
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()

    def done(self) -> None:
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()


def table(
    out: TextIO,
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    right: frozenset[int] | set[int] = frozenset(),
) -> None:
    """Columns padded to their widest cell; ``right`` holds right-aligned columns.
    Cells are the clients' text: escaped first (``printable``), then measured."""
    rows = [[printable(cell, lines=False) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    print(line(headers), file=out)
    print(line(["-" * w for w in widths]), file=out)
    for row in rows:
        print(line(row), file=out)


def _json(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False), file=out)


def _data_size(store: ControlledStore, data: dict[str, Any]) -> int | None:
    """The size of a session's data as compact JSON: sealed data (encryption at
    rest, as ``list-user`` reads it) is opened with the configured keys to measure
    it; without keys that open it, ``None`` (unknown)."""
    if is_sealed(data):
        ring = store.config.keyring
        if ring is None:
            return None
        try:
            data = ring.open(data)
        except SealBroken:
            return None
    return len(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode())


def _describe(store: ControlledStore, s: Session, now: datetime) -> dict[str, Any]:
    """A session's metadata for ``show`` and ``list-user --json``."""
    return {
        "session": s.short_id,
        "site": s.site_id,
        "user": s.user_id,
        "organization": s.organization_id,
        "created_at": _iso(s.created_at),
        "updated_at": _iso(s.updated_at),
        "last_accessed_at": _iso(s.last_accessed_at),
        "expires_at": _iso(s.expires_at),
        "ip": s.ip_address,
        "user_agent": s.user_agent,
        "version": s.version,
        "size": _data_size(store, s.data),
    }


def _iso(when: datetime | None) -> str | None:
    return None if when is None else when.astimezone(UTC).isoformat(timespec="seconds")


def _when(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    stamp = when.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    delta = when - now
    ago = delta < timedelta(0)
    return f"{stamp} ({'' if ago else 'in '}{_span(abs(delta))}{' ago' if ago else ''})"


def _span(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value:.1f} TiB"


def _count(n: int, noun: str) -> str:
    """``1 session``, ``2 sessions``, ``1,204 sessions``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def _on(store: ControlledStore) -> str:
    return f" on site {store.config.site_id!r}" if store.config.site_id else ""


# ---------------------------------------------------------------- registration

CommandSpec = tuple[
    str, str, Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]
]

ADMIN_COMMANDS: list[CommandSpec] = [
    (
        "stats",
        "sessions per site, users, expired-but-not-purged, the largest sessions",
        _configure_stats,
        _runner(_stats),
    ),
    ("list-user", "a user's live sessions (short hashes)", _configure_user, _runner(_list_user)),
    ("show", "one session: metadata and data", _configure_show, _runner(_show)),
    ("revoke", "delete one session", _configure_revoke, _runner(_revoke)),
    (
        "revoke-user",
        "delete a user's sessions (log out everywhere)",
        _configure_revoke_user,
        _runner(_revoke_user),
    ),
    (
        "purge",
        "remove expired sessions now (every site, or only --site)",
        _configure_purge,
        _runner(_purge),
    ),
    (
        "migrate",
        "move sessions stored under plain ids (before hashed ids) to their hashes",
        _configure_migrate,
        _runner(_migrate),
    ),
    (
        "keygen",
        "print a new encryption key for $ASYNCSESSION_ENCRYPTION_KEYS",
        _configure_keygen,
        _keygen,
    ),
    (
        "reencrypt",
        "rewrite every session not under the first key of $ASYNCSESSION_ENCRYPTION_KEYS",
        _configure_reencrypt,
        _runner(_reencrypt),
    ),
]
"""``(name, help, configure, run)`` of each admin command, for ``__main__``."""
