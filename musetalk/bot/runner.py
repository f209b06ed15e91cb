"""Live bots in background threads: start, stop, list and watch them from any thread (the panel, the CLI).

`BotRunner(models, max_bots=N)` holds up to N bots at once (each a `BotRun`: its own thread,
event loop, transport and sessions; see musetalk/bot/run.py). All of them share one
`GenerationService`: one copy of the models, frames of every session batched together,
admission by measured capacity. With the default `max_bots=1` it behaves like the single-bot
runner it grew from: a second start is refused until the first bot is stopped.

Methods that take `bot_id=None` act on the newest running bot (else the newest), so single-bot
callers need no ids.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING, Protocol, TypeVar

from loguru import logger

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.bot.run import STATES, BotRun, BotStatus, daily_error_message, readable
from musetalk.bot.transports import TransportSettings
from musetalk.config import avatars_dir_from_env
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.bot.agent_config import SpeechSetup
    from musetalk.bot.processor import LiveSettings
    from musetalk.live.service import GenerationService, ServiceStats
    from musetalk.models import Models

__all__ = ["STATES", "STOP_GRACE_S", "BotRunner", "BotStatus", "daily_error_message"]

STOP_GRACE_S = 1.0  # how long stop() waits before it answers "stopped" and lets teardown finish behind it
_KEEP_ENDED = 8  # ended bots kept for their final status and error
_Bot = TypeVar("_Bot", bound="_HasAlive")


class _HasAlive(Protocol):
    @property
    def alive(self) -> bool: ...


class BotRunner:
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
        service: GenerationService | None = None,
    ):
        if max_bots < 1:
            raise ConfigError("max_bots must be at least 1.")
        self._models = models
        self._start_timeout_s = start_timeout_s
        self._max_bots = max_bots
        self._service = service
        self._lock = threading.Lock()
        self._runs: dict[str, BotRun] = {}  # by bot id, oldest first
        self._ids = itertools.count(1)
        self._closing: list[BotRun] = []  # stopped runs whose threads are still tearing down

    # ---------------------------------------------------------------- the shared service
    @property
    def service(self) -> GenerationService:
        """The generation service every bot of this runner uses (its own unless one was passed in;
        created on first use; its worker thread ends whenever no session is open)."""
        with self._lock:
            if self._service is None:
                from musetalk.live.service import GenerationService

                if self._models is None:
                    raise ConfigError("A BotRunner without models needs a service= that generates the frames.")

                self._service = GenerationService(self._models)
            return self._service

    def service_stats(self) -> ServiceStats | None:
        """Sessions, batch sizes, frames/s, per-frame cost, capacity, GPU memory; None before any bot ran."""
        with self._lock:
            service = self._service
        return service.stats() if service is not None else None

    @property
    def max_bots(self) -> int:
        return self._max_bots

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
        from); their services are asked once first, so a wrong address fails the start with a sentence."""
        from musetalk.bot.processor import LiveSettings

        if not isinstance(transport_settings, TransportSettings):
            raise ConfigError("transport_settings must be a TransportSettings.")
        live_settings = live_settings if live_settings is not None else LiveSettings()
        check_speech(live_settings, speech)
        if not isinstance(avatar, (str, Avatar)):
            raise ConfigError("avatar must be an avatar name or a loaded Avatar.")
        name = avatar if isinstance(avatar, str) else avatar.name
        store = avatar_store or (AvatarStore(avatars_dir_from_env()) if isinstance(avatar, str) else None)
        service = self.service
        with self._lock:
            self._refuse_past_limit()
            bot_id = f"bot-{next(self._ids)}"
            run = BotRun(
                self._models, transport_settings, live_settings, name, bot_id=bot_id, service=service,
                avatar_store=store, speech=speech,
            )  # fmt: skip
            self._runs[bot_id] = run
            self._forget_old_runs()
        self._wait_for_closing_pages(transport_settings)
        logger.info("Starting bot {}: avatar {}, {}, mode {}", bot_id, name, transport_settings, live_settings.mode)
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

    def _refuse_past_limit(self) -> None:
        refuse_past_limit([(r.state, r.avatar_name) for r in self._runs.values() if r.alive], self._max_bots)

    def _forget_old_runs(self) -> None:
        for bot_id in ended_to_forget({bot_id: r.alive for bot_id, r in self._runs.items()}):
            del self._runs[bot_id]

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
                with self._lock:
                    self._closing = [r for r in self._closing if r.thread is not None and r.thread.is_alive()]
                    self._closing.append(run)
        elif thread is None:
            run.detach()  # stopped before its thread existed (the avatar was still loading)
        run.acknowledge()
        return run.snapshot(None)

    def stop_all(self, timeout: float = STOP_GRACE_S) -> list[BotStatus]:
        with self._lock:
            alive = [bot_id for bot_id, r in self._runs.items() if r.alive]
        return [self.stop(bot_id, timeout=timeout) for bot_id in alive]

    def join_closing(self, timeout: float) -> bool:
        """Wait up to `timeout` s for stopped bots that are still tearing down; True when none is left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            closing = list(self._closing)
        for run in closing:
            if run.thread is not None:
                run.thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closing = [r for r in self._closing if r.thread is not None and r.thread.is_alive()]
            return not self._closing

    def _wait_for_closing_pages(self, settings: TransportSettings, timeout: float = 5.0) -> None:
        """A local page still closing may hold the port a new local bot asks for: let it finish first."""
        if settings.kind != "local":
            return
        with self._lock:
            pages = [r for r in self._closing if r.settings.kind == "local" and r.thread is not None]
        for run in pages:
            run.thread.join(timeout)

    # ---------------------------------------------------------------- speaking
    def say(self, bot_id: str | None, text: str) -> BotStatus:
        """Queue `text` for the bot to speak (behind what it is saying) and return at once."""
        from musetalk.bot.agent_config import check_say_text

        text = check_say_text(text)
        run = self._running(bot_id)
        run.say(text)
        logger.info("Bot {}: say ({} characters)", run.bot_id, len(text))
        return run.snapshot(run.stats())

    def interrupt(self, bot_id: str | None = None) -> BotStatus:
        """Stop the bot's speech now (queued text too); it keeps running and can speak again."""
        run = self._running(bot_id)
        run.interrupt()
        logger.info("Bot {}: interrupted", run.bot_id)
        return run.snapshot(run.stats())

    def _running(self, bot_id: str | None) -> BotRun:
        run = self._find(bot_id)
        if run is None:
            no_such_bot(bot_id, self.running_ids())
            raise MuseTalkError("No bot is running: start one in say or conversation mode first.")
        return run

    # ---------------------------------------------------------------- status
    def _find(self, bot_id: str | None) -> BotRun | None:
        with self._lock:
            return pick_bot(self._runs, bot_id)

    def status(self, bot_id: str | None = None) -> BotStatus:
        """One bot's status (the newest running one when `bot_id` is None); "stopped" when there is none."""
        run = self._find(bot_id)
        if run is None:
            return no_such_bot(bot_id, self.running_ids())
        return run.snapshot(run.stats() if run.alive else None)  # live figures only while it runs

    def bots(self) -> list[BotStatus]:
        """Every bot this runner knows (running ones and the last few that ended), oldest first."""
        with self._lock:
            runs = list(self._runs.values())
        return [r.snapshot(r.stats() if r.alive else None) for r in runs]

    def running_ids(self) -> list[str]:
        with self._lock:
            return [bot_id for bot_id, r in self._runs.items() if r.alive]

    @property
    def running(self) -> bool:
        return bool(self.running_ids())

    def avatars_in_use(self) -> set[str]:
        """Every avatar a running bot shows (its own and its viewers' picks)."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.alive]
        return set().union(*(r.avatar_names() for r in runs))

    def avatar_in_use(self, name: str) -> str | None:
        """A sentence naming the bot that shows avatar `name`, or None when no running bot does."""
        with self._lock:
            runs = [r for r in self._runs.values() if r.alive and name in r.avatar_names()]
        if not runs:
            return None
        run = runs[0]
        return in_use_sentence(run.settings, run.bot_id, run.state, run.url, name)


def check_speech(live: LiveSettings, speech: SpeechSetup | None) -> None:
    """Say and conversation bots: the bot config is there and its services answer (before anything starts)."""
    if live.mode not in ("say", "conversation", "speech"):
        return
    if speech is None:
        raise ConfigError(
            f"Mode {live.mode} needs a bot config (--bot-config, default configs/bot/conversation.yaml): "
            "its TTS, and for a conversation its STT and LLM."
        )
    from musetalk.bot.agent import check_services

    check_services(speech, "conversation" if live.mode == "conversation" else "say")


def pick_bot(bots: dict[str, _Bot], bot_id: str | None) -> _Bot | None:
    """The bot `bot_id`, or with None the newest running bot, else the newest one."""
    if bot_id is not None:
        return bots.get(bot_id)
    entries = list(bots.values())
    return next((b for b in reversed(entries) if b.alive), entries[-1] if entries else None)


def no_such_bot(bot_id: str | None, running_ids: list[str]) -> BotStatus:
    """The status where no bot is: "stopped" when none was asked for by id, else a readable error."""
    if bot_id is not None:
        raise ConfigError(f"No bot {bot_id!r} (running bots: {', '.join(running_ids) or 'none'}).")
    return BotStatus()


def refuse_past_limit(alive: list[tuple[str, str | None]], max_bots: int) -> None:
    """Refuse another start when `alive` ((state, avatar) of each live bot) already fills `max_bots`."""
    if len(alive) < max_bots:
        return
    if max_bots == 1:
        state, avatar = alive[0]
        raise MuseTalkError(f"The bot is already {state} (avatar {avatar}); stop it first.")
    raise MuseTalkError(f"{len(alive)} bots are running, the most this runner starts ({max_bots}); stop one first.")


def ended_to_forget(alive_by_id: dict[str, bool]) -> list[str]:
    """Ids of ended bots past the last `_KEEP_ENDED` (oldest first): their status is no longer listed."""
    ended = [bot_id for bot_id, alive in alive_by_id.items() if not alive]
    return ended[: max(0, len(ended) - _KEEP_ENDED)]


def in_use_sentence(settings: TransportSettings, bot_id: str, state: str, url: str | None, name: str) -> str:
    where = url or settings.room_url or settings.kind
    return f"the {settings.kind} bot {bot_id} ({state}, {where}) is using avatar {name!r}"
