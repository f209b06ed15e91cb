"""Whose voice a bot in a Daily room takes: one participant at a time.

Daily hands the bot each participant's microphone as its own 20 ms `UserAudioRawFrame`s. Fed
into one session, two people talking at once become alternating scraps of two voices, and twice
the audio makes twice the frames, which pile up in the output queue. `SpeakerChoice` picks one
participant (the active speaker, switching only between the followed person's utterances; a
name; or the first to join) and `FollowedVoiceFilter`, right after the transport's input, lets
only that participant's audio through: the VAD, the lip-sync and the STT never hear anyone else.
Bots (ours, by name, and the names the operator lists) are never followed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from loguru import logger
from pipecat.frames.frames import Frame, UserAudioRawFrame
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor

from musetalk.bot.daily import FOLLOW_ACTIVE, FOLLOW_FIRST

VOICE_RMS = 300.0  # int16 RMS of a 20 ms chunk above which someone is talking (speech is ~1000-8000)
UTTERANCE_GAP_S = 0.6  # the followed person quiet this long: between utterances, a switch may happen


@dataclass
class _Participant:
    name: str
    joined_at: float
    bot: bool
    last_voice_at: float = -1e9


class SpeakerChoice:
    """The participant whose audio the session gets (all state on the bot's event loop)."""

    def __init__(
        self,
        follow: str = FOLLOW_ACTIVE,
        is_bot: Callable[[str], bool] = lambda name: False,
        gap_s: float = UTTERANCE_GAP_S,
    ):
        self.follow = follow
        self._is_bot = is_bot  # asked when a participant joins: our bots' names and the operator's never-follow list
        self._gap_s = gap_s
        self._participants: dict[str, _Participant] = {}
        self._followed: str | None = None
        self._wanted: str | None = None  # the active speaker waiting for the followed one to finish
        self.switches = 0

    # ------------------------------------------------------------------ the room
    def joined(self, participant_id: str, name: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        bot = self._is_bot(name)
        self._participants[participant_id] = _Participant(name=name, joined_at=now, bot=bot)
        if bot:
            logger.info("Daily: {} joined; a bot, never followed", name)
        self._choose(now)

    def left(self, participant_id: str, now: float | None = None) -> None:
        self._participants.pop(participant_id, None)
        if self._wanted == participant_id:
            self._wanted = None
        if self._followed == participant_id:
            self._followed = None
        self._choose(time.monotonic() if now is None else now)

    def active_speaker(self, participant_id: str, now: float | None = None) -> None:
        """Daily's active speaker changed: followed at once if the followed person is between utterances."""
        person = self._participants.get(participant_id)
        if self.follow != FOLLOW_ACTIVE or person is None or person.bot:
            return
        self._wanted = participant_id if participant_id != self._followed else None
        self._choose(time.monotonic() if now is None else now)

    def heard(self, participant_id: str, audio: bytes, now: float | None = None) -> bool:
        """A 20 ms chunk of someone's microphone: True when it is the followed person's (it passes)."""
        now = time.monotonic() if now is None else now
        person = self._participants.get(participant_id)
        if person is not None and _rms(audio) >= VOICE_RMS:
            person.last_voice_at = now
        if self._wanted is not None:
            self._choose(now)
        return participant_id == self._followed and person is not None

    # ------------------------------------------------------------------ what the status shows
    @property
    def followed_name(self) -> str | None:
        person = self._participants.get(self._followed) if self._followed else None
        return person.name if person else None

    @property
    def people(self) -> int:
        """Participants other than the bot that are people (bots in the room do not keep it company)."""
        return sum(1 for p in self._participants.values() if not p.bot)

    @property
    def participants(self) -> int:
        return len(self._participants)

    # ------------------------------------------------------------------ the rule
    def _people_by_arrival(self) -> list[str]:
        people = [(p.joined_at, pid) for pid, p in self._participants.items() if not p.bot]
        return [pid for _, pid in sorted(people)]

    def _choose(self, now: float) -> None:
        if self.follow == FOLLOW_ACTIVE:
            chosen = self._followed
            if self._wanted is not None and self._between_utterances(now):
                chosen, self._wanted = self._wanted, None
            if chosen is None:
                arrivals = self._people_by_arrival()
                chosen = arrivals[0] if arrivals else None
        elif self.follow == FOLLOW_FIRST:
            arrivals = self._people_by_arrival()
            chosen = self._followed if self._followed in arrivals else (arrivals[0] if arrivals else None)
        else:
            wanted = self.follow.casefold()
            named = [pid for pid in self._people_by_arrival() if self._participants[pid].name.casefold() == wanted]
            chosen = self._followed if self._followed in named else (named[0] if named else None)
        if chosen != self._followed:
            self._followed = chosen
            self.switches += 1
            logger.info("Daily: following {}", self.followed_name or "nobody (waiting)")

    def _between_utterances(self, now: float) -> bool:
        person = self._participants.get(self._followed) if self._followed else None
        return person is None or now - person.last_voice_at >= self._gap_s


def _rms(audio: bytes) -> float:
    samples = np.frombuffer(audio, dtype=np.int16)
    if samples.size == 0:
        return 0.0
    return float(np.sqrt(np.mean(samples.astype(np.float32) ** 2)))


class FollowedVoiceFilter(FrameProcessor):
    """Right after a Daily transport's input: only the followed participant's audio goes on."""

    def __init__(self, choice: SpeakerChoice, **kwargs):
        super().__init__(**kwargs)
        self.choice = choice
        self.dropped = 0

    async def process_frame(self, frame: Frame, direction: FrameDirection):
        await super().process_frame(frame, direction)
        if isinstance(frame, UserAudioRawFrame) and direction == FrameDirection.DOWNSTREAM:
            if not self.choice.heard(frame.user_id, frame.audio):
                self.dropped += 1
                return
        await self.push_frame(frame, direction)
