"""A TTS-fed live session against a generation service, driven the way the bot's processor drives it.

`TtsSpeaker` opens a `LiveSession` in speech mode on a `GenerationService` and plays utterances
into it: TTS audio in chunks, faster than real time (`TtsPacing`), each chunk passed with its
original int16 samples as the processor does, `end_utterance()` after the last one. Its loop takes
the service's answers on this thread and pops due frames every few milliseconds; an utterance's
first mouth is the time from its first chunk to the first generated frame popped, which is what
the processor reports as `first_mouth_ms` (Pipecat's TTFB of the video service). No Pipecat.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass

import numpy as np

from musetalk.avatar.store import Avatar
from musetalk.bench.context import TtsPacing
from musetalk.config import AUDIO_SAMPLE_RATE
from musetalk.live.requests import FrameResult
from musetalk.live.service import GenerationService
from musetalk.live.session import LiveSession, LiveSettings, output_size

POLL_S = 0.004  # how often the loop pops due frames (the processor wakes on each answer and deadline)


@dataclass(frozen=True)
class Utterance:
    first_mouth_s: float | None  # None: no frame of it was generated in time (all shown idle)
    frames: int
    generated: int
    seconds: float  # first chunk to last frame shown


class TtsSpeaker:
    def __init__(self, service: GenerationService, avatar_id: str, avatar: Avatar, name: str, settings: LiveSettings):
        self.results: queue.SimpleQueue[FrameResult] = queue.SimpleQueue()
        self.service = service
        size = output_size(avatar.size, settings.max_side)  # the processor's video size: the service scales to it
        info = service.open_session(name, avatar_id, self.results.put, output_size=size)
        self.session = LiveSession(
            session_id=info.session_id, avatar=avatar, submit=service.submit, settings=settings,
            context_seconds=info.context_seconds,
        )  # fmt: skip
        self._utterances = 0

    def close(self) -> None:
        self.service.close_session(self.session.session_id)

    def pump(self) -> list:
        """Hand the service's answers to the session, then return the frames due now."""
        while True:
            try:
                self.session.on_result(self.results.get_nowait())
            except queue.Empty:
                break
        return self.session.pop_due()

    def say(self, pcm: np.ndarray, pacing: TtsPacing, *, timeout_s: float = 60.0) -> Utterance:
        """Stream `pcm` (16 kHz float32) as TTS chunks; return when its last frame has been shown."""
        self._utterances += 1
        context = f"u{self._utterances}"
        step = max(1, int(pacing.chunk_s * AUDIO_SAMPLE_RATE))
        chunks = [pcm[i : i + step] for i in range(0, len(pcm), step)]
        interval = pacing.chunk_s / pacing.speed
        start = next_at = time.monotonic()
        sent, first, frames, generated = 0, None, 0, 0
        while time.monotonic() - start < timeout_s:
            now = time.monotonic()
            while sent < len(chunks) and next_at <= now:
                original = _int16(chunks[sent])
                self.session.push_audio(chunks[sent], original=original, rate=AUDIO_SAMPLE_RATE, context_id=context)
                sent, next_at = sent + 1, next_at + interval
                if sent == len(chunks):
                    self.session.end_utterance()
            for out in self.pump():
                if out.audio is None:
                    continue  # idle ticker
                frames += 1
                if out.generated:
                    generated += 1
                    if first is None:
                        first = time.monotonic() - start
            if sent == len(chunks) and not self.session.pending_speech:
                break
            time.sleep(POLL_S)
        return Utterance(first, frames, generated, time.monotonic() - start)

    def push_all(self, pcm: np.ndarray) -> None:
        """A whole utterance at once (a TTS that answers in one piece), then its end."""
        self._utterances += 1
        self.session.push_audio(pcm, original=_int16(pcm), rate=AUDIO_SAMPLE_RATE, context_id=f"u{self._utterances}")
        self.session.end_utterance()

    def idle(self, seconds: float) -> None:
        """Keep popping frames (the idle loop) for `seconds`, as between two replies."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.pump()
            time.sleep(POLL_S)


def _int16(pcm: np.ndarray) -> bytes:
    """The TTS's own samples, as the processor passes them along with the 16 kHz float audio."""
    return np.clip(np.round(pcm * 32768.0), -32768, 32767).astype(np.int16).tobytes()
