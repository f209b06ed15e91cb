"""Bots as worker processes on a Ray cluster: one Ray actor per bot, placed on CPU.

With `--backend ray`, each bot (its Pipecat pipelines, WebRTC or Daily transport, video
encoding) runs in a process of its own: bots no longer share one interpreter's GIL, and a bot
that dies, even by kill -9, takes nothing else with it; the panel shows its error. A worker
holds no models: its sessions call the MuseTalk Serve app through a handle (`RayGenerationClient`).

`WorkerBotRunner` is a `BotManager` like `BotRunner` (both are `BotManagerBase`s,
musetalk/bot/manager.py), so the panel and start_pipecat_server.py drive either. Workers are
pinned to this machine's node: the local page a worker serves is on this machine, and it reads
avatars from this machine's avatar store. A process joined through Ray Client
(`ray://HOST:PORT`) is no node of the cluster: there bots stay threads of this process
(`make_bot_runner` decides) and only the frames come from the cluster.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loguru import logger

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.bot.manager import STOP_GRACE_S, BotManager, BotManagerBase, check_speech
from musetalk.bot.runner import BotRunner
from musetalk.bot.status import BotStatus
from musetalk.bot.transports import TransportSettings
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.bot.agent_config import SpeechSetup
    from musetalk.bot.processor import LiveSettings
    from musetalk.live.backend import BackendStats, GenerationBackend
    from musetalk.models import Models

__all__ = ["BotWorker", "WorkerBotRunner", "make_bot_runner", "uses_bot_workers"]

STATUS_TIMEOUT_S = 2.0  # a worker that does not answer a status call within this is reported as not answering
CLOSE_TIMEOUT_S = 40.0  # a stopped worker's teardown (a Daily join settling) before its process is ended
_ALIVE = ("starting", "running", "stopping")


def uses_bot_workers(backend: str) -> bool:
    """Bots run as worker processes on `ray` (this machine is a node); on `inproc` and `ray://` they are threads."""
    from musetalk.serve.backend import BackendSpec

    parsed = BackendSpec.parse(backend)
    return parsed.kind == "ray" and parsed.address is None


def make_bot_runner(
    models: Models | None,
    service: GenerationBackend,
    *,
    backend: str = "inproc",
    max_bots: int = 1,
    bot_cpus: float = 1.0,
) -> BotManager:
    """The bot manager for `backend`: threads of this process, or Ray worker processes (see the module docstring)."""
    if uses_bot_workers(backend):
        return WorkerBotRunner(service, max_bots=max_bots, bot_cpus=bot_cpus)
    return BotRunner(models, max_bots=max_bots, service=service)


class BotWorker:
    """What runs inside a bot's worker process: a one-bot `BotRunner` over the Serve app.

    Created by `WorkerBotRunner` as a Ray actor (with concurrency, so status calls answer while
    a start waits); never used directly.
    """

    def __init__(self, app_name: str, avatars_dir: str):
        from ray import serve

        from musetalk.serve.client import RayGenerationClient

        self._client = RayGenerationClient(serve.get_app_handle(app_name))
        self._store = AvatarStore(Path(avatars_dir))
        self._runner = BotRunner(None, service=self._client)

    def pid(self) -> int:
        return os.getpid()

    def start(
        self, avatar_name: str, transport: TransportSettings, live: LiveSettings, speech: SpeechSetup | None = None
    ) -> BotStatus:
        return self._runner.start(avatar_name, transport, live, avatar_store=self._store, speech=speech)

    def say(self, text: str) -> BotStatus:
        return self._runner.say(None, text)

    def interrupt(self) -> BotStatus:
        return self._runner.interrupt(None)

    def report(self) -> tuple[BotStatus, list[str]]:
        """The bot's status and every avatar it shows (its own and its viewers' picks)."""
        status = self._runner.status()
        return status, sorted(self._runner.avatars_in_use())

    def stop(self, timeout: float) -> BotStatus:
        return self._runner.stop(timeout=timeout)

    def close(self, timeout: float) -> bool:
        """Let a stopped bot finish its teardown, then end the sessions' client (the process ends after)."""
        self._runner.stop_all()
        done = self._runner.join_closing(timeout)
        self._client.close()
        return done


@dataclass
class _Worker:
    """The panel's side of one bot worker: its actor, its last known status."""

    bot_id: str
    actor: Any
    settings: TransportSettings
    last: BotStatus
    avatars: set[str] = field(default_factory=set)
    pid: int | None = None
    gone: bool = False  # the process died (or was ended): no more calls to it
    starting: bool = True  # start() still owns the actor
    stop_requested: bool = False  # stopped while starting: start() ends it

    @property
    def alive(self) -> bool:
        return self.last.state in _ALIVE

    @property
    def state(self) -> str:
        return self.last.state

    @property
    def url(self) -> str | None:
        return self.last.url

    @property
    def avatar_name(self) -> str | None:
        return self.last.avatar

    def avatar_names(self) -> set[str]:
        return set(self.avatars)


class WorkerBotRunner(BotManagerBase[_Worker]):
    """Start, stop and watch bots that each run in a Ray worker process (see the module docstring)."""

    def __init__(
        self, service: GenerationBackend, *, max_bots: int = 1, bot_cpus: float = 1.0,
        start_timeout_s: float = 90.0, app_name: str | None = None,
    ):  # fmt: skip
        import ray

        from musetalk.serve.deployment import APP_NAME

        super().__init__(max_bots=max_bots, start_timeout_s=start_timeout_s)
        if not ray.is_initialized():
            raise ConfigError("Bot workers need this process joined to a Ray cluster (make_backend('ray') does that).")
        self._service = service
        self._bot_cpus = bot_cpus
        self._app_name = app_name or APP_NAME
        self._node_id = ray.get_runtime_context().get_node_id()
        self._actor_class = ray.remote(BotWorker)

    # ---------------------------------------------------------------- the shared service
    @property
    def service(self) -> GenerationBackend:
        return self._service

    def service_stats(self) -> BackendStats:
        return self._service.stats()

    # ---------------------------------------------------------------- start / stop
    def start(
        self, avatar: str | Avatar, transport_settings: TransportSettings, live_settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None, speech: SpeechSetup | None = None,
    ) -> BotStatus:  # fmt: skip
        """Start a bot in a new worker process; returns once it runs, raises `MuseTalkError` if it cannot start.

        A say or conversation bot's services are checked here first; the worker gets the keys its
        config names (looked up in this process), never the rest of the environment."""
        from musetalk.bot.processor import LiveSettings
        from musetalk.config import avatars_dir_from_env

        if not isinstance(transport_settings, TransportSettings):
            raise ConfigError("transport_settings must be a TransportSettings.")
        if not isinstance(avatar, (str, Avatar)):
            raise ConfigError("avatar must be an avatar name or a loaded Avatar.")
        live = live_settings if live_settings is not None else LiveSettings()
        check_speech(live, speech)
        speech = speech.portable() if speech is not None else None
        name = avatar if isinstance(avatar, str) else avatar.name
        # The worker loads the avatar itself, by name, from the same store on this node.
        store = avatar_store if avatar_store is not None else AvatarStore(avatars_dir_from_env())
        store_root = store.root
        if not store.exists(name):
            raise MuseTalkError(f"Avatar {name!r} is not in {store_root}; prepare it first (Avatars tab).")
        if transport_settings.kind == "daily":  # each bot has a process of its own: tell it the others' names
            never = (*transport_settings.daily.never_follow, *sorted(self.bot_names()))
            transport_settings = dataclasses.replace(
                transport_settings, daily=dataclasses.replace(transport_settings.daily, never_follow=never)
            )
        worker = self._add(
            lambda bot_id: _Worker(bot_id, None, transport_settings,
                                   self._starting_status(bot_id, name, transport_settings, live), avatars={name}),
            transport_settings,
        )  # fmt: skip
        self._wait_for_closing_pages(transport_settings)
        logger.info("Starting bot {} in a worker process: avatar {}, {}", worker.bot_id, name, transport_settings)
        try:
            worker.actor = self._new_actor(str(store_root))
            worker.pid = self._get(worker.actor.pid.remote(), self._start_timeout_s, worker, "start its process")
            worker.last = self._own(worker, worker.last)
            if not worker.stop_requested:
                status = self._get(worker.actor.start.remote(name, transport_settings, live, speech),
                                   self._start_timeout_s, worker, "start")  # fmt: skip
        except MuseTalkError as exc:
            if not worker.stop_requested:
                self._end(worker, "error", str(exc))
            if worker.actor is not None and not worker.gone:
                self._close_in_background(worker)  # a bot that could not start leaves no process behind
            raise
        finally:
            worker.starting = False
        if worker.stop_requested:  # stop() answered "stopped" while this start was under way
            self._close_in_background(worker)
            return worker.last
        worker.last = self._own(worker, status)
        return worker.last

    def _new_actor(self, avatars_dir: str) -> Any:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        root = str(Path(__file__).resolve().parents[2])
        return self._actor_class.options(
            num_cpus=self._bot_cpus,
            max_concurrency=8,  # status calls answer while start() waits for the bot
            max_restarts=0,  # a dead bot is reported, not restarted behind the operator's back
            scheduling_strategy=NodeAffinitySchedulingStrategy(self._node_id, soft=False),
            runtime_env={"env_vars": {"PYTHONPATH": root}},  # this checkout's code, on this node
        ).remote(self._app_name, avatars_dir)

    def _starting_status(self, bot_id: str, name: str, settings: TransportSettings, live: LiveSettings) -> BotStatus:
        return BotStatus(state="starting", avatar=name, transport=settings.kind, mode=live.mode, bot_id=bot_id,
                         room_url=settings.room_url)  # fmt: skip

    def stop(self, bot_id: str | None = None, timeout: float = STOP_GRACE_S) -> BotStatus:
        """Stop a bot (the newest running one when `bot_id` is None); its process ends once its teardown is done."""
        worker = self._find(bot_id)
        if worker is None:
            return self.status(bot_id)
        if worker.starting:  # start() still owns the actor and ends it; a bot already starting in it is told now
            worker.stop_requested = True
            self._end(worker, "stopped")
            if worker.actor is not None and worker.pid is not None:
                worker.actor.stop.remote(timeout)
            return worker.last
        if worker.gone or worker.actor is None:
            self._end(worker, "stopped")
            return worker.last
        try:
            status = self._get(worker.actor.stop.remote(timeout), timeout + STATUS_TIMEOUT_S + 5, worker, "stop")
            worker.last = self._own(worker, status)
        except MuseTalkError as exc:
            logger.warning("Bot {}: {}", worker.bot_id, exc)
        self._end(worker, "stopped")
        self._close_in_background(worker)
        return worker.last

    def _close_in_background(self, worker: _Worker) -> None:
        """End the worker's process after its teardown (a Daily call still leaving) without blocking the caller."""
        actor, worker.actor, worker.gone = worker.actor, None, True

        def close() -> None:
            import ray

            try:
                ray.get(actor.close.remote(CLOSE_TIMEOUT_S), timeout=CLOSE_TIMEOUT_S + 10)
            except Exception as exc:  # it died or hangs: it is killed below either way
                logger.debug("Bot {} worker close: {}", worker.bot_id, exc)
            ray.kill(actor, no_restart=True)

        thread = threading.Thread(target=close, name=f"musetalk-close-{worker.bot_id}", daemon=True)
        thread.start()
        self._add_closing(thread, worker.settings)

    # ---------------------------------------------------------------- speaking
    def say(self, bot_id: str | None, text: str) -> BotStatus:
        """Queue `text` in the bot's worker (behind what it is saying); returns at once."""
        from musetalk.bot.agent_config import check_say_text

        text = check_say_text(text)
        worker = self._live_worker(bot_id)
        worker.last = self._own(worker, self._get(worker.actor.say.remote(text), STATUS_TIMEOUT_S + 3, worker, "say"))
        return worker.last

    def interrupt(self, bot_id: str | None = None) -> BotStatus:
        """Stop the bot's speech now; it keeps running."""
        worker = self._live_worker(bot_id)
        status = self._get(worker.actor.interrupt.remote(), STATUS_TIMEOUT_S + 3, worker, "interrupt")
        worker.last = self._own(worker, status)
        return worker.last

    def _live_worker(self, bot_id: str | None) -> _Worker:
        worker = self._find_running(bot_id)
        if worker.gone or worker.actor is None or worker.starting or not worker.alive:
            raise MuseTalkError(f"Bot {worker.bot_id} is not running ({worker.last.state}).")
        return worker

    # ---------------------------------------------------------------- status
    def _report(self, workers: list[_Worker]) -> list[BotStatus]:
        self._refresh(workers)
        return [w.last for w in workers]

    def _refresh(self, workers: list[_Worker]) -> None:
        """Ask every live worker for its status at once; a dead one becomes "error" with what happened."""
        import ray

        asked = {}
        for w in workers:
            if w.alive and not w.gone and not w.starting:  # a starting bot shows "starting" until start() returns
                asked[w.actor.report.remote()] = w
        if not asked:
            return
        ready, _ = ray.wait(list(asked), num_returns=len(asked), timeout=STATUS_TIMEOUT_S)
        for ref, w in asked.items():
            if ref not in ready:
                w.last = dataclasses.replace(
                    w.last, warning=f"the bot's worker process (pid {w.pid}) did not answer within {STATUS_TIMEOUT_S:.0f} s"
                )  # fmt: skip
                continue
            try:
                status, avatars = self._get(ref, STATUS_TIMEOUT_S, w, "report")
            except MuseTalkError:
                continue  # _get recorded the death
            w.last, w.avatars = self._own(w, status), set(avatars)
            if not w.alive:  # it ended by itself (a Daily error, say): its process ends, its status stays
                self._close_in_background(w)

    # ---------------------------------------------------------------- plumbing
    def _own(self, worker: _Worker, status: BotStatus) -> BotStatus:
        """The worker's status under this runner's id for it, with its process id."""
        return dataclasses.replace(status, bot_id=worker.bot_id, worker_pid=worker.pid)

    def _end(self, worker: _Worker, state: str, error: str | None = None) -> None:
        worker.last = dataclasses.replace(
            worker.last, state=state, last_error=error or worker.last.last_error, viewers=0, viewer_connected=False,
            fps=None,
        )  # fmt: skip

    def _get(self, ref: Any, timeout: float, worker: _Worker, what: str) -> Any:
        """`ray.get` with the worker's failures as `MuseTalkError`s; a dead process marks the bot "error"."""
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

        try:
            return ray.get(ref, timeout=timeout)
        except RayTaskError as exc:  # the bot raised: its own readable error
            cause = getattr(exc, "cause", None)
            raise MuseTalkError(
                str(cause) if isinstance(cause, MuseTalkError) else f"{type(cause).__name__}: {cause}"
            ) from None
        except RayActorError as exc:
            message = _death_message(worker.pid, exc)
            logger.error("Bot {}: {}", worker.bot_id, message)
            worker.gone = True
            self._end(worker, "error", message)
            raise MuseTalkError(message) from None
        except GetTimeoutError:
            if what in ("start", "start its process"):
                ray.kill(worker.actor, no_restart=True)
                worker.gone = True
            hint = ""
            if what == "start its process":
                hint = (
                    f" Each bot worker takes {self._bot_cpus:g} CPU of this machine's Ray node: `ray status` shows "
                    "what is free (stop a bot, or start Ray with more --num-cpus)."
                )
            raise MuseTalkError(f"The bot's worker process did not {what} within {timeout:.0f} s.{hint}") from None


def _death_message(pid: int | None, exc: BaseException) -> str:
    reason = " ".join(str(exc).split())
    reason = reason if len(reason) <= 240 else reason[:237] + "..."
    which = f" (pid {pid})" if pid else ""
    return (
        f"The bot's worker process{which} died; its viewers were disconnected. The panel and the other bots go on: "
        f"start it again. (Ray said: {reason})"
    )
