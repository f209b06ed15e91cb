"""Live bots in background threads: start, stop, list and watch them from any thread (the panel, the CLI).

`BotRunner(models, max_bots=N)` holds up to N bots at once (each a `BotRun`: its own thread,
event loop, transport and sessions; see musetalk/bot/run.py). All of them share one generation
backend (by default an in-process `GenerationService`: one copy of the models, frames of every
session batched together, admission by measured capacity). With the default `max_bots=1` it
behaves like the single-bot runner it grew from: a second start is refused until the first bot
is stopped. Ids, the limit, status and listing are `BotManagerBase`'s (musetalk/bot/manager.py).

Methods that take `bot_id=None` act on the newest running bot (else the newest), so single-bot
callers need no ids.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from loguru import logger

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.bot.daily import daily_error_message
from musetalk.bot.manager import STOP_GRACE_S, BotManagerBase, check_speech
from musetalk.bot.run import BotRun, readable
from musetalk.bot.status import STATES, BotStatus
from musetalk.bot.transports import TransportSettings, with_page_key
from musetalk.config import avatars_dir_from_env
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.bot.agent_config import SpeechSetup
    from musetalk.bot.processor import LiveSettings
    from musetalk.live.backend import BackendStats, GenerationBackend
    from musetalk.models import Models

# STATES, BotStatus, daily_error_message, check_speech: importable from here as before.
__all__ = ["STATES", "STOP_GRACE_S", "BotRunner", "BotStatus", "check_speech", "daily_error_message"]


class BotRunner(BotManagerBase[BotRun]):
    """Start, stop and watch live bots from any thread; they share one generation service.

    `start()` returns once the bot runs (the local page is served, or the Daily pipeline is
    up and joining) and raises a `MuseTalkError` if it cannot start. Afterwards a failure
    (Daily unreachable, pipeline crash) shows as state "error" with `last_error`.
    """

    def __init__(
        self,
        models: Models | None,
        *,
        start_timeout_s: float = 60.0,
        max_bots: int = 1,
        service: GenerationBackend | None = None,
    ):
        super().__init__(max_bots=max_bots, start_timeout_s=start_timeout_s)
        self._models = models
        self._service = service

    @property
    def _runs(self) -> dict[str, BotRun]:
        """The bots by id, oldest first (the shared `_bots`)."""
        return self._bots

    # ---------------------------------------------------------------- the shared service
    @property
    def service(self) -> GenerationBackend:
        """The generation backend every bot of this runner uses (its own in-process service unless
        one was passed in; created on first use; its worker thread ends whenever no session is open)."""
        with self._lock:
            if self._service is None:
                from musetalk.serve.backend import make_backend

                if self._models is None:
                    raise ConfigError("A BotRunner without models needs a service= that generates the frames.")

                self._service = make_backend("inproc", models=self._models)
            return self._service

    def service_stats(self) -> BackendStats | None:
        """Sessions, batch sizes, frames/s, per-frame cost, capacity, GPU memory; None before any bot ran."""
        with self._lock:
            service = self._service
        return service.stats() if service is not None else None

    # ---------------------------------------------------------------- start / stop
    def start(
        self,
        avatar: str | Avatar,
        transport_settings: TransportSettings,
        live_settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None,
        speech: SpeechSetup | None = None,
    ) -> BotStatus:
        """Start a bot. Say and conversation modes need `speech` (the bot config and where its keys come
        from); their services are asked once first, so a wrong address fails the start with a sentence.
        A local page bound beyond loopback always has a viewer key: pass settings from `with_page_key`
        to know it (without one, a key nobody knows is made here, and the page lets nobody in)."""
        from musetalk.bot.processor import LiveSettings

        if not isinstance(transport_settings, TransportSettings):
            raise ConfigError("transport_settings must be a TransportSettings.")
        transport_settings = with_page_key(transport_settings)
        live_settings = live_settings if live_settings is not None else LiveSettings()
        check_speech(live_settings, speech)
        if not isinstance(avatar, (str, Avatar)):
            raise ConfigError("avatar must be an avatar name or a loaded Avatar.")
        name = avatar if isinstance(avatar, str) else avatar.name
        store = avatar_store or (AvatarStore(avatars_dir_from_env()) if isinstance(avatar, str) else None)
        service = self.service
        run = self._add(
            lambda bot_id: BotRun(
                self._models, transport_settings, live_settings, name, bot_id=bot_id, service=service,
                avatar_store=store, speech=speech, our_bot_names=self.bot_names,
            ),
            transport_settings,
        )  # fmt: skip
        self._wait_for_closing_pages(transport_settings)
        logger.info("Starting bot {}: avatar {}, {}, mode {}", run.bot_id, name, transport_settings, live_settings.mode)
        try:
            run.avatar = avatar if isinstance(avatar, Avatar) else store.load(avatar)
        except MuseTalkError as exc:
            run.end("error", readable(exc))
            raise
        if run.stop_requested:  # stopped while the avatar was loading
            run.end("stopped")
            return run.snapshot(None)
        run.launch()
        if not run.started.wait(self._start_timeout_s):
            run.fail(f"The bot did not start within {self._start_timeout_s:.0f} s.")
        status = run.snapshot(run.stats())
        if status.state != "running" and status.last_error:
            if run.thread is not None:
                run.thread.join(self._start_timeout_s)
            raise MuseTalkError(status.last_error)
        return status

    def stop(self, bot_id: str | None = None, timeout: float = STOP_GRACE_S) -> BotStatus:
        """Stop a bot (the newest running one when `bot_id` is None); safe in any state, from any thread, repeatedly.

        Waits at most `timeout` s for the bot's thread. A bot that needs longer to let go (a Daily
        call still joining holds on for up to ~20 s) is reported "stopped" at once and finishes
        its teardown in the background: a new start is possible right away, and an error that
        teardown reports (the room lookup failed) still shows as `last_error`.
        """
        run = self._find(bot_id)
        if run is None:
            return self.status(bot_id)
        run.request_stop()
        thread = run.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.info("Bot {} is stopped; its connection closes in the background", run.bot_id)
                run.detach()
                self._add_closing(thread, run.settings)
        elif thread is None:
            run.detach()  # stopped before its thread existed (the avatar was still loading)
        run.acknowledge()
        return run.snapshot(None)

    # ---------------------------------------------------------------- speaking
    def say(self, bot_id: str | None, text: str) -> BotStatus:
        """Queue `text` for the bot to speak (behind what it is saying) and return at once."""
        from musetalk.bot.agent_config import check_say_text

        text = check_say_text(text)
        run = self._find_running(bot_id)
        run.say(text)
        logger.info("Bot {}: say ({} characters)", run.bot_id, len(text))
        return run.snapshot(run.stats())

    def interrupt(self, bot_id: str | None = None) -> BotStatus:
        """Stop the bot's speech now (queued text too); it keeps running and can speak again."""
        run = self._find_running(bot_id)
        run.interrupt()
        logger.info("Bot {}: interrupted", run.bot_id)
        return run.snapshot(run.stats())

    # ---------------------------------------------------------------- status
    def _report(self, bots: list[BotRun]) -> list[BotStatus]:
        return [r.snapshot(r.stats() if r.alive else None) for r in bots]  # live figures only while it runs
