"""MuseTalkProcessor: a Pipecat video service that turns speech audio into avatar video.

A thin adapter, written like Pipecat's own avatar services (Simli, Tavus, HeyGen): the scheduling
(audio bookkeeping, due times, idle loop, late frames, interruptions, stats) is
`musetalk.live.session.LiveSession`; the model work is the shared
`musetalk.live.service.GenerationService` of its models (or the one passed as `service=`), which
batches the frames of every live session in the process. This class turns Pipecat frames into
session calls and the session's output into image + audio frames:

- Room audio (mirror mode) or TTS audio (say / conversation / speech modes) is resampled to 16 kHz
  mono here and handed to the session, which sends speech frames to the service as soon as their
  132.5 ms look-ahead has arrived (Silero VAD decides what is speech in mirror mode).
- Each frame leaves as one image (`sync_with_audio`) and its own 40 ms of audio (a
  `TTSAudioRawFrame` of the TTS's own samples in the TTS modes), so lip sync holds by construction
  at the transport. A frame the service has not finished within `latency_budget_s` leaves as an
  idle frame with its audio.
- TTS modes: the text and stop frames that came after some TTS audio leave after that audio's
  frames (as behind a real-time TTS), so the transport and the context aggregator see the words
  as they are said. The time from an utterance's first TTS audio to its first moving-mouth frame
  is Pipecat's TTFB metric of this processor and `stats().first_mouth_ms`.
- With no audio coming in at all, an idle ticker keeps 25 fps video flowing from the start.
- `InterruptionFrame` drops the audio buffer, pending and in-flight frames and the text waiting
  behind them: the next frame is the idle loop (the mouth closes).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import deque
from pathlib import Path

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
    SystemFrame,
    TTSAudioRawFrame,
    TTSStoppedFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from musetalk.audio import AudioFeatureEncoder, frame_count_for
from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.config import (
    AUDIO_SAMPLE_RATE,
    ModelPaths,
    PrepareSettings,
    avatars_dir_from_env,
    load_realtime_config,
    models_dir_from_env,
    runtime_from_env,
)
from musetalk.errors import ConfigError
from musetalk.generate import LipSyncGenerator
from musetalk.live.backend import GenerationBackend
from musetalk.live.requests import FrameResult, SessionInfo
from musetalk.live.service import GenerationService, ServiceSettings, new_session_id
from musetalk.live.session import (
    FRAME_SECONDS,
    LiveSession,
    LiveSettings,
    LiveStats,
    OutputFrame,
    fit_image,
    output_size,
)
from musetalk.models import Models

__all__ = ["DEFAULT_CONFIG", "LiveSettings", "LiveStats", "MuseTalkProcessor", "output_size"]

DEFAULT_CONFIG = Path("configs/inference/realtime.yaml")
_NO_STATS = LiveStats(0.0, 0, 0, 0, 0, None, None, True, None)
# A TTS that sends no TTSStoppedFrame: its utterance ends after this long without audio (the tail
# frames, held back for their whisper look-ahead, are released then).
UTTERANCE_GAP_S = 0.5


@dataclasses.dataclass
class _Utterance:
    """The TTS utterance being lip-synced, and how soon its mouth moved."""

    open: bool = False
    context_id: str | None = None
    last_audio_at: float = 0.0
    first_audio_at: float | None = None  # waiting for its first moving-mouth frame
    first_mouth_s: deque = dataclasses.field(default_factory=lambda: deque(maxlen=50))


class MuseTalkProcessor(FrameProcessor):
    """Lip-syncs speech onto a prepared avatar, like Pipecat's own avatar video services.

    Put it after the audio it should lip-sync: `transport.input() -> VADProcessor -> this ->
    transport.output()` (mirror mode), or after a TTS service (speech mode). Pass `service=`
    (any `GenerationBackend`: in process or on Ray) to share one backend between bots; by default
    the processor joins the process's service for its models.
    """

    def __init__(
        self,
        avatar_config_path: str | Path | None = None,
        *,
        models: Models | None = None,
        avatar: Avatar | None = None,
        settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None,
        service: GenerationBackend | None = None,
        publish_audio: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        # False: images only, on the transport's own 25 fps video clock (a Daily room in mirror mode, where
        # everyone hears the speaker already); the frames still leave at their audio's due time.
        self._publish_audio = publish_audio
        self._config_path = Path(avatar_config_path) if avatar_config_path else None
        self._models = models
        self._avatar = avatar
        self._store = avatar_store
        self._settings = settings or LiveSettings()
        self._service = service
        self._session: LiveSession | None = None
        self._session_id = new_session_id("bot")
        self._joined = False
        self._generator: LipSyncGenerator | None = None  # generate_video_frame only
        self._wakeup = asyncio.Event()
        self._emitter_task: asyncio.Task | None = None
        self._resampler = create_stream_resampler()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False
        self._utterance = _Utterance()
        self._held: deque[tuple[int, Frame]] = deque()  # (entries created when it arrived, frame): see _push_in_order
        self._emitted = 0  # entries (frames with their audio) handed on so far

    # ------------------------------------------------------------------ seed API
    async def initialize_models(self) -> None:
        """Load the models (once per process is enough: pass `models=` to share them).

        A processor given a `service=` needs none: the service generates the frames (a bot
        worker process on the Ray backend holds no model copy)."""
        if self._models is None and self._service is None:
            await self._load_models()

    async def _load_models(self) -> None:
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

            await self._load_models()  # preparing encodes the crops with the VAE, here

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
        await self.initialize_avatars()
        await self._load_models()  # this direct path runs the models here, even beside a service
        models, avatar = self._models, self._avatar
        assert models is not None and avatar is not None
        if self._generator is None:
            self._generator = LipSyncGenerator(models, avatar, batch_size=self._settings.batch_size)
        audio = _to_float(audio_chunk)
        n = frame_count_for(len(audio))
        positions = self._session.take_positions(n) if self._session is not None else list(range(n))
        generator, size = self._generator, self.video_size

        def work() -> list[np.ndarray]:
            encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
            feats = encoder.frame_features(audio, n)
            return [fit_image(f, size) for f in generator.generate(feats, positions[0])]

        frames = await asyncio.to_thread(work)
        return [_image_frame(f) for f in frames]

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
    def publish_audio(self) -> bool:
        return self._publish_audio

    @property
    def joined(self) -> bool:
        """Its session is open on the generation service (from the pipeline's start until it stops)."""
        return self._joined

    @property
    def avatar(self) -> Avatar | None:
        return self._avatar

    @property
    def service(self) -> GenerationBackend | None:
        return self._service

    def stats(self) -> LiveStats:
        stats = self._session.stats() if self._session is not None else _NO_STATS
        stats = dataclasses.replace(stats, speaking=self.speaking)
        waits = sorted(self._utterance.first_mouth_s)
        if not waits:
            return stats
        p95 = waits[min(len(waits) - 1, int(round(0.95 * (len(waits) - 1))))]
        return dataclasses.replace(
            stats,
            first_mouth_ms=round(self._utterance.first_mouth_s[-1] * 1000, 1),
            first_mouth_p95_ms=round(p95 * 1000, 1),
        )

    @property
    def speaking(self) -> bool:
        """TTS audio is being lip-synced or waits to be shown."""
        return self._utterance.open or bool(self._session is not None and self._joined and self._session.pending_speech)

    # ------------------------------------------------------------------ pipecat plumbing
    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        session = self._session if self._joined else None
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
            self._interrupt()
            await self.push_frame(frame, direction)
        elif isinstance(frame, TTSAudioRawFrame) and self._settings.lip_syncs_tts:
            await self._on_tts_audio(frame)
        elif isinstance(frame, TTSStoppedFrame) and self._settings.lip_syncs_tts:
            self._end_utterance()
            await self._push_in_order(frame, direction)
        elif isinstance(frame, InputAudioRawFrame):
            # Mirror mode lip-syncs the room; otherwise the STT before this has used it already.
            if session is not None and self._settings.mode == "mirror":
                session.push_audio(await self._mono16k(frame.audio, frame.sample_rate, frame.num_channels))
                self._wakeup.set()
        elif isinstance(frame, (VADUserStartedSpeakingFrame, VADUserStoppedSpeakingFrame)):
            if session is not None:
                session.set_vad(isinstance(frame, VADUserStartedSpeakingFrame))
            await self.push_frame(frame, direction)
        else:
            await self._push_in_order(frame, direction)

    async def _push_in_order(self, frame: Frame, direction: FrameDirection) -> None:
        """TTS modes: a data frame that came after TTS audio (its text, TTSStoppedFrame, the end of an LLM
        reply) leaves after that audio's frames, as it would behind a real-time TTS: the transport then
        hands the spoken text on as it is heard, and an interruption drops the words never said."""
        held = self._held
        if (
            direction == FrameDirection.DOWNSTREAM and self._settings.lip_syncs_tts and not isinstance(frame, SystemFrame)
            and self._session is not None and self._joined and (held or self._session.created > self._emitted)
        ):  # fmt: skip
            held.append((self._session.created, frame))
            return
        await self.push_frame(frame, direction)

    async def _release_held(self, everything: bool = False) -> None:
        while self._held and (everything or self._held[0][0] <= self._emitted):
            _, frame = self._held.popleft()
            await self.push_frame(frame)

    async def cleanup(self) -> None:
        """Pipecat calls this however the pipeline ends (even a cancel that overtakes StartFrame)."""
        self._stopped = True
        await self._stop()
        await super().cleanup()

    async def _start(self) -> None:
        try:
            await self.initialize_avatars()
            await self._join()
        except Exception as exc:  # any load or admission failure ends up in the pipeline's error path
            await self.push_error(f"MuseTalk could not start: {exc}", exception=exc, fatal=True)
            return
        if self._stopped:  # cancelled while starting: leave nothing behind
            await self._stop()
            return
        logger.info(
            "MuseTalk live: avatar {} -> {}x{} video, {} mode, {}",
            self._avatar.name, *self.video_size, self._settings.mode,
            self._models.describe() if self._models is not None else f"frames from {type(self._service).__name__}",
        )  # fmt: skip
        if self._emitter_task is None:
            self._emitter_task = self.create_task(self._emit_loop(), name="musetalk-emitter")

    async def _join(self) -> None:
        """Open this bot's session on the generation service (loading the avatar there)."""
        if self._service is None:
            self._service = GenerationService.for_models(
                self._models, ServiceSettings(batch_size=self._settings.batch_size)
            )
        service = self._service
        self._loop = asyncio.get_running_loop()
        avatar_id = await asyncio.to_thread(service.add_avatar, self._avatar)
        # Off the loop: on a remote backend (Ray) opening a session is a network call. If the pipeline is
        # cancelled meanwhile, the session may still open in that thread: whichever side comes second closes
        # it (decided under a lock, not by a callback on this loop, which may be closed by then).
        session_id, lock, state = self._session_id, threading.Lock(), {"opened": False, "abandoned": False}

        def open_session() -> SessionInfo:
            info = service.open_session(session_id, avatar_id, self._sink, output_size=self.video_size)
            with lock:
                state["opened"] = True
                abandoned = state["abandoned"]
            if abandoned:
                service.close_session(session_id)
            return info

        opening = asyncio.ensure_future(asyncio.to_thread(open_session))
        try:
            info = await asyncio.shield(opening)
        except asyncio.CancelledError:
            with lock:
                state["abandoned"] = True
                opened = state["opened"]
            if opened:
                service.close_session(session_id)
            raise
        self._session = LiveSession(
            session_id=self._session_id, avatar=self._avatar, settings=self._settings, submit=service.submit,
            context_seconds=info.context_seconds,
        )  # fmt: skip
        self._joined = True

    def _sink(self, result: FrameResult) -> None:
        """Service threads -> this bot's event loop."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError("the bot's event loop is gone")
        loop.call_soon_threadsafe(self._on_result, result)

    def _on_result(self, result: FrameResult) -> None:
        if not self._joined or self._session is None:
            return
        self._session.on_result(result)
        if result.error is not None:
            logger.error("MuseTalk generation failed: {}", result.error)
            self.create_task(self.push_error(f"MuseTalk generation failed: {result.error}"))
        self._wakeup.set()

    def _interrupt(self) -> None:
        if self._joined and self._session is not None:
            self._session.interrupt()
            self._service.cancel(self._session_id)
        self._utterance.open = False
        self._utterance.first_audio_at = None
        self._held.clear()  # what came after the dropped audio was never said
        if self._session is not None:
            self._emitted = self._session.created
        self._wakeup.set()

    def _end_utterance(self) -> None:
        """The TTS finished an utterance: release its tail frames; the next starts a new one."""
        if self._utterance.open and self._joined and self._session is not None:
            self._session.end_utterance()
            self._wakeup.set()
        self._utterance.open = False

    async def _drain(self) -> None:
        session = self._session if self._joined else None
        if session is None:
            return
        if self._settings.lip_syncs_tts:
            self._end_utterance()
        while session.pending and self._emitter_task is not None:
            if time.monotonic() > (session.last_due or 0.0) + 1.0:
                break
            await asyncio.sleep(FRAME_SECONDS)
        await self._release_held(everything=True)

    async def _stop(self) -> None:
        if self._joined:
            self._joined = False
            self._session.interrupt()
            self._service.close_session(self._session_id)
        if self._emitter_task is not None:
            await self.cancel_task(self._emitter_task)
            self._emitter_task = None
        if self._generator is not None:
            self._generator.close()
            self._generator = None

    # ------------------------------------------------------------------ audio in
    async def _on_tts_audio(self, frame: TTSAudioRawFrame) -> None:
        if frame.num_channels != 1:
            samples = np.frombuffer(frame.audio, dtype=np.int16).reshape(-1, frame.num_channels).mean(axis=1)
            original = samples.astype(np.int16).tobytes()
        else:
            original = frame.audio
        pcm = await self._mono16k(original, frame.sample_rate, 1)
        if not (self._joined and self._session is not None):
            return
        utterance = self._utterance
        if utterance.open and frame.context_id != utterance.context_id:
            self._end_utterance()  # a new TTS context: the previous one ended without a TTSStoppedFrame
        now = time.monotonic()
        if not utterance.open:
            # An earlier utterance whose frames were all late (shown idle) never got a mouth: it is not counted.
            utterance.open, utterance.context_id, utterance.first_audio_at = True, frame.context_id, now
            await self.start_ttfb_metrics()
        utterance.last_audio_at = now
        self._session.push_audio(pcm, original=original, rate=frame.sample_rate, context_id=frame.context_id)
        self._wakeup.set()

    async def _mono16k(self, audio: bytes, rate: int, channels: int) -> np.ndarray:
        samples = np.frombuffer(audio, dtype=np.int16)
        if channels > 1:
            samples = samples.reshape(-1, channels).mean(axis=1).astype(np.int16)
        if rate != AUDIO_SAMPLE_RATE:
            samples = np.frombuffer(
                await self._resampler.resample(samples.tobytes(), rate, AUDIO_SAMPLE_RATE), dtype=np.int16
            )
        return samples.astype(np.float32) / 32768.0

    # ------------------------------------------------------------------ video out
    async def _emit_loop(self) -> None:
        session = self._session
        while True:
            self._wakeup.clear()
            if self._utterance.open and time.monotonic() - self._utterance.last_audio_at > UTTERANCE_GAP_S:
                self._end_utterance()
            for out in session.pop_due():
                await self._emit(out)
            timeout = session.next_deadline() - time.monotonic()
            if self._utterance.open:
                timeout = min(timeout, self._utterance.last_audio_at + UTTERANCE_GAP_S - time.monotonic())
            if timeout <= 0:
                continue
            try:
                await asyncio.wait_for(self._wakeup.wait(), timeout=timeout)
            except TimeoutError:
                pass

    async def _emit(self, out: OutputFrame) -> None:
        frame = _image_frame(out.image)
        if out.audio is None:  # idle ticker: no audio is flowing
            await self.push_frame(frame)
            return
        await self._count_mouth(out)
        # With audio, the image is shown when its audio starts playing: sync by construction. Video only: the
        # image replaces the current one now, its audio's due time, and the transport's 25 fps clock sends it.
        frame.sync_with_audio = self._publish_audio
        await self.push_frame(frame)
        self._emitted += 1
        if self._publish_audio and self._settings.lip_syncs_tts:
            await self.push_frame(TTSAudioRawFrame(out.audio, out.audio_rate, 1, context_id=out.context_id))
        elif self._publish_audio:
            await self.push_frame(OutputAudioRawFrame(out.audio, out.audio_rate, 1))
        if self._settings.lip_syncs_tts:
            await self._release_held()

    async def _count_mouth(self, out: OutputFrame) -> None:
        """The first moving mouth of an utterance stops its TTFB clock (first TTS audio -> first mouth)."""
        if out.generated and self._utterance.first_audio_at is not None:
            self._utterance.first_mouth_s.append(time.monotonic() - self._utterance.first_audio_at)
            self._utterance.first_audio_at = None
            await self.stop_ttfb_metrics()


def _image_frame(image: np.ndarray) -> OutputImageRawFrame:
    h, w = image.shape[:2]
    return OutputImageRawFrame(image=np.ascontiguousarray(image).tobytes(), size=(w, h), format="RGB")


def _to_float(audio: np.ndarray) -> np.ndarray:
    audio = np.asarray(audio)
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    return audio.astype(np.float32).reshape(-1)


def _load_models(paths: ModelPaths) -> Models:
    from musetalk.models import load_models

    return load_models(paths, runtime_from_env())
