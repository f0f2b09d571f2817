"""End to end: the demo app in real headless Chromium (Playwright + Debian's chromium).

The demo runs as ``python -m asyncsession demo`` on a free 127.0.0.1 port with a
SQLite file. Without Playwright or ``/usr/bin/chromium`` the test skips, unless
``ASYNCSESSION_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where it fails.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .redis_servers import free_port

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
COOKIE = "asyncsession_demo"


def _missing_browser() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "Playwright is not installed (pip install -e '.[test]')"
    if not os.access(CHROMIUM, os.X_OK):
        return f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    try:
        import aiosqlite  # noqa: F401
    except ImportError:
        return "aiosqlite is not installed (pip install -e '.[sqlite]')"
    return None


def _require_browser() -> None:
    reason = _missing_browser()
    if reason is None:
        return
    if os.environ.get("ASYNCSESSION_REQUIRE_BROWSER") == "1":
        pytest.fail(f"ASYNCSESSION_REQUIRE_BROWSER=1 but {reason}")
    pytest.skip(reason)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[str]:
    """The demo server's base URL; the process is stopped afterwards."""
    _require_browser()
    port = free_port()
    log = open(tmp_path / "demo.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "asyncsession",
            "demo",
            "--store",
            f"sqlite:///{tmp_path / 'demo.db'}",
            "--port",
            str(port),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                pytest.fail(f"demo exited: {(tmp_path / 'demo.log').read_text()}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"demo did not start: {(tmp_path / 'demo.log').read_text()}")
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _login(page: Any, base: str, name: str) -> None:
    page.goto(base + "/")
    page.fill("#login-form input[name=user]", name)
    page.click("#login")
    page.wait_for_selector("#user")
    assert page.inner_text("#user") == name


def test_demo_login_increment_second_device_revoke(demo: str) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            laptop = browser.new_context(user_agent="laptop-browser/1.0")
            phone = browser.new_context(user_agent="phone-browser/2.0")
            page = laptop.new_page()
            page.set_default_timeout(15_000)

            # anonymous: a counter works before login, and survives the login
            page.goto(demo + "/")
            assert "Not logged in" in page.inner_text("#whoami")
            assert laptop.cookies() == []  # nothing stored until the first write
            page.click("#increment")
            page.wait_for_function("document.querySelector('#counter').innerText === '1'")
            (anonymous,) = laptop.cookies()
            _login(page, demo, "alice")
            (cookie,) = laptop.cookies()
            assert cookie["name"] == COOKIE
            assert cookie["value"] != anonymous["value"]  # rotated at login
            assert cookie["httpOnly"] is True
            assert cookie["sameSite"] == "Lax"
            assert page.inner_text("#counter") == "1"
            page.click("#increment")
            page.wait_for_function("document.querySelector('#counter').innerText === '2'")

            # set a key through the form
            page.fill("#set-form input[name=key]", "theme")
            page.fill("#set-form input[name=value]", "dark")
            page.click("#set")
            page.wait_for_function("document.querySelector('#data').innerText.includes('dark')")

            # the same user on a second device
            other = phone.new_page()
            other.set_default_timeout(15_000)
            _login(other, demo, "alice")
            assert other.inner_text("#counter") == "0"

            page.reload()
            rows = page.locator("#sessions tr[data-session]")
            assert rows.count() == 2
            assert "phone-browser/2.0" in page.inner_text("#sessions")
            assert "this device" in page.inner_text("#sessions tr.current")

            # revoke the phone from the laptop
            page.click("#sessions tr[data-session]:not(.current) button")
            page.wait_for_function(
                "document.querySelectorAll('#sessions tr[data-session]').length === 1"
            )
            assert "laptop-browser/1.0" in page.inner_text("#sessions")

            # the phone is logged out and its stale cookie is cleared
            other.reload()
            assert "Not logged in" in other.inner_text("#whoami")
            assert [c for c in phone.cookies() if c["name"] == COOKIE] == []

            # the laptop still is, with its data
            page.reload()
            assert page.inner_text("#user") == "alice"
            assert page.inner_text("#counter") == "2"

            # log out
            page.click("#logout")
            page.wait_for_selector("#login-form")
            assert laptop.cookies() == []
        finally:
            browser.close()
