"""MuseTalkProcessor: a Pipecat `FrameProcessor` that turns speech audio into avatar video.

How it keeps sync, latency and liveness:
- Audio arrives in small chunks (20 ms from WebRTC, bursts from a TTS). The cheap
  bookkeeping (`StreamingAudioFeatures`) runs on the event loop and cuts it into 40 ms
  video frames once each frame's 132.5 ms look-ahead has arrived.
- Every frame becomes an *entry* that leaves the processor as one image plus its own
  40 ms of audio (the image is queued with the audio, `sync_with_audio`), so lip sync holds
  by construction at the transport.
- Speech frames (Silero VAD in mirror mode, TTS audio in speech mode) are generated in one
  worker thread, batched, one whisper pass per batch; silent frames are the avatar's
  ping-pong loop with no model work at all.
- Each entry has a due time (its readiness + `latency_budget_s`). A frame the worker has not
  finished by then leaves as an idle frame with its audio: audio never waits for video, and
  a device too slow for real time shows idle video with live audio and says so in `stats()`.
- With no audio coming in at all, an idle ticker keeps 25 fps video flowing from the moment
  the pipeline starts.
- `InterruptionFrame` drops the audio buffer, pending features, queued and in-flight frames.
"""

from __future__ import annotations

import asyncio
import bisect
import statistics
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import (
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    OutputImageRawFrame,
    StartFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from musetalk.audio import AudioFeatureEncoder, FeatureRequest, StreamingAudioFeatures, frame_count_for
from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.config import (
    AUDIO_SAMPLE_RATE,
    SAMPLES_PER_VIDEO_FRAME,
    VIDEO_FPS,
    ModelPaths,
    PrepareSettings,
    avatars_dir_from_env,
    load_realtime_config,
    models_dir_from_env,
    runtime_from_env,
)
from musetalk.errors import ConfigError
from musetalk.generate import LipSyncGenerator
from musetalk.models import Models

FRAME_SECONDS = 1.0 / VIDEO_FPS
DEFAULT_CONFIG = Path("configs/inference/realtime.yaml")


@dataclass(frozen=True)
class LiveSettings:
    """How the live bot behaves; passed in by the runner, the CLI or the panel."""

    mode: str = "mirror"  # mirror: lip-sync the room's InputAudioRawFrame; speech: lip-sync TTSAudioRawFrame
    max_side: int = 720  # output video: the avatar frame scaled so its long side fits (even sizes)
    latency_budget_s: float = 0.2  # compute time allowed per frame beyond the audio look-ahead
    batch_size: int | None = None  # frames per model batch (default: 8 on CUDA, 4 on CPU)
    vad_hangover_s: float = 0.12  # keep generating this long after VAD says speech stopped

    def __post_init__(self) -> None:
        if self.mode not in ("mirror", "speech"):
            raise ConfigError(f"mode must be 'mirror' or 'speech', not {self.mode!r}.")
        if self.max_side < 64:
            raise ConfigError("max_side must be at least 64 pixels.")
        if not 0.0 < self.latency_budget_s <= 60.0:
            raise ConfigError("latency_budget_s must be between 0 and 60 seconds.")


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


@dataclass
class _Entry:
    """One outgoing video frame and its 40 ms of audio."""

    index: int
    position: int  # place in the avatar's ping-pong loop
    audio: bytes  # this frame's audio at `audio_rate` (int16 mono)
    audio_rate: int
    speech: bool
    arrival: float  # when its first audio sample arrived
    due: float
    utterance: int
    context_id: str | None = None
    image: np.ndarray | None = None
    submitted: bool = False
    late: bool = False


@dataclass
class _Timing:
    """Rolling measurements for `stats()`."""

    emitted: deque = field(default_factory=lambda: deque(maxlen=250))
    latencies: deque = field(default_factory=lambda: deque(maxlen=200))
    model_s_per_frame: float | None = None
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


class MuseTalkProcessor(FrameProcessor):
    """Lip-syncs speech onto a prepared avatar, like Pipecat's own avatar video services.

    Put it after the audio it should lip-sync: `transport.input() -> VADProcessor -> this ->
    transport.output()` (mirror mode), or after a TTS service (speech mode).
    """

    def __init__(
        self,
        avatar_config_path: str | Path | None = None,
        *,
        models: Models | None = None,
        avatar: Avatar | None = None,
        settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self._config_path = Path(avatar_config_path) if avatar_config_path else None
        self._models = models
        self._avatar = avatar
        self._store = avatar_store
        self._settings = settings or LiveSettings()
        self._generator: LipSyncGenerator | None = None
        self._encoder: AudioFeatureEncoder | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._stream = StreamingAudioFeatures()
        self._entries: deque[_Entry] = deque()
        self._wakeup = asyncio.Event()
        self._emitter_task: asyncio.Task | None = None
        self._worker_busy = False
        self._epoch = 0
        self._position = 0
        self._vad_speaking = False
        self._vad_stopped_at = 0.0
        self._arrivals: deque[tuple[int, float]] = deque(maxlen=4000)  # (end sample, arrival time)
        self._out_audio = bytearray()  # speech mode: original-rate TTS audio, frame 0 at offset 0
        self._out_rate = AUDIO_SAMPLE_RATE
        self._context_id: str | None = None
        self._utterance = 0
        self._closed_windows: dict[int, FeatureRequest] = {}
        self._resampler = create_stream_resampler()
        self._timing = _Timing()
        self._last_probe = 0.0
        self._warned_slow = False
        self._stopped = False

    # ------------------------------------------------------------------ seed API
    async def initialize_models(self) -> None:
        """Load the models (once per process is enough: pass `models=` to share them)."""
        if self._models is None:
            paths = ModelPaths(models_dir_from_env())
            self._models = await asyncio.to_thread(_load_models, paths)

    async def initialize_avatars(self) -> None:
        """Load the avatar, or the first avatar of the realtime.yaml config (preparing it if asked)."""
        if self._avatar is not None:
            return
        await self.initialize_models()
        store = self._store or AvatarStore(avatars_dir_from_env())
        entries = load_realtime_config(self._config_path or DEFAULT_CONFIG)
        first = entries[0]
        if first.preparation:
            from musetalk.avatar.prepare import prepare_avatar

            logger.info("Preparing avatar {} from {} (preparation: True)", first.name, first.video_path)
            await asyncio.to_thread(
                prepare_avatar, self._models, store, first.video_path, first.name, PrepareSettings(bbox_shift=first.bbox_shift),
                progress=lambda f, m: logger.info("prepare {}: {:.0%} {}", first.name, f, m),
            )  # fmt: skip
        self._avatar = await asyncio.to_thread(store.load, first.name)

    async def generate_video_frame(self, audio_chunk: np.ndarray) -> list[OutputImageRawFrame]:
        """Lip-sync one complete chunk of 16 kHz mono audio now (file-path features), off the event loop.

        Returns one image per started 40 ms. The live path does not use this: it streams.
        """
        await self._ensure_ready()
        audio = _to_float(audio_chunk)
        n = frame_count_for(len(audio))
        positions = list(range(self._position, self._position + n))
        self._position += n

        def work() -> list[np.ndarray]:
            assert self._encoder is not None and self._generator is not None
            feats = self._encoder.frame_features(audio, n)
            return [self._fit(f) for f in self._generator.generate(feats, positions[0])]

        frames = await asyncio.get_running_loop().run_in_executor(self._executor, work)
        return [self._image_frame(f) for f in frames]

    # ------------------------------------------------------------------ public state
    @property
    def video_size(self) -> tuple[int, int]:
        if self._avatar is None:
            raise ConfigError("No avatar loaded yet: call initialize_avatars() first.")
        return output_size(self._avatar.size, self._settings.max_side)

    @property
    def settings(self) -> LiveSettings:
        return self._settings

    @property
    def avatar(self) -> Avatar | None:
        return self._avatar

    def stats(self) -> LiveStats:
        t = self._timing
        now = time.monotonic()
        recent = [x for x in t.emitted if now - x <= 5.0]
        fps = (len(recent) - 1) / (recent[-1] - recent[0]) if len(recent) > 2 and recent[-1] > recent[0] else 0.0
        latency = statistics.median(t.latencies) * 1000 if t.latencies else None
        per_frame = t.model_s_per_frame
        realtime = per_frame is None or per_frame <= FRAME_SECONDS
        warning = None
        if not realtime:
            warning = (
                f"This device generates {1 / per_frame:.1f} frames/s ({per_frame * 1000:.0f} ms per frame); "
                f"real time needs {VIDEO_FPS}. Showing idle video with live audio. Use a CUDA GPU."
            )
        elif t.frames > 50 and t.late > 0.2 * max(t.generated + t.late, 1):
            warning = f"{t.late} speech frames were late and shown idle; the device is at its limit."
        return LiveStats(fps, t.frames, t.generated, t.idle, t.late, latency, per_frame and per_frame * 1000, realtime, warning)

    # ------------------------------------------------------------------ pipecat plumbing
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, StartFrame):
            await self.push_frame(frame, direction)
            await self._start()
        elif isinstance(frame, EndFrame):
            await self._drain()  # graceful end: what was said is still shown
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, CancelFrame):
            await self._stop()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InterruptionFrame):
            self._flush()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and self._settings.mode == "speech":
            await self._on_tts_audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and self._settings.mode == "speech":
            self._end_utterance()
            await self.push_frame(frame, direction)
        elif isinstance(frame, InputAudioRawFrame) and self._settings.mode == "mirror":
            await self._on_room_audio(frame)
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._vad_speaking = True
            await self.push_frame(frame, direction)
        elif isinstance(frame, VADUserStoppedSpeakingFrame):
            self._vad_speaking = False
            self._vad_stopped_at = time.monotonic()
            await self.push_frame(frame, direction)
        else:
            await self.push_frame(frame, direction)

    async def cleanup(self) -> None:
        """Pipecat calls this however the pipeline ends (even a cancel that overtakes StartFrame)."""
        self._stopped = True
        await self._stop()
        await super().cleanup()

    async def _ensure_ready(self) -> None:
        await self.initialize_avatars()
        if self._generator is None:
            assert self._models is not None and self._avatar is not None
            batch = self._settings.batch_size or (8 if self._models.device.type == "cuda" else 4)
            self._generator = LipSyncGenerator(self._models, self._avatar, batch_size=batch)
            m = self._models
            self._encoder = AudioFeatureEncoder(m.whisper, m.feature_extractor, m.device, m.dtype)
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="musetalk-live")

    async def _start(self) -> None:
        try:
            await self._ensure_ready()
        except Exception as exc:  # any load failure ends up in the pipeline's error path
            await self.push_error(f"MuseTalk could not start: {exc}", exception=exc, fatal=True)
            return
        if self._stopped:  # cancelled while starting: leave no worker or task behind
            await self._stop()
            return
        logger.info(
            "MuseTalk live: avatar {} -> {}x{} video, {} mode, {}",
            self._avatar.name, *self.video_size, self._settings.mode, self._models.describe(),
        )  # fmt: skip
        self._executor.submit(self._warm_up)
        if self._emitter_task is None:
            self._emitter_task = self.create_task(self._emit_loop(), name="musetalk-emitter")

    async def _drain(self) -> None:
        if self._settings.mode == "speech":
            self._end_utterance()
        while self._entries and self._emitter_task is not None:
            last_due = self._entries[-1].due
            if time.monotonic() > last_due + 1.0:
                break
            await asyncio.sleep(FRAME_SECONDS)

    async def _stop(self) -> None:
        self._flush()
        if self._emitter_task is not None:
            await self.cancel_task(self._emitter_task)
            self._emitter_task = None
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    # ------------------------------------------------------------------ audio in
    async def _on_room_audio(self, frame: InputAudioRawFrame) -> None:
        pcm = await self._mono16k(frame.audio, frame.sample_rate, frame.num_channels)
        self._take_audio(pcm)

    async def _on_tts_audio(self, frame: TTSAudioRawFrame) -> None:
        if frame.num_channels != 1:
            samples = np.frombuffer(frame.audio, dtype=np.int16).reshape(-1, frame.num_channels).mean(axis=1)
            original = samples.astype(np.int16).tobytes()
        else:
            original = frame.audio
        if not self._out_audio and self._stream.total_samples == 0:
            self._out_rate = frame.sample_rate
        self._context_id = frame.context_id
        self._out_audio += original
        pcm = await self._mono16k(original, frame.sample_rate, 1)
        self._take_audio(pcm)

    async def _mono16k(self, audio: bytes, rate: int, channels: int) -> np.ndarray:
        samples = np.frombuffer(audio, dtype=np.int16)
        if channels > 1:
            samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
        if rate != AUDIO_SAMPLE_RATE:
            samples = np.frombuffer(await self._resampler.resample(samples.tobytes(), rate, AUDIO_SAMPLE_RATE), dtype=np.int16)
        return samples.astype(np.float32) / 32768.0

    def _take_audio(self, pcm: np.ndarray) -> None:
        if self._generator is None:
            return  # not started (or failed to start): nothing to lip-sync with
        now = time.monotonic()
        self._arrivals.append((self._stream.total_samples + len(pcm), now))
        self._add_entries(self._stream.push(pcm), now)

    def _end_utterance(self) -> None:
        """Speech mode: the TTS finished; release the tail frames, then start the next utterance at frame 0."""
        if self._generator is None:
            return
        # The resampler holds back a few ms: pad so every 40 ms of the original audio gets its frame.
        step = self._out_rate // VIDEO_FPS
        frames_needed = -(-len(self._out_audio) // (2 * step))
        shortfall = frames_needed * SAMPLES_PER_VIDEO_FRAME - self._stream.total_samples
        if shortfall > 0:
            self._add_entries(self._stream.push(np.zeros(shortfall, np.float32)), time.monotonic())
        self._add_entries(self._stream.flush(), time.monotonic())
        # Frames of this utterance still waiting for the worker keep the audio they need.
        self._closed_windows[self._utterance] = self._stream.request(())
        self._utterance += 1
        self._stream.reset()
        self._out_audio.clear()
        self._arrivals.clear()

    def _arrival_of(self, sample: int) -> float:
        """When the chunk holding `sample` arrived (chunk ends are increasing: binary search)."""
        k = bisect.bisect_right(self._arrivals, sample, key=lambda arrival: arrival[0])
        return self._arrivals[k][1] if k < len(self._arrivals) else time.monotonic()

    def _add_entries(self, ready, now: float) -> None:
        if not ready:
            return
        speech_mode = self._settings.mode == "speech"
        speaking = speech_mode or self._vad_speaking or (now - self._vad_stopped_at) < self._settings.vad_hangover_s
        last_due = self._entries[-1].due if self._entries else 0.0
        for frame in ready:
            due = max(now + self._settings.latency_budget_s, last_due + FRAME_SECONDS)
            last_due = due
            if speech_mode:
                step = self._out_rate // VIDEO_FPS
                audio = bytes(self._out_audio[2 * step * frame.index : 2 * step * (frame.index + 1)])
                audio = audio.ljust(2 * step, b"\0")
                rate = self._out_rate
            else:
                # Mirror mode never echoes the room while the avatar is idle.
                audio = _to_int16(frame.pcm) if speaking else bytes(2 * SAMPLES_PER_VIDEO_FRAME)
                rate = AUDIO_SAMPLE_RATE
            self._entries.append(
                _Entry(
                    index=frame.index, position=self._position, audio=audio, audio_rate=rate, speech=speaking,
                    arrival=self._arrival_of(frame.index * SAMPLES_PER_VIDEO_FRAME), due=due, utterance=self._utterance,
                    context_id=self._context_id if speech_mode else None,
                )  # fmt: skip
            )
            self._position += 1
        self._submit()
        self._wakeup.set()

    # ------------------------------------------------------------------ model work
    def _submit(self) -> None:
        """Hand the waiting speech frames to the worker as one batch (if it is free)."""
        if self._worker_busy or self._executor is None:
            return
        now = time.monotonic()
        est = self._timing.model_s_per_frame
        waiting = [e for e in self._entries if e.speech and not e.submitted and e.image is None and not e.late]
        if not waiting:
            return
        batch_cap = self._generator.batch_size
        batch: list[_Entry] = []
        utterance = waiting[0].utterance
        for e in waiting:
            if e.utterance != utterance:
                break  # one batch = one audio window
            # Skip frames that cannot be finished before they are due (the device is too slow).
            too_slow = est is not None and now + est * (len(batch) + 1) > e.due
            probe_due = est is not None and est > FRAME_SECONDS and now - self._last_probe > 30.0
            if too_slow and not (probe_due and not batch):
                e.late = True
                continue
            batch.append(e)
            if len(batch) >= batch_cap:
                break
        if not batch:
            return
        if est is not None and est > FRAME_SECONDS:
            self._last_probe = now
        for e in batch:
            e.submitted = True
        indices = tuple(e.index for e in batch)
        closed = self._closed_windows.get(utterance)
        if closed is not None:
            request = FeatureRequest(closed.window, closed.first_feature, indices)
        else:
            request = self._stream.request(indices)
        live = {e.utterance for e in self._entries}
        self._closed_windows = {u: r for u, r in self._closed_windows.items() if u in live}
        positions = [e.position for e in batch]
        self._worker_busy = True
        epoch = self._epoch
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, self._generate, request, positions)
        future.add_done_callback(lambda f: self._on_generated(f, batch, epoch))

    def _generate(self, request: FeatureRequest, positions: Sequence[int]) -> tuple[list[np.ndarray], float]:
        """Worker thread: whisper features, UNet, VAE decode, blend, resize for the transport."""
        generator, encoder = self._generator, self._encoder
        if generator is None or encoder is None:
            raise RuntimeError("the processor was stopped")
        start = time.perf_counter()
        feats = request.compute(encoder)
        frames = [self._fit(f) for f in generator.generate_batch(positions, feats)]
        return frames, (time.perf_counter() - start) / len(positions)

    def _warm_up(self) -> None:
        """First model call on the device (CUDA kernels, allocator), also the first speed measurement."""
        if self._generator is None:
            return
        try:
            n = min(2, self._generator.batch_size)
            request = FeatureRequest(np.zeros(AUDIO_SAMPLE_RATE, dtype=np.float32), 0, tuple(range(n)))
            _, per_frame = self._generate(request, list(range(n)))
            self._record_speed(per_frame)
            logger.info("MuseTalk warm-up: {:.0f} ms per frame on {}", per_frame * 1000, self._models.describe())
        except Exception as exc:  # reported through stats; the live path reports its own errors
            if self._generator is not None:
                logger.warning("MuseTalk warm-up failed: {}", exc)

    def _record_speed(self, per_frame: float) -> None:
        t = self._timing
        t.model_s_per_frame = per_frame if t.model_s_per_frame is None else 0.7 * t.model_s_per_frame + 0.3 * per_frame
        if t.model_s_per_frame > FRAME_SECONDS and not self._warned_slow:
            self._warned_slow = True
            logger.warning(self.stats().warning)

    def _on_generated(self, future: asyncio.Future, batch: list[_Entry], epoch: int) -> None:
        self._worker_busy = False
        if future.cancelled():
            return
        exc = future.exception()
        if exc is not None:
            logger.error("MuseTalk generation failed: {}", exc)
            for e in batch:
                e.late = True
            self.create_task(self.push_error(f"MuseTalk generation failed: {exc}", exception=exc))
        elif epoch == self._epoch:
            frames, per_frame = future.result()
            self._record_speed(per_frame)
            for e, image in zip(batch, frames):
                e.image = image
        self._wakeup.set()
        self._submit()

    # ------------------------------------------------------------------ video out
    async def _emit_loop(self) -> None:
        next_idle = time.monotonic()
        while True:
            now = time.monotonic()
            head = self._entries[0] if self._entries else None
            if head is not None:
                if head.image is not None or not head.speech or head.late or now >= head.due:
                    self._entries.popleft()
                    await self._emit(head)
                    next_idle = time.monotonic() + 2 * FRAME_SECONDS
                    continue
                timeout = head.due - now
            elif now >= next_idle:
                await self._emit_idle()
                next_idle = max(next_idle + FRAME_SECONDS, now)
                continue
            else:
                timeout = next_idle - now
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=max(timeout, 0.001))
            except TimeoutError:
                pass

    async def _emit(self, entry: _Entry) -> None:
        t = self._timing
        if entry.image is not None:
            image = entry.image
            t.generated += 1
            t.latencies.append(time.monotonic() - entry.arrival)
        else:
            image = self._idle_image(entry.position)
            if entry.speech:
                t.late += 1
                entry.late = True
            else:
                t.idle += 1
        frame = self._image_frame(image)
        frame.sync_with_audio = True  # shown when its audio starts playing: sync by construction
        await self.push_frame(frame)
        if self._settings.mode == "speech":
            audio = TTSAudioRawFrame(entry.audio, entry.audio_rate, 1, context_id=entry.context_id)
        else:
            audio = OutputAudioRawFrame(entry.audio, entry.audio_rate, 1)
        await self.push_frame(audio)
        self._count_frame()
        self._submit()

    async def _emit_idle(self) -> None:
        """No audio is arriving: keep the avatar alive from its idle loop."""
        image = self._idle_image(self._position)
        self._position += 1
        await self.push_frame(self._image_frame(image))
        self._timing.idle += 1
        self._count_frame()

    def _count_frame(self) -> None:
        self._timing.frames += 1
        self._timing.emitted.append(time.monotonic())

    def _idle_image(self, position: int) -> np.ndarray:
        return self._fit(self._generator.idle_frame(position))

    def _fit(self, frame: np.ndarray) -> np.ndarray:
        w, h = self.video_size
        if frame.shape[1] == w and frame.shape[0] == h:
            return frame
        return cv2.resize(frame, (w, h), interpolation=cv2.INTER_AREA)

    def _image_frame(self, image: np.ndarray) -> OutputImageRawFrame:
        h, w = image.shape[:2]
        return OutputImageRawFrame(image=np.ascontiguousarray(image).tobytes(), size=(w, h), format="RGB")

    def _flush(self) -> None:
        """Interruption: drop every queue at once (audio, features, pending and in-flight frames)."""
        self._epoch += 1
        self._entries.clear()
        self._closed_windows.clear()
        self._utterance += 1
        self._stream.reset()
        self._out_audio.clear()
        self._arrivals.clear()
        self._wakeup.set()


def _to_int16(pcm: np.ndarray) -> bytes:
    """Inverse of the /32768 scaling used on the way in: int16 audio comes back bit-exact."""
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16).tobytes()


def _to_float(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    return audio.astype(np.float32).reshape(-1)


def _load_models(paths: ModelPaths) -> Models:
    from musetalk.models import load_models

    return load_models(paths, runtime_from_env())
