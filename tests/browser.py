"""Headless Debian Chromium driven over the DevTools protocol through a pipe.

`--remote-debugging-pipe` makes Chromium read protocol messages on fd 3 and write replies on
fd 4 (JSON, each message ended by a NUL byte). A pipe needs no port, so it also works when
the browser runs inside a private network namespace and the test does not.

    with Chromium(fake_audio=wav, wrap=net.wrap) as browser:
        page = browser.new_page("http://10.200.0.1:7861/")
        page.evaluate("document.title")
"""

from __future__ import annotations

import base64
import fcntl
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")


def find_chromium() -> str | None:
    for path in CHROMIUM_CANDIDATES:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("chromium")


def _high_pipe() -> tuple[int, int]:
    """A pipe whose fds are above 4, so moving them onto fds 3 and 4 in the child is safe."""
    r, w = os.pipe()
    high = tuple(fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (r, w))
    os.close(r)
    os.close(w)
    return high


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium process and its DevTools pipe."""

    def __init__(
        self,
        *,
        fake_audio: Path | None = None,
        wrap: Callable[[Sequence[str]], list[str]] | None = None,
        executable: str | None = None,
        extra_flags: Sequence[str] = (),
    ):
        self._executable = executable or find_chromium()
        if self._executable is None:
            raise FileNotFoundError("chromium is not installed (apt-get install -y chromium)")
        self._fake_audio = fake_audio
        self._wrap = wrap or (lambda command: list(command))
        self._extra_flags = list(extra_flags)
        self._proc: subprocess.Popen | None = None
        self._profile: tempfile.TemporaryDirectory | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[threading.Event, list]] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._to_browser = None
        self.console: list[str] = []

    def flags(self, profile: str) -> list[str]:
        flags = [
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream",
            "--autoplay-policy=no-user-gesture-required",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--no-first-run",
            "--no-default-browser-check",
            "--mute-audio",
            # A headless window counts as hidden: keep its timers and rendering at full rate.
            "--disable-background-timer-throttling",
            "--disable-backgrounding-occluded-windows",
            "--disable-renderer-backgrounding",
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
        ]
        if self._fake_audio is not None:
            flags.append(f"--use-file-for-fake-audio-capture={self._fake_audio}")
        return flags + self._extra_flags

    def __enter__(self) -> Chromium:
        self._profile = tempfile.TemporaryDirectory(prefix="musetalk-chromium-")
        to_browser_r, to_browser_w = _high_pipe()
        from_browser_r, from_browser_w = _high_pipe()

        def child_fds() -> None:  # runs in the child before exec: fd 3 = commands in, fd 4 = replies out
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        command = self._wrap([self._executable, *self.flags(self._profile.name), "about:blank"])
        self._proc = subprocess.Popen(
            command, preexec_fn=child_fds, pass_fds=(3, 4),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._to_browser = os.fdopen(to_browser_w, "wb", buffering=0)
        self._reader = threading.Thread(target=self._read_loop, args=(from_browser_r,), daemon=True)
        self._reader.start()
        try:
            self.call("Browser.getVersion", timeout=30)
        except BaseException:
            self.close()
            raise
        return self

    def _read_loop(self, fd: int) -> None:
        buffer = b""
        with os.fdopen(fd, "rb", buffering=0) as pipe:
            while True:
                chunk = pipe.read(1 << 16)
                if not chunk:
                    break
                buffer += chunk
                while b"\0" in buffer:
                    raw, buffer = buffer.split(b"\0", 1)
                    self._dispatch(json.loads(raw))
        with self._lock:  # the browser is gone: wake every waiter
            for event, box in self._pending.values():
                box.append({"error": {"message": "the browser closed the DevTools pipe"}})
                event.set()

    def _dispatch(self, message: dict[str, Any]) -> None:
        if "id" in message:
            with self._lock:
                waiter = self._pending.pop(message["id"], None)
            if waiter is not None:
                waiter[1].append(message)
                waiter[0].set()
        elif message.get("method") == "Runtime.consoleAPICalled":
            args = message["params"].get("args", [])
            self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in args))

    def call(
        self, method: str, params: dict[str, Any] | None = None, *, session: str | None = None, timeout: float = 30
    ) -> dict:
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session is not None:
            message["sessionId"] = session
        event, box = threading.Event(), []
        with self._lock:
            self._pending[message["id"]] = (event, box)
        self._to_browser.write(json.dumps(message).encode() + b"\0")
        if not event.wait(timeout):
            with self._lock:
                self._pending.pop(message["id"], None)
            raise CDPError(f"{method}: no reply within {timeout} s")
        reply = box[0]
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error'].get('message')}")
        return reply.get("result", {})

    def new_page(self, url: str) -> Page:
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self, session)
        page.call("Runtime.enable")
        page.call("Page.enable")
        # A tab in the background gets no rendering (no requestVideoFrameCallback): show it, focused.
        page.call("Page.bringToFront")
        page.call("Emulation.setFocusEmulationEnabled", {"enabled": True})
        page.call("Page.navigate", {"url": url})
        return page

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None and self._to_browser is not None:
                try:
                    self.call("Browser.close", timeout=5)
                except (CDPError, OSError):
                    pass
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(timeout=10)
            self._proc = None
        if self._to_browser is not None:
            try:
                self._to_browser.close()
            except OSError:
                pass
            self._to_browser = None
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None
        if self._profile is not None:
            self._profile.cleanup()
            self._profile = None

    def __exit__(self, *exc) -> None:
        self.close()


class Page:
    def __init__(self, browser: Chromium, session: str):
        self.browser = browser
        self.session = session

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict:
        return self.browser.call(method, params, session=self.session, timeout=timeout)

    def evaluate(self, expression: str, *, timeout: float = 30, user_gesture: bool = False) -> Any:
        """Evaluate JavaScript (promises are awaited); returns the value as JSON."""
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True, "userGesture": user_gesture},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise CDPError(f"JavaScript error: {text}")
        return result.get("result", {}).get("value")


def wait_js(page: Page, expression: str, timeout: float = 30.0) -> Any:
    """Evaluate `expression` every 0.2 s until it is truthy or `timeout` s pass; returns its last value."""
    deadline = time.monotonic() + timeout
    value = page.evaluate(expression)
    while not value and time.monotonic() < deadline:
        time.sleep(0.2)
        value = page.evaluate(expression)
    return value


def screenshot(page: Page, path: Path) -> None:
    """The whole page (up to 4000 px tall, 1400 px wide) as a PNG at `path`; the viewport is 1400x900 again after."""
    height = int(page.call("Page.getLayoutMetrics")["cssContentSize"]["height"])
    page.call("Emulation.setDeviceMetricsOverride", {"width": 1400, "height": min(max(height, 900), 4000), "deviceScaleFactor": 1, "mobile": False})  # fmt: skip
    time.sleep(0.5)
    data = page.call("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})["data"]
    path.write_bytes(base64.b64decode(data))
    page.call(
        "Emulation.setDeviceMetricsOverride", {"width": 1400, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    )
