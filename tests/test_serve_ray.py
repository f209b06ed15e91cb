"""The generation service on Ray Serve: equal frames, session pinning, a replica killed mid-speech.

One local Ray cluster (127.0.0.1, CPU only, tiny models, 2 replicas) serves every test here.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import threading
import time

import numpy as np
import pytest
from helpers import START_SERVER, LineReader, PanelServer, panel_env, pid_alive, poll, wait_until, write_config
from viewers import candidate_free_offer, media_less_page

from musetalk.config import RuntimeSettings
from musetalk.errors import ConfigError, MuseTalkError
from musetalk.live.requests import FrameItem, FrameRequest
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.serve import backend as backend_mod
from musetalk.serve.backend import BackendError, RayOptions, make_backend
from musetalk.testing import synthetic_avatar, synthetic_features

SERVICE = {"batch_size": 1, "blend_threads": 1, "torch_threads": 1, "admission": False}
# A replica killed with kill -9: its sessions lose only frames that fall due before they are
# re-attached (measured here: the results stream fails within ~10 ms, the re-open takes ~0.6 s,
# so with the live default budget of 0.2 s at most ~20 frames at 25 fps). Here every frame is due
# 30 s after it is sent (this shared CPU is slow), so none may be lost: the client re-sends what
# the dead replica owed.
LOSS_BOUND_FRAMES = 0

needs_ray = pytest.mark.skipif(
    not backend_mod.ray_available(), reason="Ray is not installed: pip install -r requirements-scale.txt"
)


class Results:
    def __init__(self):
        self.images: dict[int, np.ndarray] = {}
        self.skipped: list[int] = []
        self.errors: list[str] = []
        self.arrived: dict[int, float] = {}
        self.changed = threading.Condition()

    def __call__(self, result) -> None:
        with self.changed:
            now = time.monotonic()
            self.images.update(result.images)
            self.arrived.update({seq: now for seq in result.images})
            self.skipped += result.skipped
            if result.error:
                self.errors.append(result.error)
            self.changed.notify_all()

    def wait(self, seqs, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        with self.changed:
            while not set(seqs) <= set(self.images) | set(self.skipped):
                left = deadline - time.monotonic()
                assert left > 0, f"{len(set(seqs) - set(self.images) - set(self.skipped))} frames never arrived"
                self.changed.wait(left)


def renamed(avatar, name):
    return dataclasses.replace(avatar, manifest=dataclasses.replace(avatar.manifest, name=name))


def request(session_id, seqs, features, *, due_in=60.0):
    due = time.monotonic() + due_in
    items = tuple(FrameItem(seq=s, frame=s, position=s, due=due) for s in seqs)
    return FrameRequest(session_id=session_id, items=items, features=np.asarray(features))


@pytest.fixture(scope="module")
def avatars():
    return [
        renamed(synthetic_avatar(frames=3, size=(192, 160), face_box=(60, 30, 140, 120), seed=s), f"av{s}")
        for s in range(2)
    ]


@pytest.fixture(scope="module")
def ray_client(tiny_models_dir):
    if not backend_mod.ray_available():
        pytest.skip("Ray is not installed: pip install -r requirements-scale.txt")
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=4, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.getcwd()}})  # fmt: skip
    client = make_backend("ray", models_dir=tiny_models_dir, runtime=RuntimeSettings(device="cpu"),
                          ray=RayOptions(replicas=2, service=SERVICE, gpus_per_replica=0))  # fmt: skip
    yield client
    client.close()
    serve.shutdown()
    ray.shutdown()


SESSIONS = [("s1", 0), ("s2", 0), ("s3", 1)]  # 3 sessions, 2 avatars


@needs_ray
@pytest.mark.slow
def test_ray_frames_equal_inprocess_and_sessions_stay_on_their_replica(ray_client, models, avatars):
    feats = {sid: synthetic_features(6, models.audio_dim, seed=k).numpy() for k, (sid, _) in enumerate(SESSIONS)}
    local = GenerationService(models, ServiceSettings(**SERVICE))
    expected = {}
    for sid, a in SESSIONS:
        local.open_session(sid, local.add_avatar(avatars[a]), sink := Results(), warm_up=False)
        local.submit(request(sid, range(6), feats[sid]))
        sink.wait(range(6))
        expected[sid] = sink.images
    local.close()

    sinks = {}
    for sid, a in SESSIONS:
        ray_client.open_session(sid, ray_client.add_avatar(avatars[a]), sinks.setdefault(sid, Results()), warm_up=False)
    replicas = {sid: ray_client.session_replica(sid)[0] for sid, _ in SESSIONS}
    for half in (range(0, 3), range(3, 6)):
        for sid, _ in SESSIONS:
            ray_client.submit(request(sid, half, feats[sid][half.start : half.stop]))
    for sid, _ in SESSIONS:
        sinks[sid].wait(range(6))
        assert not sinks[sid].errors and not sinks[sid].skipped
        for seq in range(6):
            np.testing.assert_array_equal(sinks[sid].images[seq], expected[sid][seq], err_msg=f"{sid} frame {seq}")
        assert ray_client.session_replica(sid)[0] == replicas[sid]

    stats = ray_client.stats()
    assert len(stats.replicas) == 2
    by_replica = {r.replica: r for r in stats.replicas}
    for sid, _ in SESSIONS:  # every frame of a session was made on the replica it opened on
        assert sid in by_replica[replicas[sid]].sessions
    for r in stats.replicas:
        assert r.stats.frames == 6 * sum(1 for sid in r.sessions if sid in replicas)
    for sid, _ in SESSIONS:
        ray_client.close_session(sid)


@needs_ray
@pytest.mark.slow
def test_ray_replica_killed_mid_speech_sessions_go_on(ray_client, models, avatars):
    sinks = {sid: Results() for sid, _ in SESSIONS}
    ids = {sid: f"k{sid}" for sid, _ in SESSIONS}
    for sid, a in SESSIONS:
        ray_client.open_session(ids[sid], ray_client.add_avatar(avatars[a]), sinks[sid], warm_up=False)
    victim_replica, victim_pid, _ = ray_client.session_replica(ids["s1"])
    on_victim = [sid for sid in sinks if ray_client.session_replica(ids[sid])[0] == victim_replica]
    feats = synthetic_features(1, models.audio_dim, seed=5).numpy()
    frames, fps, killed_at = 20, 10.0, None
    start = time.monotonic()
    for seq in range(frames):  # paced speech
        for sid in sinks:
            ray_client.submit(request(ids[sid], [seq], feats, due_in=30.0))
        if seq == 6:
            os.kill(victim_pid, signal.SIGKILL)
            killed_at = time.monotonic()
        time.sleep(max(0.0, start + (seq + 1) / fps - time.monotonic()))
    for sid, sink in sinks.items():
        sink.wait(range(frames), timeout=60)
        lost = frames - len(sink.images)
        assert not sink.errors, sink.errors
        assert lost <= LOSS_BOUND_FRAMES, f"{sid} lost {lost} frames"
        assert max(sink.arrived.values()) > killed_at  # it went on after the kill
        assert set(range(frames - 5, frames)) <= set(sink.images)  # and its last frames were made
    for sid in on_victim:
        replica, pid, reattaches = ray_client.session_replica(ids[sid])
        assert reattaches >= 1 and pid != victim_pid
    for sid in sinks:
        ray_client.close_session(ids[sid])


@needs_ray
@pytest.mark.slow
def test_ray_live_sessions_through_the_client_lip_sync_every_speech_frame(ray_client, avatars):
    """LiveSession (audio windows, not ready features) over the Ray client, as a bot drives it."""
    from musetalk.bench.streams import StreamsOptions, run_streams_remote

    opts = StreamsOptions(seconds=1.0, latency_budget_s=20.0, frame_size=(192, 160))  # this CPU is slow and shared
    result = run_streams_remote(ray_client, avatars, 1, opts)
    assert result.late_pct == 0.0  # every speech frame got its generated image
    assert result.min_session_fps >= 24  # 1 s of speech + 80 ms of silence: 24 frames have their look-ahead


def test_backend_choice_errors(monkeypatch):
    with pytest.raises(ConfigError, match="inproc"):
        make_backend("grpc://x")
    monkeypatch.setattr(backend_mod, "ray_available", lambda: False)
    with pytest.raises(BackendError, match="requirements-scale.txt"):
        make_backend("ray")


def test_bots_are_worker_processes_only_where_this_process_is_a_cluster_node(models):
    from musetalk.bot.runner import BotRunner
    from musetalk.bot.workers import make_bot_runner, uses_bot_workers

    assert uses_bot_workers("ray")
    assert not uses_bot_workers("inproc") and not uses_bot_workers("ray://10.0.0.1:10001")  # Ray Client: threads
    service = GenerationService(models, ServiceSettings(batch_size=1))
    runner = make_bot_runner(models, service, backend="ray://10.0.0.1:10001", max_bots=3)
    assert isinstance(runner, BotRunner) and runner.service is service and runner.max_bots == 3


@needs_ray
@pytest.mark.slow
def test_unreachable_ray_address_fails_fast():
    start = time.monotonic()
    with pytest.raises(BackendError, match="No Ray cluster answers"):
        make_backend("ray://127.0.0.1:9", ray=RayOptions(connect_timeout_s=2.0))
    assert time.monotonic() - start < 10


def test_avatar_blob_round_trip_digest_and_cache(tmp_path, avatars):
    from musetalk.errors import AvatarError
    from musetalk.serve.avatars import AvatarCache, PackedAvatars, digest, pack_avatar, unpack_avatar

    blob = pack_avatar(avatars[0])
    assert pack_avatar(avatars[0]) == blob  # same avatar, same bytes, same id everywhere
    assert digest(blob) != digest(pack_avatar(avatars[1]))
    back = unpack_avatar(blob)
    assert back.manifest == avatars[0].manifest
    for a, b in zip(back.frames + back.masks, avatars[0].frames + avatars[0].masks):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(back.latents.numpy(), avatars[0].latents.numpy())
    np.testing.assert_array_equal(back.crop_boxes, avatars[0].crop_boxes)
    packed = PackedAvatars()
    key = packed.add(avatars[0])
    assert packed.add(avatars[0]) == key == digest(blob) and packed.name(key) == "av0"
    cache = AvatarCache(tmp_path)
    with pytest.raises(AvatarError, match="does not match"):
        cache.put(key, pack_avatar(avatars[1]))
    assert not cache.has(key)
    cache.put(key, blob)
    assert cache.has(key) and cache.load(key).manifest == avatars[0].manifest


@needs_ray
@pytest.mark.slow
def test_a_local_bot_runs_its_viewers_on_the_ray_backend(ray_client, models, prepared_avatar):
    """What the panel and start_pipecat_server.py do with --backend ray: a BotRunner whose service is
    the Ray client; a viewer's session opens on a replica, its video flows, stop closes the session."""
    import httpx

    from musetalk.bot.runner import BotRunner

    runner = BotRunner(models, service=ray_client)
    before = ray_client.stats().sessions
    try:
        status = runner.start(prepared_avatar, media_less_page())
        answer = httpx.post(status.url + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert wait_until(lambda: ray_client.stats().sessions == before + 1, 60), ray_client.stats()
        assert wait_until(lambda: runner.status().frames > 10, 30), runner.status()
        assert runner.status().viewers == 1 and runner.status().last_error is None
    finally:
        assert runner.stop(timeout=10).state == "stopped"
    assert wait_until(lambda: ray_client.stats().sessions == before, 30), ray_client.stats()


@needs_ray
@pytest.mark.slow
def test_bots_run_as_worker_processes_and_a_killed_one_leaves_the_others(ray_client, avatar_store, prepared_avatar):
    """Each bot runs in a Ray worker process of its own; kill -9 of one: its status says so, the other bot's
    viewer keeps getting frames, the dead bot's session is freed on the replica, and a new bot starts."""
    import httpx

    from musetalk.bot.transports import TransportSettings
    from musetalk.bot.workers import WorkerBotRunner

    runner = WorkerBotRunner(ray_client, max_bots=2, bot_cpus=0.5)
    before = ray_client.stats().sessions
    try:
        bots = [runner.start(prepared_avatar.name, media_less_page(), avatar_store=avatar_store) for _ in range(2)]
        pids = {b.worker_pid for b in bots}
        assert None not in pids and len(pids | {os.getpid()}) == 3, bots  # two processes, neither this one
        with pytest.raises(Exception, match="2 bots are running"):
            runner.start(prepared_avatar.name, TransportSettings(kind="local", port=0), avatar_store=avatar_store)
        for bot in bots:
            answer = httpx.post(
                bot.url + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=60
            )
            assert answer.status_code == 200, answer.text
        assert wait_until(lambda: all(runner.status(b.bot_id).frames > 10 for b in bots), 60), runner.bots()
        assert runner.avatar_in_use(prepared_avatar.name)

        victim, survivor = bots
        os.kill(victim.worker_pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert wait_until(lambda: runner.status(victim.bot_id).state == "error", 15), runner.status(victim.bot_id)
        print(f"\nbot worker killed with kill -9: its status said so after {time.monotonic() - killed_at:.2f} s")
        dead = runner.status(victim.bot_id)
        assert f"pid {victim.worker_pid}" in dead.last_error and "died" in dead.last_error, dead
        assert dead.viewers == 0 and runner.running_ids() == [survivor.bot_id]
        frames = runner.status(survivor.bot_id).frames
        assert wait_until(lambda: runner.status(survivor.bot_id).frames > frames + 10, 30), runner.status(
            survivor.bot_id
        )
        assert runner.status(survivor.bot_id).state == "running"
        # The replica closes the dead bot's session once nobody polls it (ORPHAN_S).
        assert wait_until(lambda: ray_client.stats().sessions == before + 1, 40), ray_client.stats()

        stopped = runner.stop(victim.bot_id)
        assert stopped.state == "stopped" and "died" in stopped.last_error  # acknowledged, error kept

        with socket.socket() as busy:  # a bot that cannot start: its readable error, and no process left behind
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            port = busy.getsockname()[1]
            with pytest.raises(MuseTalkError, match=f"Port {port} on 127.0.0.1 is already in use"):
                runner.start(
                    prepared_avatar.name, TransportSettings(kind="local", port=port), avatar_store=avatar_store
                )
        failed = runner.bots()[-1]
        assert failed.state == "error" and failed.worker_pid and failed.worker_pid not in pids, failed
        assert runner.join_closing(60) and wait_until(lambda: not pid_alive(failed.worker_pid), 15)
        # A new bot starts while the panel keeps asking for statuses (a starting worker is not asked yet).
        starts: list = []
        local = TransportSettings(kind="local", port=0)
        thread = threading.Thread(target=lambda: starts.append(runner.start(prepared_avatar.name, local,
                                                                            avatar_store=avatar_store)))  # fmt: skip
        thread.start()
        while thread.is_alive():
            assert {b.state for b in runner.bots()} <= {"starting", "running", "stopped", "error"}
            time.sleep(0.2)
        again = starts[0]
        assert (
            again.state == "running" and again.worker_pid not in pids and runner.status(again.bot_id).state == "running"
        )

        # Stopped while its worker process is still starting: "stopped" at once, and nothing runs after.
        starts.clear()
        thread = threading.Thread(target=lambda: starts.append(runner.start(prepared_avatar.name, local,
                                                                            avatar_store=avatar_store)))  # fmt: skip
        runner.stop(again.bot_id, timeout=10)
        thread.start()
        assert wait_until(
            lambda: runner.bots()[-1].state == "starting" and runner.bots()[-1].bot_id != again.bot_id, 10
        )
        late = runner.bots()[-1]
        assert runner.stop(late.bot_id).state == "stopped"
        thread.join(120)
        assert starts and starts[0].state == "stopped", (starts, runner.bots())
        assert runner.running_ids() == [survivor.bot_id], runner.bots()
    finally:
        runner.stop_all(timeout=10)
        assert runner.join_closing(60)
    assert not runner.running
    assert wait_until(lambda: ray_client.stats().sessions == before, 40), ray_client.stats()


@needs_ray
@pytest.mark.slow
def test_the_panel_drives_bot_workers_on_the_ray_backend(ray_client, avatar_store, prepared_avatar, tiny_models_dir,
                                                          tmp_path):  # fmt: skip
    """app.py --backend ray joins this machine's cluster: the same API names start bots in worker processes;
    one killed shows its error in the panel while the other runs on, and stop works for both."""
    import httpx
    from gradio_client import Client

    server = PanelServer(["--backend", "ray", "--max-bots", "2"],
                         panel_env(tiny_models_dir, avatar_store.root, tmp_path), tmp_path / "app.log")  # fmt: skip
    try:
        server.wait_ready()
        client = Client(server.url, verbose=False)
        start = ("astro", "local", "", "", "mirror", 0, "127.0.0.1", 1.0)
        first = client.predict(*start, api_name="/start_bot")
        second = client.predict(*start, api_name="/start_bot")
        for bot in (first, second):
            assert bot["state"] == "running" and bot["worker_pid"] not in (None, server.proc.pid, os.getpid()), bot
        assert first["worker_pid"] != second["worker_pid"]
        answer = httpx.post(
            second["url"] + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=60
        )
        assert answer.status_code == 200, answer.text

        def bots() -> dict:
            return {b["bot_id"]: b for b in client.predict(api_name="/list_bots")}

        assert poll(bots, lambda b: b[second["bot_id"]]["frames"] > 10, 60)[second["bot_id"]]["frames"] > 10
        service = client.predict(api_name="/service_status")
        assert service["sessions"] >= 1 and len(service["replicas"]) == 2, service

        os.kill(first["worker_pid"], signal.SIGKILL)
        seen = poll(bots, lambda b: b[first["bot_id"]]["state"] == "error", 20)
        assert "died" in (seen[first["bot_id"]]["last_error"] or ""), seen
        assert seen[second["bot_id"]]["state"] == "running", seen
        frames = seen[second["bot_id"]]["frames"]
        assert poll(bots, lambda b: b[second["bot_id"]]["frames"] > frames, 20)[second["bot_id"]]["frames"] > frames
        assert client.predict(second["bot_id"], api_name="/stop_bot_id")["state"] == "stopped"
        assert client.predict(first["bot_id"], api_name="/stop_bot_id")["state"] == "stopped"
    finally:
        code = server.stop()
    assert code == 0, server.log.read_text()[-3000:]


@needs_ray
@pytest.mark.slow
def test_start_pipecat_server_runs_its_bot_in_a_worker_process(ray_client, avatar_store, prepared_avatar,
                                                               tiny_models_dir, tmp_path):  # fmt: skip
    """start_pipecat_server.py --backend ray on a machine with a cluster: the bot is a worker process, its page
    answers, Ctrl-C stops it cleanly and the worker process ends."""
    import subprocess
    import sys

    import httpx

    config = write_config(tmp_path / "realtime.yaml", prepared_avatar.name, preparation=False)
    env = {**os.environ, "MUSETALK_MODELS_DIR": str(tiny_models_dir), "MUSETALK_AVATARS_DIR": str(avatar_store.root),
           "MUSETALK_DEVICE": "cpu"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, str(START_SERVER), "--local", "--port", "0", "--config", str(config), "--skip-checks",
         "--backend", "ray"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    reader = LineReader(proc.stderr)
    try:
        worker = reader.wait_for(r"its own worker process \(Ray\), pid (\d+)", timeout=180)
        assert worker, f"no worker process announced; output:\n{reader.rest(1)}"
        found = reader.wait_for(r"Local page: (http://127\.0\.0\.1:\d+/)", timeout=10)
        assert found, f"no local page announced; output:\n{reader.rest(1)}"
        pid = int(worker.group(1))
        assert pid != proc.pid and pid_alive(pid)
        status = httpx.get(found.group(1) + "api/status", timeout=10).json()
        assert status["state"] == "running" and status["avatar"] == prepared_avatar.name
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = reader.rest()
    assert "Stopped cleanly" in output and "Traceback" not in output, output[-3000:]
    assert wait_until(lambda: not pid_alive(pid), 20)


@needs_ray
@pytest.mark.slow
def test_a_say_bot_in_a_worker_process_speaks_and_stops(ray_client, avatar_store, prepared_avatar):
    """Say mode through a bot worker: the worker gets the bot config (and only the keys it names), say()
    and interrupt() reach its pipeline; the key never shows in a status."""
    import httpx

    from musetalk.bot.agent_config import BotConfig, ServiceConfig, SpeechSetup
    from musetalk.bot.processor import LiveSettings
    from musetalk.bot.workers import WorkerBotRunner

    secret = "sk-worker-secret-42"
    tts = ServiceConfig("tts", "espeak", voice="en-us", api_key_env="MUSETALK_TEST_TTS_KEY")
    setup = SpeechSetup(BotConfig(tts=tts), {"MUSETALK_TEST_TTS_KEY": secret, "OTHER": "not-sent"}.get)
    runner = WorkerBotRunner(ray_client, max_bots=1, bot_cpus=0.5)
    try:
        status = runner.start(prepared_avatar.name, media_less_page(),
                              LiveSettings(mode="say", latency_budget_s=2.0), avatar_store=avatar_store, speech=setup)  # fmt: skip
        assert status.mode == "say" and status.worker_pid not in (None, os.getpid())
        with pytest.raises(MuseTalkError, match="Nobody is watching"):
            runner.say(status.bot_id, "Hello.")
        answer = httpx.post(status.url + "api/offer", json={"sdp": candidate_free_offer(), "type": "offer"}, timeout=60)
        assert answer.status_code == 200, answer.text
        assert wait_until(lambda: runner.status(status.bot_id).frames > 10, 60), runner.status(status.bot_id)
        runner.say(status.bot_id, "This is the worker speaking, for a good few seconds, so it can be stopped.")
        heard = lambda: any(t["role"] == "avatar" for t in runner.status(status.bot_id).transcript)  # noqa: E731
        assert wait_until(heard, 30), runner.status(status.bot_id)
        assert runner.status(status.bot_id).speaking
        runner.interrupt(status.bot_id)
        assert wait_until(lambda: not runner.status(status.bot_id).speaking, 3), runner.status(status.bot_id)
        final = runner.status(status.bot_id)
        assert final.state == "running" and any(t["interrupted"] for t in final.transcript), final
        assert secret not in repr(final)
    finally:
        runner.stop_all()
        runner.join_closing(60)
