"""Real uvicorn for the tests that need real concurrency: an app served by worker
processes on a free port of 127.0.0.1, stopped (and its workers with it) afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from .redis_servers import free_port

ROOT = Path(__file__).resolve().parent.parent


@contextmanager
def serve(
    app: str,
    *,
    workers: int,
    env: dict[str, str],
    ready: str,
    log: Path,
    factory: bool = False,
    timeout: float = 60,
) -> Iterator[str]:
    """Serve ``app`` (``module:attr``) with ``workers`` processes and ``env`` added to
    this process's environment; yields the base URL once ``GET ready`` answers 200.
    uvicorn's output goes to ``log``, shown if it does not start."""
    port = free_port()
    cmd = [sys.executable, "-m", "uvicorn", app, *(["--factory"] if factory else [])]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    cmd += ["--log-level", "warning", "--no-access-log"]
    # uvicorn closes a keep-alive connection idle for 5 s; on a loaded machine a test's
    # client reused one the server was closing at that moment ("Server disconnected",
    # a flake of the harness, not of the code under test)
    cmd += ["--timeout-keep-alive", "120"]
    base = f"http://127.0.0.1:{port}"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**os.environ, **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: workers go with it
        )
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    if httpx.get(base + ready, timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"uvicorn did not start:\n{log.read_text(errors='replace')}")
                time.sleep(0.1)
            time.sleep(0.5 * (workers - 1))  # one worker answered: let the others come up
            yield base
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # the supervisor and its workers
                proc.wait()
