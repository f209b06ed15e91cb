"""What every bot manager offers (`BotManager`) and the bookkeeping they share (`BotManagerBase`).

Two managers: `BotRunner` (musetalk/bot/runner.py: bots as threads of this process) and
`WorkerBotRunner` (musetalk/bot/workers.py: one Ray worker process per bot). The panel and
start_pipecat_server.py drive either through `BotManager`; `make_bot_runner` picks one.

`BotManagerBase` holds what both keep alike: the lock, the bot ids, the bots by id (oldest
first, the last few ended ones kept for their status), the limit on running bots, the bots
still closing after a stop, and the status, listing and avatar-in-use answers. A subclass
adds how a bot starts, stops, speaks and reports.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Generic, Protocol, TypeVar

from musetalk.bot.status import BotStatus
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.avatar.store import Avatar, AvatarStore
    from musetalk.bot.agent_config import SpeechSetup
    from musetalk.bot.processor import LiveSettings
    from musetalk.bot.transports import TransportSettings
    from musetalk.live.backend import BackendStats, GenerationBackend

__all__ = [
    "STOP_GRACE_S",
    "BotManager",
    "BotManagerBase",
    "check_speech",
    "ended_to_forget",
    "in_use_sentence",
    "no_such_bot",
    "pick_bot",
    "refuse_past_limit",
]

STOP_GRACE_S = 1.0  # how long stop() waits before it answers "stopped" and lets teardown finish behind it
CLOSING_PAGE_WAIT_S = 5.0  # a new local bot waits this long for a stopped local bot to free its port
_KEEP_ENDED = 8  # ended bots kept for their final status and error


class BotManager(Protocol):
    """Start, stop, watch and speak through live bots from any thread (the panel, the CLI).

    Methods that take `bot_id=None` act on the newest running bot (else the newest).
    """

    @property
    def service(self) -> GenerationBackend:
        """The generation backend every bot of this manager uses."""
        ...

    @property
    def max_bots(self) -> int: ...

    @property
    def running(self) -> bool: ...

    def service_stats(self) -> BackendStats | None:
        """The backend's figures (sessions, frames/s, capacity, ...); None before any bot ran."""
        ...

    def start(
        self, avatar: str | Avatar, transport_settings: TransportSettings, live_settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None, speech: SpeechSetup | None = None,
    ) -> BotStatus:  # fmt: skip
        """Start a bot; returns once it runs, raises a `MuseTalkError` if it cannot start."""
        ...

    def stop(self, bot_id: str | None = None, timeout: float = STOP_GRACE_S) -> BotStatus: ...

    def stop_all(self, timeout: float = STOP_GRACE_S) -> list[BotStatus]: ...

    def join_closing(self, timeout: float) -> bool:
        """Wait up to `timeout` s for stopped bots still tearing down; True when none is left."""
        ...

    def say(self, bot_id: str | None, text: str) -> BotStatus: ...

    def interrupt(self, bot_id: str | None = None) -> BotStatus: ...

    def status(self, bot_id: str | None = None) -> BotStatus: ...

    def bots(self) -> list[BotStatus]: ...

    def bot_names(self) -> set[str]:
        """The display names of our live Daily bots: a bot never follows another one of ours."""
        with self._lock:
            return {b.settings.bot_name for b in self._bots.values() if b.alive and b.settings.kind == "daily"}

    def running_ids(self) -> list[str]: ...

    def avatar_in_use(self, name: str) -> str | None:
        """A sentence naming the bot that shows avatar `name`, or None when no running bot does."""
        ...


class ManagedBot(Protocol):
    """What the shared bookkeeping reads of one bot (a `BotRun`, or a worker's last known status)."""

    @property
    def bot_id(self) -> str: ...

    @property
    def settings(self) -> TransportSettings: ...

    @property
    def alive(self) -> bool: ...  # starting, running or stopping

    @property
    def state(self) -> str: ...

    @property
    def url(self) -> str | None: ...

    @property
    def avatar_name(self) -> str | None: ...

    def avatar_names(self) -> set[str]:
        """Every avatar the bot shows (its own and its viewers' picks)."""
        ...


class _HasAlive(Protocol):
    @property
    def alive(self) -> bool: ...


_Alive = TypeVar("_Alive", bound=_HasAlive)
_Bot = TypeVar("_Bot", bound=ManagedBot)


class BotManagerBase(Generic[_Bot]):
    """Bookkeeping and status shared by the bot managers (see the module docstring).

    Subclasses implement `start`, `stop`, `say`, `interrupt`, `service`, `service_stats` and
    `_report` (the statuses of some bots, in order).
    """

    def __init__(self, *, max_bots: int, start_timeout_s: float) -> None:
        if max_bots < 1:
            raise ConfigError("max_bots must be at least 1.")
        self._max_bots = max_bots
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._bots: dict[str, _Bot] = {}  # by bot id, oldest first
        self._ids = itertools.count(1)
        self._closing: list[tuple[threading.Thread, TransportSettings]] = []  # stopped bots still tearing down

    @property
    def max_bots(self) -> int:
        return self._max_bots

    def stop(self, bot_id: str | None = None, timeout: float = STOP_GRACE_S) -> BotStatus:
        raise NotImplementedError

    def _report(self, bots: list[_Bot]) -> list[BotStatus]:
        """The status of each of `bots` (live figures only while it runs)."""
        raise NotImplementedError

    # ---------------------------------------------------------------- bookkeeping
    def _add(self, make: Callable[[str], _Bot], settings: TransportSettings | None = None) -> _Bot:
        """A new bot from `make(bot_id)`, kept under its id; refused while `max_bots` are alive, or (unless its
        settings allow it) when another of our bots serves the same Daily room."""
        with self._lock:
            refuse_past_limit([(b.state, b.avatar_name) for b in self._bots.values() if b.alive], self._max_bots)
            if settings is not None:
                refuse_shared_room(settings, [(b.bot_id, b.settings) for b in self._bots.values() if b.alive])
            bot = make(f"bot-{next(self._ids)}")
            self._bots[bot.bot_id] = bot
            for bot_id in ended_to_forget({bot_id: b.alive for bot_id, b in self._bots.items()}):
                del self._bots[bot_id]
        return bot

    def _find(self, bot_id: str | None) -> _Bot | None:
        with self._lock:
            return pick_bot(self._bots, bot_id)

    def _find_running(self, bot_id: str | None) -> _Bot:
        """The bot to speak through: the one asked for (a readable error if there is none)."""
        bot = self._find(bot_id)
        if bot is None:
            no_such_bot(bot_id, self.running_ids())
            raise MuseTalkError("No bot is running: start one in say or conversation mode first.")
        return bot

    def stop_all(self, timeout: float = STOP_GRACE_S) -> list[BotStatus]:
        with self._lock:
            alive = [bot_id for bot_id, b in self._bots.items() if b.alive]
        return [self.stop(bot_id, timeout=timeout) for bot_id in alive]

    # ---------------------------------------------------------------- bots still closing
    def _add_closing(self, thread: threading.Thread, settings: TransportSettings) -> None:
        """A stopped bot whose teardown goes on in `thread` (a Daily call still leaving)."""
        with self._lock:
            self._closing = [c for c in self._closing if c[0].is_alive()] + [(thread, settings)]

    def join_closing(self, timeout: float) -> bool:
        """Wait up to `timeout` s for stopped bots that are still tearing down; True when none is left."""
        return self._join_closing(timeout, lambda settings: True)

    def _wait_for_closing_pages(self, settings: TransportSettings, timeout: float = CLOSING_PAGE_WAIT_S) -> None:
        """A stopped local bot may still hold the port a new local bot asks for: let it finish first."""
        if settings.kind == "local":
            self._join_closing(timeout, lambda closing: closing.kind == "local")

    def _join_closing(self, timeout: float, which: Callable[[TransportSettings], bool]) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            closing = [thread for thread, settings in self._closing if which(settings)]
        for thread in closing:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            self._closing = [c for c in self._closing if c[0].is_alive()]
            return not self._closing

    # ---------------------------------------------------------------- status
    def status(self, bot_id: str | None = None) -> BotStatus:
        """One bot's status (the newest running one when `bot_id` is None); "stopped" when there is none."""
        bot = self._find(bot_id)
        if bot is None:
            return no_such_bot(bot_id, self.running_ids())
        return self._report([bot])[0]

    def bots(self) -> list[BotStatus]:
        """Every bot this manager knows (running ones and the last few that ended), oldest first."""
        with self._lock:
            bots = list(self._bots.values())
        return self._report(bots)

    def bot_names(self) -> set[str]:
        """The display names of our live Daily bots: a bot never follows another one of ours."""
        with self._lock:
            return {b.settings.bot_name for b in self._bots.values() if b.alive and b.settings.kind == "daily"}

    def running_ids(self) -> list[str]:
        with self._lock:
            return [bot_id for bot_id, b in self._bots.items() if b.alive]

    @property
    def running(self) -> bool:
        return bool(self.running_ids())

    def avatars_in_use(self) -> set[str]:
        """Every avatar a running bot shows (its own and its viewers' picks)."""
        with self._lock:
            bots = [b for b in self._bots.values() if b.alive]
        return set().union(*(b.avatar_names() for b in bots))

    def avatar_in_use(self, name: str) -> str | None:
        """A sentence naming the bot that shows avatar `name`, or None when no running bot does."""
        with self._lock:
            bots = [b for b in self._bots.values() if b.alive and name in b.avatar_names()]
        if not bots:
            return None
        bot = bots[0]
        return in_use_sentence(bot.settings, bot.bot_id, bot.state, bot.url, name)


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


def pick_bot(bots: dict[str, _Alive], bot_id: str | None) -> _Alive | None:
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


def same_room(a: str | None, b: str | None) -> bool:
    """Two Daily room URLs name the same room (host case and a trailing slash aside)."""
    if not a or not b:
        return False
    split_a, split_b = a.rstrip("/").split("://", 1)[-1], b.rstrip("/").split("://", 1)[-1]
    host_a, _, room_a = split_a.partition("/")
    host_b, _, room_b = split_b.partition("/")
    return host_a.lower() == host_b.lower() and room_a == room_b


def refuse_shared_room(settings: TransportSettings, alive: list[tuple[str, TransportSettings]]) -> None:
    """Two of our bots in one room re-publish each other (and a mirror bot lip-syncs the other avatar)."""
    if settings.kind != "daily" or settings.daily.share_room:
        return
    for bot_id, other in alive:
        if other.kind == "daily" and same_room(other.room_url, settings.room_url):
            raise ConfigError(
                f"Bot {bot_id} already serves the room {settings.room_url}: stop it first, or allow a second bot "
                "in that room on purpose (--share-room, or 'Allow a second bot in this room' in the panel)."
            )


def ended_to_forget(alive_by_id: dict[str, bool]) -> list[str]:
    """Ids of ended bots past the last `_KEEP_ENDED` (oldest first): their status is no longer listed."""
    ended = [bot_id for bot_id, alive in alive_by_id.items() if not alive]
    return ended[: max(0, len(ended) - _KEEP_ENDED)]


def in_use_sentence(settings: TransportSettings, bot_id: str, state: str, url: str | None, name: str) -> str:
    where = url or settings.room_url or settings.kind
    return f"the {settings.kind} bot {bot_id} ({state}, {where}) is using avatar {name!r}"
