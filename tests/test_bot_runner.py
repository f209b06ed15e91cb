"""BotRunner with the local transport: start/stop cycles, status, no leaked threads or ports.

Real parts only: the tiny models, the prepared astronaut avatar, uvicorn serving the local page
in the bot thread, Pipecat's SmallWebRTC signalling. (The browser end to end is in
test_bot_browser.py; Daily in test_bot_daily.py.)
"""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
from helpers import bot_threads, port_is_free, wait_no_new_threads, wait_until
from viewers import candidate_free_offer

from musetalk.bot.runner import BotRunner, BotStatus
from musetalk.bot.transports import TransportSettings, validate_room_url
from musetalk.errors import AvatarError, ConfigError, MuseTalkError


@pytest.fixture
def runner(models):
    r = BotRunner(models)
    yield r
    r.stop(timeout=15)


def test_stopped_status_before_start(runner):
    status = runner.status()
    assert status == BotStatus(state="stopped")
    assert runner.stop().state == "stopped"  # stopping a stopped bot is harmless


def test_local_start_stop_cycles(runner, prepared_avatar):
    before = {t.ident for t in bot_threads()}
    ports = []
    for cycle in range(3):
        status = runner.start(prepared_avatar, TransportSettings(kind="local", host="127.0.0.1", port=0))
        assert status.state == "running", status
        assert status.transport == "local" and status.avatar == prepared_avatar.name and status.mode == "mirror"
        assert status.url and status.url.startswith("http://127.0.0.1:")
        assert status.last_error is None
        port = int(status.url.rstrip("/").rsplit(":", 1)[1])
        ports.append(port)
        assert not port_is_free("127.0.0.1", port)

        # The page, its script and the status endpoint are served from the bot thread's loop.
        with httpx.Client(base_url=status.url, timeout=10) as http:
            page = http.get("/")
            assert page.status_code == 200 and "text/html" in page.headers["content-type"]
            assert "How to use" in page.text and "?avatar=NAME" in page.text
            assert http.get("/client").text == page.text
            script = http.get("/client.js").text
            for needed in ("RTCPeerConnection", "/api/offer", "PATCH", "sendrecv", "recvonly"):
                assert needed in script
            served = http.get("/api/status").json()
            assert served["state"] == "running" and served["avatar"] == prepared_avatar.name
            # Malformed signalling is refused with a readable 4xx, and the bot keeps running.
            bad = http.post("/api/offer", json={"type": "offer"})
            assert bad.status_code == 400 and "sdp" in bad.json()["detail"]
            assert http.patch("/api/offer", content=b"not json").status_code == 400
            unknown = http.patch("/api/offer", json={"pc_id": "nobody", "candidates": []})
            assert unknown.status_code == 404

        with pytest.raises(MuseTalkError, match="already running.*stop it first"):
            runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
        assert runner.status().state == "running"
        assert runner.status().uptime_s >= 0.0

        stopped = runner.stop(timeout=10)
        assert stopped.state == "stopped", stopped
        assert stopped.last_error is None
        assert port_is_free("127.0.0.1", port), f"cycle {cycle}: port {port} still taken after stop"
        leaked = wait_no_new_threads(before)
        assert not leaked, f"cycle {cycle}: threads left after stop: {leaked}"
    assert len(ports) == 3


def test_port_in_use_is_a_readable_error_and_runner_stays_usable(runner, prepared_avatar):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen(1)
        taken = blocker.getsockname()[1]
        with pytest.raises(MuseTalkError, match=f"Port {taken}.*already in use"):
            runner.start(prepared_avatar, TransportSettings(kind="local", port=taken))
        status = runner.status()
        assert status.state == "error" and "already in use" in status.last_error
    ok = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
    assert ok.state == "running" and ok.last_error is None
    assert runner.stop().state == "stopped"


def test_unknown_avatar_name_is_refused(runner, avatar_store, prepared_avatar):
    with pytest.raises(AvatarError, match="No avatar named 'nobody'"):
        runner.start("nobody", TransportSettings(kind="local", port=0), avatar_store=avatar_store)
    assert runner.status().state == "error"
    # By name, from the store.
    status = runner.start(prepared_avatar.name, TransportSettings(kind="local", port=0), avatar_store=avatar_store)
    assert status.state == "running" and status.avatar == prepared_avatar.name
    assert runner.stop().state == "stopped"


@pytest.mark.parametrize(
    "url",
    [
        "https://your-domain.daily.co/room-name",
        "https://acme.daily.co/standup_2024",
        " https://acme.daily.co/room/ ",
    ],
)
def test_valid_room_urls(url):
    assert validate_room_url(url) == url.strip()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "required"),
        (None, "required"),
        ("   ", "required"),
        ("http://acme.daily.co/room", "https://"),
        ("ftp://acme.daily.co/room", "https://"),
        ("acme.daily.co/room", "https://"),
        ("https://acme.daily.co/my room", "spaces"),
        ("https://acme.daily.co/", "no room"),
        ("https://acme.daily.co", "no room"),
        ("https://daily.co/room", "subdomain"),
        ("https://a.b.daily.co/room", "subdomain"),
        ("https://acme.daily.co/a/b", "one room name"),
        ("https://acme.daily.co/room?t=abc", "token"),
        ("https://acme.daily.co/room#x", "fragment"),
        ("https:///room", "host"),
        ("https://acme_.daily.co/room", "host"),
        ("https://user:pw@acme.daily.co/room", "user name"),
        ("https://acme.daily.co/r%20oom", "room path"),
        ("https://example.com/room", "not a Daily host"),
        ("https://video.example.com/rooms/team-a", "not a Daily host"),
        ("https://acme.daily.co.evil.net/room", "not a Daily host"),
    ],
)
def test_malformed_room_urls_are_refused(url, message):
    with pytest.raises(ConfigError, match=message):
        validate_room_url(url)
    with pytest.raises(ConfigError):
        TransportSettings(kind="daily", room_url=url, token="t")


def test_transport_settings_checks_and_hides_the_token():
    settings = TransportSettings(kind="daily", room_url="https://acme.daily.co/room", token="sekrit-token-123")
    assert "sekrit-token-123" not in repr(settings) and "sekrit-token-123" not in str(settings)
    assert settings.host == "127.0.0.1" and settings.port == 7861 and settings.kind == "daily"
    with pytest.raises(ConfigError, match="Unknown transport"):
        TransportSettings(kind="zoom")
    with pytest.raises(ConfigError, match="out of range"):
        TransportSettings(kind="local", port=70000)
    with pytest.raises(ConfigError, match="one word"):
        TransportSettings(kind="daily", room_url="https://acme.daily.co/room", token="two words")


def test_bad_settings_never_start_anything(runner, prepared_avatar):
    with pytest.raises(ConfigError):
        runner.start(prepared_avatar, "local")  # type: ignore[arg-type]
    assert runner.status().state == "stopped"


def test_viewers_get_their_own_sessions_and_a_crash_ends_only_its_viewer(models, prepared_avatar):
    """Each offer starts a viewer pipeline with its own session on the shared service; viewers
    coexist; a fatal error inside one viewer's pipeline ends that viewer only; the bot goes on."""
    from musetalk.live.service import GenerationService, ServiceSettings

    runner = BotRunner(models, service=GenerationService(models, ServiceSettings(admission=False)))
    before = {t.ident for t in bot_threads()}
    status = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
    run = runner._runs[status.bot_id]
    with httpx.Client(base_url=status.url, timeout=30) as http:
        first_answer = http.post("/api/offer", json={"sdp": candidate_free_offer(), "type": "offer"})
        assert first_answer.status_code == 200, first_answer.text
        first_answer = first_answer.json()
        assert first_answer["type"] == "answer" and first_answer["pc_id"] and "m=video" in first_answer["sdp"]
        assert wait_until(lambda: first_answer["pc_id"] in run.sessions), list(run.sessions)
        first = run.sessions[first_answer["pc_id"]]
        # The pipeline runs: the processor emits idle video from the start (nobody receives it here).
        assert wait_until(lambda: runner.status().frames > 5), runner.status()
        assert runner.status().fps is not None

        second_answer = http.post("/api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}).json()
        assert wait_until(lambda: second_answer["pc_id"] in run.sessions), list(run.sessions)
        second = run.sessions[second_answer["pc_id"]]
        assert second is not first and second_answer["pc_id"] != first_answer["pc_id"]
        assert not first.task.done(), "an earlier viewer keeps its own session"
        assert wait_until(lambda: runner.status().viewers == 2), runner.status()
        assert wait_until(lambda: runner.service.stats().sessions == 2), runner.service.stats()
        frames_before = first.processor.stats().frames

        # A crash inside the second viewer's pipeline, as a failing model would report it.
        crash = second.processor.push_error("simulated GPU failure", force_treat_as_permanent=True)
        asyncio.run_coroutine_threadsafe(crash, run.loop).result(timeout=5)
        assert wait_until(lambda: second_answer["pc_id"] not in run.sessions, timeout=15)
        status = runner.status()
        assert status.state == "running" and status.viewers == 1, status
        assert "simulated GPU failure" in status.warning and status.last_error is None
        assert wait_until(lambda: first.processor.stats().frames > frames_before + 5), "the first viewer goes on"
    assert runner.stop().state == "stopped"
    port = int(status.url.rstrip("/").rsplit(":", 1)[1])
    assert port_is_free("127.0.0.1", port)
    leaked = wait_no_new_threads(before)
    assert not leaked, f"threads left: {leaked}"


def test_viewers_past_capacity_or_with_an_unknown_avatar_are_refused_with_the_reason(
    models, prepared_avatar, avatar_store
):
    """The refusal reaches the viewer's page as the HTTP answer to its offer (not only a server log)."""
    from musetalk.live.service import GenerationService, ServiceSettings

    service = GenerationService(models, ServiceSettings(max_sessions=1))
    runner = BotRunner(models, service=service)
    try:
        status = runner.start(prepared_avatar.name, TransportSettings(kind="local", port=0), avatar_store=avatar_store)
        with httpx.Client(base_url=status.url, timeout=30) as http:
            unknown = http.post(
                "/api/offer",
                json={"sdp": candidate_free_offer(), "type": "offer", "request_data": {"avatar": "nobody"}},
            )
            assert unknown.status_code == 503 and "No avatar named 'nobody'" in unknown.json()["detail"]
            first = http.post("/api/offer", json={"sdp": candidate_free_offer(), "type": "offer"})
            assert first.status_code == 200, first.text
            assert wait_until(lambda: service.stats().sessions == 1), service.stats()
            second = http.post("/api/offer", json={"sdp": candidate_free_offer(), "type": "offer"})
            assert second.status_code == 503
            assert "This device serves 1 sessions at 25 fps; 1 are running" in second.json()["detail"]
        assert runner.status().viewers == 1
    finally:
        runner.stop(timeout=10)
        service.close()
