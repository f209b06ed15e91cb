"""One live session's scheduling, without Pipecat: audio in, timed video frames + audio out.

How it keeps sync, latency and liveness:
- Audio arrives in small chunks (20 ms from WebRTC, bursts from a TTS). `StreamingAudioFeatures`
  cuts it into 40 ms video frames once each frame's 132.5 ms look-ahead has arrived.
- Every frame becomes an *entry* that leaves as one image plus its own 40 ms of audio, so lip
  sync holds by construction wherever the pair is shown together.
- Speech frames are sent to the generation service (`submit`) as soon as they are ready, with a
  snapshot of the audio the whisper encoder needs; silent frames are the avatar's ping-pong
  loop with no model work at all.
- Each entry is due `latency_budget_s` after it became ready (and never sooner than 40 ms after
  the previous one). A frame whose image has not arrived by then leaves as an idle frame with
  its audio: audio waits for its image only up to the budget, never longer.
- With no audio at all, an idle ticker keeps 25 fps video flowing.
- `interrupt()` drops the audio buffer, pending frames and every answer still on its way.

The class is single-threaded and takes its clock from the caller (`clock`), so tests run it in
simulated time. Results from the service go through `on_result` on the same thread.
"""

from __future__ import annotations

import bisect
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import cv2
import numpy as np

from musetalk.audio import StreamingAudioFeatures
from musetalk.avatar.store import Avatar
from musetalk.config import AUDIO_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS
from musetalk.errors import ConfigError
from musetalk.live.requests import FrameItem, FrameRequest, FrameResult

FRAME_SECONDS = 1.0 / VIDEO_FPS
LIVE_MODES = ("mirror", "say", "conversation", "speech")


@dataclass(frozen=True)
class LiveSettings:
    """How a live session behaves; passed in by the runner, the CLI or the panel."""

    # mirror: lip-sync the room's audio; say: speak the operator's text with TTS; conversation:
    # STT -> LLM -> TTS; speech: lip-sync TTS audio from a pipeline built in code
    mode: str = "mirror"
    max_side: int = 720  # output video: the avatar frame scaled so its long side fits (even sizes)
    # How long a frame may wait for the model before it is shown idle (its audio waits with it,
    # so sync holds at any budget; a larger budget lets a slow device show a late moving mouth).
    latency_budget_s: float = 0.2
    batch_size: int | None = None  # frames per model batch (default: 8 on CUDA, 4 on CPU)
    vad_hangover_s: float = 0.12  # keep generating this long after VAD says speech stopped

    def __post_init__(self) -> None:
        if self.mode not in LIVE_MODES:
            raise ConfigError(f"mode must be one of {', '.join(LIVE_MODES)}, not {self.mode!r}.")
        if self.max_side < 64:
            raise ConfigError("max_side must be at least 64 pixels.")
        if not 0.0 < self.latency_budget_s <= 60.0:
            raise ConfigError("latency_budget_s (--latency-budget) must be between 0 and 60 seconds.")
        if self.batch_size is not None and not 1 <= self.batch_size <= 64:
            raise ConfigError("batch_size must be between 1 and 64.")

    @classmethod
    def from_mapping(cls, data: dict[str, Any]) -> LiveSettings:
        """From a config file's `live:` section or CLI values (`latency_budget` = `--latency-budget SECONDS`)."""
        names = {f.name for f in fields(cls)}
        aliases = {"latency_budget": "latency_budget_s", "vad_hangover": "vad_hangover_s"}
        values = {aliases.get(k.replace("-", "_"), k.replace("-", "_")): v for k, v in data.items() if v is not None}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"Unknown live settings {', '.join(unknown)}; known: {', '.join(sorted(names))}.")
        try:
            return cls(**{k: (float(v) if k.endswith("_s") else v) for k, v in values.items()})
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Invalid live settings {values}: {exc}") from exc

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def lip_syncs_tts(self) -> bool:
        """The avatar speaks TTS audio (say, conversation, speech), rather than mirroring the room."""
        return self.mode != "mirror"


@dataclass(frozen=True)
class LiveStats:
    fps: float
    frames: int
    generated_frames: int
    idle_frames: int
    late_frames: int
    mouth_latency_ms: float | None  # p50: first audio sample of a frame arriving -> its video frame handed on
    model_ms_per_frame: float | None
    realtime: bool
    warning: str | None
    # say / conversation: first TTS audio of an utterance in -> its first generated (moving-mouth) frame out
    first_mouth_ms: float | None = None  # the last utterance
    first_mouth_p95_ms: float | None = None  # p95 over the recent ones
    speaking: bool = False  # TTS audio is being lip-synced or waits to be shown


@dataclass(frozen=True)
class OutputFrame:
    """One frame to show now; `audio` is None for idle-ticker frames (no audio is flowing)."""

    image: np.ndarray  # (h, w, 3) uint8 RGB at the output size
    audio: bytes | None  # this frame's 40 ms, int16 mono at `audio_rate`
    audio_rate: int
    context_id: str | None
    generated: bool


@dataclass
class _Entry:
    """One outgoing video frame and its 40 ms of audio."""

    seq: int
    position: int  # place in the avatar's ping-pong loop
    audio: bytes
    audio_rate: int
    speech: bool
    arrival: float  # when its first audio sample arrived
    due: float
    context_id: str | None = None
    image: np.ndarray | None = None
    late: bool = False


@dataclass
class _Timing:
    """Rolling measurements for `stats()`."""

    emitted: deque = field(default_factory=lambda: deque(maxlen=250))
    latencies: deque = field(default_factory=lambda: deque(maxlen=200))
    frame_cost_s: float | None = None
    capacity: int | None = None
    sessions: int | None = None
    frames: int = 0
    generated: int = 0
    idle: int = 0
    late: int = 0


def _even(n: float) -> int:
    return max(2, int(n) // 2 * 2)


def output_size(avatar_size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """Avatar frame size scaled down so the long side fits `max_side` (even, for video encoders)."""
    w, h = avatar_size
    scale = min(1.0, max_side / max(w, h))
    return _even(w * scale), _even(h * scale)


def fit_image(frame: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """`frame (H, W, 3) uint8` scaled to `size = (w, h)` (the frame itself when it already fits)."""
    w, h = size
    if frame.shape[1] == w and frame.shape[0] == h:
        return frame
    return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)


def to_int16(pcm: np.ndarray) -> bytes:
    """Inverse of the /32768 scaling used on the way in: int16 audio comes back bit-exact."""
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16).tobytes()


class LiveSession:
    """Scheduling of one live conversation: which frame shows when, with which audio.

    `submit(request)` hands speech frames to the generation service; its answers come back
    through `on_result`. `pop_due()` returns the frames to show now; `next_deadline()` says
    when to call it again if nothing else happens.
    """

    def __init__(
        self,
        *,
        session_id: str,
        avatar: Avatar,
        settings: LiveSettings,
        submit: Callable[[FrameRequest], None],
        clock: Callable[[], float] = time.monotonic,
        context_seconds: float = 20.0,
    ):
        self.session_id = session_id
        self.avatar = avatar
        self.settings = settings
        self.size = output_size(avatar.size, settings.max_side)
        self._submit = submit
        self._clock = clock
        self._stream = StreamingAudioFeatures(context_seconds=context_seconds)
        self._entries: deque[_Entry] = deque()
        self._waiting: dict[int, _Entry] = {}  # seq -> entry whose image the service still owes
        self._seq = 0
        self._position = 0
        self._utterance = 0
        self._vad_speaking = False
        self._vad_stopped_at = -1e9
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4000)  # (end sample, arrival time)
        self._out_audio = bytearray()  # speech mode: original-rate TTS audio, frame 0 at offset 0
        self._out_rate = AUDIO_SAMPLE_RATE
        self._context_id: str | None = None
        self._next_idle = clock()
        self._playing_until = -1e9  # when the audio handed on so far ends, played in real time
        self._timing = _Timing()

    # ------------------------------------------------------------------ audio in
    def push_audio(self, pcm: np.ndarray, *, original: bytes | None = None, rate: int | None = None,
                   context_id: str | None = None) -> None:  # fmt: skip
        """16 kHz mono float32 audio in. Speech mode also passes the TTS audio as sent (`original`
        int16 mono at `rate`): each frame leaves with its own slice of it, untouched."""
        now = self._clock()
        if original is not None:
            if not self._out_audio and self._stream.total_samples == 0:
                self._out_rate = int(rate or AUDIO_SAMPLE_RATE)
            self._context_id = context_id
            self._out_audio += original
        self._arrivals.append((self._stream.total_samples + len(pcm), now))
        self._add_entries(self._stream.push(pcm), now)

    def set_vad(self, speaking: bool) -> None:
        self._vad_speaking = speaking
        if not speaking:
            self._vad_stopped_at = self._clock()

    def end_utterance(self) -> None:
        """Speech mode: the TTS finished; release the tail frames, then start the next utterance at frame 0."""
        now = self._clock()
        # The resampler holds back a few ms: pad so every 40 ms of the original audio gets its frame.
        step = self._out_rate // VIDEO_FPS
        frames_needed = -(-len(self._out_audio) // (2 * step))
        shortfall = frames_needed * SAMPLES_PER_VIDEO_FRAME - self._stream.total_samples
        if shortfall > 0:
            self._add_entries(self._stream.push(np.zeros(shortfall, np.float32)), now)
        self._add_entries(self._stream.flush(), now)
        self._new_utterance()

    def interrupt(self) -> None:
        """Drop every queue at once (audio, pending and in-flight frames); answers still on their way are ignored."""
        self._entries.clear()
        self._waiting.clear()
        self._new_utterance()

    def _new_utterance(self) -> None:
        self._utterance += 1
        self._stream.reset()
        self._out_audio.clear()
        self._arrivals.clear()

    def _arrival_of(self, sample: int, now: float) -> float:
        """When the chunk holding `sample` arrived (chunk ends are increasing: binary search)."""
        k = bisect.bisect_right(self._arrivals, sample, key=lambda arrival: arrival[0])
        return self._arrivals[k][1] if k < len(self._arrivals) else now

    def _add_entries(self, ready, now: float) -> None:
        if not ready:
            return
        speech_mode = self.settings.lip_syncs_tts
        speaking = speech_mode or self._vad_speaking or (now - self._vad_stopped_at) < self.settings.vad_hangover_s
        last_due = self._entries[-1].due if self._entries else 0.0
        items: list[FrameItem] = []
        for frame in ready:
            due = max(now + self.settings.latency_budget_s, last_due + FRAME_SECONDS)
            last_due = due
            if speech_mode:
                step = self._out_rate // VIDEO_FPS
                audio = bytes(self._out_audio[2 * step * frame.index : 2 * step * (frame.index + 1)]).ljust(
                    2 * step, b"\0"
                )
                rate = self._out_rate
            else:
                # Mirror mode never echoes the room while the avatar is idle.
                audio = to_int16(frame.pcm) if speaking else bytes(2 * SAMPLES_PER_VIDEO_FRAME)
                rate = AUDIO_SAMPLE_RATE
            entry = _Entry(
                seq=self._seq, position=self._position, audio=audio, audio_rate=rate, speech=speaking,
                arrival=self._arrival_of(frame.index * SAMPLES_PER_VIDEO_FRAME, now), due=due,
                context_id=self._context_id if speech_mode else None,
            )  # fmt: skip
            self._entries.append(entry)
            if speaking:
                self._waiting[entry.seq] = entry
                items.append(FrameItem(seq=entry.seq, frame=frame.index, position=entry.position, due=due))
            self._seq += 1
            self._position += 1
        if items:
            snapshot = self._stream.request(())
            self._submit(
                FrameRequest(
                    session_id=self.session_id,
                    items=tuple(items),
                    utterance=self._utterance,
                    window=snapshot.window,
                    first_feature=snapshot.first_feature,
                )  # fmt: skip
            )

    # ------------------------------------------------------------------ answers from the service
    def on_result(self, result: FrameResult) -> None:
        """Images (or give-ups) from the service; answers for dropped frames are ignored."""
        t = self._timing
        if result.frame_cost_s is not None:
            t.frame_cost_s = result.frame_cost_s
            t.capacity = result.capacity
            t.sessions = result.sessions
        for seq, image in result.images.items():
            entry = self._waiting.pop(seq, None)
            if entry is not None:
                entry.image = image
        for seq in result.skipped:
            entry = self._waiting.pop(seq, None)
            if entry is not None:
                entry.late = True
        if result.error is not None:
            for entry in self._waiting.values():
                entry.late = True
            self._waiting.clear()

    # ------------------------------------------------------------------ video out
    def pop_due(self) -> list[OutputFrame]:
        """Frames to show now, in order: ready or late entries, or an idle-ticker frame."""
        now = self._clock()
        out: list[OutputFrame] = []
        while self._entries:
            head = self._entries[0]
            if now < self._leaves_at(head, now):
                return out
            self._entries.popleft()
            self._waiting.pop(head.seq, None)
            out.append(self._entry_output(head, now))
            self._playing_until = max(self._playing_until, now) + FRAME_SECONDS
            self._next_idle = now + 2 * FRAME_SECONDS
        if now >= self._next_idle:
            out.append(self._idle_tick(now))
            self._next_idle = max(self._next_idle + FRAME_SECONDS, now)
        return out

    def next_deadline(self) -> float:
        """When `pop_due` may next return something if no audio or answer arrives meanwhile."""
        if self._entries:
            now = self._clock()
            return self._leaves_at(self._entries[0], now)
        return self._next_idle

    def _leaves_at(self, head: _Entry, now: float) -> float:
        """When the oldest entry may leave: at once when ready (or silent, or given up), else at its due time.

        Except a ready speech frame that would start the audio anew (what was handed on has played
        out, as when a TTS utterance begins): it leaves only once the frames still being made will be
        ready before their turn to play (or at its due time). Started with its first ready frame, a
        device slower than real time would hand the rest on at its own pace and the voice would stutter.
        """
        if not head.speech or head.late:
            return now
        if head.image is None:
            return head.due
        if now <= self._playing_until + FRAME_SECONDS or self._can_start(head, now):
            return now
        return head.due

    def _can_start(self, head: _Entry, now: float) -> bool:
        """With `ready` frames ready and `rest` still to make at `cost` s each, frame `ready + j - 1` is ready
        after j * cost and plays after (ready + j - 1) * 40 ms: the worst case is the last frame."""
        ready = rest = 0  # the ready ones ahead of the first still being made; those still being made
        for entry in self._entries:
            waiting = entry.speech and entry.image is None and not entry.late
            if waiting:
                rest += 1
            elif rest == 0:
                ready += 1
        if rest == 0:
            return True
        t = self._timing
        if t.frame_cost_s is not None:  # the service's cost, shared with the sessions it serves
            cost = t.frame_cost_s * max(1, t.sessions or 1)
        else:  # not measured yet: what making the ready ones took, waiting included (an upper bound)
            cost = (now - head.arrival) / ready
        return rest * (cost - FRAME_SECONDS) <= (ready - 1) * FRAME_SECONDS

    @property
    def pending(self) -> int:
        return len(self._entries)

    @property
    def created(self) -> int:
        """Entries (outgoing frames with their audio) made so far; they leave in this order."""
        return self._seq

    @property
    def pending_speech(self) -> bool:
        """Speech frames (with their audio) are still waiting to be shown."""
        return any(entry.speech for entry in self._entries)

    @property
    def last_due(self) -> float | None:
        return self._entries[-1].due if self._entries else None

    def _entry_output(self, entry: _Entry, now: float) -> OutputFrame:
        t = self._timing
        if entry.image is not None:
            image = entry.image
            t.generated += 1
            t.latencies.append(now - entry.arrival)
        else:
            image = self.idle_image(entry.position)
            if entry.speech:
                t.late += 1
            else:
                t.idle += 1
        self._count_frame(now)
        return OutputFrame(image, entry.audio, entry.audio_rate, entry.context_id, entry.image is not None)

    def _idle_tick(self, now: float) -> OutputFrame:
        """No audio is arriving: keep the avatar alive from its idle loop."""
        image = self.idle_image(self._position)
        self._position += 1
        self._timing.idle += 1
        self._count_frame(now)
        return OutputFrame(image, None, AUDIO_SAMPLE_RATE, None, False)

    def idle_image(self, position: int) -> np.ndarray:
        return fit_image(self.avatar.frames[self.avatar.frame_index(position)], self.size)

    def take_positions(self, n: int) -> list[int]:
        """Reserve `n` consecutive loop positions (for frames made outside the stream)."""
        start = self._position
        self._position += n
        return list(range(start, start + n))

    def _count_frame(self, now: float) -> None:
        self._timing.frames += 1
        self._timing.emitted.append(now)

    # ------------------------------------------------------------------ stats
    def stats(self) -> LiveStats:
        t = self._timing
        now = self._clock()
        recent = [x for x in t.emitted if now - x <= 5.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and recent[-1] > recent[0] else 0.0
        latency = statistics.median(t.latencies) * 1000 if t.latencies else None
        per_frame = t.frame_cost_s
        realtime = per_frame is None or per_frame <= FRAME_SECONDS
        warning = None
        if not realtime:
            warning = (
                f"This device generates {1 / per_frame:.1f} frames/s ({per_frame * 1000:.0f} ms per frame); "
                f"real time needs {VIDEO_FPS}. Late frames are shown idle with live audio: use a CUDA GPU, "
                "or a larger latency budget for a late but lip-synced mouth."
            )
        elif t.capacity is not None and t.sessions is not None and t.sessions > max(t.capacity, 1):
            realtime = False
            warning = (
                f"This device serves {max(t.capacity, 1)} sessions at {VIDEO_FPS} fps; {t.sessions} are running, "
                "so some speech frames are shown idle."
            )
        elif t.frames > 50 and t.late > 0.2 * max(t.generated + t.late, 1):
            warning = f"{t.late} speech frames were late and shown idle; the device is at its limit."
        ms = per_frame * 1000 if per_frame is not None else None
        return LiveStats(fps, t.frames, t.generated, t.idle, t.late, latency, ms, realtime, warning)
