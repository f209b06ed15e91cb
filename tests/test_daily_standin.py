"""The Daily stand-in (tests/daily_standin/daily): a simulated room that behaves as daily-python does for Pipecat.

Fast (a few seconds): join, leave and release; participants and their audio in real time; the active
speaker; ejection; a slow leave; the pacing of audio writes; the report files; signatures against the
real SDK's daily/__init__.pyi; and Pipecat's real DailyTransport running over it in this process.
"""

from __future__ import annotations

import ast
import asyncio
import importlib.util
import inspect
import json
import math
import os
import subprocess
import sys
import threading
import time
import wave
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers import DAILY_STANDIN, daily_standin, load_daily_standin, wait_until

URL = "https://standin.daily.co/test-room"
TOKEN = "tok-5e1f-standin-secret"
PIPECAT_DAILY = Path(importlib.util.find_spec("pipecat").origin).parent / "transports" / "daily" / "transport.py"


@pytest.fixture
def standin():
    module = load_daily_standin()
    module.reset()
    yield module
    module.reset()


def tone_wav(path: Path, seconds: float, rate: int = 8000, freq: float = 220.0, amplitude: float = 8000.0) -> str:
    """A mono 16-bit WAV holding a sine tone (loud enough to be an active speaker)."""
    t = np.arange(round(seconds * rate)) / rate
    samples = (amplitude * np.sin(2 * np.pi * freq * t)).astype("<i2")
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(rate)
        wav.writeframes(samples.tobytes())
    return str(path)


def rms(data: bytes) -> float:
    samples = np.frombuffer(data, dtype="<i2").astype(np.float64)
    return math.sqrt(float(np.mean(samples**2))) if len(samples) else 0.0


class Recorder:
    """An event handler that records every event it is called with: (time, event, args, thread).

    The stand-in looks methods up by name, so any `on_*` attribute works; `hooks` run after recording."""

    def __init__(self, **hooks: Any) -> None:
        self.calls: list[tuple[float, str, tuple, threading.Thread]] = []
        self.hooks = hooks

    def __getattr__(self, name: str) -> Any:
        if not name.startswith("on_"):
            raise AttributeError(name)

        def record(*args: Any) -> None:
            self.calls.append((time.monotonic(), name, args, threading.current_thread()))
            if name in self.hooks:
                self.hooks[name](*args)

        return record

    def events(self, name: str) -> list[tuple]:
        return [args for _, event, args, _ in self.calls if event == name]

    def states(self) -> list[str]:
        return [args[0] for args in self.events("on_call_state_updated")]


class Completions:
    """Completion callbacks by name: what each was called with, when, and on which thread."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[tuple, float, threading.Thread]] = {}
        self._cond = threading.Condition()

    def __call__(self, name: str):
        def completion(*args: Any) -> None:
            with self._cond:
                self.results[name] = (args, time.monotonic(), threading.current_thread())
                self._cond.notify_all()

        return completion

    def wait(self, name: str, timeout: float = 5.0) -> tuple:
        with self._cond:
            assert self._cond.wait_for(lambda: name in self.results, timeout), f"{name} did not complete"
            return self.results[name][0]


def joined_client(standin, handler: Any = None, settings: dict | None = None, client: Any = None):
    """`client` (or a new one) joined to URL, after the scenario's join delay; returns it and its join time."""
    client = client or standin.CallClient(event_handler=handler)
    client.set_user_name("bot")
    done = Completions()
    client.join(URL, TOKEN, client_settings=settings or {}, completion=done("join"))
    data, error = done.wait("join")
    assert error is None, error
    return client, done.results["join"][1]


def room_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("daily-standin-room")]


# --------------------------------------------------------------------------- the call
def test_join_leave_release_from_the_room_thread(standin):
    handler, done = Recorder(), Completions()
    client = standin.CallClient(event_handler=handler)
    client.set_user_name("MuseTalk bot")
    client.update_subscription_profiles({"base": {"camera": "unsubscribed"}})
    t0 = time.monotonic()
    settings = {"inputs": {"microphone": {"isEnabled": True}}, "publishing": {"camera": {"isPublishing": False}}}
    client.join(URL, TOKEN, completion=done("join"), client_settings=settings)
    data, error = done.wait("join")
    assert error is None and 0.09 <= done.results["join"][1] - t0 < 0.3  # the default join delay
    local = data["participants"]["local"]["info"]
    assert local["userName"] == "MuseTalk bot" and local["isLocal"] and local["userId"] == client.participant_id
    assert data["meetingSession"]["id"]
    assert client.participants()["local"]["id"] == client.participant_id
    assert client.participant_counts() == {"present": 1, "hidden": 0}
    assert client.subscription_profiles() == {"base": {"camera": "unsubscribed"}}
    client.leave(completion=done("leave"))
    assert done.wait("leave") == (None,)
    client.release()

    assert handler.states() == ["joining", "joined", "leaving", "left"]
    threads = {thread for *_, thread in handler.calls} | {thread for *_, thread in done.results.values()}
    assert threading.current_thread() not in threads and len(threads) == 1
    room = standin.rooms[URL]
    assert (room.leave_calls, room.release_calls, room.callback_errors, room.misuse) == (1, 1, [], [])
    assert room.user_name == "MuseTalk bot" and room.token_given and room.join_settings == settings
    assert TOKEN not in json.dumps(room.report())
    with pytest.raises(RuntimeError, match="already been released"):
        client.participants()
    with pytest.raises(RuntimeError, match="already been released"):
        client.release()
    assert wait_until(lambda: not room_threads(), timeout=2)


def test_participants_and_their_audio_in_real_time(standin, tmp_path):
    voice = tone_wav(tmp_path / "ann.wav", 0.3, rate=8000)  # resampled to the renderer's 16 kHz
    standin.configure(URL, {"participants": [{"name": "ann", "id": "p-ann", "join_at": 0.1, "leave_at": 0.7,
                                              "audio": voice, "audio_at": 0.3}]})  # fmt: skip
    chunks: list[tuple[float, bytes, int, threading.Thread]] = []
    client: Any = None

    def on_joined(participant: dict) -> None:  # as Pipecat does: capture each participant's microphone
        def on_audio(participant_id: str, audio: Any, source: str) -> None:
            assert (participant_id, source, audio.num_channels, audio.bits_per_sample) == ("p-ann", "microphone", 1, 16)
            chunks.append((time.monotonic(), audio.audio_frames, audio.sample_rate, threading.current_thread()))

        client.set_audio_renderer(participant["id"], on_audio, sample_rate=16000, callback_interval_ms=20)

    handler = Recorder(on_participant_joined=on_joined)
    client, _ = joined_client(standin, handler)
    assert wait_until(lambda: handler.events("on_participant_joined"), timeout=2)
    assert set(client.participants()) == {"local", "p-ann"}
    assert wait_until(lambda: handler.events("on_participant_left"), timeout=2)
    time.sleep(0.1)
    client.leave()
    client.release()

    room = standin.rooms[URL]  # times on the room's clock: never early, late by at most a loaded tick
    joined_at = room.time(next(t for t, event, *_ in handler.calls if event == "on_participant_joined"))
    left_at = room.time(next(t for t, event, *_ in handler.calls if event == "on_participant_left"))
    assert 0.1 <= joined_at < 0.2 and 0.7 <= left_at < 0.8
    (person,) = handler.events("on_participant_joined")[0]
    assert person["info"]["userName"] == "ann" and not person["info"]["isLocal"]
    assert person["media"]["microphone"]["state"] == "playable"
    assert handler.events("on_participant_left") == [(person, "leftCall")]
    assert [args[0]["present"] for args in handler.events("on_participant_counts_updated")] == [2, 1]

    times = np.array([t for t, *_ in chunks])
    assert 28 <= len(chunks) <= 31  # 0.6 s of presence in 20 ms chunks
    assert all(len(data) == 640 and rate == 16000 for _, data, rate, _ in chunks)
    assert {thread for *_, thread in chunks} == {handler.calls[0][3]}  # the room's thread, like the events
    assert room.time(times[-1]) < left_at + 0.005  # none after the participant left
    drift = times - times[0] - 0.02 * np.arange(len(times))  # on a monotonic schedule, no accumulating lag
    assert abs(drift).max() < 0.03, drift
    loud = [i for i, (_, data, _, _) in enumerate(chunks) if rms(data) > 1000]
    assert 14 <= len(loud) <= 16 and loud == list(range(loud[0], loud[-1] + 1))  # 0.3 s of tone, in one run
    assert 0.29 <= room.time(times[loud[0]]) <= 0.4  # the chunk that holds the audio's start, delivered at its end
    assert room.callback_errors == []


def test_active_speaker_is_the_loudest_and_stays_through_silence(standin, tmp_path):
    voice = tone_wav(tmp_path / "voice.wav", 0.4)
    standin.configure(URL, {"participants": [
        {"name": "ann", "audio": voice, "audio_at": 0.0},
        {"name": "bob", "audio": voice, "audio_at": 0.6},
        {"name": "cy"},  # silent throughout
    ]})  # fmt: skip
    handler = Recorder()
    client, _ = joined_client(standin, handler)
    time.sleep(1.3)
    assert client.active_speaker()["info"]["userName"] == "bob"  # nobody speaks after 1.0 s: bob stays
    client.leave()
    client.release()
    room = standin.rooms[URL]
    assert [name for _, name in room.active_speaker_changes] == ["ann", "bob"]
    ann_at, bob_at = (t for t, _ in room.active_speaker_changes)
    assert 0.09 <= ann_at < 0.25 and 0.69 <= bob_at < 0.85
    assert [args[0]["info"]["userName"] for args in handler.events("on_active_speaker_changed")] == ["ann", "bob"]


def test_ejection_reports_an_error_then_left_and_media_stops(standin, tmp_path):
    voice = tone_wav(tmp_path / "ann.wav", 0.1)
    standin.configure(URL, {"participants": [{"name": "ann", "audio": voice, "loop_audio": True}],
                            "eject_at": 0.3, "eject_message": "ejected by the owner"})  # fmt: skip
    chunk_times: list[float] = []

    def on_joined(participant: dict) -> None:  # ann is there from the start: this runs right after the join
        client.set_audio_renderer(participant["id"], lambda *_: chunk_times.append(time.monotonic()))

    handler = Recorder(on_participant_joined=on_joined)
    client = standin.CallClient(event_handler=handler)
    client, t0 = joined_client(standin, client=client)
    assert wait_until(lambda: "left" in handler.states(), timeout=2)
    time.sleep(0.15)
    assert client.participants().keys() == {"local"}
    done = Completions()
    client.leave(completion=done("leave"))  # the call is over: nothing to leave, completes at once
    assert done.wait("leave") == (None,)
    client.release()

    order = [(event, args) for _, event, args, _ in handler.calls if event in ("on_error", "on_call_state_updated")]
    assert order[-2:] == [("on_error", ("ejected by the owner",)), ("on_call_state_updated", ("left",))]
    assert handler.states() == ["joining", "joined", "left"]  # no "leaving": the bot did not leave
    ejected_at = next(t for t, event, *_ in handler.calls if event == "on_error")
    room = standin.rooms[URL]  # the room's clock: the join's completion (t0) may be recorded a bit later
    assert room.joined_at <= t0 and 0.3 <= room.time(ejected_at) < 0.45  # never early; late by at most a loaded tick
    assert 12 <= len(chunk_times) <= 15 and max(chunk_times) < ejected_at
    assert room.state == "left" and room.callback_errors == [] and room.leave_calls == 1


def test_release_waits_for_a_slow_leave_then_nothing_fires(standin):
    standin.configure(URL, {"leave_delay": 0.5, "participants": [{"name": "ann", "join_at": 0.05}]})
    handler, done = Recorder(), Completions()
    client, _ = joined_client(standin, handler)
    time.sleep(0.1)
    t0 = time.monotonic()
    client.leave(completion=done("leave"))
    client.release()  # blocks until the leave completed
    released = time.monotonic()
    assert 0.48 <= released - t0 < 0.8
    assert "leave" in done.results and done.results["leave"][1] <= released
    assert handler.states()[-2:] == ["leaving", "left"] and handler.calls[-1][0] <= released
    count = len(handler.calls)
    time.sleep(0.25)  # the active speaker ticks, participants' events: all stopped
    assert len(handler.calls) == count and not room_threads()
    room = standin.rooms[URL]
    assert room.callback_errors == [] and room.release_calls == 1


def test_leave_during_the_join_leaves_once_joined(standin):
    standin.configure(URL, {"join_delay": 0.2})
    handler, done = Recorder(), Completions()
    client = standin.CallClient(event_handler=handler)
    client.join(URL, completion=done("join"))
    client.leave(completion=done("leave"))
    assert done.wait("leave") == (None,) and done.wait("join")[1] is None
    assert done.results["join"][1] <= done.results["leave"][1]
    client.release()
    assert handler.states() == ["joining", "joined", "leaving", "left"]


def test_a_join_error_completes_the_join_with_it(standin):
    standin.configure(URL, {"join_error": "exp-room: the room has expired", "join_delay": 0.05})
    handler, done = Recorder(), Completions()
    client = standin.CallClient(event_handler=handler)
    client.join(URL, None, completion=done("join"))
    assert done.wait("join") == (None, "exp-room: the room has expired")
    client.release()
    room = standin.rooms[URL]
    assert handler.states() == ["joining", "left"] and not room.token_given and room.report()["join_error"]


def test_what_a_handler_or_completion_raises_is_recorded_and_the_room_goes_on(standin):
    def explode(_participant: dict) -> None:
        raise ValueError("handler bug")

    standin.configure(URL, {"participants": [{"name": "ann"}]})
    handler = Recorder(on_participant_joined=explode)
    client, _ = joined_client(standin, handler)
    client.update_publishing({"camera": {"isPublishing": True}}, completion=lambda _error: 1 / 0)
    assert wait_until(lambda: handler.events("on_participant_counts_updated"), timeout=2)
    assert wait_until(lambda: len(standin.rooms[URL].callback_errors) == 2, timeout=2)
    client.leave()
    client.release()
    errors = standin.rooms[URL].callback_errors
    assert any("on_participant_joined" in e and "ValueError: handler bug" in e for e in errors), errors
    assert any("publishing" in e and "ZeroDivisionError" in e for e in errors), errors
    assert client.callback_errors is errors and len(errors) == 2


# --------------------------------------------------------------------------- what the bot publishes
def test_audio_writes_are_paced_like_a_real_time_sink(standin):
    source = standin.CustomAudioSource(16000, 1)
    track = standin.CustomAudioTrack(source)
    settings = {"inputs": {"microphone": {"isEnabled": True, "settings": {"customTrack": {"id": track.id}}}}}
    client, _ = joined_client(standin, Recorder(), settings)
    chunk = (np.arange(320) % 100).astype("<i2").tobytes()  # 20 ms
    done = threading.Event()
    threads: set[threading.Thread] = set()

    def completed(frames: int) -> None:
        assert frames == 320
        threads.add(threading.current_thread())
        done.set()

    t0 = time.monotonic()
    for _ in range(30):  # a writer that awaits each completion, as Pipecat's does
        done.clear()
        source.write_frames(chunk, completion=completed)
        assert done.wait(2)
    elapsed = time.monotonic() - t0
    burst_done: list[float] = []
    t1 = time.monotonic()
    for _ in range(10):  # a writer that does not wait: completions come as play-out reaches each chunk
        source.write_frames(chunk, completion=lambda _frames: burst_done.append(time.monotonic()))
    assert wait_until(lambda: len(burst_done) == 10, timeout=2)
    client.leave()
    client.release()

    room = standin.rooms[URL]
    assert 0.55 <= elapsed < 0.8  # 0.6 s of audio, completed 40 ms before its end
    assert 0.13 <= burst_done[-1] - t1 < 0.35  # where the first writer left off (+40 ms), then 10 x 20 ms
    leads = [w.play_start - w.time for w in room.audio_writes[:30]]
    assert max(leads) <= 0.045 and threading.current_thread() not in threads
    audio, rate = room.published_audio()
    assert rate == 16000 and len(room.audio_writes) == 40 and np.array_equal(audio, np.tile(np.arange(320) % 100, 40))
    assert room.report()["audio"]["seconds"] == pytest.approx(0.8)


def test_the_report_and_the_published_audio_land_in_files(standin, tmp_path, monkeypatch):
    monkeypatch.setenv("DAILY_STANDIN_REPORT", str(tmp_path / "reports"))
    video = standin.CustomVideoSource(4, 2, "RGB")
    audio = standin.CustomAudioSource(16000, 1)
    camera, microphone = standin.CustomVideoTrack(video), standin.CustomAudioTrack(audio)
    video.write_frame(bytes(24))  # before the join: counted, not kept
    inputs = {
        "camera": {"isEnabled": True, "settings": {"customTrack": {"id": camera.id}}},
        "microphone": {"isEnabled": True, "settings": {"customTrack": {"id": microphone.id}}},
    }
    client, t0 = joined_client(standin, Recorder(), {"inputs": inputs})
    frames = [bytes([i * 10] * 24) for i in range(5)]
    for frame in frames:
        video.write_frame(frame)
        time.sleep(0.04)
    audio.write_frames(np.full(1600, 1000, "<i2").tobytes())
    client.leave()
    client.release()

    paths = sorted(p.name for p in (tmp_path / "reports").iterdir())
    assert paths == ["test-room-1.json", "test-room-1.wav"]  # nothing half-written left over
    text = (tmp_path / "reports" / "test-room-1.json").read_text()
    assert TOKEN not in text
    report = json.loads(text)
    assert (
        report["user_name"] == "bot" and report["token_given"] is True and report["join_settings"]["inputs"] == inputs
    )
    assert (report["leave_calls"], report["release_calls"], report["callback_errors"], report["misuse"]) == (
        1,
        1,
        [],
        [],
    )
    assert report["video"]["frames"] == 5 and report["video"]["before_join"] == 1
    assert report["video"]["digests"] == [zlib.crc32(f) for f in frames]
    assert report["video"]["means"] == [0.0, 10.0, 20.0, 30.0, 40.0]
    times = report["video"]["times"]
    assert 0 <= times[0] < 0.05 and all(0.03 < b - a < 0.07 for a, b in zip(times, times[1:]))
    assert report["audio"]["writes"] == 1 and report["audio"]["seconds"] == pytest.approx(0.1)
    with wave.open(str(tmp_path / "reports" / "test-room-1.wav"), "rb") as wav:
        assert (wav.getframerate(), wav.getnchannels(), wav.getnframes()) == (16000, 1, 1600)
    video.write_frame(bytes(24))  # after release: misuse, recorded
    assert standin.rooms[URL].misuse == ["write_frame() on camera after release()"]


def test_a_scenario_file_names_the_rooms(standin, tmp_path, monkeypatch):
    tone_wav(tmp_path / "ann.wav", 0.2)
    (tmp_path / "rooms.json").write_text(json.dumps({URL: {"join_delay": 0.02, "participants": [
        {"name": "ann", "audio": "ann.wav"}]}}))  # fmt: skip
    monkeypatch.setenv("DAILY_STANDIN_ROOM", str(tmp_path / "rooms.json"))
    handler = Recorder()
    client, _ = joined_client(standin, handler)
    assert wait_until(lambda: standin.rooms[URL].active_speaker_changes, timeout=2)  # its audio was found
    client.leave()
    client.release()
    other, done = standin.CallClient(), Completions()
    other.join("https://standin.daily.co/elsewhere", completion=done("join"))
    assert "not found" in done.wait("join")[1]
    other.release()
    (tmp_path / "one.json").write_text(json.dumps({"participants": [{"name": "zoe"}], "join_delay": 0.01}))
    monkeypatch.setenv("DAILY_STANDIN_ROOM", str(tmp_path / "one.json"))
    third, _ = joined_client(standin, Recorder())  # one scenario for any room
    assert wait_until(lambda: len(third.participants()) == 2, timeout=2)
    third.release()
    with pytest.raises(ValueError, match="unknown scenario keys"):
        standin.configure(URL, {"participant": []})


def test_the_speaker_device_hears_the_room(standin, tmp_path):
    standin.configure(URL, {"participants": [{"name": "ann", "audio": tone_wav(tmp_path / "a.wav", 1.0)}]})
    speaker = standin.Daily.create_speaker_device("speaker", sample_rate=16000, channels=1, non_blocking=True)
    standin.Daily.select_speaker_device("speaker")
    client, _ = joined_client(standin)
    assert speaker.read_frames(320) == b""  # nobody has spoken yet
    assert wait_until(lambda: len(speaker.read_frames(320)) == 640, timeout=2)
    done = Completions()
    time.sleep(0.05)
    speaker.read_frames(320, completion=done("read"))
    assert rms(done.wait("read")[0]) > 1000
    client.release()


SUBPROCESS_BOT = """
import threading, daily
assert daily.__file__.endswith("daily_standin/daily/__init__.py"), daily.__file__
joined = threading.Event()
client = daily.CallClient()
client.set_user_name("cli bot")
client.join("https://standin.daily.co/cli-room", "tok", completion=lambda data, error: joined.set())
assert joined.wait(5)
source = daily.CustomAudioSource(16000, 1)
client.add_custom_audio_track("microphone", daily.CustomAudioTrack(source))
source.write_frames(bytes(3200))
client.release()
"""


def test_first_on_pythonpath_it_is_daily_for_a_subprocess(tmp_path):
    (tmp_path / "room.json").write_text(json.dumps({"participants": [{"name": "ann"}], "join_delay": 0.01}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(DAILY_STANDIN), os.environ.get("PYTHONPATH", "")]),
           "DAILY_STANDIN_ROOM": str(tmp_path / "room.json"), "DAILY_STANDIN_REPORT": str(tmp_path / "out")}  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SUBPROCESS_BOT], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out" / "cli-room-1.json").read_text())
    assert report["user_name"] == "cli bot" and report["release_calls"] == 1 and report["callback_errors"] == []
    assert report["audio"]["seconds"] == pytest.approx(0.1) and (tmp_path / "out" / "cli-room-1.wav").is_file()


# --------------------------------------------------------------------------- the SDK's API, as Pipecat calls it
def _pyi_classes() -> dict[str, dict[str, ast.FunctionDef]]:
    spec = importlib.util.find_spec("daily")
    assert spec is not None and spec.origin is not None
    tree = ast.parse((Path(spec.origin).parent / "__init__.pyi").read_text())
    classes = (node for node in tree.body if isinstance(node, ast.ClassDef))
    return {c.name: {f.name: f for f in c.body if isinstance(f, ast.FunctionDef)} for c in classes}


def test_signatures_match_the_sdk_and_pipecat_calls_bind(standin):
    real = _pyi_classes()
    assert {name for name in real if name[0].isupper()} - set(standin.__all__) <= {
        "VirtualCameraDevice", "VirtualMicrophoneDevice"
    }  # fmt: skip
    compared = 0
    for class_name, methods in real.items():
        ours = getattr(standin, class_name, None)
        for name, node in methods.items():
            if ours is None or not inspect.isfunction(getattr(ours, name, None)):
                continue  # a property, or what the stand-in leaves out
            params = list(inspect.signature(getattr(ours, name)).parameters.values())
            assert [p.name for p in params] == [a.arg for a in node.args.args], f"{class_name}.{name}"
            defaults = [ast.unparse(d).replace("LogLevel.Off", "<LogLevel.Off: 0>") for d in node.args.defaults]
            assert [repr(p.default) for p in params if p.default is not p.empty] == defaults, f"{class_name}.{name}"
            compared += 1
    assert compared >= 40, compared

    # Every call Pipecat makes on its CallClient, on Daily, on the sources, the speaker and the VAD binds here.
    tree = ast.parse(PIPECAT_DAILY.read_text())
    targets = {"_client": standin.CallClient, "Daily": standin.Daily, "audio_source": standin.CustomAudioSource,
               "video_source": standin.CustomVideoSource, "_speaker": standin.VirtualSpeakerDevice,
               "_webrtc_vad": standin.NativeVad}  # fmt: skip
    # `self._client` is a CallClient in these two classes (elsewhere it is Pipecat's DailyTransportClient).
    scopes = [
        n for n in tree.body if isinstance(n, ast.ClassDef) and n.name in ("DailyTransportClient", "WebRTCVADAnalyzer")
    ]
    calls = [(n, True) for scope in scopes for n in ast.walk(scope)] + [(n, False) for n in ast.walk(tree)]
    bound = set()
    for call, in_scope in calls:
        if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Attribute):
            continue
        owner = call.func.value
        owner_name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", None)
        if owner_name not in targets or not (in_scope or owner_name == "Daily"):
            continue
        cls = targets[owner_name]
        method = getattr(cls, call.func.attr, None)
        assert method is not None, f"Pipecat calls {owner_name}.{call.func.attr}, which is missing"
        is_static = isinstance(inspect.getattr_static(cls, call.func.attr), staticmethod)
        positional = [None] * ((0 if is_static else 1) + len(call.args))
        inspect.signature(method).bind(*positional, **{k.arg: None for k in call.keywords if k.arg})
        bound.add(f"{owner_name}.{call.func.attr}")
    assert {"_client.join", "_client.leave", "_client.release", "_client.set_audio_renderer", "Daily.init",
            "Daily.set_log_level", "audio_source.write_frames", "video_source.write_frame", "_speaker.read_frames",
            "_webrtc_vad.analyze_frames"} <= bound, bound  # fmt: skip
    assert len({b for b in bound if b.startswith("_client.")}) >= 25


# --------------------------------------------------------------------------- Pipecat's DailyTransport over it
def test_pipecat_daily_transport_runs_over_the_standin(monkeypatch, tmp_path):
    standin = daily_standin(monkeypatch)
    from pipecat.frames.frames import OutputAudioRawFrame, OutputImageRawFrame, UserAudioRawFrame
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameProcessor
    from pipecat.transports.daily.transport import DailyParams, DailyTransport
    from pipecat.workers.runner import WorkerRunner

    voice = tone_wav(tmp_path / "ann.wav", 0.5)
    standin.configure(URL, {"participants": [{"name": "ann", "audio": voice, "loop_audio": True}]})

    class UserAudioCounter(FrameProcessor):
        def __init__(self) -> None:
            super().__init__()
            self.frames: list[Any] = []

        async def process_frame(self, frame, direction) -> None:
            await super().process_frame(frame, direction)
            if isinstance(frame, UserAudioRawFrame):
                self.frames.append(frame)
            await self.push_frame(frame, direction)

    params = DailyParams(
        audio_in_enabled=True, audio_in_sample_rate=16000, audio_out_enabled=True, audio_out_sample_rate=16000,
        audio_out_end_silence_secs=0, video_out_enabled=True, video_out_width=8, video_out_height=4,
    )  # fmt: skip
    transport = DailyTransport(URL, TOKEN, "stand-in bot", params=params)
    counter, joined = UserAudioCounter(), []

    @transport.event_handler("on_participant_joined")
    async def on_participant_joined(_transport: Any, participant: dict) -> None:
        joined.append(participant["info"]["userName"])

    async def main() -> None:
        pipeline = Pipeline([transport.input(), counter, transport.output()])
        worker = PipelineWorker(
            pipeline, params=PipelineParams(audio_in_sample_rate=16000, audio_out_sample_rate=16000),
            idle_timeout_secs=None, enable_rtvi=False,
        )  # fmt: skip
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        task = asyncio.create_task(runner.run())
        deadline = time.monotonic() + 10
        while len(counter.frames) < 25 and time.monotonic() < deadline and not task.done():
            await asyncio.sleep(0.05)
        tone = (8000 * np.sin(np.arange(8000) / 16000 * 2 * np.pi * 300)).astype("<i2").tobytes()  # 0.5 s
        await worker.queue_frame(OutputAudioRawFrame(audio=tone, sample_rate=16000, num_channels=1))
        await worker.queue_frame(OutputImageRawFrame(image=bytes(range(96)), size=(8, 4), format="RGB"))
        await asyncio.sleep(0.8)
        await runner.cancel(reason="the test is over")
        await asyncio.wait_for(task, timeout=15)

    asyncio.run(main())

    assert joined == ["ann"]
    assert len(counter.frames) >= 25, len(counter.frames)
    assert {(f.sample_rate, f.num_channels, len(f.audio)) for f in counter.frames} == {(16000, 1, 640)}
    assert max(rms(f.audio) for f in counter.frames) > 1000  # ann's voice, not just silence
    (client,) = standin.clients
    room = standin.rooms[URL]
    assert client.room is room and room.user_name == "stand-in bot" and room.token_given
    assert set(room.tracks) == {"camera", "microphone"}  # Pipecat's custom tracks, found by their ids at join
    audio, rate = room.published_audio()
    assert rate == 16000 and len(audio) >= 8000 * 0.9 and room.report()["audio"]["max_lead_s"] <= 0.06
    assert room.video_frames and room.video_frames[-1].crc32 == zlib.crc32(bytes(range(96)))
    assert (room.leave_calls, room.release_calls, room.callback_errors, room.misuse) == (1, 1, [], [])
    assert standin.Daily.init_calls == 1 and not room_threads()
