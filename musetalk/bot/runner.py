"""The live bot in a background thread: start, stop, status, from any thread (the panel, the CLI).

`BotRunner(models)` owns at most one running bot. Each `start()` creates a thread with its
own asyncio event loop; in it:

* local transport: the page server (`LocalWebRTCServer`, uvicorn in this loop) waits for a
  browser; each new connection gets its own pipeline (a new viewer replaces the previous);
* Daily transport: one pipeline joined to the room; a Daily error (unreachable room, bad
  token) cancels it and leaves the runner in state "error" with a readable message.

A pipeline is `build_pipeline(transport, MuseTalkProcessor)` run by a `PipelineWorker` on its
own `WorkerRunner(handle_sigint=False)` (signals belong to the main thread). Other threads
only reach the loop through `asyncio.run_coroutine_threadsafe` / `call_soon_threadsafe`.
The models are passed in (one copy per process, shared with avatar preparation).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.bot.transports import LocalWebRTCServer, TransportSettings, make_daily_transport, make_local_transport
from musetalk.config import AUDIO_SAMPLE_RATE, avatars_dir_from_env
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.bot.processor import LiveSettings, MuseTalkProcessor
    from musetalk.models import Models

STATES = ("stopped", "starting", "running", "stopping", "error")
STOP_GRACE_S = 1.0  # how long stop() waits before it answers "stopped" and lets teardown finish behind it
_SESSION_END_TIMEOUT_S = 5.0
_DAILY_JOIN_SETTLE_S = 30.0  # a stopped bot still waits this long for its join to succeed or fail
_STATS_TIMEOUT_S = 0.5


@dataclass(frozen=True)
class BotStatus:
    """What the operator sees. Never holds the Daily token."""

    state: str = "stopped"  # stopped | starting | running | stopping | error
    avatar: str | None = None
    transport: str | None = None  # local | daily
    url: str | None = None  # the local page, when local
    mode: str | None = None  # mirror | speech
    viewer_connected: bool = False
    uptime_s: float = 0.0
    fps: float | None = None
    frames: int = 0
    mouth_latency_ms: float | None = None
    realtime: bool | None = None
    warning: str | None = None
    last_error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Session:
    """One pipeline: a local viewer's connection, or the Daily room."""

    processor: MuseTalkProcessor
    worker: Any  # PipelineWorker
    runner: Any  # WorkerRunner
    connection: Any = None  # SmallWebRTCConnection (local only)
    task: asyncio.Task | None = None


def _readable(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, MuseTalkError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _BotRun:
    """Everything of one start() .. stop(): the thread, its loop, the server and the session."""

    def __init__(
        self, models: Models, settings: TransportSettings, live: LiveSettings, avatar_name: str | None
    ) -> None:
        self.models = models
        self.settings = settings
        self.live = live
        self.avatar: Avatar | None = None
        self.avatar_name = avatar_name
        self._lock = threading.Lock()
        self.state = "starting"
        self.error: str | None = None
        self.warning: str | None = None
        self.url: str | None = None
        self.running_since: float | None = None
        self.ended_at: float | None = None
        self.viewer_connected = False
        self.stop_requested = False
        self.failed = False  # an error ended it (not an operator's stop): the final state is "error"
        self.detached = False  # stop() answered already; the thread finishes its teardown on its own
        self.started = threading.Event()  # set once running, or once it failed
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.session: _Session | None = None
        self._stop_event: asyncio.Event | None = None
        self._last_stats: Any = None
        self._server: LocalWebRTCServer | None = None

    # ---------------------------------------------------------------- thread-safe state
    @property
    def alive(self) -> bool:
        """Starting, running or stopping (the thread sets the final state as its very last step)."""
        with self._lock:
            return self.state in ("starting", "running", "stopping")

    def scrub(self, text: str) -> str:
        token = self.settings.token
        return text.replace(token, "***") if token else text

    def fail(self, message: str) -> None:
        """Record the first error and end the run (callable from any thread).

        An error that arrives after the operator asked to stop (a Daily join failing while it is
        torn down) is kept as `last_error`, but the run still ends "stopped": that is what was asked.
        """
        message = self.scrub(message)
        with self._lock:
            if self.error is None:
                self.error = message
            if not self.stop_requested:
                self.failed = True
        logger.error("Bot error: {}", message)
        self.request_stop()

    def end(self, state: str, error: str | None = None) -> None:
        """Final state of a run that never got its thread going."""
        with self._lock:
            self.state = state
            self.error = self.error or error
            self.failed = state == "error"
        self.started.set()

    def detach(self) -> None:
        """Answer "stopped" now; the thread goes on closing what it holds (a Daily call that is
        still joining cannot be released sooner) and then ends by itself."""
        with self._lock:
            if self.state in ("starting", "running", "stopping"):
                self.detached = True
                self.state = "error" if self.failed else "stopped"
                self.ended_at = time.monotonic()
                self.viewer_connected = False
        self.started.set()

    def acknowledge(self) -> None:
        """A stop of a run that already ended in error: the state becomes "stopped" (the error stays readable)."""
        with self._lock:
            if self.state == "error":
                self.state = "stopped"
                self.failed = False

    def request_stop(self) -> None:
        with self._lock:
            self.stop_requested = True
            if self.state in ("starting", "running"):
                self.state = "stopping"
            loop, event = self.loop, self._stop_event
        if loop is not None and event is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed in between: nothing left to stop
                loop.call_soon_threadsafe(event.set)

    def snapshot(self, stats: Any) -> BotStatus:
        with self._lock:
            end = self.ended_at or time.monotonic()
            uptime = end - self.running_since if self.running_since else 0.0
            warning = self.warning
            if stats is not None and getattr(stats, "warning", None):
                warning = stats.warning if not warning else f"{stats.warning}; {warning}"
            return BotStatus(
                state=self.state,
                avatar=self.avatar_name,
                transport=self.settings.kind,
                url=self.url,
                mode=self.live.mode,
                viewer_connected=self.viewer_connected,
                uptime_s=round(uptime, 1),
                fps=getattr(stats, "fps", None),
                frames=int(getattr(stats, "frames", 0) or 0),
                mouth_latency_ms=getattr(stats, "mouth_latency_ms", None),
                realtime=getattr(stats, "realtime", None),
                warning=warning,
                last_error=self.error,
            )

    def stats(self) -> Any:
        """The current processor's `LiveStats` (read inside the loop), or the last one seen."""
        loop = self.loop
        if threading.current_thread() is self.thread:
            return self._read_stats()
        if loop is None or loop.is_closed() or not loop.is_running():
            return self._last_stats
        try:
            return asyncio.run_coroutine_threadsafe(self._read_stats_async(), loop).result(_STATS_TIMEOUT_S)
        except Exception:  # busy or closing loop: the last figures are good enough for a status line
            return self._last_stats

    def _read_stats(self) -> Any:
        session = self.session
        if session is not None:
            try:
                self._last_stats = session.processor.stats()
            except Exception as exc:  # stats must never break the status line
                logger.debug("Processor stats unavailable: {}", exc)
        return self._last_stats

    async def _read_stats_async(self) -> Any:
        return self._read_stats()

    # ---------------------------------------------------------------- the thread
    def launch(self) -> None:
        self.thread = threading.Thread(target=self._thread_main, name="musetalk-bot", daemon=True)
        self.thread.start()

    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        with self._lock:
            self.loop = loop
        try:
            loop.run_until_complete(self._main())
        except Exception as exc:
            if not isinstance(exc, MuseTalkError):
                logger.opt(exception=exc).debug("Bot thread failed")
            self.fail(_readable(exc))
        finally:
            try:
                _drain_loop(loop)
            finally:
                with self._lock:
                    if not self.detached:
                        self.ended_at = time.monotonic()
                        self.state = "error" if self.failed else "stopped"
                    self.loop = None
                    self._stop_event = None
                    self.session = None
                    self.viewer_connected = False
                asyncio.set_event_loop(None)
                loop.close()
                self.started.set()
                logger.info("Bot {}", "ended with an error" if self.failed else "stopped")

    async def _main(self) -> None:
        with self._lock:
            self._stop_event = asyncio.Event()
            if self.stop_requested:
                return
        if self.settings.kind == "local":
            await self._main_local()
        else:
            await self._main_daily()

    def _mark_running(self) -> None:
        with self._lock:
            if self.state == "starting":
                self.state = "running"
                self.running_since = time.monotonic()
        self.started.set()

    async def _main_local(self) -> None:
        server = LocalWebRTCServer(self.settings, self._on_connection, status=self._public_status)
        self._server = server
        await server.start()
        try:
            with self._lock:
                self.url = server.url
            self._mark_running()
            await self._stop_event.wait()
        finally:
            await self._end_session("the bot is stopping")
            await server.stop()

    async def _main_daily(self) -> None:
        from musetalk.bot.pipeline import transport_params

        processor = await self._new_processor()
        transport = make_daily_transport(self.settings, transport_params(processor, daily=True))
        join_settled = asyncio.Event()  # joined, or the join failed

        @transport.event_handler("on_error")
        async def on_error(_transport, error: Any) -> None:
            join_settled.set()
            self.fail(daily_error_message(self.settings.room_url or "", str(error)))

        @transport.event_handler("on_joined")
        async def on_joined(_transport, _data: Any) -> None:
            join_settled.set()
            logger.info("Joined the Daily room {}", self.settings.room_url)

        participants: set[str] = set()

        @transport.event_handler("on_participant_joined")
        async def on_participant_joined(_transport, participant: Any) -> None:
            participants.add(str(participant.get("id")))
            with self._lock:
                self.viewer_connected = True

        @transport.event_handler("on_participant_left")
        async def on_participant_left(_transport, participant: Any, _reason: Any) -> None:
            participants.discard(str(participant.get("id")))
            with self._lock:
                self.viewer_connected = bool(participants)

        session = await self._start_session(processor, transport, connection=None)
        self._mark_running()
        try:
            stop_wait = asyncio.ensure_future(self._stop_event.wait())
            await asyncio.wait({stop_wait, session.task}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if session.task.done() and not self.stop_requested and self.error is None:
                logger.info("The Daily pipeline ended")
            if not join_settled.is_set() and not session.task.done():
                # Stopped while joining: Daily cannot drop a join half way (releasing the call blocks
                # until the join ends), and cancelling it would lose its outcome. The operator's stop
                # has answered already (BotRunner.stop detaches); here the join's real result (e.g.
                # "the room lookup failed") still reaches on_error and becomes last_error.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(join_settled.wait(), timeout=_DAILY_JOIN_SETTLE_S)
        finally:
            await self._end_session("the bot is stopping")

    # ---------------------------------------------------------------- sessions
    def _public_status(self) -> dict[str, Any]:
        return self.snapshot(self._read_stats()).to_dict()

    async def _new_processor(self) -> MuseTalkProcessor:
        from musetalk.bot.processor import MuseTalkProcessor

        processor = MuseTalkProcessor(models=self.models, avatar=self.avatar, settings=self.live)
        await processor.initialize_models()
        await processor.initialize_avatars()
        return processor

    async def _start_session(self, processor: MuseTalkProcessor, transport: Any, connection: Any) -> _Session:
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
        from pipecat.workers.runner import WorkerRunner

        from musetalk.bot.pipeline import build_pipeline

        pipeline = build_pipeline(transport, processor)
        worker = PipelineWorker(
            pipeline,
            # The room's audio comes in at 16 kHz; the output rate is the transport's (16 kHz in mirror
            # mode), or the pipeline default where the transport leaves it open (a TTS's rate in speech mode).
            params=PipelineParams(audio_in_sample_rate=AUDIO_SAMPLE_RATE),
            idle_timeout_secs=None,
            enable_rtvi=False,
            processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
        )

        @worker.event_handler("on_pipeline_error")
        async def on_pipeline_error(_worker, frame: Any) -> None:
            unusable = frame.processor is not None and not frame.processor.is_usable
            if frame.fatal or unusable:
                self.fail(f"The pipeline failed: {frame.error}")
            else:
                message = self.scrub(str(frame.error))
                logger.warning("Pipeline error: {}", message)
                with self._lock:
                    self.warning = f"last pipeline error: {message}"

        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        session = _Session(processor=processor, worker=worker, runner=runner, connection=connection)
        session.task = asyncio.create_task(self._run_session(session), name="musetalk-pipeline")
        self.session = session
        return session

    async def _run_session(self, session: _Session) -> None:
        try:
            await session.runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).debug("Pipeline crashed")
            self.fail(f"The pipeline crashed: {_readable(exc)}")
        finally:
            if self.session is session:
                self.session = None
                with self._lock:
                    self.viewer_connected = False

    async def _end_session(self, reason: str) -> None:
        """Cancel the current pipeline and close its connection (idempotent)."""
        session, self.session = self.session, None
        with self._lock:
            self.viewer_connected = False
        if session is None:
            return
        with contextlib.suppress(Exception):
            self._last_stats = session.processor.stats()
        await session.runner.cancel(reason=reason)
        if session.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(session.task), timeout=_SESSION_END_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("The pipeline did not end within {} s; cancelling its task", _SESSION_END_TIMEOUT_S)
                session.task.cancel()
                await asyncio.gather(session.task, return_exceptions=True)
        if session.connection is not None:
            with contextlib.suppress(Exception):
                await session.connection.disconnect()

    async def _on_connection(self, connection: Any) -> None:
        """A browser connected to the local page: its pipeline replaces the previous one."""
        from musetalk.bot.pipeline import transport_params

        if self.stop_requested:
            raise MuseTalkError("The bot is stopping.")
        if self.session is not None:
            logger.info("Local page: a new viewer connected; the previous one is disconnected")
        await self._end_session("replaced by a new viewer")
        processor = await self._new_processor()
        transport = make_local_transport(connection, transport_params(processor))

        @transport.event_handler("on_client_connected")
        async def on_connected(_transport, _client: Any) -> None:
            logger.info("Local page: viewer connected")
            with self._lock:
                self.viewer_connected = True

        @transport.event_handler("on_client_disconnected")
        async def on_disconnected(_transport, _client: Any) -> None:
            logger.info("Local page: viewer disconnected")
            current = self.session
            if current is not None and current.connection is connection:
                # End it from a task of our own: this handler runs inside the transport.
                asyncio.get_running_loop().create_task(self._end_session("the viewer left"))

        await self._start_session(processor, transport, connection=connection)


_DAILY_HINTS = (
    (
        ("lookup address", "name or service not known", "dns"),
        "its address does not resolve (no internet, or a wrong Daily subdomain?)",
    ),
    (
        ("unauthorized", "401", "403", "forbidden", "token", "not allowed", "ejected", "owner-only"),
        "access was refused (a private room needs a valid --token)",
    ),
    (
        ("not found", "404", "no such room", "does not exist", "not-found"),
        "this room does not exist (check the room name)",
    ),
    (("timed out", "timeout"), "Daily did not answer in time (network or firewall?)"),
    (("connect", "network", "unreachable"), "Daily cannot be reached from here (network or firewall?)"),
)


def daily_error_message(room_url: str, error: str) -> str:
    """A Daily error as one sentence an operator can act on, with Daily's own words after it."""
    lowered = error.lower()
    hint = next((text for keys, text in _DAILY_HINTS if any(k in lowered for k in keys)), "Daily reported an error")
    raw = " ".join(error.split())
    raw = raw if len(raw) <= 300 else raw[:297] + "..."
    return f"Daily: could not use the room {room_url}: {hint}. (Daily said: {raw})"


def _drain_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop and join its executor threads."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())


class BotRunner:
    """Start, stop and watch the live bot from any thread; one bot at a time.

    `start()` returns once the bot runs (the local page is served, or the Daily pipeline is
    up and joining) and raises a `MuseTalkError` if it cannot start. Afterwards a failure
    (Daily unreachable, pipeline crash) shows as state "error" with `last_error`, and the
    runner can be started again.
    """

    def __init__(self, models: Models, *, start_timeout_s: float = 60.0):
        self._models = models
        self._start_timeout_s = start_timeout_s
        self._lock = threading.Lock()
        self._run: _BotRun | None = None
        self._closing: list[_BotRun] = []  # stopped runs whose threads are still tearing down

    def start(
        self,
        avatar: str | Avatar,
        transport_settings: TransportSettings,
        live_settings: LiveSettings | None = None,
        avatar_store: AvatarStore | None = None,
    ) -> BotStatus:
        from musetalk.bot.processor import LiveSettings

        if not isinstance(transport_settings, TransportSettings):
            raise ConfigError("transport_settings must be a TransportSettings.")
        live_settings = live_settings if live_settings is not None else LiveSettings()
        if not isinstance(avatar, (str, Avatar)):
            raise ConfigError("avatar must be an avatar name or a loaded Avatar.")
        name = avatar if isinstance(avatar, str) else avatar.name
        with self._lock:
            current = self._run
            if current is not None and current.alive:
                raise MuseTalkError(
                    f"The bot is already {current.state} (avatar {current.avatar_name}); stop it first."
                )
            run = _BotRun(self._models, transport_settings, live_settings, name)
            self._run = run
        self._wait_for_closing_pages(transport_settings)
        logger.info("Starting the bot: avatar {}, {}, mode {}", name, transport_settings, live_settings.mode)
        try:
            if isinstance(avatar, Avatar):
                run.avatar = avatar
            else:
                run.avatar = (avatar_store or AvatarStore(avatars_dir_from_env())).load(avatar)
        except MuseTalkError as exc:
            run.end("error", _readable(exc))
            raise
        if run.stop_requested:  # stopped while the avatar was loading
            run.end("stopped")
            return self.status()
        run.launch()
        if not run.started.wait(self._start_timeout_s):
            run.fail(f"The bot did not start within {self._start_timeout_s:.0f} s.")
        status = self.status()
        if status.state != "running" and status.last_error:
            if run.thread is not None:
                run.thread.join(self._start_timeout_s)
            raise MuseTalkError(status.last_error)
        return status

    def stop(self, timeout: float = STOP_GRACE_S) -> BotStatus:
        """Stop the bot; safe to call in any state, from any thread, as often as you like.

        Waits at most `timeout` s for the bot's thread. A bot that needs longer to let go (a Daily
        call still joining holds on for up to ~20 s) is reported "stopped" at once and finishes
        its teardown in the background: a new start is possible right away, and an error that
        teardown reports (the room lookup failed) still shows as `last_error`.
        """
        with self._lock:
            run = self._run
        if run is None:
            return self.status()
        run.request_stop()
        thread = run.thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
            if thread.is_alive():
                logger.info("The bot is stopped; its connection closes in the background")
                run.detach()
                with self._lock:
                    self._closing = [r for r in self._closing if r.thread is not None and r.thread.is_alive()]
                    self._closing.append(run)
        elif thread is None:
            run.detach()  # stopped before its thread existed (the avatar was still loading)
        run.acknowledge()
        return self.status()

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

    def avatar_in_use(self, name: str) -> str | None:
        """A sentence naming the bot that uses avatar `name`, or None when no running bot does."""
        with self._lock:
            run = self._run
        if run is None or not run.alive or run.avatar_name != name:
            return None
        where = run.url or run.settings.room_url or run.settings.kind
        return f"the {run.settings.kind} bot ({run.state}, {where}) is using avatar {name!r}"

    def status(self) -> BotStatus:
        with self._lock:
            run = self._run
        if run is None:
            return BotStatus()
        return run.snapshot(run.stats() if run.alive else None)  # live figures only while it runs

    @property
    def running(self) -> bool:
        with self._lock:
            run = self._run
        return run is not None and run.alive
