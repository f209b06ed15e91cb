"""What several test files share: waiting, threads, ports, processes, the panel and the CLI as subprocesses.

Test modules import from here (and from media.py, viewers.py, browser.py, netns.py), never from each
other. Plain functions and classes, no pytest fixtures (those live in conftest.py).
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
TESTS = REPO / "tests"
ARTIFACTS = REPO / "test-artifacts"  # screenshots the browser tests save
START_SERVER = REPO / "start_pipecat_server.py"


# --------------------------------------------------------------------------- waiting
def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, step: float = 0.05) -> bool:
    """Whether `predicate()` holds within `timeout` s (asked every `step` s, and once more at the end)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return bool(predicate())


def poll(fn: Callable[[], Any], until: Callable[[Any], Any], timeout: float = 20.0, every: float = 0.2):
    """Call `fn` until `until(value)` holds or `timeout` s pass; returns the last value."""
    deadline = time.monotonic() + timeout
    value = fn()
    while not until(value) and time.monotonic() < deadline:
        time.sleep(every)
        value = fn()
    return value


# --------------------------------------------------------------------------- the device's speed
def budget_for(frames: int, frame_cost_s: float, slack: float = 3.0, start_s: float = 2.0) -> float:
    """A latency budget (s) in which this device makes `frames` frames queued at once in time for 25 fps.

    Frame k is due `budget + k * 40 ms` after the audio came; the device has made it after `(k + 1) * cost`,
    where cost is `slack` times what it measured per frame (conftest's `frame_cost_s`: a loaded machine is
    slower than its calibration), plus `start_s` for the pipeline to start. A test that needs every frame in
    time waits at most this long on a device slower than real time, instead of a fixed, generous minute."""
    return start_s + frames * max(slack * frame_cost_s - 0.04, 0.0) + slack * frame_cost_s


# --------------------------------------------------------------------------- threads, ports, processes
def bot_threads() -> list[threading.Thread]:
    """Every live thread but the main one."""
    return [t for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]


def wait_no_new_threads(before: set[int], timeout: float = 10.0) -> list[str]:
    """Threads started since `before` that are still alive after `timeout` s (empty when none leaked)."""
    deadline = time.monotonic() + timeout
    while True:
        extra = [t for t in bot_threads() if t.ident not in before]
        if not extra or time.monotonic() > deadline:
            return [t.name for t in extra]
        time.sleep(0.1)


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (SO_REUSEADDR, as servers do: closed
    connections in TIME_WAIT do not count, a socket still listening does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class LineReader:
    """Collects a process's output lines on a thread, so a test can wait for one with a timeout."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        for line in stream:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout: float) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                return None
            self.lines.append(line)
            match = re.search(pattern, line)
            if match:
                return match
        return None

    def rest(self, timeout: float = 5) -> str:
        self._thread.join(timeout)
        while not self._queue.empty():
            line = self._queue.get()
            if line is not None:
                self.lines.append(line)
        return "".join(self.lines)


# --------------------------------------------------------------------------- start_pipecat_server.py
def write_config(path: Path, name: str, preparation: bool, video: Path | None = None) -> Path:
    """A configs/inference/realtime.yaml with one avatar, as start_pipecat_server.py --config reads it."""
    body = {
        name: {
            "preparation": preparation,
            "bbox_shift": 0,
            "video_path": str(video) if video else None,
            "audio_clips": {},
        }
    }
    path.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the panel (app.py)
# Keys the shipped bot config names (api_key_env): never handed to a panel unless a test sets them.
BOT_KEY_VARIABLES = ("STT_API_KEY", "LLM_API_KEY", "TTS_API_KEY", "OPENAI_API_KEY")
SHIPPED_BOT_CONFIG = REPO / "configs" / "bot" / "conversation.yaml"


def panel_env(models_dir: Path, avatars_dir: Path, tmp: Path, **extra: str) -> dict[str, str]:
    return {
        **{k: v for k, v in os.environ.items() if k not in BOT_KEY_VARIABLES},
        "MUSETALK_MODELS_DIR": str(models_dir),
        "MUSETALK_AVATARS_DIR": str(avatars_dir),
        "MUSETALK_DEVICE": "cpu",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "GRADIO_TEMP_DIR": str(tmp / "gradio"),
        "PYTHONUNBUFFERED": "1",
        **extra,
    }


class PanelServer:
    """`python app.py ...` in a subprocess; stopped with Ctrl-C (SIGINT), as a person would."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log = log
        self._log_file = open(log, "w")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--port", str(self.port), *args],
            cwd=log.parent, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"app.py exited:\n{self.log.read_text()[-4000:]}"
            try:
                if httpx.get(self.url, timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"app.py did not serve {self.url} within {timeout} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self._log_file.close()
        return self.proc.returncode

    def stop_checked(self, *secrets: str) -> None:
        """Ctrl-C, then check that it exited 0 and that none of `secrets` reached its log. Gradio waits up to
        5 s for its clients' heartbeat streams before it exits, so tests hand this to conftest's
        `finish_later` and go on meanwhile."""
        code = self.stop()
        log = self.log.read_text()
        for secret in secrets:
            assert secret not in log, f"a secret ({secret[:4]}...) reached the log of {self.url}"
        assert code == 0, f"app.py exited with {code} after Ctrl-C:\n{log[-3000:]}"


# --------------------------------------------------------------------------- the Daily stand-in
DAILY_STANDIN = TESTS / "daily_standin"  # first on a subprocess's PYTHONPATH, `import daily` gets the stand-in


def load_daily_standin() -> Any:
    """The stand-in `daily` module (tests/daily_standin/daily), loaded once under the name "daily_standin" so it
    never shadows the real `daily` in this process."""
    import importlib.util

    module = sys.modules.get("daily_standin")
    if module is None or not hasattr(module, "configure"):
        spec = importlib.util.spec_from_file_location("daily_standin", DAILY_STANDIN / "daily" / "__init__.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules["daily_standin"] = module  # registered before it runs, as `import` does
        spec.loader.exec_module(module)
    return module


def daily_standin(monkeypatch) -> Any:
    """Pipecat's real DailyTransport over the stand-in, in this process: patches the names Pipecat's transport
    module imported from `daily` (undone by `monkeypatch`) and has it call Daily.init() again. Returns the
    stand-in module, reset (no scenarios, clients or rooms)."""
    import pipecat.transports.daily.transport as daily_transport

    standin = load_daily_standin()
    standin.reset()
    names = ("AudioData", "CallClient", "CustomAudioSource", "CustomAudioTrack", "CustomVideoSource")
    for name in (*names, "CustomVideoTrack", "Daily", "VideoFrame", "VirtualSpeakerDevice"):
        monkeypatch.setattr(daily_transport, name, getattr(standin, name))
    monkeypatch.setattr(daily_transport.DailyTransportClient, "_daily_initialized", False)
    return standin
