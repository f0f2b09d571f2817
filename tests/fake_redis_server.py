"""A misbehaving Redis-speaking TCP server on a local port, for the no-hang tests.

It answers the connection handshake (``HELLO``, ``CLIENT``, ``SELECT``, ``AUTH``,
``PING``, ``READONLY``) and ``CLUSTER SLOTS`` (one node: itself, every slot) like
Redis, and everything else as its ``mode`` says:

- ``garbage``: bytes that are not RESP;
- ``wrong_types``: an integer reply to every command;
- ``error_mid_batch``: every other reply an error, the rest integers;
- ``close_mid_reply``: half a reply, then the connection is closed;
- ``silent``: nothing at all;
- ``old``: a well-behaved ``INFO`` of Redis 6.2.14;
- ``no_commands``: ``INFO`` of Redis 7.2.4 but ``PEXPIRETIME`` is unknown;
- ``no_info``: ``INFO`` refused (``NOPERM``, as for an ACL user without it), every
  other command answered;
- ``no_info_old``: ``INFO`` refused and ``PEXPIRETIME`` unknown.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

HANDSHAKE = {b"CLIENT", b"SELECT", b"AUTH", b"READONLY"}


async def _read_command(reader: asyncio.StreamReader) -> list[bytes]:
    header = await reader.readline()
    if not header:
        raise EOFError
    if not header.startswith(b"*"):  # an inline command
        return header.strip().split()
    args = []
    for _ in range(int(header[1:])):
        size = int((await reader.readline())[1:])
        args.append((await reader.readexactly(size + 2))[:-2])
    return args


def _bulk(text: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(text), text)


class FakeRedis:
    """The server; ``port`` once started (``serve``)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.port = 0
        self.commands: list[list[bytes]] = []
        self.connected = 0  # connections open now
        self._change = asyncio.Event()
        self._count = 0
        # set after the open: the store's reads and scripts get their own command
        # back as one string (a reply of the wrong shape that holds the key's id)
        self.echo = False

    async def until_connected(self, count: int, within: float = 2.0) -> None:
        """Wait until ``count`` connections are open (the server sees a client's close
        a moment after the client made it)."""

        async def wait() -> None:
            while self.connected != count:
                self._change.clear()
                await self._change.wait()

        await asyncio.wait_for(wait(), within)

    def _info(self) -> bytes:
        version = b"6.2.14" if self.mode == "old" else b"7.2.4"
        return _bulk(b"# Server\r\nredis_version:" + version + b"\r\nredis_mode:standalone\r\n")

    def _answer(self, args: list[bytes]) -> bytes | None:
        name = args[0].upper()
        if name in HANDSHAKE:
            return b"+OK\r\n"
        if name == b"PING":
            return b"+PONG\r\n"
        if name == b"HELLO":
            return b"-ERR unknown command 'HELLO'\r\n"  # RESP2 only
        if self.echo and name in (b"HMGET", b"EVALSHA", b"EVAL"):
            return _bulk(b" ".join(args))
        if name == b"CLUSTER":
            node = b"*2\r\n" + _bulk(b"127.0.0.1") + b":%d\r\n" % self.port
            return b"*1\r\n*3\r\n:0\r\n:16383\r\n" + node
        if self.mode in ("old", "no_commands", "no_info", "no_info_old"):
            if name == b"INFO" and self.mode.startswith("no_info"):
                return b"-NOPERM this user has no permissions to run the 'info' command\r\n"
            if name == b"INFO":
                return self._info()
            if name == b"PEXPIRETIME" and self.mode in ("no_commands", "no_info_old"):
                return b"-ERR unknown command 'PEXPIRETIME'\r\n"
            if name == b"ZMSCORE":
                return b"*1\r\n$-1\r\n"
            return b":0\r\n"
        self._count += 1
        if self.mode == "garbage":
            return b"?this is not RESP\r\n"
        if self.mode == "wrong_types":
            return b":42\r\n"
        if self.mode == "error_mid_batch":
            return b"-ERR boom\r\n" if self._count % 2 else b":1\r\n"
        if self.mode == "close_mid_reply":
            return b"*3\r\n$5\r\nab"
        return None  # silent

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connected += 1
        self._change.set()
        try:
            while True:
                args = await _read_command(reader)
                self.commands.append(args)
                reply = self._answer(args)
                if reply is None:
                    continue
                writer.write(reply)
                await writer.drain()
                if self.mode == "close_mid_reply" and reply.startswith(b"*3"):
                    break
        except (EOFError, ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            self.connected -= 1
            self._change.set()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve(mode: str) -> AsyncIterator[FakeRedis]:
    """A ``FakeRedis`` listening on a free local port until the block ends."""
    fake = FakeRedis(mode)
    server = await asyncio.start_server(fake._serve, "127.0.0.1", 0)
    fake.port = server.sockets[0].getsockname()[1]
    try:
        yield fake
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)
