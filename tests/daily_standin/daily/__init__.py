"""A stand-in for `daily` (daily-python 0.36, the Daily.co SDK): a simulated room, no network.

Why: Pipecat's real `DailyTransport` is what the bot runs in a Daily room. Run over this module it
goes through its whole Daily path (join, participants and their audio, active speaker, ejection,
leave, release) offline and in seconds, and the room records what the bot publishes so a test can
check it. Two ways in: `tests/daily_standin` first on PYTHONPATH makes `import daily` this module (a
CLI subprocess); in-process, tests/helpers.py `daily_standin(monkeypatch)` patches it into Pipecat.

A room plays a scenario, registered with `configure(room_url, scenario)` or read at join from the
JSON file named by DAILY_STANDIN_ROOM (one scenario for any URL, or URL -> scenario; a URL the file
does not name fails to join). Times are seconds after the bot's join completes:

    {"participants": [{"name": "ann", "id": "optional", "join_at": 0, "leave_at": null,
                       "audio": "ann.wav", "audio_at": 0, "loop_audio": false}],
     "join_delay": 0.1, "join_error": null, "eject_at": null, "eject_message": "ejected", "leave_delay": 0}

What it keeps of the real SDK, because Pipecat depends on it:
* Signatures as in daily/__init__.pyi (keyword names included) for every call Pipecat 1.14 makes.
* Event handler methods are looked up by name when they fire, and every event and completion comes
  from the room's own thread, never the caller's: Pipecat's handlers block on its event loop, which
  would deadlock on the loop's own thread.
* A CustomAudioSource is a real-time sink: a write completes when play-out is within 40 ms of its
  end, so a writer awaiting completions cannot run ahead of real time.
* release() waits for a pending join or leave to complete; after it nothing fires, and the client's
  calls raise RuntimeError. Whatever a handler or completion raises lands in `room.callback_errors`.

Not simulated: remote video (cameras are off), app messages from others, transcription, recording
and dial-out events (those calls just complete), live streaming, virtual cameras and microphones.
"""

from __future__ import annotations

import copy
import heapq
import itertools
import json
import math
import os
import tempfile
import threading
import time
import traceback
import uuid
import wave
import zlib
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import numpy as np

__all__ = [
    "AudioData", "AudioWrite", "CallClient", "CustomAudioSource", "CustomAudioTrack", "CustomVideoSource",
    "CustomVideoTrack", "Daily", "EventHandler", "LogLevel", "NativeVad", "Room", "VideoFrame", "VideoWrite",
    "VirtualSpeakerDevice", "clients", "configure", "reset", "rooms",
]  # fmt: skip

RELEASED = "this object has already been released"
PACE_LEAD_S = 0.04  # an audio write completes when play-out is this close to its end
SPEAKER_EVERY_S, SPEAKER_WINDOW_S, SPEAKER_RMS = 0.1, 0.3, 300.0  # active speaker: RMS of int16 samples
RELEASE_WAIT_S = 30.0  # release() gives up waiting for a join or leave after this long (and records it)
SCENARIO_KEYS = {"participants", "join_delay", "join_error", "eject_at", "eject_message", "leave_delay"}
PARTICIPANT_KEYS = {"name", "id", "join_at", "leave_at", "audio", "audio_at", "loop_audio"}
_BYTES_PER_PIXEL = {"RGB": 3, "BGR": 3, "RGBA": 4, "BGRA": 4, "ARGB": 4, "ABGR": 4}

clients: list[CallClient] = []  # every CallClient created since reset(), for assertions
rooms: dict[str, Room] = {}  # room URL -> its latest call
unattached_errors: list[str] = []  # raised by completions of sources and devices in no call
_scenarios: dict[str, dict[str, Any]] = {}
_tracks: dict[str, CustomAudioSource | CustomVideoSource] = {}  # custom track id -> its source
_speakers: dict[str, VirtualSpeakerDevice] = {}
_room_numbers: dict[str, int] = {}


def configure(room_url: str, scenario: Mapping[str, Any]) -> None:
    """Register the scenario the room at `room_url` plays for each bot that joins it (checked now)."""
    _scenarios[room_url] = _checked(scenario, None)


def reset() -> None:
    """Forget every scenario, client, room, track and device; stops the threads of unreleased clients."""
    for client in clients:
        client._clock.stop()
    for registry in (clients, rooms, _scenarios, _tracks, _speakers, _room_numbers, unattached_errors):
        registry.clear()
    Daily.selected_speaker, Daily.init_calls = None, 0


def _checked(scenario: Mapping[str, Any], base: Path | None) -> dict[str, Any]:
    """The scenario with its defaults filled in; unknown keys are refused (a typo would go unnoticed)."""
    if unknown := set(scenario) - SCENARIO_KEYS:
        raise ValueError(f"unknown scenario keys {sorted(unknown)}; known: {sorted(SCENARIO_KEYS)}")
    out = {"join_delay": 0.1, "join_error": None, "eject_at": None, "eject_message": "ejected", "leave_delay": 0.0}
    out.update(scenario)
    people = []
    for raw in scenario.get("participants", []):
        if unknown := set(raw) - PARTICIPANT_KEYS:
            raise ValueError(f"unknown participant keys {sorted(unknown)}; known: {sorted(PARTICIPANT_KEYS)}")
        if "name" not in raw:
            raise ValueError(f"a participant needs a name: {raw}")
        person = {"id": str(uuid.uuid4()), "join_at": 0.0, "leave_at": None, "audio": None, "loop_audio": False}
        person.update(raw)
        person.setdefault("audio_at", person["join_at"])
        if person["audio"]:
            person["audio"] = str(base / person["audio"] if base is not None else person["audio"])
            if not Path(person["audio"]).is_file():
                raise ValueError(f"{person['name']}'s audio {person['audio']} is no file")
        if person["leave_at"] is not None and person["leave_at"] < person["join_at"]:
            raise ValueError(f"{person['name']} leaves before joining")
        people.append(person)
    out["participants"] = people
    return out


def _scenario_for(url: str) -> dict[str, Any]:
    """configure()'s scenario, else DAILY_STANDIN_ROOM's, else an empty room."""
    if url in _scenarios:
        return _scenarios[url]
    path = os.environ.get("DAILY_STANDIN_ROOM")
    if not path:
        return _checked({}, None)
    data = json.loads(Path(path).read_text())
    if data and not set(data) & SCENARIO_KEYS:  # a file of URL -> scenario
        if url not in data:
            return _checked({"join_error": f"room {url} not found (not in {path})"}, None)
        data = data[url]
    return _checked(data, Path(path).resolve().parent)


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat()


class LogLevel(Enum):
    """The SDK's log levels (Pipecat imports this as DailyLogLevel)."""

    Off = 0
    Error = 1
    Warn = 2
    Info = 3
    Debug = 4
    Trace = 5

    def __str__(self) -> str:
        return self.name


class AudioData:
    """One audio renderer callback's samples: int16, as the SDK hands them over."""

    def __init__(self, audio_frames: bytes, sample_rate: int, num_channels: int = 1) -> None:
        self._frames, self._rate, self._channels = audio_frames, sample_rate, num_channels

    @property
    def audio_frames(self) -> bytes:
        return self._frames

    @property
    def sample_rate(self) -> int:
        return self._rate

    @property
    def num_channels(self) -> int:
        return self._channels

    @property
    def bits_per_sample(self) -> int:
        return 16

    @property
    def num_audio_frames(self) -> int:
        return len(self._frames) // (2 * self._channels)


class VideoFrame:
    """A remote video frame. Never delivered: the room's participants have their cameras off."""

    def __init__(self, buffer: bytes, width: int, height: int, timestamp_us: int = 0, color_format: str = "RGB"):
        self.buffer, self.width, self.height = buffer, width, height
        self.timestamp_us, self.color_format = timestamp_us, color_format


class AudioWrite(NamedTuple):
    """One write_frames() call: when, when its samples start playing out, what, on which track."""

    time: float
    play_start: float
    data: bytes
    track: str
    sample_rate: int
    channels: int


class VideoWrite(NamedTuple):
    """One write_frame() call: when, a digest of the bytes and their mean (cheap to compare), which track."""

    time: float
    crc32: int
    mean: float
    track: str


class _Clock:
    """The room's own thread: runs jobs in order of their monotonic due time, each once.

    `every` schedules tick k at start + k * interval, so a late tick does not delay later ones (no
    drift). A job that raises is recorded in `errors` and the thread goes on."""

    def __init__(self, name: str, errors: list[str]) -> None:
        self.errors = errors
        self.running_label: str | None = None
        self._jobs: list[tuple[float, int, str, Callable[[], Any]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()

    def at(self, when: float, label: str, job: Callable[[], Any], tick: bool = False) -> None:
        with self._cond:
            if self._stopped:
                if not tick:
                    self.errors.append(f"{label}: would fire after release(); dropped")
                return
            heapq.heappush(self._jobs, (when, next(self._seq), label, job))
            self._cond.notify()

    def soon(self, label: str, job: Callable[[], Any]) -> None:
        self.at(time.monotonic(), label, job)

    def every(self, interval: float, label: str, job: Callable[[int], bool], start: float | None = None) -> None:
        """Run job(k) at start + k * interval, k = 1, 2, ..., until it returns False."""
        start = time.monotonic() if start is None else start

        def tick(k: int) -> None:
            keep = True
            try:
                keep = job(k)
            finally:
                if keep:
                    self.at(start + (k + 1) * interval, label, lambda: tick(k + 1), tick=True)

        self.at(start + interval, label, lambda: tick(1), tick=True)

    def stop(self) -> int:
        """Stop the thread (after the job it runs now); returns how many pending jobs were dropped."""
        with self._cond:
            self._stopped = True
            dropped = len(self._jobs)
            self._jobs.clear()
            self._cond.notify()
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout=5)
            if self.thread.is_alive():
                self.errors.append(f"the room thread is stuck in {self.running_label} and did not stop")
        return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and (not self._jobs or self._jobs[0][0] > time.monotonic()):
                    self._cond.wait(self._jobs[0][0] - time.monotonic() if self._jobs else None)
                if self._stopped:
                    return
                _, _, label, job = heapq.heappop(self._jobs)
                self.running_label = label
            try:
                job()
            except Exception as exc:
                where = traceback.extract_tb(exc.__traceback__)[-1]
                self.errors.append(f"{label}: {type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})")
            self.running_label = None


class _Voice:
    """A participant's microphone: a WAV's samples placed on the room's timeline at `start_s`."""

    def __init__(self, path: str, start_s: float, loop: bool) -> None:
        with wave.open(path, "rb") as wav:
            if wav.getsampwidth() != 2:
                raise ValueError(f"{path}: need 16-bit PCM, got {8 * wav.getsampwidth()}-bit")
            rate, channels = wav.getframerate(), wav.getnchannels()
            samples = np.frombuffer(wav.readframes(wav.getnframes()), dtype="<i2").astype(np.float32)
        self.rate, self.start_s, self.loop = rate, start_s, loop
        self.samples = samples.reshape(-1, channels).mean(axis=1) if channels > 1 else samples
        self._by_rate: dict[int, np.ndarray] = {}

    def _at_rate(self, rate: int) -> np.ndarray:
        """The samples resampled to `rate` (linear interpolation), once per rate."""
        if rate not in self._by_rate:
            count = round(len(self.samples) * rate / self.rate)
            x = np.arange(count) * (self.rate / rate)
            resampled = np.interp(x, np.arange(len(self.samples)), self.samples)
            self._by_rate[rate] = np.clip(np.round(resampled), -32768, 32767).astype(np.int16)
        return self._by_rate[rate]

    def chunk(self, rate: int, first: int, count: int) -> np.ndarray:
        """Timeline samples [first, first + count) at `rate` (sample 0 plays at the join); zeros where silent."""
        audio, out = self._at_rate(rate), np.zeros(count, np.int16)
        index = np.arange(first, first + count) - round(self.start_s * rate)
        valid = (index >= 0) & (True if self.loop else index < len(audio))
        if len(audio):
            out[valid] = audio[index[valid] % len(audio)]
        return out


class _Person:
    """A remote participant of the scenario."""

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.id, self.name = str(spec["id"]), str(spec["name"])
        self.join_at, self.leave_at = float(spec["join_at"]), spec["leave_at"]
        self.voice = _Voice(spec["audio"], float(spec["audio_at"]), bool(spec["loop_audio"])) if spec["audio"] else None
        self.joined_iso = ""

    def chunk(self, rate: int, first: int, count: int) -> np.ndarray:
        return self.voice.chunk(rate, first, count) if self.voice else np.zeros(count, np.int16)

    def participant(self) -> dict[str, Any]:
        info = {
            "userName": self.name,
            "isLocal": False,
            "isOwner": False,
            "joinedAt": self.joined_iso,
            "userId": self.id,
        }
        media = {
            "microphone": {"state": "playable", "subscribed": "subscribed"},
            "camera": {"state": "off", "subscribed": "unsubscribed"},
        }
        return {"id": self.id, "info": info, "media": media}


class Room:
    """One bot's call in a simulated room: the scenario it plays, and everything the bot did there."""

    def __init__(self, url: str, scenario: dict[str, Any], client: CallClient) -> None:
        self.url, self.scenario, self.client = url, scenario, client
        parts = urlsplit(url)
        self.name = parts.path.strip("/").split("/")[-1] or parts.hostname or "room"
        self.number = _room_numbers[self.name] = _room_numbers.get(self.name, 0) + 1
        self.session_id = str(uuid.uuid4())
        self.people = [_Person(spec) for spec in scenario["participants"]]
        self.state = "new"  # joining, joined, leaving, left
        self.created_at, self.joined_at, self.joined_iso, self.join_error = time.monotonic(), None, "", None
        self.join_due = self.created_at
        self.user_name, self.token_given, self.join_settings = "", False, {}
        self.leave_calls = self.release_calls = self.dropped_at_release = 0
        self.callback_errors = client.callback_errors  # one list: errors before the join count too
        self.misuse: list[str] = []  # API misuse by the bot: wrong frame sizes, writes after release
        self.events: list[tuple[float, str, str]] = []  # (time, handler method, detail) as they fired
        self.tracks: dict[str, CustomAudioSource | CustomVideoSource] = {}  # attached sources by track name
        self.video_frames: list[VideoWrite] = []
        self.video_frames_before_join = self.video_frames_after_left = 0
        self.audio_writes: list[AudioWrite] = []
        self.audio_writes_outside_call = 0
        self.app_messages: list[Any] = []
        self.active_speaker: _Person | None = None
        self.active_speaker_changes: list[tuple[float, str]] = []
        self.present: dict[str, _Person] = {}
        self.lock = threading.Lock()

    def time(self, when: float | None = None) -> float:
        """Seconds since the join completed (since join() before that)."""
        return (time.monotonic() if when is None else when) - (self.joined_at or self.created_at)

    def attach(self, name: str, source: CustomAudioSource | CustomVideoSource) -> None:
        source.room, source.track_name, self.tracks[name] = self, name, source
        if isinstance(source, CustomVideoSource):
            self.video_frames_before_join += source.frames_unattached

    def published_audio(self, track: str = "microphone") -> tuple[np.ndarray, int]:
        """Everything written to `track` in order (int16, interleaved if stereo) and its sample rate."""
        writes = [w for w in self.audio_writes if w.track == track]
        data = np.frombuffer(b"".join(w.data for w in writes), dtype="<i2").copy()
        return data, writes[0].sample_rate if writes else 16000

    def report(self) -> dict[str, Any]:
        """What the bot did, JSON-able (never the token)."""
        camera = [f for f in self.video_frames if f.track == "camera"]
        audio, rate = self.published_audio()
        channels = next((w.channels for w in self.audio_writes if w.track == "microphone"), 1)
        return {
            "room_url": self.url, "room_name": self.name, "number": self.number, "state": self.state,
            "user_name": self.user_name, "token_given": self.token_given, "join_settings": self.join_settings,
            "joined": self.joined_at is not None, "join_error": self.join_error,
            "leave_calls": self.leave_calls, "release_calls": self.release_calls,
            "callback_errors": list(self.callback_errors), "misuse": list(self.misuse),
            "dropped_at_release": self.dropped_at_release,
            "events": [[round(t, 4), name, detail] for t, name, detail in self.events],
            "video": {
                "frames": len(camera), "times": [round(self.time(f.time), 4) for f in camera],
                "digests": [f.crc32 for f in camera], "means": [round(f.mean, 3) for f in camera],
                "before_join": self.video_frames_before_join, "after_left": self.video_frames_after_left,
                "other_tracks": sorted({f.track for f in self.video_frames} - {"camera"}),
            },
            "audio": {
                "writes": len(self.audio_writes), "seconds": len(audio) / channels / rate, "sample_rate": rate,
                "channels": channels, "outside_call": self.audio_writes_outside_call,
                "max_lead_s": round(max((w.play_start - w.time for w in self.audio_writes), default=0.0), 4),
                "play_starts": [round(self.time(w.play_start), 4) for w in self.audio_writes if w.track == "microphone"],
                "samples": [len(w.data) // 2 // w.channels for w in self.audio_writes if w.track == "microphone"],
            },
            "active_speaker_changes": [[round(t, 4), name] for t, name in self.active_speaker_changes],
            "app_messages": self.app_messages,
        }  # fmt: skip

    def write_report(self, directory: str | os.PathLike[str]) -> Path:
        """<dir>/<room name>-<n>.wav (the published audio) then .json (the report), each atomically."""
        folder = Path(directory)
        folder.mkdir(parents=True, exist_ok=True)
        audio, rate = self.published_audio()
        channels = next((w.channels for w in self.audio_writes if w.track == "microphone"), 1)

        def wav(f: Any) -> None:
            with wave.open(f, "wb") as out:
                out.setnchannels(channels)
                out.setsampwidth(2)
                out.setframerate(rate)
                out.writeframes(audio.astype("<i2").tobytes())

        stem = f"{self.name}-{self.number}"
        _atomic(folder / f"{stem}.wav", wav)
        _atomic(folder / f"{stem}.json", lambda f: f.write(json.dumps(self.report(), indent=1, default=repr).encode()))
        return folder / f"{stem}.json"

    # ---------------------------------------------------------------- the timeline (room thread)
    def start(self) -> None:
        """Schedule the scenario from the join on: arrivals, departures, ejection, active speaker, speaker."""
        clock, t0 = self.client._clock, self.joined_at or 0.0
        for person in self.people:
            clock.at(t0 + person.join_at, f"{person.name} joins", lambda p=person: self._arrive(p))
            if person.leave_at is not None:
                clock.at(t0 + float(person.leave_at), f"{person.name} leaves", lambda p=person: self._depart(p))
        if self.scenario["eject_at"] is not None:
            clock.at(t0 + float(self.scenario["eject_at"]), "ejection", self._eject)
        clock.every(SPEAKER_EVERY_S, "active speaker", self._speaker_tick, start=t0)
        speaker = Daily.selected_speaker
        if speaker is not None:
            speaker.room = self
            clock.every(0.02, "speaker device", lambda k: self._feed_speaker(speaker, k), start=t0)

    def _counts(self) -> None:
        self.client._emit("on_participant_counts_updated", {"present": 1 + len(self.present), "hidden": 0})

    def _arrive(self, person: _Person) -> None:
        if self.state == "joined":
            person.joined_iso = _now_iso()
            with self.lock:
                self.present[person.id] = person
            self.client._emit("on_participant_joined", person.participant())
            self._counts()

    def _depart(self, person: _Person) -> None:
        if self.state == "joined" and person.id in self.present:
            with self.lock:
                del self.present[person.id]
            self.client._emit("on_participant_left", person.participant(), "leftCall")
            self._counts()

    def _eject(self) -> None:
        if self.state == "joined":
            self.end()
            self.client._emit("on_error", str(self.scenario["eject_message"]))
            self.client._emit("on_call_state_updated", "left")

    def end(self) -> None:
        """The call is over: media and participant events stop."""
        self.state = "left"
        with self.lock:
            self.present.clear()

    def _speaker_tick(self, k: int) -> bool:
        """The loudest present participant over the last 300 ms becomes active speaker, if loud enough."""
        if self.state != "joined":
            return False
        rate, t = 16000, k * SPEAKER_EVERY_S
        first, count = round((t - SPEAKER_WINDOW_S) * rate), round(SPEAKER_WINDOW_S * rate)
        levels = [(math.sqrt(np.mean(p.chunk(rate, first, count).astype(np.float64) ** 2)), p) for p in self._here()]
        level, loudest = max(levels, key=lambda pair: pair[0], default=(0.0, None))
        if loudest is not None and level > SPEAKER_RMS and loudest is not self.active_speaker:
            self.active_speaker = loudest
            self.active_speaker_changes.append((self.time(), loudest.name))
            self.client._emit("on_active_speaker_changed", loudest.participant())
        return True

    def _feed_speaker(self, speaker: VirtualSpeakerDevice, k: int) -> bool:
        """The speaker device hears everyone present, mixed, 20 ms at a time."""
        if self.state != "joined":
            return False
        count = speaker.sample_rate // 50
        chunks = [p.chunk(speaker.sample_rate, (k - 1) * count, count).astype(np.int32) for p in self._here()]
        if chunks:
            mixed = np.clip(np.sum(chunks, axis=0), -32768, 32767).astype(np.int16)
            speaker.feed(np.repeat(mixed, speaker.channels).tobytes())
        return True

    def _here(self) -> list[_Person]:
        with self.lock:
            return list(self.present.values())


def _atomic(path: Path, write: Callable[[Any], Any]) -> None:
    """Write `path` through a temporary file next to it, so a reader never sees half of it."""
    with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", delete=False) as f:
        write(f)
    os.replace(f.name, path)


class EventHandler:
    """Base of the object a CallClient calls by method name; what it does not define is not called."""

    def on_active_speaker_changed(self, participant: Mapping[str, Any]) -> None: ...
    def on_call_state_updated(self, state: str) -> None: ...
    def on_error(self, message: str) -> None: ...
    def on_participant_counts_updated(self, counts: Mapping[str, Any]) -> None: ...
    def on_participant_joined(self, participant: Mapping[str, Any]) -> None: ...
    def on_participant_left(self, participant: Mapping[str, Any], reason: str) -> None: ...


Completion = Callable[..., None] | None


class CallClient:
    """The bot's side of a call, with the SDK's signatures; its thread is the room's thread."""

    def __init__(self, event_handler: EventHandler | None = None) -> None:
        self._handler = event_handler
        self.callback_errors: list[str] = []
        self.participant_id = str(uuid.uuid4())
        self.user_name = ""
        self.leave_calls = self.release_calls = 0
        self.released = False
        self.room: Room | None = None
        self.settings: dict[str, Any] = {}  # the last subscriptions, publishing, inputs... the bot asked for
        self._pending_sources: dict[str, CustomAudioSource | CustomVideoSource] = {}  # tracks named before join
        self._renderers: dict[tuple[str, str], object] = {}
        self._busy, self._settled = 0, threading.Condition()  # joins and leaves under way
        self._clock = _Clock(f"daily-standin-room-{len(clients) + 1}", self.callback_errors)
        clients.append(self)

    # ---------------------------------------------------------------- plumbing
    def _check(self) -> None:
        if self.released:
            raise RuntimeError(RELEASED)

    def _complete(self, label: str, completion: Completion, *args: Any) -> None:
        if completion is not None:
            self._clock.soon(label, lambda: completion(*args))

    def _emit(self, event: str, *args: Any) -> None:
        """Call the handler's `event` method (looked up when it fires) on the room thread."""

        def fire() -> None:
            first = args[0] if args else None
            detail = first["info"]["userName"] if isinstance(first, Mapping) and "info" in first else repr(first)
            if self.room is not None:
                self.room.events.append((self.room.time(), event, detail))
            method = getattr(self._handler, event, None)
            if method is not None:
                method(*args)

        self._clock.soon(f"handler.{event}", fire)

    def _adjust_busy(self, delta: int) -> None:
        with self._settled:
            self._busy += delta
            self._settled.notify_all()

    def _record(self, key: str, value: Any, completion: Completion = None, *result: Any) -> None:
        """Keep the settings of an update_* call (merged into the last ones) and complete it without error."""
        self._check()
        _merge(self.settings.setdefault(key, {}), copy.deepcopy(dict(value or {})))
        self._complete(key, completion, *(result or (None,)))

    def _attach(self, name: str, source: CustomAudioSource | CustomVideoSource | None) -> None:
        if source is not None:
            if self.room is not None:
                self.room.attach(name, source)
            else:
                self._pending_sources[name] = source

    def _attach_inputs(self, inputs: Mapping[str, Any]) -> None:
        for name, spec in inputs.items():
            settings = spec.get("settings") if isinstance(spec, Mapping) else None
            track = settings.get("customTrack") if isinstance(settings, Mapping) else None
            self._attach(name, _tracks.get(str(track.get("id"))) if isinstance(track, Mapping) else None)

    def _local(self) -> dict[str, Any]:
        inputs = self.settings.get("inputs", {})
        media = {
            kind: {"state": "playable" if inputs.get(kind, {}).get("isEnabled") else "off"}
            for kind in ("microphone", "camera")
        }
        joined = self.room.joined_iso if self.room is not None else ""
        info = {"userName": self.user_name, "isLocal": True, "isOwner": False, "joinedAt": joined}
        info["userId"] = self.participant_id
        return {"id": self.participant_id, "info": info, "media": media}

    # ---------------------------------------------------------------- the call
    def set_user_name(self, user_name: str) -> None:
        self._check()
        self.user_name = user_name

    def join(
        self,
        meeting_url: str,
        meeting_token: str | None = None,
        client_settings: Mapping[str, Any] | None = None,
        completion: Completion = None,
    ) -> None:
        self._check()
        if self.room is not None and self.room.state != "left":
            self._complete("join completion", completion, None, "already joining or in a call")
            return
        room = self.room = rooms[meeting_url] = Room(meeting_url, _scenario_for(meeting_url), self)
        room.user_name, room.token_given = self.user_name, bool(meeting_token)
        room.join_settings = copy.deepcopy(dict(client_settings or {}))
        for key in ("inputs", "publishing"):
            _merge(self.settings.setdefault(key, {}), copy.deepcopy(room.join_settings.get(key, {})))
        for name, source in self._pending_sources.items():
            room.attach(name, source)
        self._attach_inputs(room.join_settings.get("inputs", {}))
        room.state = "joining"
        self._adjust_busy(+1)
        self._emit("on_call_state_updated", "joining")
        room.join_due = time.monotonic() + float(room.scenario["join_delay"])
        self._clock.at(room.join_due, "join", lambda: self._joined(completion))

    def _joined(self, completion: Completion) -> None:
        room = self.room
        assert room is not None
        if room.scenario["join_error"]:
            room.end()
            room.join_error = str(room.scenario["join_error"])
            self._complete("join completion", completion, None, room.join_error)
            self._emit("on_call_state_updated", "left")
        else:
            room.joined_at, room.joined_iso, room.state = time.monotonic(), _now_iso(), "joined"
            data = {"participants": {"local": self._local()}, "meetingSession": {"id": room.session_id}}
            self._emit("on_call_state_updated", "joined")
            self._complete("join completion", completion, data, None)
            self._clock.soon("scenario", room.start)  # participants already there arrive after the completion
        self._clock.soon("join settled", lambda: self._adjust_busy(-1))

    def leave(self, completion: Completion = None) -> None:
        self._check()
        self.leave_calls += 1
        room = self.room
        if room is not None:
            room.leave_calls += 1
        if room is None or room.state in ("left", "leaving"):
            self._complete("leave completion", completion, None)  # nothing to leave
            return
        self._adjust_busy(+1)

        def begin() -> None:
            if room.state == "joined":
                room.state = "leaving"
                self._emit("on_call_state_updated", "leaving")
                self._clock.at(time.monotonic() + float(room.scenario["leave_delay"]), "leave", finish)
            else:  # the join failed, or the bot was ejected meanwhile
                self._complete("leave completion", completion, None)
                self._clock.soon("leave settled", lambda: self._adjust_busy(-1))

        def finish() -> None:
            room.end()
            self._emit("on_call_state_updated", "left")
            self._complete("leave completion", completion, None)
            self._clock.soon("leave settled", lambda: self._adjust_busy(-1))

        self._clock.at(max(time.monotonic(), room.join_due), "leave", begin)  # a pending join completes first

    def release(self) -> None:
        """Wait for a pending join or leave to complete, then stop the room thread: nothing fires after this."""
        self._check()
        self.release_calls += 1
        room = self.room
        if room is not None:
            room.release_calls += 1
        if threading.current_thread() is self._clock.thread:
            self.callback_errors.append("release() called from a handler or completion (the SDK would deadlock)")
        else:
            with self._settled:
                if not self._settled.wait_for(lambda: self._busy == 0, timeout=RELEASE_WAIT_S):
                    self.callback_errors.append(f"release(): a join or leave did not complete in {RELEASE_WAIT_S} s")
        self.released = True
        dropped = self._clock.stop()
        if room is not None:
            room.dropped_at_release = dropped
            room.end()
            folder = os.environ.get("DAILY_STANDIN_REPORT")
            if folder:
                room.write_report(folder)

    def participants(self) -> Mapping[str, Any]:
        self._check()
        out: dict[str, Any] = {"local": self._local()}
        if self.room is not None:
            out.update({p.id: p.participant() for p in self.room._here()})
        return out

    def participant_counts(self) -> Mapping[str, Any]:
        self._check()
        room = self.room
        in_call = room is not None and room.state == "joined"
        return {"present": 1 + len(room._here()) if room is not None and in_call else 0, "hidden": 0}

    def active_speaker(self) -> Mapping[str, Any]:
        self._check()
        speaker = self.room.active_speaker if self.room is not None else None
        return speaker.participant() if speaker is not None else {}

    def inputs(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self.settings.get("inputs", {}))

    def publishing(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self.settings.get("publishing", {}))

    def subscriptions(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self.settings.get("subscriptions", {}))

    def subscription_profiles(self) -> Mapping[str, Any]:
        self._check()
        return copy.deepcopy(self.settings.get("subscription_profiles", {}))

    def get_network_stats(self) -> Mapping[str, Any]:
        self._check()
        return {"quality": 100, "threshold": "good", "stats": {}}

    # ---------------------------------------------------------------- media in
    def set_audio_renderer(
        self,
        participant_id: str,
        callback: Callable[[str, AudioData, str], None],
        audio_source: str = "microphone",
        sample_rate: int = 16000,
        callback_interval_ms: int = 20,
    ) -> None:
        """Every callback_interval_ms, while the participant is present: its audio (silence when it is quiet).

        Chunk k holds the room timeline's samples of that interval, so the audio stays in step with
        real time whatever the callback costs (the room thread catches up on late ticks)."""
        self._check()
        key, mark = (participant_id, audio_source), object()
        self._renderers[key] = mark  # a later renderer for the same source replaces this one
        start, count = time.monotonic(), sample_rate * callback_interval_ms // 1000

        def tick(k: int) -> bool:
            room = self.room
            if self._renderers.get(key) is not mark or (room is not None and room.state == "left"):
                return False
            person = room.present.get(participant_id) if room is not None else None
            if person is None or room is None or room.joined_at is None:
                return True  # not here (yet): nothing to render
            first = round((start - room.joined_at) * sample_rate) + (k - 1) * count  # on the room's timeline
            silent = audio_source != "microphone"
            samples = np.zeros(count, np.int16) if silent else person.chunk(sample_rate, first, count)
            callback(participant_id, AudioData(samples.tobytes(), sample_rate), audio_source)
            return True

        self._clock.every(callback_interval_ms / 1000, f"audio renderer {participant_id}", tick, start=start)

    def set_video_renderer(
        self,
        participant_id: str,
        callback: Callable[[str, VideoFrame, str], None],
        video_source: str = "camera",
        color_format: str = "RGBA",
    ) -> None:
        """Recorded only: cameras in this room are off, so no frame ever comes."""
        self._check()
        self.settings.setdefault("video_renderers", {})[f"{participant_id}/{video_source}"] = color_format

    # ---------------------------------------------------------------- settings: recorded, completed without error
    def update_subscription_profiles(self, profile_settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("subscription_profiles", profile_settings, completion)

    def update_subscriptions(
        self,
        participant_settings: Mapping[str, Any] | None = None,
        profile_settings: Mapping[str, Any] | None = None,
        completion: Completion = None,
    ) -> None:
        self._record("subscription_profiles", profile_settings)
        self._record("subscriptions", participant_settings, completion)

    def update_publishing(self, publishing_settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("publishing", publishing_settings, completion)

    def update_inputs(self, input_settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._attach_inputs(input_settings)
        self._record("inputs", input_settings, completion)

    def update_remote_participants(self, remote_participants: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("remote_participants", remote_participants, completion)

    def add_custom_audio_track(
        self, track_name: str, audio_track: CustomAudioTrack, ignore_audio_level: bool | None = None,
        completion: Completion = None,
    ) -> None:  # fmt: skip
        self._check()
        self._attach(track_name, _tracks.get(audio_track.id))
        self._record("custom_audio_tracks", {track_name: audio_track.id}, completion)

    def remove_custom_audio_track(self, track_name: str, completion: Completion = None) -> None:
        self._record("removed_tracks", {track_name: True}, completion)

    def add_custom_video_track(
        self, track_name: str, video_track: CustomVideoTrack, completion: Completion = None
    ) -> None:
        self._check()
        self._attach(track_name, _tracks.get(video_track.id))
        self._record("custom_video_tracks", {track_name: video_track.id}, completion)

    def remove_custom_video_track(self, track_name: str, completion: Completion = None) -> None:
        self._record("removed_tracks", {track_name: True}, completion)

    def send_app_message(
        self, message: Any, participant_id: str | None = None, serialize_none: bool = True,
        completion: Completion = None,
    ) -> None:  # fmt: skip
        self._check()
        if self.room is None or self.room.state != "joined":
            self._complete("app message completion", completion, "not in a call")
            return
        self.room.app_messages.append({"message": copy.deepcopy(message), "to": participant_id})
        self._complete("app message completion", completion, None)

    def send_prebuilt_chat_message(
        self, message: str, user_name: str | None = None, completion: Completion = None
    ) -> None:
        self._record("chat", {"message": message, "user_name": user_name}, completion)

    def start_transcription(self, settings: Mapping[str, Any] | None = None, completion: Completion = None) -> None:
        self._record("transcription", settings, completion)

    def stop_transcription(self, completion: Completion = None) -> None:
        self._record("transcription", {"stopped": True}, completion)

    def update_transcription(
        self, participants: list[str] | None = None, instance_id: str | None = None, completion: Completion = None
    ) -> None:
        self._record("transcription", {"participants": participants, "instance_id": instance_id}, completion)

    def start_recording(
        self, streaming_settings: Mapping[str, Any] | None = None, stream_id: str | None = None,
        force_new: bool | None = None, completion: Completion = None,
    ) -> None:  # fmt: skip
        self._record("recording", streaming_settings, completion, stream_id or str(uuid.uuid4()), None)

    def stop_recording(self, stream_id: str | None = None, completion: Completion = None) -> None:
        self._record("recording", {"stopped": stream_id or True}, completion)

    def start_dialout(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("dialout", settings, completion, str(uuid.uuid4()), None)

    def stop_dialout(self, participant_id: str | None = None, completion: Completion = None) -> None:
        self._record("dialout", {"stopped": participant_id or True}, completion)

    def send_dtmf(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("dtmf", settings, completion)

    def sip_call_transfer(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("sip_call_transfer", settings, completion)

    def sip_refer(self, settings: Mapping[str, Any], completion: Completion = None) -> None:
        self._record("sip_refer", settings, completion)


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


# -------------------------------------------------------------------- media out
class CustomAudioSource:
    """The bot's microphone (or another audio track): a real-time sink that records what is written.

    It keeps a play-out clock: a chunk starts playing at max(now, the previous chunk's end), and its
    completion fires from the room thread when play-out is within PACE_LEAD_S of the chunk's end."""

    def __init__(self, sample_rate: int, channels: int, auto_silence: bool = True) -> None:
        self._rate, self._channels, self.auto_silence = sample_rate, channels, auto_silence
        self.room: Room | None = None
        self.track_name = ""
        self._play_end = 0.0

    sample_rate = property(lambda self: self._rate)
    channels = property(lambda self: self._channels)

    def write_frames(self, frame: bytes, completion: Callable[[int], None] | None = None) -> int:
        data, now = bytes(frame), time.monotonic()
        frames = len(data) // (2 * self._channels)
        play_start = max(now, self._play_end)
        self._play_end = play_start + frames / self._rate
        due, room = max(now, self._play_end - PACE_LEAD_S), self.room
        if room is None:  # in no call yet: paced all the same, on a timer thread
            if completion is not None:
                timer = threading.Timer(due - now, _guarded, args=(completion, frames))
                timer.daemon = True
                timer.start()
            return frames
        if room.client.released:
            room.misuse.append(f"write_frames() on {self.track_name} after release(): no completion")
            return frames
        if len(data) % (2 * self._channels):
            room.misuse.append(f"write_frames(): {len(data)} bytes is no whole number of int16 frames")
        if room.state == "joined":
            room.audio_writes.append(AudioWrite(now, play_start, data, self.track_name, self._rate, self._channels))
        else:
            room.audio_writes_outside_call += 1
        if completion is not None:
            room.client._clock.at(due, f"{self.track_name} write completion", lambda: completion(frames))
        return frames


def _guarded(completion: Callable[[Any], None], result: Any) -> None:
    """A completion run on a timer thread (a source or device in no call): what it raises is kept."""
    try:
        completion(result)
    except Exception as exc:
        unattached_errors.append(f"completion outside a call: {type(exc).__name__}: {exc}")


class CustomAudioTrack:
    def __init__(self, audio_source: CustomAudioSource) -> None:
        self._id = str(uuid.uuid4())
        _tracks[self._id] = audio_source

    id = property(lambda self: self._id)


class CustomVideoSource:
    """The bot's camera (or another video track): each frame is recorded as time, CRC-32 and mean byte."""

    def __init__(self, width: int, height: int, color_format: str = "RGBA") -> None:
        self._width, self._height, self._format = width, height, color_format
        self.room: Room | None = None
        self.track_name = ""
        self.frames_unattached = 0

    width = property(lambda self: self._width)
    height = property(lambda self: self._height)
    color_format = property(lambda self: self._format)

    def write_frame(self, frame: bytes) -> None:
        room = self.room
        if room is None:
            self.frames_unattached += 1
            return
        if room.client.released:
            room.misuse.append(f"write_frame() on {self.track_name} after release()")
            return
        expected = self._width * self._height * _BYTES_PER_PIXEL.get(self._format, 4)
        if len(frame) != expected and len(room.misuse) < 20:
            room.misuse.append(f"write_frame(): {len(frame)} bytes, {self._width}x{self._height} {self._format}")
        if room.state == "joined":
            mean = float(np.frombuffer(frame, np.uint8).mean()) if len(frame) else 0.0
            room.video_frames.append(VideoWrite(time.monotonic(), zlib.crc32(frame), mean, self.track_name))
        elif room.joined_at is None:
            room.video_frames_before_join += 1
        else:
            room.video_frames_after_left += 1


class CustomVideoTrack:
    def __init__(self, video_source: CustomVideoSource) -> None:
        self._id = str(uuid.uuid4())
        _tracks[self._id] = video_source

    id = property(lambda self: self._id)


# -------------------------------------------------------------------- devices
class VirtualSpeakerDevice:
    """The room's audio mixed into one stream (Pipecat reads it when audio_in_user_tracks is off).

    read_frames returns whole requests only: num_frame frames once the room has fed that many,
    b"" before (Pipecat then waits 10 ms and asks again). A blocking device's completion waits."""

    def __init__(self, name: str, sample_rate: int, channels: int, non_blocking: bool) -> None:
        self.name, self.sample_rate, self.channels, self.non_blocking = name, sample_rate, channels, non_blocking
        self._buffer, self._waiting = bytearray(), []  # waiting: (bytes wanted, completion)
        self.room: Room | None = None  # the call that feeds it (the last one joined while it was selected)
        self._lock = threading.Lock()

    def feed(self, data: bytes) -> None:
        """Room thread: append the room's mix (at most 1 s kept) and answer waiting reads."""
        with self._lock:
            self._buffer += data
            del self._buffer[: max(0, len(self._buffer) - 2 * self.channels * self.sample_rate)]
            ready = []
            while self._waiting and len(self._buffer) >= self._waiting[0][0]:
                size, completion = self._waiting.pop(0)
                ready.append((completion, bytes(self._buffer[:size])))
                del self._buffer[:size]
        for completion, chunk in ready:
            completion(chunk)

    def read_frames(self, num_frame: int, completion: Callable[[bytes], None] | None = None) -> bytes:
        size = num_frame * 2 * self.channels
        with self._lock:
            chunk = bytes(self._buffer[:size]) if len(self._buffer) >= size else b""
            del self._buffer[: len(chunk)]
            if not chunk and completion is not None and not self.non_blocking:
                self._waiting.append((size, completion))
                return b""
        room = self.room
        if completion is not None and room is not None and not room.client.released:
            room.client._complete("speaker read", completion, chunk)
        elif completion is not None:  # in no call: answered on a timer thread
            timer = threading.Timer(0.01, _guarded, args=(completion, chunk))
            timer.daemon = True
            timer.start()
        return chunk


class NativeVad:
    """Daily's WebRTC VAD, approximated by loudness: confidence 0 below RMS 150, 1 from RMS 750."""

    def __init__(self, reset_period_ms: int, sample_rate: int, channels: int) -> None:
        self.reset_period_ms, self.sample_rate, self.channels = reset_period_ms, sample_rate, channels

    def analyze_frames(self, frame: bytes) -> float:
        samples = np.frombuffer(frame, dtype="<i2").astype(np.float64)
        rms = math.sqrt(float(np.mean(samples**2))) if len(samples) else 0.0
        return float(np.clip((rms - 150.0) / 600.0, 0.0, 1.0))


class Daily:
    """The SDK's process-wide calls. init() is counted (Pipecat calls it once per process)."""

    init_calls = 0
    log_level = LogLevel.Off
    selected_speaker: VirtualSpeakerDevice | None = None

    @staticmethod
    def init(worker_threads: int = 2, log_level: LogLevel = LogLevel.Off) -> None:
        Daily.init_calls += 1
        Daily.log_level = log_level

    @staticmethod
    def deinit() -> None:
        Daily.selected_speaker = None

    @staticmethod
    def set_log_level(log_level: LogLevel) -> None:
        Daily.log_level = log_level

    @staticmethod
    def create_speaker_device(
        device_name: str, sample_rate: int = 16000, channels: int = 1, non_blocking: bool = False
    ) -> VirtualSpeakerDevice:
        _speakers[device_name] = VirtualSpeakerDevice(device_name, sample_rate, channels, non_blocking)
        return _speakers[device_name]

    @staticmethod
    def select_speaker_device(device_name: str) -> None:
        if device_name not in _speakers:
            raise ValueError(f"no speaker device named {device_name}")
        Daily.selected_speaker = _speakers[device_name]

    @staticmethod
    def create_native_vad(reset_period_ms: int = 500, sample_rate: int = 16000, channels: int = 1) -> NativeVad:
        return NativeVad(reset_period_ms, sample_rate, channels)
