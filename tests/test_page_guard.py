"""The local page guards itself (issue 18): a viewer key beyond loopback, offers that never connect, request limits.

Fast tests run the page server alone (`LocalWebRTCServer` in a thread of its own, a stand-in bot that records what
it was asked: no models) or real bots (`BotRunner`, tiny models, the prepared avatar) on 127.0.0.1. What they show:
* key: every API endpoint (status, ICE servers, POST and PATCH offer) answers 401 with a sentence without the key
  or with a wrong one (header or `?key=`), 200 with it; the page itself stays public; loopback without a key is
  open as before; the key never reaches a log line, a repr or an error;
* limits: a body announced at 8 MB gets 413 after 64 KB were sent (never read whole), a chunked body is cut off
  past 256 KB, malformed JSON and SDPs that are not audio+video offers get 400, and none of them reaches the bot;
* pending offers: 20 offers that never connect against a bot serving 2 sessions: 2 answered, 18 refused (503),
  both sessions given back ~10 s after their answers, and a new viewer admitted within 15 s of the flood; one
  address has at most 4 pending offers (the 5th gets 429), another address is not held back;
* an offer that fails after admission (aiortc refuses its SDP, or its pipeline cannot start) gives back its
  avatar and session at once (the avatar no longer "loading").
The slow test is the issue's own scenario: `start_pipecat_server.py --local --host 10.200.0.1 --max-sessions 2` in a
private network namespace, its generated key printed (and never in its log file), 20 offers that never connect,
then a real aiortc viewer that connects and receives the avatar's video within 15 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from helpers import START_SERVER, LineReader, poll, wait_until, write_config
from loguru import logger
from netns import SERVER_ADDRESS, PrivateNetwork, unavailable_reason
from viewers import candidate_free_offer

from musetalk.bot.page import MAX_BODY_BYTES, MAX_PENDING_PER_CLIENT, LocalWebRTCServer
from musetalk.bot.transports import (
    PENDING_TIMEOUT_S,
    TransportSettings,
    is_loopback,
    page_url,
    with_page_key,
)
from musetalk.errors import ConfigError

KEY = "page-key-for-tests-7f3a"
FLOOD = 20
VIEWER_WITHIN_S = 15.0
DEAD_OFFER_TIMEOUT_S = 3.0
API = (("GET", "api/status"), ("GET", "api/ice-servers"), ("POST", "api/offer"), ("PATCH", "api/offer"))


@pytest.fixture(scope="module")
def offer_sdp() -> str:
    return candidate_free_offer()


@pytest.fixture
def log_lines():
    """Every loguru line written meanwhile (Pipecat's too), at DEBUG."""
    lines: list[str] = []
    sink = logger.add(lambda message: lines.append(str(message)), level="DEBUG")
    yield lines
    logger.remove(sink)


# --------------------------------------------------------------------------- a page server alone
class StandInBot:
    """What the page server asks of a bot, recorded: admissions, connections and what was given back."""

    def __init__(self) -> None:
        self.admitted = 0
        self.connections: list[str] = []
        self.released: list[tuple[str | None, str]] = []

    async def admit(self, request_data):
        self.admitted += 1

        async def release(pc_id, reason):
            self.released.append((pc_id, reason))

        return release

    async def on_connection(self, connection, request_data=None):
        self.connections.append(str(connection.pc_id))


class PageThread:
    """A `LocalWebRTCServer` serving in an event loop on a thread of its own (as a bot's thread runs it)."""

    def __init__(self, settings: TransportSettings, bot: StandInBot):
        self.settings, self.bot = settings, bot
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-page", daemon=True)

    def run(self, coro, timeout: float = 30):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def _start(self) -> LocalWebRTCServer:
        server = LocalWebRTCServer(
            self.settings, self.bot.on_connection, status=lambda: {"state": "running"}, admit=self.bot.admit
        )
        await server.start()
        return server

    def __enter__(self) -> PageThread:
        self.thread.start()
        self.server = self.run(self._start())
        self.url, self.port = self.server.url, self.server.port
        return self

    def __exit__(self, *exc) -> None:
        self.run(self.server.stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def call(url: str, method: str, path: str, offer_sdp: str, **kwargs) -> httpx.Response:
    body = {"sdp": offer_sdp, "type": "offer"} if method == "POST" else {"pc_id": "nobody", "candidates": []}
    return httpx.request(method, url + path, json=body if method != "GET" else None, timeout=20, **kwargs)


def test_a_page_beyond_loopback_gets_a_key_that_stays_secret():
    for host in ("0.0.0.0", "::", "10.200.0.1", "192.168.1.20", "bot.example.com"):
        settings = with_page_key(TransportSettings(kind="local", host=host))
        assert settings.page_key and len(settings.page_key) >= 20, host  # token_urlsafe(16): 22 characters
        assert settings.page_key not in repr(settings)
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost", "[::1]"):
        assert is_loopback(host)
        assert with_page_key(TransportSettings(kind="local", host=host)).page_key is None, host
    assert with_page_key(TransportSettings(kind="local", host="0.0.0.0", page_key=KEY)).page_key == KEY
    assert with_page_key(TransportSettings(kind="local", page_key=KEY)).page_key == KEY  # loopback with a key keeps it
    two = {with_page_key(TransportSettings(kind="local", host="0.0.0.0")).page_key for _ in range(2)}
    assert len(two) == 2  # random, never a fixed default
    daily = TransportSettings(kind="daily", room_url="https://acme.daily.co/room")
    assert with_page_key(daily) is daily
    assert TransportSettings(kind="local", page_key="").page_key is None
    for bad in ("short", "has a space in it", "tab\there-and-long", "x" * 201, "ünïcödé-key-long"):
        with pytest.raises(ConfigError) as caught:
            TransportSettings(kind="local", page_key=bad)
        assert bad not in str(caught.value) and "page key" in str(caught.value)
    for bad in (0, -1, 3601, "10"):
        with pytest.raises(ConfigError, match="connect_timeout_s"):
            TransportSettings(kind="local", connect_timeout_s=bad)
    assert TransportSettings(kind="local").connect_timeout_s == PENDING_TIMEOUT_S == 10.0
    assert page_url("http://h:1/", None) == "http://h:1/"
    assert page_url("http://h:1/", "a&b#c/d") == "http://h:1/?key=a%26b%23c%2Fd"


def test_a_key_guards_the_api_but_not_the_page(offer_sdp, log_lines):
    bot = StandInBot()
    with PageThread(TransportSettings(kind="local", port=0, page_key=KEY), bot) as page:
        for path in ("", "client", "client.js"):  # the page holds no secret
            assert httpx.get(page.url + path, timeout=10).status_code == 200, path
        refused = []
        for method, path in API:
            for kwargs in (
                {},
                {"headers": {"Authorization": "Bearer wrong-key-1234"}},
                {"headers": {"Authorization": f"Basic {KEY}"}},
                {"params": {"key": KEY[:-1]}},
                {"params": {"key": "ключ-не-тот"}},
            ):
                answer = call(page.url, method, path, offer_sdp, **kwargs)
                refused.append((method, path, answer.status_code))
                assert answer.status_code == 401, (method, path, kwargs, answer.text)
                detail = answer.json()["detail"]
                assert detail.endswith(".") and "key" in detail and KEY not in detail
                assert answer.headers["www-authenticate"] == "Bearer"
        assert bot.admitted == 0 and not bot.connections  # nothing reached the bot
        bearer = {"Authorization": f"Bearer {KEY}"}
        assert call(page.url, "GET", "api/status", offer_sdp, headers=bearer).json() == {"state": "running"}
        assert call(page.url, "GET", "api/ice-servers", offer_sdp, params={"key": KEY}).status_code == 200
        answered = call(page.url, "POST", "api/offer", offer_sdp, headers=bearer)
        assert answered.status_code == 200 and answered.json()["type"] == "answer"
        assert call(page.url, "POST", "api/offer", offer_sdp, params={"key": KEY}).status_code == 200
        patch = call(page.url, "PATCH", "api/offer", offer_sdp, headers=bearer)
        assert patch.status_code == 404  # past the key: an unknown connection
        assert bot.admitted == 2 and len(bot.connections) == 2
    print(f"\n{len(refused)} requests without the right key: all 401; with it: status, ICE servers, 2 offers answered")
    assert log_lines and not [line for line in log_lines if KEY in line]

    open_bot = StandInBot()
    with PageThread(TransportSettings(kind="local", port=0), open_bot) as page:  # loopback, no key: as before
        for method, path in API:
            assert call(page.url, method, path, offer_sdp).status_code in (200, 404), (method, path)
        assert open_bot.admitted == 1


def raw_request(port: int, head: str, parts: list[bytes]) -> tuple[int, float]:
    """Send a request's head and some of its body, then read the answer's status (and how long it took)."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(head.encode())
        for part in parts:
            sock.sendall(part)
        t0 = time.monotonic()
        first = sock.recv(4096)
        return int(first.split()[1]), time.monotonic() - t0


def test_large_and_malformed_requests_are_refused_before_anything_is_reserved(offer_sdp):
    bot = StandInBot()
    with PageThread(TransportSettings(kind="local", port=0), bot) as page:
        eight_mb = 8 * 2**20
        # Announced as 8 MB, 64 KB sent: the answer comes without the rest.
        head = f"POST /api/offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {eight_mb}\r\n\r\n"
        status, waited = raw_request(page.port, head, [b"x" * 65536])
        assert status == 413 and waited < 5
        # Chunked, no length: cut off once past 256 KB (5 chunks of 64 KB sent, the body never ends).
        head = "POST /api/offer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        chunk = b"10000\r\n" + b"x" * 65536 + b"\r\n"
        status_chunked, waited_chunked = raw_request(page.port, head, [chunk] * 5)
        assert status_chunked == 413 and waited_chunked < 5
        padded = (
            offer_sdp + "a=x-padding:" + "y" * MAX_BODY_BYTES + "\r\n"
        )  # the huge SDP, as a client sends it
        large = httpx.post(page.url + "api/offer", json={"sdp": padded, "type": "offer"}, timeout=20)
        assert large.status_code == 413 and "256 KB" in large.json()["detail"]
        refusals = {
            "not JSON": httpx.post(page.url + "api/offer", content=b"{not json", timeout=10),
            "not UTF-8": httpx.post(page.url + "api/offer", content=b'{"sdp": "\xff"}', timeout=10),
            "a JSON list": httpx.post(page.url + "api/offer", json=[offer_sdp], timeout=10),
            "an answer": httpx.post(page.url + "api/offer", json={"sdp": offer_sdp, "type": "answer"}, timeout=10),
        }
        for name, sdp in {
            "garbage": "garbage",
            "empty": "",
            "no v=0": offer_sdp.replace("v=0", "v=1", 1),
            "audio only": re.sub(r"m=video[\s\S]*", "", offer_sdp),
            "video only": re.sub(r"m=audio[\s\S]*?(?=m=video)", "", offer_sdp),
        }.items():
            refusals[name] = httpx.post(page.url + "api/offer", json={"sdp": sdp, "type": "offer"}, timeout=10)
        refusals["PATCH not JSON"] = httpx.patch(page.url + "api/offer", content=b"[", timeout=10)
        refusals["PATCH too large"] = httpx.patch(
            page.url + "api/offer", content=b"x" * (MAX_BODY_BYTES + 1), timeout=10
        )
        codes = {name: answer.status_code for name, answer in refusals.items()}
        assert codes == {**dict.fromkeys(codes, 400), "PATCH too large": 413}, codes
        assert all(answer.json()["detail"].endswith(".") for answer in refusals.values())
        assert bot.admitted == 0 and not bot.connections  # nothing was reserved
        assert (
            httpx.post(page.url + "api/offer", json={"sdp": offer_sdp, "type": "offer"}, timeout=20).status_code == 200
        )
    print(
        f"\n413 after {waited * 1000:.0f} ms for a body announced at 8 MB (64 KB sent), after {waited_chunked * 1000:.0f} ms "
        f"for a chunked one past 256 KB; 400 for {', '.join(n for n, c in codes.items() if c == 400)}"
    )


# --------------------------------------------------------------------------- real bots
def offer(url: str, sdp: str, transport: httpx.HTTPTransport | None = None, **data) -> httpx.Response:
    with httpx.Client(transport=transport, timeout=30) as client:
        return client.post(url + "api/offer", json={"sdp": sdp, "type": "offer", **data})


def start_bot(models, avatar, store=None, connect_timeout_s=PENDING_TIMEOUT_S, **service_settings):
    from musetalk.bot.runner import BotRunner
    from musetalk.live.service import GenerationService, ServiceSettings

    service = GenerationService(models, ServiceSettings(admission=False, **service_settings))
    runner = BotRunner(models, service=service)
    settings = TransportSettings(kind="local", port=0, connect_timeout_s=connect_timeout_s)
    status = runner.start(avatar, settings, avatar_store=store)
    return runner, service, status


def test_offers_that_never_connect_give_their_sessions_back(models, prepared_avatar, offer_sdp):
    """The issue's flood on a bot serving 2 sessions: dead offers held them ~60 s and a viewer 14 s later was refused.
    (A 3 s connect timeout here, for speed; the CLI test below floods the default 10 s.)"""
    runner, service, status = start_bot(models, prepared_avatar, connect_timeout_s=DEAD_OFFER_TIMEOUT_S, max_sessions=2)
    try:
        flood_started = time.monotonic()
        answers = []
        for _ in range(FLOOD):
            answer = offer(status.url, offer_sdp)
            answers.append((answer.status_code, time.monotonic()))
        flood_ended = time.monotonic()
        codes = [code for code, _ in answers]
        answered_at = [t for code, t in answers if code == 200]
        held = service.stats().sessions
        tries, refused_until, admitted = 0, None, None
        while admitted is None and time.monotonic() - flood_ended < VIEWER_WITHIN_S + 5:
            tries += 1
            answer = offer(status.url, offer_sdp)
            if answer.status_code == 200:
                admitted = time.monotonic()
            else:
                assert answer.status_code == 503 and "2 sessions" in answer.json()["detail"], answer.text
                refused_until = time.monotonic()
                time.sleep(0.25)
        assert admitted is not None, f"no viewer admitted within {VIEWER_WITHIN_S + 5} s of the flood"
        # The second dead offer was answered a moment after the first: its session goes a moment later (and the
        # new viewer's own, which never connects either, only after its 3 s).
        wait_until(lambda: runner.status().viewers <= 1, timeout=2.0)
        viewers = runner.status().viewers
    finally:
        runner.stop_all(timeout=15)
        service.close()
    print(
        f"\n{FLOOD} dead offers in {flood_ended - flood_started:.1f} s: {codes.count(200)} answered, "
        f"{codes.count(503)} refused (503), {held} sessions held; a new viewer refused until "
        f"{refused_until - answered_at[-1]:.1f} s after the last answer, admitted {admitted - flood_ended:.1f} s "
        f"after the flood ({tries} tries), {admitted - answered_at[0]:.1f} s after the first answer"
    )
    # Admission counts the sessions the service has opened and this bot's sessions still opening: exactly 2 pass.
    assert codes.count(200) == 2 and codes.count(503) == FLOOD - 2, codes
    assert held == 2
    assert admitted - flood_ended <= VIEWER_WITHIN_S
    assert DEAD_OFFER_TIMEOUT_S - 0.5 <= admitted - answered_at[0] <= DEAD_OFFER_TIMEOUT_S + 4
    assert viewers == 1  # the dead offers' sessions are gone, the new viewer's is there


def test_one_address_has_at_most_four_pending_offers(models, prepared_avatar, offer_sdp):
    runner, service, status = start_bot(models, prepared_avatar)
    try:
        codes = [offer(status.url, offer_sdp).status_code for _ in range(MAX_PENDING_PER_CLIENT)]
        fifth = offer(status.url, offer_sdp)
        other_address = offer(status.url, offer_sdp, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        viewers = runner.status().viewers
        sessions = poll(lambda: service.stats().sessions, until=lambda n: n == viewers, timeout=10)
    finally:
        runner.stop_all(timeout=15)
        service.close()
    print(f"\npending offers from 127.0.0.1: {codes} then {fifth.status_code} ({fifth.json()['detail']}); from 127.0.0.2: "
          f"{other_address.status_code}; {sessions} sessions")  # fmt: skip
    assert codes == [200] * MAX_PENDING_PER_CLIENT
    assert fifth.status_code == 429 and fifth.json()["detail"].endswith(".")
    assert other_address.status_code == 200
    assert sessions == viewers == MAX_PENDING_PER_CLIENT + 1  # the refused one took nothing


def test_a_failed_offer_gives_back_its_avatar_and_session(
    models, prepared_avatar, avatar_store, offer_sdp, tmp_path, monkeypatch
):
    """An admitted offer that fails (aiortc refuses its SDP; its pipeline cannot start) keeps nothing "loading"."""
    from musetalk.avatar.store import AvatarStore
    from musetalk.bot.run import BotRun

    store = AvatarStore(tmp_path / "avatars")
    for name in ("astro", "astro-copy"):
        shutil.copytree(avatar_store.path(prepared_avatar.name), store.root / name)
    runner, service, status = start_bot(models, "astro", store)
    run = runner._runs[status.bot_id]
    try:
        broken = "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"  # passes the check only
        refused = offer(status.url, broken, request_data={"avatar": "astro-copy"})
        after_refused = (set(run._admitting), set(run._viewer_avatars), service.stats().sessions)

        async def no_pipeline(*_args, **_kwargs):
            raise ConfigError("This viewer's pipeline cannot start (test).")

        monkeypatch.setattr(run, "_new_processor", no_pipeline)
        failed = offer(status.url, offer_sdp, request_data={"avatar": "astro-copy"})
        after_failed = (set(run._admitting), set(run._viewer_avatars), service.stats().sessions)
        monkeypatch.undo()
        good = offer(status.url, offer_sdp, request_data={"avatar": "astro-copy"})
        shown = run.avatar_names()
    finally:
        runner.stop_all(timeout=15)
        service.close()
    assert isinstance(run, BotRun)
    print(f"\nrefused SDP: {refused.status_code}; pipeline failure: {failed.status_code} ({failed.json()['detail']}); "
          f"then a good offer: {good.status_code}, showing {sorted(shown)}")  # fmt: skip
    assert refused.status_code == 400, refused.text
    assert failed.status_code == 503 and "cannot start" in failed.json()["detail"]
    assert after_refused == after_failed == (set(), set(), 0)  # nothing loading, no avatar kept, no session
    assert good.status_code == 200 and shown == {"astro", "astro-copy"}


def test_the_panel_keys_its_pages_beyond_loopback_and_links_them_with_the_key(
    tiny_models_dir, avatar_store, prepared_avatar
):
    """app.py --page-key / MUSETALK_PAGE_KEY reach the engine; a page on 0.0.0.0 gets the panel's key (made once, shared
    by its pages), its link in the Live tab carries it, its status never does; a loopback page stays open."""
    import app
    from musetalk.config import RuntimeSettings
    from musetalk.panel.engine import Engine, EngineOptions
    from musetalk.panel.live import LiveActions
    from musetalk.panel.text import page_view

    assert app.engine_options(app.build_parser().parse_args([]), {"MUSETALK_PAGE_KEY": KEY}).page_key == KEY
    assert app.engine_options(app.build_parser().parse_args(["--page-key", KEY]), {}).page_key == KEY
    assert KEY not in repr(app.engine_options(app.build_parser().parse_args(["--page-key", KEY]), {}))
    with pytest.raises(ConfigError, match="page key"):
        app.engine_options(app.build_parser().parse_args(["--page-key", "a b"]), {})
    keyed = Engine(tiny_models_dir, avatar_store.root, RuntimeSettings(device="cpu"), EngineOptions(page_key=KEY))
    assert keyed.page_key_for("127.0.0.1") == keyed.page_key_for("0.0.0.0") == keyed.page_key == KEY

    engine = Engine(tiny_models_dir, avatar_store.root, RuntimeSettings(device="cpu"), EngineOptions())
    engine.start_loading()
    actions = LiveActions(engine)
    quiet = lambda *_args, **_kwargs: None  # noqa: E731 (Gradio's progress, outside Gradio)
    try:
        assert engine.page_key is None
        wide = actions.start_bot(prepared_avatar.name, "local", local_port=0, local_host="0.0.0.0", progress=quiet)
        key = engine.page_key
        near = actions.start_bot(prepared_avatar.name, "local", local_port=0, local_host="127.0.0.1", progress=quiet)
        assert key and engine.page_key_for("10.0.0.1") == key  # one key for every page of this panel
        link = page_view(wide, engine.page_key)
        assert f"{wide['url']}?key={key}" in link and key not in json.dumps([wide, near, actions.list_bots()])
        assert httpx.get(wide["url"] + "api/status", timeout=10).status_code == 401
        assert httpx.get(wide["url"] + "api/status", params={"key": key}, timeout=10).json()["state"] == "running"
        assert httpx.get(near["url"] + "api/status", timeout=10).status_code == 200  # loopback, no key: open
    finally:
        engine.shutdown()


def test_the_cli_refuses_a_bad_page_key_before_loading_anything(tmp_path):
    bad = "bad key with spaces"
    result = subprocess.run(
        [sys.executable, str(START_SERVER), "--local", "--host", "0.0.0.0", "--page-key", bad],
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2 and result.stderr.startswith("error: The page key must be")
    assert bad not in result.stderr and not (tmp_path / "musetalk_pipecat.log").exists()
    env = {**os.environ, "MUSETALK_PAGE_KEY": "short"}
    from_env = subprocess.run(
        [sys.executable, str(START_SERVER), "--local"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert from_env.returncode == 2 and "page key" in from_env.stderr and "short" not in from_env.stderr


# --------------------------------------------------------------------------- the scenario, for real
_NETNS = unavailable_reason()


@pytest.mark.slow  # mostly waiting out the 10 s connect timeout: it may share the machine
@pytest.mark.skipif(_NETNS is not None, reason=str(_NETNS))
def test_after_twenty_dead_offers_a_real_viewer_gets_in(tmp_path, tiny_models_dir, avatar_store, prepared_avatar):
    """start_pipecat_server.py on 10.200.0.1 (no --page-key: one is made and printed); in the same private network,
    a client floods 20 offers that never connect, then a real aiortc viewer retries until it is let in."""
    config = write_config(tmp_path / "realtime.yaml", prepared_avatar.name, preparation=False)
    env = {
        **os.environ,
        "MUSETALK_MODELS_DIR": str(tiny_models_dir),
        "MUSETALK_AVATARS_DIR": str(avatar_store.root),
        "MUSETALK_DEVICE": "cpu",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("MUSETALK_PAGE_KEY", None)
    port = 7871
    args = ["--local", "--host", SERVER_ADDRESS, "--port", str(port), "--max-sessions", "2", "--config", str(config)]
    with PrivateNetwork() as net:
        bot = net.popen(
            [sys.executable, str(START_SERVER), *args, "--skip-checks"],
            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        reader = LineReader(bot.stderr)
        try:
            found = reader.wait_for(r"Viewer URL .*: (http://\S+/)\?key=(\S+)", timeout=180)
            assert found, f"no viewer URL printed:\n{reader.rest(1)}"
            url, key = found.group(1), found.group(2)
            client = subprocess.run(
                net.wrap([sys.executable, __file__, "client", url, key]),
                env={**env, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), env.get("PYTHONPATH", "")])},
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            assert client.returncode == 0, f"client failed:\n{client.stderr[-4000:]}\nbot:\n{reader.rest(1)[-4000:]}"
            summary = json.loads(client.stdout.strip().splitlines()[-1])
        finally:
            if bot.poll() is None:
                bot.send_signal(signal.SIGINT)
                try:
                    bot.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    bot.kill()
                    bot.wait()
    output = reader.rest()
    log = (tmp_path / "musetalk_pipecat.log").read_text()
    print(f"\nthe issue's scenario through the CLI: {json.dumps(summary)}")
    assert summary["without_key"] == 401
    flood = summary["flood"]
    assert 2 <= flood.count(200) <= 3 and flood.count(200) + flood.count(503) == FLOOD, summary
    assert summary["connected_after_s"] <= VIEWER_WITHIN_S, summary
    assert summary["video_frames"] >= 10, summary
    assert key not in log and "Local page:" in log  # the key went to stderr only
    assert bot.returncode == 0 and "Traceback" not in output, output[-3000:]


async def flood_then_view(url: str, key: str, dead: str) -> dict:
    """In the namespace: 20 offers that never connect, then a real viewer (aiortc: silent microphone out, the avatar
    in) retrying every 0.5 s until it is answered and connected; what it saw."""
    from aiortc import RTCPeerConnection, RTCSessionDescription
    from aiortc.mediastreams import AudioStreamTrack, MediaStreamError

    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as http:
        without_key = (await http.get(url + "api/status")).status_code
        flood = []
        for _ in range(FLOOD):
            answer = await http.post(url + "api/offer", json={"sdp": dead, "type": "offer"}, headers=headers)
            flood.append(answer.status_code)
        flood_ended = time.monotonic()
        tries = 0
        while True:
            tries += 1
            pc = RTCPeerConnection()
            pc.addTrack(AudioStreamTrack())
            pc.addTransceiver("video", direction="recvonly")
            frames = []

            async def consume(track, frames=frames):
                while True:
                    try:
                        frames.append(await track.recv())
                    except MediaStreamError:
                        return

            pc.on(
                "track",
                lambda track, consume=consume: asyncio.ensure_future(consume(track)) if track.kind == "video" else None,
            )
            await pc.setLocalDescription(await pc.createOffer())
            answer = await http.post(
                url + "api/offer", json={"sdp": pc.localDescription.sdp, "type": "offer"}, headers=headers
            )
            if answer.status_code == 200:
                break
            await pc.close()
            if time.monotonic() - flood_ended > VIEWER_WITHIN_S + 10:
                raise AssertionError(
                    f"still refused {time.monotonic() - flood_ended:.1f} s after the flood: {answer.text}"
                )
            await asyncio.sleep(0.5)
        await pc.setRemoteDescription(RTCSessionDescription(sdp=answer.json()["sdp"], type="answer"))
        while pc.connectionState != "connected" and time.monotonic() - flood_ended < VIEWER_WITHIN_S + 20:
            await asyncio.sleep(0.05)
        connected_after = time.monotonic() - flood_ended
        await asyncio.sleep(2.0)
        state = pc.connectionState
        await pc.close()
    return {"without_key": without_key, "flood": flood, "tries": tries, "connected_after_s": round(connected_after, 2),
            "state": state, "video_frames": len(frames)}  # fmt: skip


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "client":
    print(json.dumps(asyncio.run(flood_then_view(sys.argv[2], sys.argv[3], candidate_free_offer()))), flush=True)
