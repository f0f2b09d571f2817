"""Throwaway Redis Cluster and Sentinel deployments for tests, on free loopback ports.

``redis_cluster`` (three primaries, ``--cluster-enabled yes`` joined with ``redis-cli
--cluster create ... --cluster-replicas 0``) and ``redis_sentinel`` (one primary, one
replica, one sentinel) are session-scoped fixtures: each deployment starts once, on
first use, in a temporary directory, and every process started is stopped at the end
of the session, also when a test or the start-up itself fails (finalizers, an
``atexit`` backstop, and on Linux a parent-death signal so a killed pytest leaves no
server behind). The conformance backend ``redis_cluster`` shares the same cluster
through ``shared_cluster()``.

Without ``redis-server`` / ``redis-cli`` on PATH the tests that need these servers
skip with the reason, unless ``ASYNCSESSION_REQUIRE_SERVERS=1`` (set by ``.ci/run``):
then they fail.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REQUIRE = os.environ.get("ASYNCSESSION_REQUIRE_SERVERS") == "1"
HOST = "127.0.0.1"
SERVICE = "asyncsession"
"""The Sentinel service name the ``redis_sentinel`` deployment monitors."""
NODE_TIMEOUT_MS = 5_000
"""``cluster-node-timeout``: long enough that a busy 2-core machine never fakes a failure."""
START_TIMEOUT = 60.0


def skip_reason() -> str | None:
    """Why the server tests cannot run here (None: they can)."""
    try:
        import redis  # noqa: F401
    except ImportError:
        return "redis is not installed (pip install 'asyncsession[redis]')"
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    if missing:
        return f"{' and '.join(missing)} not on PATH (needed to start throwaway servers)"
    return None


def cluster_client_reason() -> str | None:
    """Why the installed redis-py cannot run the store on a cluster (None: it can):
    a declared limit (``MIN_CLUSTER_CLIENT``), so cluster tests skip, even under
    ``ASYNCSESSION_REQUIRE_SERVERS=1`` (the oldest-versions run installs redis-py 5)."""
    try:
        import redis
    except ImportError:
        return None
    from asyncsession.backends.redis.server import cluster_client_problem

    return cluster_client_problem(redis.__version__)


def require_cluster() -> None:
    """``require_servers``, and a redis-py that supports Redis Cluster (else skip)."""
    reason = cluster_client_reason()
    if reason is not None:
        pytest.skip(reason)
    require_servers()


def require_servers() -> None:
    """Skip the calling test (or fail it under ``ASYNCSESSION_REQUIRE_SERVERS=1``)."""
    reason = skip_reason()
    if reason is None:
        return
    if REQUIRE:
        pytest.fail(f"ASYNCSESSION_REQUIRE_SERVERS=1 but {reason}")
    pytest.skip(reason)


# ----------------------------------------------------------------------- processes


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_ports(count: int, *, bus: bool = False) -> list[int]:
    """``count`` distinct free loopback ports (with ``bus``, ``port + 10000`` free too,
    for the cluster bus). Random in 10000-21999, so that bus ports (up to 31999) too
    stay below Linux's ephemeral range (32768 up): an outgoing connection cannot take
    a port between the check and the server's start."""
    rng = random.Random()
    ports: list[int] = []
    while len(ports) < count:
        port = rng.randrange(10_000, 22_000)
        if port in ports or (bus and (port + 10_000 in ports or port - 10_000 in ports)):
            continue
        if _port_free(port) and (not bus or _port_free(port + 10_000)):
            ports.append(port)
    return ports


def free_port() -> int:
    """One free loopback port from ``free_ports``: below the ephemeral range, where
    a port the kernel hands out for bind(0) can be taken by another suite's outgoing
    connection before the server binds it (a restarted server gets it back too)."""
    return free_ports(1)[0]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    """Linux: the server gets SIGKILL if the test process dies without cleaning up."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


_live: set[Server] = set()
_live_lock = threading.Lock()


class Server:
    """One ``redis-server`` (or sentinel) process on ``port``, logging to a file."""

    def __init__(self, name: str, port: int, directory: Path, args: list[str]) -> None:
        self.name = name
        self.port = port
        self.directory = directory
        self.args = args
        self.log = directory / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> tuple[str, int]:
        return (HOST, self.port)

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary is not None
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, *self.args],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
        with _live_lock:
            _live.add(self)
        self.wait_ping()

    def wait_ping(self, within: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + within
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.tail()}")
            with contextlib.suppress(Exception):
                if self.client(timeout=0.5).ping():
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not answer PING: {self.tail()}")
            time.sleep(0.02)

    def client(self, timeout: float = 5.0) -> Any:
        """A synchronous redis-py client for administration (a new one each call)."""
        import redis

        return redis.Redis(
            host=HOST, port=self.port, socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def call(self, *args: Any) -> Any:
        client = self.client()
        try:
            return client.execute_command(*args)
        finally:
            client.close()

    def info(self, section: str) -> dict[str, Any]:
        client = self.client()
        try:
            return dict(client.info(section))
        finally:
            client.close()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pause(self) -> None:
        """SIGSTOP: the node stops answering but keeps its sockets (a hung node)."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def kill(self) -> None:
        """SIGKILL and reap (a crashed node); ``start()`` brings it back on the same port."""
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.kill()
        proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 5 s) and reap. Idempotent."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused server cannot handle SIGTERM
                proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        with _live_lock:
            _live.discard(self)

    def tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(text[-lines:])


def _stop_all_live() -> None:
    """``atexit`` backstop: nothing started here outlives the test process."""
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_live)


def wait_until(condition: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while True:
        with contextlib.suppress(Exception):
            if condition():
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {within:.0f} s waiting for {what}")
        time.sleep(0.05)


class Deployment:
    """Servers started together in one temporary directory; ``stop()`` ends them all."""

    kind = "deployment"

    def __init__(self) -> None:
        self.directory = Path(tempfile.mkdtemp(prefix=f"asyncsession-{self.kind}-"))
        self.servers: list[Server] = []
        self.stopped = False

    def _server(self, name: str, port: int, args: list[str]) -> Server:
        server = Server(name, port, self.directory, args)
        self.servers.append(server)
        server.start()
        return server

    def stop(self) -> None:
        self.stopped = True
        for server in self.servers:
            with contextlib.suppress(Exception):
                server.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    def logs(self) -> str:
        return "\n".join(f"{s.name}: {s.tail()}" for s in self.servers)


def _base_args(port: int) -> list[str]:
    return [
        "--port",
        str(port),
        "--bind",
        HOST,
        "--save",
        "",
        "--appendonly",
        "no",
        "--daemonize",
        "no",
        "--protected-mode",
        "no",
        "--repl-diskless-sync-delay",
        "0",
    ]


# ------------------------------------------------------------------------- cluster


class Cluster(Deployment):
    """Three primaries, no replicas, every slot assigned (``cluster_state:ok``)."""

    kind = "cluster"

    def __init__(self, primaries: int = 3) -> None:
        super().__init__()
        try:
            self._start(primaries)
        except BaseException:
            self.stop()
            raise

    def _start(self, primaries: int) -> None:
        for attempt in range(3):
            ports = free_ports(primaries, bus=True)
            try:
                for n, port in enumerate(ports):
                    self._server(f"node{n}-{port}", port, self._node_args(port))
                break
            except RuntimeError:  # a port was taken between the check and the bind
                for server in self.servers:
                    server.stop()
                self.servers.clear()
                if attempt == 2:
                    raise
        cli = shutil.which("redis-cli")
        assert cli is not None
        out = subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"{HOST}:{s.port}" for s in self.servers),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            capture_output=True,
            timeout=START_TIMEOUT,
            stdin=subprocess.DEVNULL,
        )
        if out.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({out.returncode}): "
                f"{out.stdout.decode(errors='replace')[-800:]} "
                f"{out.stderr.decode(errors='replace')[-800:]}"
            )
        self.wait_ok()

    def _node_args(self, port: int) -> list[str]:
        return [
            *_base_args(port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            f"nodes-{port}.conf",
            "--cluster-node-timeout",
            str(NODE_TIMEOUT_MS),
            "--cluster-require-full-coverage",
            "yes",
        ]

    def wait_ok(self, within: float = START_TIMEOUT) -> None:
        """Every node reports ``cluster_state:ok``, all slots, all nodes, one slot map."""
        count = len(self.servers)

        def ready() -> bool:
            maps = set()
            for server in self.servers:
                info = server.call("CLUSTER", "INFO")
                text = info.decode() if isinstance(info, bytes) else str(info)
                fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
                if (
                    fields.get("cluster_state") != "ok"
                    or fields.get("cluster_slots_ok") != "16384"
                    or fields.get("cluster_known_nodes") != str(count)
                ):
                    return False
                maps.add(tuple(sorted(self.slot_map(server).items())))
            return len(maps) == 1

        try:
            wait_until(ready, within, "the cluster to be ready")
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None

    @staticmethod
    def slot_map(server: Server) -> dict[int, int]:
        """First slot of each range -> port of the primary serving it, as ``server`` sees it."""
        out = {}
        for entry in server.call("CLUSTER", "SLOTS"):
            out[int(entry[0])] = int(entry[2][1])
        return out

    @property
    def ports(self) -> list[int]:
        return [s.port for s in self.servers]

    @property
    def startup_nodes(self) -> list[tuple[str, int]]:
        return [s.address for s in self.servers]

    @property
    def url(self) -> str:
        """``redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3``."""
        return "redis+cluster://" + ",".join(f"{HOST}:{p}" for p in self.ports)

    def server_for_slot(self, slot: int) -> Server:
        owner = None
        for entry in self.servers[0].call("CLUSTER", "SLOTS"):
            if int(entry[0]) <= slot <= int(entry[1]):
                owner = int(entry[2][1])
        return next(s for s in self.servers if s.port == owner)

    def node_id(self, server: Server) -> str:
        raw = server.call("CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def dbsizes(self) -> dict[int, int]:
        return {s.port: int(s.call("DBSIZE")) for s in self.servers}

    def move_slot(
        self, slot: int, target: Server, *, keys: list[bytes] | None = None, finish: bool = True
    ) -> Server:
        """Reshard ``slot`` to ``target`` the way ``redis-cli --cluster reshard`` does:
        IMPORTING/MIGRATING, ``MIGRATE`` the keys (only ``keys`` if given), then, with
        ``finish``, ``SETSLOT NODE`` everywhere. Returns the source node."""
        source = self.server_for_slot(slot)
        if source is target:
            return source
        source_id, target_id = self.node_id(source), self.node_id(target)
        target.call("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.call("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        if keys is None:
            keys = list(source.call("CLUSTER", "GETKEYSINSLOT", slot, 100_000))
        if keys:
            source.call("MIGRATE", HOST, target.port, "", 0, 10_000, "KEYS", *keys)
        if finish:
            self.finish_slot(slot, target)
        return source

    def finish_slot(self, slot: int, target: Server) -> None:
        """Complete a migration started by ``move_slot(..., finish=False)``."""
        source = self.server_for_slot(slot)
        rest = list(source.call("CLUSTER", "GETKEYSINSLOT", slot, 100_000))
        if rest and source is not target:
            source.call("MIGRATE", HOST, target.port, "", 0, 10_000, "KEYS", *rest)
        target_id = self.node_id(target)
        for server in [target, source, *self.servers]:
            server.call("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        self.wait_ok()


# ------------------------------------------------------------------------ sentinel


def _text_fields(entry: Any) -> dict[str, str]:
    """A ``SENTINEL REPLICAS`` entry (a flat list, or a dict once redis-py parsed it)."""
    if not isinstance(entry, dict):
        entry = dict(zip(entry[::2], entry[1::2], strict=True))
    return {
        (k.decode() if isinstance(k, bytes) else str(k)): (
            v.decode() if isinstance(v, bytes) else str(v)
        )
        for k, v in entry.items()
    }


class Sentinel(Deployment):
    """One primary, one replica of it, one sentinel monitoring ``SERVICE`` (quorum 1)."""

    kind = "sentinel"

    def __init__(self) -> None:
        super().__init__()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        for attempt in range(3):
            primary_port, replica_port, sentinel_port = free_ports(3)
            try:
                self.primary_server = self._server(
                    f"primary-{primary_port}", primary_port, _base_args(primary_port)
                )
                self.replica_server = self._server(
                    f"replica-{replica_port}",
                    replica_port,
                    [*_base_args(replica_port), "--replicaof", HOST, str(primary_port)],
                )
                conf = self.directory / "sentinel.conf"
                conf.write_text(
                    f"port {sentinel_port}\n"
                    f"bind {HOST}\n"
                    "daemonize no\n"
                    "protected-mode no\n"
                    f"dir {self.directory}\n"
                    f"sentinel monitor {SERVICE} {HOST} {primary_port} 1\n"
                    f"sentinel down-after-milliseconds {SERVICE} 5000\n"
                    f"sentinel failover-timeout {SERVICE} 10000\n"
                    f"sentinel parallel-syncs {SERVICE} 1\n"
                )
                self.sentinel_server = self._server(
                    f"sentinel-{sentinel_port}", sentinel_port, [str(conf), "--sentinel"]
                )
                break
            except RuntimeError:
                for server in self.servers:
                    server.stop()
                self.servers.clear()
                if attempt == 2:
                    raise
        try:
            self.wait_synced()
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}\n{self.logs()}") from None

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        return [self.sentinel_server.address]

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:port/asyncsession``."""
        return f"redis+sentinel://{HOST}:{self.sentinel_server.port}/{SERVICE}"

    def primary_address(self) -> tuple[str, int]:
        """The primary as the sentinel names it now."""
        host, port = self.sentinel_server.call("SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE)
        return (host.decode() if isinstance(host, bytes) else host, int(port))

    def by_port(self, port: int) -> Server:
        return next(s for s in (self.primary_server, self.replica_server) if s.port == port)

    def current(self) -> tuple[Server, Server]:
        """``(primary, replica)`` as they are now (they swap at each failover)."""
        primary = self.by_port(self.primary_address()[1])
        replica = self.replica_server if primary is self.primary_server else self.primary_server
        return primary, replica

    def wait_synced(self, within: float = START_TIMEOUT) -> None:
        """The replica is linked and caught up, and the sentinel knows it as a good
        failover candidate (so ``SENTINEL FAILOVER`` can pick it)."""

        def ready() -> bool:
            primary, replica = self.current()
            if primary.info("replication").get("role") != "master":
                return False
            rep = replica.info("replication")
            if rep.get("role") != "slave" or rep.get("master_link_status") != "up":
                return False
            if rep.get("master_port") != primary.port:
                return False
            if int(primary.call("WAIT", 1, 1000)) < 1:
                return False
            known = self.sentinel_server.call("SENTINEL", "REPLICAS", SERVICE)
            for entry in known:
                fields = _text_fields(entry)
                if (
                    int(fields.get("port", 0)) == replica.port
                    and fields.get("flags") == "slave"
                    and fields.get("master-link-status") == "ok"
                ):
                    return True
            return False

        wait_until(ready, within, "the replica and the sentinel to be in sync")

    def failover(
        self, within: float = START_TIMEOUT, *, resync: bool = False
    ) -> tuple[Server, Server]:
        """``SENTINEL FAILOVER``; returns the new ``(primary, replica)`` once the sentinel
        names the new primary and it has taken the role.

        The sentinel demotes the old primary only at its next INFO round (about 10 s
        later) and sees it in sync some 10 s after that; ``resync`` waits for both."""
        old_primary, old_replica = self.current()
        self.sentinel_server.call("SENTINEL", "FAILOVER", SERVICE)
        wait_until(
            lambda: (
                self.primary_address()[1] == old_replica.port
                and old_replica.info("replication").get("role") == "master"
            ),
            within,
            "the sentinel to promote the replica",
        )
        if resync:
            self.wait_synced(within)
        return old_replica, old_primary


# ---------------------------------------------------------------------- fixtures
#
# One cluster and one sentinel deployment per test session, started on first use.
# ``shared_cluster()`` also serves the conformance backend (tests/backend_redis_cluster.py),
# which is not a fixture; ``stop_shared()`` runs from the session finalizer in
# tests/conftest.py and from ``atexit``.

_shared: dict[str, Deployment] = {}
_failed: dict[str, BaseException] = {}


def _shared_deployment(kind: str, make: Callable[[], Deployment]) -> Any:
    deployment = _shared.get(kind)
    if deployment is not None and not deployment.stopped:
        return deployment
    if kind in _failed:  # fail fast: do not retry a broken start-up in every test
        raise RuntimeError(f"the shared {kind} failed to start earlier: {_failed[kind]}")
    try:
        deployment = make()
    except BaseException as exc:
        _failed[kind] = exc
        raise
    _shared[kind] = deployment
    return deployment


def shared_cluster() -> Cluster:
    """The session's 3-primary cluster, started on the first call."""
    cluster: Cluster = _shared_deployment("cluster", Cluster)
    return cluster


def shared_sentinel() -> Sentinel:
    """The session's primary + replica + sentinel, started on the first call."""
    sentinel: Sentinel = _shared_deployment("sentinel", Sentinel)
    return sentinel


def stop_shared() -> None:
    """Stop every shared deployment (the session finalizer)."""
    while _shared:
        _, deployment = _shared.popitem()
        deployment.stop()


atexit.register(stop_shared)


@pytest.fixture(scope="session", autouse=True)
def redis_servers_cleanup() -> Iterator[None]:
    """Session finalizer: stops whatever shared deployment a test started."""
    try:
        yield
    finally:
        stop_shared()


@pytest.fixture(scope="session")
def redis_cluster(redis_servers_cleanup: None) -> Cluster:
    """The shared 3-primary cluster (skips, or fails under REQUIRE, without binaries)."""
    require_cluster()
    return shared_cluster()


@pytest.fixture(scope="session")
def redis_sentinel(redis_servers_cleanup: None) -> Sentinel:
    """The shared primary + replica + sentinel deployment."""
    require_servers()
    return shared_sentinel()


@pytest.fixture
def private_cluster() -> Iterator[Cluster]:
    """A cluster of this test's own (for tests that break nodes); always stopped."""
    require_cluster()
    cluster = Cluster()
    try:
        yield cluster
    finally:
        cluster.stop()
