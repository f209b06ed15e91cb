"""A private network namespace for WebRTC tests (root only).

Why: aioice (the bot's ICE) skips 127.0.0.1 and Chromium ignores loopback candidates, so a
browser and the bot on one machine need a real, non-loopback address. A fresh network
namespace with a veth pair (10.200.0.1 <-> 10.200.0.2) gives them one; nothing in it can
reach any other network, and it disappears with its last process.

    with PrivateNetwork() as net:
        server = net.popen([...])      # runs inside the namespace
        browser = net.popen([...])
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence

SERVER_ADDRESS = "10.200.0.1"
PEER_ADDRESS = "10.200.0.2"


def unavailable_reason() -> str | None:
    """Why a private namespace cannot be made here (None when it can)."""
    if os.geteuid() != 0:
        return "needs root to create a network namespace (CI runs as root)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"`{tool}` is not installed (util-linux / iproute2)"
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, text=True, check=False)
    if probe.returncode != 0:
        return f"cannot create a network namespace here: {probe.stderr.strip()}"
    return None


class PrivateNetwork:
    """A network namespace held open by a `sleep` process; `popen()` runs commands inside it."""

    def __init__(self, lifetime_s: int = 900):
        self._lifetime_s = lifetime_s
        self._holder: subprocess.Popen | None = None

    def __enter__(self) -> PrivateNetwork:
        self._holder = subprocess.Popen(["unshare", "-n", "--", "sleep", str(self._lifetime_s)])
        try:
            self._wait_until_unshared()
            for command in (
                ["ip", "link", "set", "lo", "up"],
                ["ip", "link", "add", "mt0", "type", "veth", "peer", "name", "mt1"],
                ["ip", "addr", "add", f"{SERVER_ADDRESS}/24", "dev", "mt0"],
                ["ip", "addr", "add", f"{PEER_ADDRESS}/24", "dev", "mt1"],
                ["ip", "link", "set", "mt0", "up"],
                ["ip", "link", "set", "mt1", "up"],
            ):
                self._run_checked(command)
        except BaseException:
            self.close()
            raise
        return self

    def _wait_until_unshared(self) -> None:
        """Never configure anything before the holder really is in its own namespace."""
        ours = os.readlink("/proc/self/ns/net")
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._holder.poll() is not None:
                raise RuntimeError(f"unshare -n exited with {self._holder.returncode}")
            try:
                if os.readlink(f"/proc/{self._holder.pid}/ns/net") != ours:
                    return
            except FileNotFoundError:
                pass
            time.sleep(0.01)
        raise RuntimeError("the namespace holder did not enter its own network namespace")

    def _run_checked(self, command: Sequence[str]) -> None:
        result = subprocess.run(self.wrap(command), capture_output=True, text=True, check=False)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed in the namespace: {result.stderr.strip()}")

    @property
    def pid(self) -> int:
        assert self._holder is not None, "use PrivateNetwork as a context manager"
        return self._holder.pid

    def wrap(self, command: Sequence[str]) -> list[str]:
        """`command` as run inside the namespace."""
        return ["nsenter", "-t", str(self.pid), "-n", "--", *command]

    def popen(self, command: Sequence[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.wrap(command), **kwargs)

    def addresses(self) -> str:
        return subprocess.run(self.wrap(["ip", "-br", "addr"]), capture_output=True, text=True, check=False).stdout

    def close(self) -> None:
        if self._holder is not None and self._holder.poll() is None:
            self._holder.kill()
            self._holder.wait(timeout=10)
        self._holder = None

    def __exit__(self, *exc) -> None:
        self.close()
