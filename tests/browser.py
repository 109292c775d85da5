"""A real dashboard for the browser tests: `streamlit run app.py` on a free loopback port,
and headless Debian Chromium driven by Playwright."""

from __future__ import annotations

import ipaddress
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("DTM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DTM_TEST_ARTIFACTS", ROOT / "test-artifacts")) / "browser"
# As the machine's own probe starts it: no sandbox (root), and nothing that reaches out.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def need_chromium() -> None:
    """Skip without a Chromium, except under CI, where its absence is a failure."""
    if not Path(CHROMIUM).exists():
        msg = f"no Chromium at {CHROMIUM} (make test installs Debian's chromium)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Dashboard:
    """The Streamlit server as a user starts it, in its own process group (so a kill -9
    takes the server only, never the detached training jobs it launched)."""

    def __init__(self, cache: Path, log: Path):
        self.cache, self.log, self.port = cache, log, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> Dashboard:
        env = {
            **os.environ,
            "DTM_CACHE": str(self.cache),
            "DTM_LAB_AUTOBUILD": "0",
            "HF_HUB_OFFLINE": "1",
        }
        cmd = [sys.executable, "-m", "streamlit", "run", "app.py"]
        cmd += ["--server.port", str(self.port), "--server.headless", "true"]
        cmd += ["--server.fileWatcherType", "none"]
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen(
                cmd,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        end = time.time() + timeout
        while time.time() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"streamlit exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + "/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(0.3)
        raise RuntimeError(f"streamlit did not come up: {self.log.read_text()[-2000:]}")

    def kill9(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill9()


def on_this_machine(url: str) -> bool:
    """True for a URL that stays on this machine: a loopback host (127.0.0.0/8, ::1,
    localhost) or none at all (data:, blob:, about:)."""
    host = urlsplit(url).hostname
    if not host:
        return True
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it would need a DNS lookup, off the machine
        return False


class OffMachine:
    """Every URL a browser context asks for that would leave the machine (documents,
    scripts, fonts, images, fetches, and its pages' web sockets), in ``urls``. Such a
    request is recorded, then aborted, so a test that finds one never sends it."""

    def __init__(self, context):
        self.urls: list[str] = []
        context.on("request", lambda r: self.see(r.url))
        context.on("page", self.watch)
        context.route(lambda url: not on_this_machine(url), lambda route: route.abort())
        for page in context.pages:
            self.watch(page)

    def see(self, url: str) -> None:
        if not on_this_machine(url):
            self.urls.append(url)

    def watch(self, page) -> None:
        page.on("websocket", lambda ws: self.see(ws.url))


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)


def wait_idle(page, timeout: float = 120_000) -> None:
    """Until the app's script run has finished (Streamlit marks the root element)."""
    page.wait_for_timeout(250)
    page.wait_for_selector(
        "[data-testid='stApp'][data-test-script-state='notRunning'],"
        "[data-testid='stApp'][data-test-script-state='rerunRequested'],"
        "[data-testid='stApp'][data-test-script-state='initial']",
        timeout=timeout,
    )


def shot(page, name: str) -> Path:
    """The whole page as a PNG. Streamlit scrolls inside its main block, not the document,
    so the viewport is stretched to the block's height for the picture."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    size = page.viewport_size
    height = page.evaluate(
        "() => Math.max(document.querySelector('[data-testid=stMain]')?.scrollHeight || 0,"
        " document.body.scrollHeight)"
    )
    page.set_viewport_size({"width": size["width"], "height": min(max(height, 600), 8000)})
    page.wait_for_timeout(300)
    page.screenshot(path=str(path))
    page.set_viewport_size(size)
    return path
