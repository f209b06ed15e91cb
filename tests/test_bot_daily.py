"""BotRunner with a real DailyTransport and an unreachable room: a readable error, within 25 s.

The room `nonexistent-musetalk-test.daily.co` does not exist (and offline its name does not
even resolve): Daily reports an error after its join attempt times out, the runner cancels
the pipeline and ends in state "error". The token must never show up anywhere.
"""

from __future__ import annotations

import threading
import time

import pytest
from loguru import logger

from musetalk.bot.runner import BotRunner, daily_error_message
from musetalk.bot.transports import TransportSettings
from musetalk.errors import ConfigError

UNREACHABLE_ROOM = "https://nonexistent-musetalk-test.daily.co/room"
TOKEN = "tok-3f9a1c77-musetalk-secret"


@pytest.fixture
def captured_logs():
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="TRACE", format="{level} {name} {message}")
    yield lines
    logger.remove(sink)


def wait_for_state(runner: BotRunner, states: tuple[str, ...], timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = runner.status()
        if status.state in states:
            return status
        time.sleep(0.2)
    return runner.status()


@pytest.mark.slow  # Daily needs ~20 s to give up on a room
def test_unreachable_room_ends_in_error_then_runner_is_usable(models, prepared_avatar, captured_logs):
    before = {t.ident for t in threading.enumerate()}
    runner = BotRunner(models)
    try:
        t0 = time.monotonic()
        settings = TransportSettings(kind="daily", room_url=UNREACHABLE_ROOM, token=TOKEN, bot_name="MuseTalk test")
        status = runner.start(prepared_avatar, settings)
        assert status.state == "running" and status.transport == "daily" and status.url is None
        status = wait_for_state(runner, ("error", "stopped"), timeout=25)
        elapsed = time.monotonic() - t0
        print(f"\nDaily error after {elapsed:.1f} s: {status.last_error}")
        assert status.state == "error", status
        assert elapsed < 25
        assert status.last_error.startswith("Daily: could not use the room https://nonexistent-musetalk-test")
        for text in (repr(status), str(status.to_dict()), repr(settings), str(settings)):
            assert TOKEN not in text
        assert not runner.running

        # Usable again at once: a local bot starts and stops cleanly.
        local = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
        assert local.state == "running" and local.last_error is None
        assert runner.stop().state == "stopped"
    finally:
        runner.stop(timeout=15)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        leaked = [t.name for t in threading.enumerate() if t.ident not in before and t.is_alive()]
        if not leaked:
            break
        time.sleep(0.1)
    assert not leaked, f"threads left: {leaked}"
    logs = "\n".join(captured_logs)
    assert "nonexistent-musetalk-test" in logs  # the logs were captured...
    assert TOKEN not in logs  # ...and the token is not in them


def test_malformed_room_url_is_refused_before_starting(models):
    runner = BotRunner(models)
    for url in ("http://acme.daily.co/room", "https://acme.daily.co/", "https://acme.daily.co/my room", ""):
        with pytest.raises(ConfigError):
            runner.start("astro", TransportSettings(kind="daily", room_url=url, token=TOKEN))
    assert runner.status().state == "stopped"


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        (
            'Error joining x: Connection(Api(RoomLookup(... error: "failed to lookup address information" ...)))',
            "does not resolve",
        ),
        ("Error joining x: Unauthorized: invalid meeting token", "valid --token"),
        ("Error joining x: room not found", "does not exist"),
        ("something else entirely", "Daily reported an error"),
    ],
)
def test_daily_errors_read_as_advice(raw, hint):
    message = daily_error_message("https://acme.daily.co/room", raw)
    assert message.startswith("Daily: could not use the room https://acme.daily.co/room: ")
    assert hint in message and raw[:40] in message
