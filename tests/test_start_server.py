"""start_pipecat_server.py as a user runs it: a subprocess, real files, real signals."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from helpers import START_SERVER, LineReader, write_config

REPO = Path(__file__).resolve().parent.parent
SEED_OPTIONS = ("--room-url", "--token", "--config", "--verbose", "--skip-checks")


def cli(
    args: list[str], cwd: Path, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(START_SERVER), *args], cwd=cwd, env={**os.environ, **(env or {})},
        capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def test_help_lists_the_seed_options(tmp_path):
    result = cli(["--help"], tmp_path)
    assert result.returncode == 0
    for option in (*SEED_OPTIONS, "--local", "--host", "--port", "--mode", "--max-sessions", "--latency-budget"):
        assert option in result.stdout
    assert "configs/inference/realtime.yaml" in result.stdout


MALFORMED_URLS = ["http://acme.daily.co/room", "https://acme.daily.co/", "acme.daily.co/room"]
BAD_LIMITS = [(["--max-sessions", "0"], "max_sessions"), (["--latency-budget", "-1"], "--latency-budget")]
CLI_TOKEN = "secret-cli-token"


@pytest.fixture(scope="module")
def refused(tmp_path_factory) -> dict[tuple[str, ...], tuple[subprocess.CompletedProcess, Path]]:
    """The runs that must be refused before anything loads, each in a folder of its own: started together,
    two at a time (each is mostly the interpreter starting), so the tests below only read their answers."""
    from concurrent.futures import ThreadPoolExecutor

    runs = [
        [],
        ["--local", "--room-url", "https://acme.daily.co/room"],
        *(["--room-url", url, "--token", CLI_TOKEN] for url in MALFORMED_URLS),
        *(["--local", *flags] for flags, _ in BAD_LIMITS),
    ]
    folders = [tmp_path_factory.mktemp("refused") for _ in runs]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(cli, runs, folders))
    return {tuple(args): (result, folder) for args, result, folder in zip(runs, results, folders)}


def test_without_room_or_local_it_says_how_to_use_it(refused):
    result, _ = refused[()]
    assert result.returncode == 2
    assert "usage:" in result.stderr and "--room-url" in result.stderr and "--local" in result.stderr
    assert "Traceback" not in result.stderr
    both, _ = refused[("--local", "--room-url", "https://acme.daily.co/room")]
    assert both.returncode == 2 and "not both" in both.stderr


@pytest.mark.parametrize("url", MALFORMED_URLS)
def test_malformed_room_url_fails_before_loading_anything(refused, url):
    result, folder = refused[("--room-url", url, "--token", CLI_TOKEN)]
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and "Daily room URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert CLI_TOKEN not in result.stderr + result.stdout
    assert not (folder / "musetalk_pipecat.log").exists()  # it stopped before logging even started


@pytest.mark.parametrize(("flags", "message"), BAD_LIMITS)
def test_bad_live_limits_fail_before_loading_anything(refused, flags, message):
    result, _ = refused[("--local", *flags)]
    assert result.returncode == 2 and result.stderr.startswith("error: ") and message in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow  # the CLI checks every weight file
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


@pytest.mark.slow  # the CLI prepares an avatar, serves it, and is stopped
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
        [sys.executable, str(START_SERVER), "--local", "--port", "0", "--config", str(config), "--skip-checks"],
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


@pytest.mark.slow  # four runs of the CLI
def test_speaking_modes_refuse_a_bad_bot_config_before_loading_anything(tmp_path, tiny_models_dir):
    """--mode say / conversation: a bot config that cannot work is one sentence, exit 2, before the models load."""
    from concurrent.futures import ThreadPoolExecutor

    from openai_standin import unreachable_url

    config = write_config(tmp_path / "realtime.yaml", "ghost", preparation=False)
    env = {"MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(tmp_path / "avatars")}
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- a\n- b\n")
    dead = tmp_path / "dead.yaml"
    dead.write_text(
        f"stt: {{service: openai, base_url: '{unreachable_url()}', model: whisper-1}}\n"
        f"llm: {{service: openai, base_url: '{unreachable_url()}', model: m, api_key_env: MUSETALK_TEST_UNSET_KEY}}\n"
    )
    unset_key = tmp_path / "unset-key.yaml"
    unset_key.write_text(
        dead.read_text().replace("model: whisper-1}", "model: whisper-1, api_key_env: MUSETALK_TEST_UNSET_KEY}")
    )
    serve = ["--local", "--port", "0", "--config", str(config), "--skip-checks", "--mode", "conversation"]
    runs = [
        ["--local", "--mode", "say", "--bot-config", str(not_a_mapping)],
        ["--local", "--mode", "conversation", "--bot-config", str(tmp_path / "nope.yaml")],
        [*serve, "--bot-config", str(dead)],
        [*serve, "--bot-config", str(unset_key)],
    ]
    with ThreadPoolExecutor(2) as pool:  # independent runs, two at a time (each is mostly interpreter start-up)
        result, missing, unset, unset_again = pool.map(lambda args: cli(args, tmp_path, env=env, timeout=120), runs)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "must be a YAML mapping" in result.stderr
    assert missing.returncode == 2 and "nope.yaml does not exist" in missing.stderr
    assert unset.returncode == 2, unset.stderr
    assert re.search(
        r"No speech-to-text service answers at http://127\.0\.0\.1:\d+/v1: start it or set stt\.base_url in .*dead\.yaml",
        unset.stderr,
    ), unset.stderr
    assert "Traceback" not in unset.stderr and "Loading the models" not in unset.stderr
    assert unset_again.returncode == 2, unset_again.stderr
    assert "stt.api_key_env names MUSETALK_TEST_UNSET_KEY, which is not set" in unset_again.stderr
