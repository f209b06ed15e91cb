"""What was said in a say or conversation bot: user and avatar turns, interruptions, reply latency.

`TranscriptObserver` is a Pipecat observer: it watches frames pass (it never changes them) and
writes turns into a `Transcript`, which the panel and API callers read from other threads.
A reply's latency runs from the end of the user's speech (the VAD's stop minus its stop_secs)
to the first avatar audio handed to the transport (the avatar paces it in real time); its text is
recorded as the avatar hands it on, after its audio, so words an interruption cut off are not in it.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import asdict, dataclass

from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseStartFrame,
    TranscriptionFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSTextFrame,
    VADUserStartedSpeakingFrame,
    VADUserStoppedSpeakingFrame,
)
from pipecat.observers.base_observer import BaseObserver, FramePushed
from pipecat.processors.frame_processor import FrameProcessor

KEEP_TURNS = 200
UNFINISHED = "…"  # an avatar turn whose first sentence is still being said (or was cut off)


@dataclass
class Turn:
    role: str  # user | avatar | error
    text: str
    at_s: float  # seconds since the bot started
    interrupted: bool = False
    latency_ms: float | None = None  # avatar turns answering the user: end of user speech -> first avatar audio
    viewer: str | None = None  # the local viewer whose conversation it is (None: the room)

    def to_dict(self) -> dict:
        return asdict(self)


class Transcript:
    """Turns of one bot, safe to read from any thread."""

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._start = clock()
        self._lock = threading.Lock()
        self._turns: deque[Turn] = deque(maxlen=KEEP_TURNS)

    def now_s(self) -> float:
        return round(self._clock() - self._start, 2)

    def add(self, turn: Turn) -> Turn:
        with self._lock:
            self._turns.append(turn)
        return turn

    def extend_last(self, role: str, viewer: str | None, text: str) -> bool:
        """Append words to the newest turn when it is `role`'s in this conversation; False otherwise."""
        with self._lock:
            last = next((t for t in reversed(self._turns) if t.viewer == viewer and t.role != "error"), None)
            if last is None or last.role != role or last.interrupted:
                return False
            last.text = (
                f"{last.text} {text}".strip() if not text.startswith((" ", ",", ".", "!", "?")) else last.text + text
            )
            return True

    def update(self, turn: Turn, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(turn, key, value)

    def turns(self) -> list[dict]:
        with self._lock:
            return [t.to_dict() for t in self._turns]

    def latencies_ms(self) -> list[float]:
        with self._lock:
            return [t.latency_ms for t in self._turns if t.latency_ms is not None]


class TranscriptObserver(BaseObserver):
    """Writes one pipeline's turns into a `Transcript` (watch only: frames pass unchanged)."""

    def __init__(self, transcript: Transcript, speaker: FrameProcessor, viewer: str | None = None) -> None:
        super().__init__(observe_every_push=True)  # the spoken text is a later push than the TTS's own
        self._transcript = transcript
        self._speaker = speaker  # the avatar (MuseTalkProcessor): it hands audio and text on as they are shown
        self._viewer = viewer
        self._user_stopped_at: float | None = None  # end of the user's speech, waiting for the reply's audio
        self._avatar_turn: Turn | None = None  # the reply being spoken
        self._avatar_context: str | None = None  # its TTS context (one per say request or LLM reply)
        self._audio_started_at: float | None = None
        self._cut_off: deque[str] = deque(maxlen=16)  # TTS contexts an interruption ended
        self._bot_speaking = False
        self._replying = False  # the LLM started a reply that has not been heard in full yet

    async def on_push_frame(self, data: FramePushed) -> None:
        frame, now = data.frame, time.monotonic()
        if data.source is self._speaker and isinstance(frame, (TTSAudioRawFrame, TTSTextFrame)):
            self._on_spoken(frame, now)
            return
        if not data.first_push:
            return
        if isinstance(frame, VADUserStoppedSpeakingFrame):
            self._user_stopped_at = now - float(getattr(frame, "stop_secs", 0.0) or 0.0)
            self._avatar_turn = None  # whatever the avatar says next is a new turn
        elif isinstance(frame, VADUserStartedSpeakingFrame):
            self._user_stopped_at = None
        elif isinstance(frame, TranscriptionFrame) and frame.text.strip():
            if not self._transcript.extend_last("user", self._viewer, frame.text.strip()):
                self._transcript.add(Turn("user", frame.text.strip(), self._transcript.now_s(), viewer=self._viewer))
        elif isinstance(frame, LLMFullResponseStartFrame):
            self._replying, self._avatar_turn = True, None
        elif isinstance(frame, TTSSpeakFrame):
            self._replying = True
        elif isinstance(frame, BotStoppedSpeakingFrame):
            self._bot_speaking = False
            self._replying = False
        elif isinstance(frame, InterruptionFrame):
            self._on_interruption()
        elif isinstance(frame, ErrorFrame):
            self._transcript.add(Turn("error", str(frame.error), self._transcript.now_s(), viewer=self._viewer))

    def _on_spoken(self, frame, now: float) -> None:
        """What the avatar hands on, as it is shown: its audio, then each sentence's text after that audio."""
        context_id = getattr(frame, "context_id", None)
        if context_id is not None and context_id in self._cut_off:
            return  # a frame of a cut-off turn that was on its way when the interruption came
        if isinstance(frame, TTSAudioRawFrame):
            if not self._bot_speaking:
                self._bot_speaking, self._audio_started_at = True, now
                self._turn_for(context_id)
                self._take_latency(self._avatar_turn, now)
        elif frame.text.strip():
            turn = self._turn_for(context_id)
            text = frame.text.strip() if turn.text == UNFINISHED else f"{turn.text} {frame.text.strip()}"
            self._transcript.update(turn, text=text)

    def _turn_for(self, context_id: str | None) -> Turn:
        """The avatar turn of this TTS context (one per say request or reply), opened with its first audio."""
        turn = self._avatar_turn
        same = context_id == self._avatar_context or (turn is not None and turn.text == UNFINISHED)
        if turn is None or turn.interrupted or not same:
            turn = self._transcript.add(Turn("avatar", UNFINISHED, self._transcript.now_s(), viewer=self._viewer))
            self._avatar_turn = turn
        self._avatar_context = context_id
        return turn

    def _take_latency(self, turn: Turn, audio_at: float) -> None:
        if self._user_stopped_at is not None and turn.latency_ms is None and audio_at >= self._user_stopped_at:
            self._transcript.update(turn, latency_ms=round((audio_at - self._user_stopped_at) * 1000, 1))
            self._user_stopped_at = None

    def _on_interruption(self) -> None:
        if self._avatar_context is not None:
            self._cut_off.append(self._avatar_context)
        if (self._bot_speaking or self._replying) and self._avatar_turn is not None:
            self._transcript.update(self._avatar_turn, interrupted=True)
        self._bot_speaking = False
        self._replying = False
        self._avatar_turn = None
