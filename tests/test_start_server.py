"""start_pipecat_server.py as a user runs it: a subprocess, real files, real signals."""

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
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "start_pipecat_server.py"
SEED_OPTIONS = ("--room-url", "--token", "--config", "--verbose", "--skip-checks")


def cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def write_config(path: Path, name: str, preparation: bool, video: Path | None = None) -> Path:
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


def test_help_lists_the_seed_options(tmp_path):
    result = cli(["--help"], tmp_path)
    assert result.returncode == 0
    for option in (*SEED_OPTIONS, "--local", "--host", "--port", "--mode", "--max-sessions", "--latency-budget"):
        assert option in result.stdout
    assert "configs/inference/realtime.yaml" in result.stdout


def test_without_room_or_local_it_says_how_to_use_it(tmp_path):
    result = cli([], tmp_path)
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--room-url" in result.stderr and "--local" in result.stderr
    assert "Traceback" not in result.stderr
    both = cli(["--local", "--room-url", "https://acme.daily.co/room"], tmp_path)
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.parametrize("url", ["http://acme.daily.co/room", "https://acme.daily.co/", "acme.daily.co/room"])
def test_malformed_room_url_fails_before_loading_anything(tmp_path, url):
    result = cli(["--room-url", url, "--token", "secret-cli-token"], tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Daily room URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert "secret-cli-token" not in result.stderr + result.stdout
    assert not (tmp_path / "musetalk_pipecat.log").exists()  # it stopped before logging even started


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--max-sessions", "0"], "max_sessions"), (["--latency-budget", "-1"], "--latency-budget")],
)
def test_bad_live_limits_fail_before_loading_anything(tmp_path, flags, message):
    result = cli(["--local", *flags], tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


def test_missing_weights_are_listed_with_the_fix(tmp_path):
    config = write_config(tmp_path / "realtime.yaml", "someone", preparation=False)
    empty = tmp_path / "no-models"
    empty.mkdir()
    env = {"MUSETALK_MODELS_DIR": str(empty), "MUSETALK_AVATARS_DIR": str(tmp_path / "avatars")}
    result = cli(["--local", "--port", "0", "--config", str(config)], tmp_path, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "missing" in result.stderr and "unet.pth" in result.stderr and "whisper" in result.stderr
    assert "bash download_weights.sh" in result.stderr
    assert "Traceback" not in result.stderr
    assert "bash download_weights.sh" in (tmp_path / "musetalk_pipecat.log").read_text()


def test_unprepared_avatar_is_a_clear_error(tmp_path, tiny_models_dir):
    config = write_config(tmp_path / "realtime.yaml", "ghost", preparation=False)
    env = {"MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(tmp_path / "avatars")}
    result = cli(["--local", "--port", "0", "--config", str(config), "--skip-checks"], tmp_path, env=env, timeout=120)
    assert result.returncode == 2
    assert "ghost has preparation: False but is not prepared" in result.stderr
    assert "Traceback" not in result.stderr


def test_local_server_prepares_serves_and_stops_on_ctrl_c(tmp_path, tiny_models_dir, face_video):
    """preparation: True -> the avatar is prepared (progress in the log), the page is served,
    SIGINT stops everything with exit code 0 and frees the port."""
    config = write_config(tmp_path / "realtime.yaml", "fresh", preparation=True, video=face_video)
    avatars = tmp_path / "avatars"
    env = {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(tiny_models_dir),
        "MUSETALK_AVATARS_DIR": str(avatars),
        "MUSETALK_DEVICE": "cpu",
    }
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--local", "--port", "0", "--config", str(config), "--skip-checks"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader = LineReader(proc.stderr)
    try:
        found = reader.wait_for(r"Local page: (http://127\.0\.0\.1:(\d+)/)", timeout=180)
        assert found, f"no local page announced; output:\n{reader.rest(1)}"
        url, port = found.group(1), int(found.group(2))
        page = httpx.get(url, timeout=10)
        assert page.status_code == 200 and "How to use" in page.text
        status = httpx.get(url + "api/status", timeout=10).json()
        assert status["state"] == "running" and status["avatar"] == "fresh" and status["transport"] == "local"

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = reader.rest()
    assert "prepare fresh:" in output and "100%" in output, output
    assert "Stopped cleanly" in output and "Traceback" not in output
    assert (avatars / "fresh" / "manifest.json").is_file()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the port is free again
    log = (tmp_path / "musetalk_pipecat.log").read_text()
    assert "Local page:" in log and "Stopped cleanly" in log


def test_speaking_modes_refuse_a_bad_bot_config_before_loading_anything(tmp_path, tiny_models_dir):
    """--mode say / conversation: a bot config that cannot work is one sentence, exit 2, before the models load."""
    config = write_config(tmp_path / "realtime.yaml", "ghost", preparation=False)
    env = {"MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(tmp_path / "avatars")}
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    result = cli(["--local", "--mode", "say", "--bot-config", str(not_a_mapping)], tmp_path, env=env)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "must be a YAML mapping" in result.stderr
    missing = cli(["--local", "--mode", "conversation", "--bot-config", str(tmp_path / "nope.yaml")], tmp_path, env=env)
    assert missing.returncode == 2 and "nope.yaml does not exist" in missing.stderr

    from openai_standin import unreachable_url

    dead = tmp_path / "dead.yaml"
    dead.write_text(
        f"stt: {{service: openai, base_url: '{unreachable_url()}', model: whisper-1}}\n"
        f"llm: {{service: openai, base_url: '{unreachable_url()}', model: m, api_key_env: MUSETALK_TEST_UNSET_KEY}}\n"
    )
    unset = cli(["--local", "--port", "0", "--config", str(config), "--skip-checks", "--mode", "conversation",
                 "--bot-config", str(dead)], tmp_path, env=env, timeout=120)  # fmt: skip
    assert unset.returncode == 2, unset.stderr
    assert re.search(r"No speech-to-text service answers at http://127\.0\.0\.1:\d+/v1: start it or set stt\.base_url in .*dead\.yaml", unset.stderr), unset.stderr
    assert "Traceback" not in unset.stderr and "Loading the models" not in unset.stderr
    dead.write_text(dead.read_text().replace("model: whisper-1}", "model: whisper-1, api_key_env: MUSETALK_TEST_UNSET_KEY}"))
    unset = cli(["--local", "--port", "0", "--config", str(config), "--skip-checks", "--mode", "conversation",
                 "--bot-config", str(dead)], tmp_path, env=env, timeout=120)  # fmt: skip
    assert unset.returncode == 2 and "stt.api_key_env names MUSETALK_TEST_UNSET_KEY, which is not set" in unset.stderr
