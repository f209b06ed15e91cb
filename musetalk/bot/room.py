"""One bot's Daily room, seen from its event loop: who is there, whom it follows, how its call ends.

`DailyRoom.watch(transport)` hooks Pipecat's `DailyTransport` events: participants joining and
leaving and the active speaker go to the `SpeakerChoice` (whose voice the session gets); Daily's
errors become one sentence with the hint that fits (musetalk/bot/daily.py) and end the bot;
`leave_when_alone()` ends it after the set time with no person in the room ("left: nobody in the
room for 10 min"), so it neither keeps a session slot nor spends Daily participant-minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from loguru import logger

from musetalk.bot.daily import DailyRoomSettings, daily_error_message
from musetalk.bot.follow import SpeakerChoice

ALONE_CHECK_S = 1.0


class DailyRoom:
    """The room side of a Daily bot: `fail(message)` ends it with an error, `leave(note)` ends it on purpose."""

    def __init__(
        self,
        room_url: str,
        settings: DailyRoomSettings,
        *,
        is_bot: Callable[[str], bool],
        fail: Callable[[str], None],
        leave: Callable[[str], None],
    ) -> None:
        self.room_url = room_url
        self.settings = settings
        self.choice = SpeakerChoice(settings.follow, is_bot=is_bot)
        self._fail = fail
        self._leave = leave
        self.joined = asyncio.Event()
        self.settled = asyncio.Event()  # joined, or the join failed

    # ------------------------------------------------------------------ what the status shows
    @property
    def participants(self) -> int:
        return self.choice.participants

    @property
    def following(self) -> str | None:
        return self.choice.followed_name

    # ------------------------------------------------------------------ events
    def watch(self, transport: Any) -> None:
        handler = transport.event_handler
        handler("on_joined")(self._on_joined)
        handler("on_error")(self._on_error)
        handler("on_daily_error")(self._on_daily_error)
        handler("on_participant_joined")(self._on_participant_joined)
        handler("on_participant_left")(self._on_participant_left)
        handler("on_active_speaker_changed")(self._on_active_speaker)

    async def _on_joined(self, _transport: Any, _data: Any) -> None:
        self.joined.set()
        self.settled.set()
        logger.info("Joined the Daily room {}; following {}", self.room_url, self.settings.describe_follow())

    async def _on_error(self, _transport: Any, error: Any) -> None:
        """Pipecat's errors: a failed join, or "Disconnected from ..." when Daily ended the call."""
        self.settled.set()
        self._fail(daily_error_message(self.room_url, str(error), in_call=self.joined.is_set()))

    async def _on_daily_error(self, _transport: Any, message: Any) -> None:
        """Daily's own error event names its error type (ejected, exp-room, exp-token, ...)."""
        self.settled.set()
        self._fail(daily_error_message(self.room_url, str(message), in_call=self.joined.is_set()))

    async def _on_participant_joined(self, _transport: Any, participant: Any) -> None:
        info = participant.get("info", {}) or {}
        name = str(info.get("userName") or "guest")
        self.choice.joined(str(participant.get("id")), name)

    async def _on_participant_left(self, _transport: Any, participant: Any, _reason: Any) -> None:
        self.choice.left(str(participant.get("id")))

    async def _on_active_speaker(self, _transport: Any, participant: Any) -> None:
        if participant and participant.get("id"):
            self.choice.active_speaker(str(participant["id"]))

    # ------------------------------------------------------------------ alone
    async def leave_when_alone(self) -> None:
        """From the join on: no person in the room for `leave_when_alone_min` -> leave (0 = never)."""
        minutes = self.settings.leave_when_alone_min
        if minutes <= 0:
            return
        await self.joined.wait()
        limit_s = minutes * 60.0
        alone_since = time.monotonic()
        while True:
            await asyncio.sleep(min(ALONE_CHECK_S, limit_s / 4))
            if self.choice.people > 0:
                alone_since = time.monotonic()
            elif time.monotonic() - alone_since >= limit_s:
                self._leave(f"left: nobody in the room for {minutes:g} min")
                return
