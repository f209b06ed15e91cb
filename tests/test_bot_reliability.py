"""The bot under an operator's load: many start/stop cycles, stop in every state, avatars in use.

Bounds (asserted on counts of live objects and a generous RSS margin, never on speed):
while one bot keeps running with a viewer, 100 start/stop cycles of a second local bot (every
10th with a viewer pipeline) leave one `Avatar` (shared), at most the steady bot's and the
last cycle's `LocalWebRTCServer`/`MuseTalkProcessor`, and no extra threads, file descriptors or
listening ports; the steady bot runs on throughout. RSS is held to a generous 250 MB over the 90 cycles after
warm-up: the leak this guards against kept every run's avatar (~61 MB a cycle, 5.5 GB here);
measured now, plain cycles add ~0.1 MB each and a viewer cycle a few MB of native allocator
memory that no Python object holds.
"""

from __future__ import annotations

import gc
import os
import threading
import time

import httpx
import psutil
import pytest
from helpers import bot_threads, port_is_free, wait_no_new_threads, wait_until
from viewers import candidate_free_offer, media_less_page

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.bot.page import LocalWebRTCServer
from musetalk.bot.runner import STOP_GRACE_S, BotRunner
from musetalk.bot.transports import TransportSettings

CYCLES = 100
WARM_UP = 10
RSS_BOUND_MB = 250
UNREACHABLE_ROOM = "https://nonexistent-musetalk-test.daily.co/reliability"
# Stop answers within its grace period; this only catches a hang (it used to take 10-19 s).
STOP_HANG_S = STOP_GRACE_S + 4.0


def live_count(kind: type) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj) is kind)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def timed_stop(runner: BotRunner):
    t0 = time.monotonic()
    status = runner.stop()
    return status, time.monotonic() - t0


@pytest.mark.slow
def test_hundred_start_stop_cycles_hold_no_memory(models, prepared_avatar):
    """One bot keeps running (with a viewer) while a second one is started and stopped 100 times."""
    from musetalk.bot.processor import MuseTalkProcessor
    from musetalk.live.service import GenerationService, ServiceSettings

    # Admission is another test's subject: here every viewer must get a session, however fast this CPU is.
    runner = BotRunner(models, max_bots=2, service=GenerationService(models, ServiceSettings(admission=False)))
    process = psutil.Process()
    offer = candidate_free_offer()
    before_threads = {t.ident for t in bot_threads()}
    fds_after_warm_up = rss_after_warm_up = None
    steady = runner.start(prepared_avatar, media_less_page())  # its viewer never connects
    assert httpx.post(steady.url + "api/offer", json={"sdp": offer, "type": "offer"}, timeout=20).status_code == 200
    try:
        for cycle in range(CYCLES):
            status = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
            assert status.state == "running", (cycle, status)
            port = int(status.url.rstrip("/").rsplit(":", 1)[1])
            if cycle % 10 == 5:  # a viewer pipeline too, so its objects are counted as well
                answer = httpx.post(status.url + "api/offer", json={"sdp": offer, "type": "offer"}, timeout=20)
                assert answer.status_code == 200, answer.text
            stopped = runner.stop(status.bot_id, timeout=10)
            assert stopped.state == "stopped" and stopped.last_error is None, (cycle, stopped)
            assert runner.status(steady.bot_id).state == "running"
            assert port_is_free("127.0.0.1", port), f"cycle {cycle}: port {port} still taken"
            if cycle + 1 == WARM_UP:
                gc.collect()
                rss_after_warm_up = process.memory_info().rss
                fds_after_warm_up = open_fds()
        gc.collect()
        grown_mb = (process.memory_info().rss - rss_after_warm_up) / 2**20
        print(f"\nRSS after {WARM_UP} cycles {rss_after_warm_up / 2**20:.0f} MB, after {CYCLES}: +{grown_mb:.1f} MB")
        still = runner.status(steady.bot_id)
        assert still.state == "running" and still.viewers == 1 and still.frames > 0, still
        assert live_count(Avatar) <= 1, "avatars of stopped bots are still alive"  # one object, shared
        assert live_count(LocalWebRTCServer) <= 2  # the steady bot's and at most the last cycle's
        assert live_count(MuseTalkProcessor) <= 2
        assert grown_mb < RSS_BOUND_MB
        assert open_fds() <= fds_after_warm_up + 5
    finally:
        runner.stop_all(timeout=15)
    assert not wait_no_new_threads(before_threads)


@pytest.mark.slow
def test_stop_takes_effect_in_every_state_and_keeps_the_real_error(models, prepared_avatar, avatar_store):
    """Two Daily bots on an unreachable room side by side (Daily needs ~20 s to give up):
    one is stopped while it joins, the other is left to fail. Meanwhile a local bot is stopped
    while starting and while running."""
    before_threads = {t.ident for t in bot_threads()}
    joining, failing, local = BotRunner(models), BotRunner(models), BotRunner(models)
    daily = TransportSettings(kind="daily", room_url=UNREACHABLE_ROOM)
    try:
        assert joining.start(prepared_avatar, daily).state == "running"
        assert failing.start(prepared_avatar, daily).state == "running"
        status, took = timed_stop(joining)
        assert status.state == "stopped" and took < STOP_HANG_S, (status, took)
        assert not joining.running  # a new start is allowed at once
        assert status.last_error is None  # no invented "did not stop" error

        # Starting: stop from another thread while start() is still on its way (loading the avatar from disk).
        seen = []
        starter = threading.Thread(
            target=lambda: seen.append(_start_quietly(local, prepared_avatar.name, avatar_store)),
            name="test-starter",
            daemon=True,
        )
        starter.start()
        assert wait_until(lambda: local.status().state == "starting", 10)
        status, took = timed_stop(local)
        starter.join(10)
        assert status.state == "stopped" and took < STOP_HANG_S, (status, took)
        assert not local.running

        # Running.
        running = local.start(prepared_avatar, TransportSettings(kind="local", port=0))
        assert running.state == "running"
        status, took = timed_stop(local)
        assert status.state == "stopped" and status.last_error is None and took < STOP_HANG_S

        # The real reasons: the joining bot ends "stopped" with Daily's error kept; the other ends in error.
        assert wait_until(lambda: failing.status().state == "error", 40), failing.status()
        assert wait_until(lambda: joining.status().last_error is not None, 40), joining.status()
        for runner in (joining, failing):
            error = runner.status().last_error
            assert error.startswith("Daily: could not use the room " + UNREACHABLE_ROOM), error
            assert "did not stop" not in error
        assert joining.status().state == "stopped"
        # A failed bot, once stopped, reads "stopped" and still says why it failed.
        after = failing.stop()
        assert after.state == "stopped" and after.last_error.startswith("Daily: could not use the room")
        assert joining.join_closing(30) and failing.join_closing(30)
    finally:
        for runner in (joining, failing, local):
            runner.stop(timeout=15)
            runner.join_closing(30)
    assert not wait_no_new_threads(before_threads, timeout=15)


def _start_quietly(runner: BotRunner, avatar: str, store: AvatarStore):
    try:
        return runner.start(avatar, TransportSettings(kind="local", port=0), avatar_store=store)
    except Exception as exc:  # stopped during start: start may report it
        return exc


def test_avatar_in_use_names_the_bot(models, prepared_avatar):
    runner = BotRunner(models)
    try:
        assert runner.avatar_in_use(prepared_avatar.name) is None
        status = runner.start(prepared_avatar, TransportSettings(kind="local", port=0))
        in_use = runner.avatar_in_use(prepared_avatar.name)
        assert in_use is not None and "local bot" in in_use and status.url in in_use
        assert runner.avatar_in_use("someone-else") is None
    finally:
        runner.stop(timeout=10)
    assert runner.avatar_in_use(prepared_avatar.name) is None


def test_failed_start_then_stop_reads_stopped(models, avatar_store, prepared_avatar):
    runner = BotRunner(models)
    with pytest.raises(Exception, match="No avatar named 'nobody'"):
        runner.start("nobody", TransportSettings(kind="local", port=0), avatar_store=avatar_store)
    assert runner.status().state == "error"
    stopped = runner.stop()
    assert stopped.state == "stopped" and "No avatar named 'nobody'" in stopped.last_error


def test_damaged_avatars_are_listed_with_why(tmp_path, prepared_avatar, avatar_store):
    import shutil

    store = AvatarStore(tmp_path / "avatars")
    shutil.copytree(avatar_store.path(prepared_avatar.name), store.root / "good")
    shutil.copytree(avatar_store.path(prepared_avatar.name), store.root / "truncated")
    manifest = store.root / "truncated" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:40])
    (store.root / "empty").mkdir()
    (store.root / ".sources").mkdir()  # not an avatar

    assert [m.name for m in store.list()] == ["good"]
    damaged = {d.name: d.reason for d in store.damaged()}
    assert set(damaged) == {"truncated", "empty"}
    assert "unreadable" in damaged["truncated"] and "manifest.json is missing" in damaged["empty"]
    store.delete("truncated")
    store.delete("empty")
    assert store.damaged() == [] and [m.name for m in store.list()] == ["good"]
