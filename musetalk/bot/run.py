"""One live bot from start to stop: its thread, its event loop, its transport and its sessions.

`BotRun` is driven by `BotRunner` (musetalk/bot/runner.py), which may hold many of them. In the
bot's thread runs its own asyncio loop; in it:

* local transport: the page server (`LocalWebRTCServer`, uvicorn in this loop) waits for
  browsers; every viewer gets its own pipeline and its own session on the shared generation
  service (`?avatar=NAME` on the page picks another prepared avatar). A viewer whose pipeline
  fails ends alone; the others go on.
* Daily transport: one pipeline joined to the room, fed by one participant's voice at a time
  (musetalk/bot/room.py, musetalk/bot/follow.py); a Daily error (unreachable room, bad token,
  ejected) ends the bot in state "error" with a readable message; alone too long, it leaves.
  However it ends, the call is left and then released, once.

A pipeline is `build_pipeline(transport, MuseTalkProcessor)` run by a `PipelineWorker` on its
own `WorkerRunner(handle_sigint=False)` (signals belong to the main thread). Other threads
only reach the loop through `asyncio.run_coroutine_threadsafe` / `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import statistics
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from loguru import logger

from musetalk.avatar.store import Avatar, AvatarStore, validate_name
from musetalk.bot.daily import daily_error_message
from musetalk.bot.meter import ViewerMeter
from musetalk.bot.page import LocalWebRTCServer
from musetalk.bot.room import DailyRoom
from musetalk.bot.status import STATES, BotStatus, combine_stats
from musetalk.bot.transcript import Transcript, TranscriptObserver
from musetalk.bot.transports import TransportSettings, make_daily_transport, make_local_transport
from musetalk.config import AUDIO_SAMPLE_RATE
from musetalk.errors import CapacityError, ConfigError, MuseTalkError

if TYPE_CHECKING:
    from musetalk.bot.agent_config import SpeechSetup
    from musetalk.bot.processor import LiveSettings, MuseTalkProcessor
    from musetalk.live.backend import GenerationBackend
    from musetalk.models import Models

# BotStatus, STATES, combine_stats (musetalk/bot/status.py) and daily_error_message (musetalk/bot/daily.py)
# lived here once: still importable from this module.
__all__ = ["STATES", "BotRun", "BotStatus", "combine_stats", "daily_error_message", "readable"]

_SESSION_END_TIMEOUT_S = 5.0
_STATS_TIMEOUT_S = 0.5
_DAILY_JOIN_SETTLE_S = 30.0  # a stopped bot still waits this long for its join to succeed or fail
_DAILY_SESSION = "daily"
_SAY_TIMEOUT_S = 2.0
STATUS_TURNS = 30  # transcript turns in a status (the newest)


@dataclass
class _Session:
    """One pipeline: a local viewer's connection, or the Daily room."""

    key: str
    processor: MuseTalkProcessor
    worker: Any  # PipelineWorker
    runner: Any  # WorkerRunner
    connection: Any = None  # SmallWebRTCConnection (local only)
    task: asyncio.Task | None = None
    viewer: bool = False  # a local viewer: its failure ends only this session
    avatar_name: str | None = None
    release: Callable[[], Awaitable[None]] | None = None  # Daily: release the call client, whatever else happened
    transport: Any = None
    meter: ViewerMeter | None = None  # a local viewer: the frames its video track actually sent


def readable(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, MuseTalkError) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class BotRun:
    """Everything of one start() .. stop(): the thread, its loop, the server and the sessions."""

    def __init__(
        self,
        models: Models,
        settings: TransportSettings,
        live: LiveSettings,
        avatar_name: str | None,
        *,
        bot_id: str,
        service: GenerationBackend | None = None,
        avatar_store: AvatarStore | None = None,
        speech: SpeechSetup | None = None,
        our_bot_names: Callable[[], set[str]] = set,
    ) -> None:
        self.models = models
        self._our_bot_names = our_bot_names  # a Daily bot never follows another of ours
        self.room: DailyRoom | None = None
        self.speech = speech
        self.transcript = Transcript()
        self.settings = settings
        self.live = live
        self.bot_id = bot_id
        self.service = service
        self.store = avatar_store
        self.avatar: Avatar | None = None
        self.avatar_name = avatar_name
        self._lock = threading.Lock()
        self.state = "starting"
        self.error: str | None = None
        self.warning: str | None = None
        self.url: str | None = None
        self.running_since: float | None = None
        self.ended_at: float | None = None
        self.stop_requested = False
        self.failed = False  # an error ended it (not an operator's stop): the final state is "error"
        self.detached = False  # stop() answered already; the thread finishes its teardown on its own
        self.started = threading.Event()  # set once running, or once it failed
        self.thread: threading.Thread | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: dict[str, _Session] = {}
        self._viewer_avatars: dict[str, Avatar] = {}  # avatars viewers asked for with ?avatar=NAME
        self._admitting: set[str] = set()  # avatar names being loaded for a viewer's offer
        self._stop_event: asyncio.Event | None = None
        self._last_stats: Any = None
        self._viewer_figures: tuple[dict, ...] = ()  # per local viewer, read with the stats

    # ---------------------------------------------------------------- thread-safe state
    @property
    def alive(self) -> bool:
        """Starting, running or stopping (the thread sets the final state as its very last step)."""
        with self._lock:
            return self.state in ("starting", "running", "stopping")

    @property
    def session(self) -> _Session | None:
        """The newest session (the Daily pipeline, or the last viewer to connect)."""
        sessions = list(self.sessions.values())
        return sessions[-1] if sessions else None

    def avatar_names(self) -> set[str]:
        """Every avatar this bot shows: its own and those its viewers picked."""
        return {self.avatar_name, *self._viewer_avatars} - {None}

    def scrub(self, text: str) -> str:
        """Secrets (the Daily token, the speech services' keys) never reach a status or a log."""
        secrets = [self.settings.token] + (self.speech.secrets() if self.speech is not None else [])
        for secret in secrets:
            if secret:
                text = text.replace(secret, "***")
        return text

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
        logger.error("Bot {} error: {}", self.bot_id, message)
        self.request_stop()

    def end(self, state: str, error: str | None = None) -> None:
        """Final state of a run that never got its thread going."""
        with self._lock:
            self.state = state
            self.error = self.error or error
            self.failed = state == "error"
            self._release_held_objects()
        self.started.set()

    def detach(self) -> None:
        """Answer "stopped" now; the thread goes on closing what it holds (a Daily call that is
        still joining cannot be released sooner) and then ends by itself."""
        with self._lock:
            if self.state in ("starting", "running", "stopping"):
                self.detached = True
                self.state = "error" if self.failed else "stopped"
                self.ended_at = time.monotonic()
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
            alive = self.state in ("starting", "running", "stopping")
            room = self.room
            viewers = (room.participants if room is not None else len(self.sessions)) if alive else 0
            figures = self._viewer_figures if alive else ()
            received = [v["fps"] for v in figures if v["fps"] is not None]
            return BotStatus(
                state=self.state,
                avatar=self.avatar_name,
                transport=self.settings.kind,
                url=self.url,
                mode=self.live.mode,
                viewer_connected=viewers > 0,
                uptime_s=round(uptime, 1),
                fps=min(received) if received else getattr(stats, "fps", None),
                frames=int(getattr(stats, "frames", 0) or 0),
                mouth_latency_ms=getattr(stats, "mouth_latency_ms", None),
                realtime=getattr(stats, "realtime", None),
                model_ms_per_frame=getattr(stats, "model_ms_per_frame", None),
                warning=warning,
                last_error=self.error,
                bot_id=self.bot_id,
                viewers=viewers,
                room_url=self.settings.room_url,
                following=room.following if room is not None and alive else None,
                viewer_stats=figures,
                speaking=bool(getattr(stats, "speaking", False)) and alive,
                first_mouth_ms=getattr(stats, "first_mouth_ms", None),
                first_mouth_p95_ms=getattr(stats, "first_mouth_p95_ms", None),
                **self._conversation_figures(),
            )

    def _conversation_figures(self) -> dict[str, Any]:
        if not self.live.lip_syncs_tts:
            return {}
        turns = self.transcript.turns()
        latencies = self.transcript.latencies_ms()
        return {
            "transcript": tuple({**t, "text": self.scrub(t["text"])} for t in turns[-STATUS_TURNS:]),
            "turn_latency_ms": latencies[-1] if latencies else None,
            "turn_latency_p50_ms": round(statistics.median(latencies), 1) if latencies else None,
            "speech_config": self.speech.config.describe() if self.speech is not None else None,
        }

    def stats(self) -> Any:
        """The sessions' stats combined (read inside the loop), or the last ones seen."""
        loop = self.loop
        if threading.current_thread() is self.thread:
            return self._read_stats()
        if loop is None or loop.is_closed() or not loop.is_running():
            return self._last_stats
        try:
            return asyncio.run_coroutine_threadsafe(self._read_stats_async(), loop).result(_STATS_TIMEOUT_S)
        except (TimeoutError, concurrent.futures.CancelledError, RuntimeError):  # busy or closing loop:
            return self._last_stats  # the last figures are good enough for a status line

    def _read_stats(self) -> Any:
        stats, viewers = [], []
        for session in list(self.sessions.values()):
            try:
                stats.append(session.processor.stats())
                if session.viewer:
                    session.meter = session.meter or ViewerMeter(session.key)
                    viewers.append(session.meter.read(session.transport, session.connection))
            except Exception as exc:  # stats must never break the status line
                logger.debug("Processor stats unavailable: {}", exc)
        if stats:
            self._last_stats = combine_stats(stats)
        self._viewer_figures = tuple(viewers)
        return self._last_stats

    async def _read_stats_async(self) -> Any:
        return self._read_stats()

    # ---------------------------------------------------------------- the thread
    def launch(self) -> None:
        thread = threading.Thread(target=self._thread_main, name=f"musetalk-bot-{self.bot_id}", daemon=True)
        thread.start()
        self.thread = thread  # only once started: stop() joins it from other threads

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
            self.fail(readable(exc))
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
                    self.sessions = {}
                    self._viewer_avatars = {}
                    self._release_held_objects()
                asyncio.set_event_loop(None)
                loop.close()
                self.started.set()
                logger.info("Bot {} {}", self.bot_id, "ended with an error" if self.failed else "stopped")

    def _release_held_objects(self) -> None:
        """An ended run keeps its status record only: not its avatar (maybe GPU tensors), models, service,
        room or speech services. Called with the lock held, as the thread's last step."""
        self.avatar = None
        self.models = None
        self.service = None
        self.store = None
        self.room = None
        self._viewer_figures = ()

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
        server = LocalWebRTCServer(
            self.settings, self._on_connection, status=self._public_status, admit=self._admit_viewer
        )
        await server.start()
        try:
            with self._lock:
                self.url = server.url
            self._mark_running()
            await self._stop_event.wait()
        finally:
            await self._end_sessions("the bot is stopping")
            await server.stop()

    async def _main_daily(self) -> None:
        from musetalk.bot.follow import FollowedVoiceFilter
        from musetalk.bot.pipeline import transport_params

        room_settings = self.settings.daily
        processor = await self._new_processor(self.avatar, publish_audio=room_settings.publishes_audio(self.live.mode))
        transport = make_daily_transport(self.settings, transport_params(processor, room=room_settings))
        room = DailyRoom(
            self.settings.room_url or "", room_settings, is_bot=self._is_bot, fail=self.fail, leave=self.leave
        )
        room.watch(transport)
        with self._lock:
            self.room = room
        session = await self._start_session(
            _DAILY_SESSION, processor, transport, connection=None, voice=FollowedVoiceFilter(room.choice)
        )
        session.release = transport.release_call
        self._mark_running()
        alone = asyncio.ensure_future(room.leave_when_alone())
        try:
            stop_wait = asyncio.ensure_future(self._stop_event.wait())
            await asyncio.wait({stop_wait, session.task}, return_when=asyncio.FIRST_COMPLETED)
            stop_wait.cancel()
            if session.task.done() and not self.stop_requested and self.error is None:
                logger.info("The Daily pipeline ended")
            if not room.settled.is_set() and not session.task.done():
                # Stopped while joining: Daily cannot drop a join half way (releasing the call blocks
                # until the join ends), and cancelling it would lose its outcome. The operator's stop
                # has answered already (BotRunner.stop detaches); here the join's real result (e.g.
                # "the room lookup failed") still reaches on_error and becomes last_error.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(room.settled.wait(), timeout=_DAILY_JOIN_SETTLE_S)
        finally:
            alone.cancel()
            await self._end_sessions("the bot is stopping")

    def _is_bot(self, name: str) -> bool:
        """Never followed: our own bots (this one included) and the names the operator listed."""
        names = {*self._our_bot_names(), *self.settings.daily.never_follow, self.settings.bot_name}
        return name.casefold() in {n.casefold() for n in names}

    def leave(self, note: str) -> None:
        """End the run on purpose (not an error): the note stays on its status."""
        with self._lock:
            self.warning = note
        logger.info("Bot {} {}", self.bot_id, note)
        self.request_stop()

    # ---------------------------------------------------------------- sessions
    def _public_status(self) -> dict[str, Any]:
        return self.snapshot(self._read_stats()).to_dict()

    async def _new_processor(self, avatar: Avatar | None, publish_audio: bool = True) -> MuseTalkProcessor:
        from musetalk.bot.processor import MuseTalkProcessor

        processor = MuseTalkProcessor(
            models=self.models, avatar=avatar, settings=self.live, service=self.service, publish_audio=publish_audio
        )
        await processor.initialize_models()
        await processor.initialize_avatars()
        return processor

    async def _start_session(
        self, key: str, processor: MuseTalkProcessor, transport: Any, connection: Any, voice: Any = None
    ) -> _Session:
        from pipecat.pipeline.worker import PipelineParams, PipelineWorker, ProcessorUnusablePolicy
        from pipecat.workers.runner import WorkerRunner

        viewer = key if connection is not None else None
        worker = PipelineWorker(
            self._pipeline_for(transport, processor, voice),
            # The room's audio comes in at 16 kHz; the output rate is the transport's (16 kHz in mirror
            # mode), or the pipeline default where the transport leaves it open (a TTS's rate in speech mode).
            params=PipelineParams(audio_in_sample_rate=AUDIO_SAMPLE_RATE, enable_metrics=self.live.lip_syncs_tts),
            idle_timeout_secs=None,
            enable_rtvi=False,
            processor_unusable_policy=ProcessorUnusablePolicy.CANCEL,
            observers=[TranscriptObserver(self.transcript, processor, viewer)] if self.live.lip_syncs_tts else [],
        )
        session = _Session(key=key, processor=processor, worker=worker, runner=None, connection=connection)
        session.viewer = connection is not None
        session.transport = transport

        @worker.event_handler("on_pipeline_error")
        async def on_pipeline_error(_worker, frame: Any) -> None:
            unusable = frame.processor is not None and not frame.processor.is_usable
            message = self.scrub(str(frame.error))
            if (frame.fatal or unusable) and session.viewer:
                # One viewer's pipeline failed: it ends alone, the bot and the other viewers go on.
                logger.warning("Local page: a viewer's pipeline failed: {}", message)
                with self._lock:
                    self.warning = f"a viewer's pipeline failed: {message}"
                asyncio.get_running_loop().create_task(self._end_session(key, "its pipeline failed"))
            elif frame.fatal or unusable:
                self.fail(f"The pipeline failed: {frame.error}")
            else:
                logger.warning("Pipeline error: {}", message)
                with self._lock:
                    self.warning = f"last pipeline error: {message}"

        session.runner = WorkerRunner(handle_sigint=False)
        await session.runner.add_workers(worker)
        session.task = asyncio.create_task(self._run_session(session), name=f"musetalk-pipeline-{key}")
        self.sessions[key] = session
        return session

    def _pipeline_for(self, transport: Any, processor: MuseTalkProcessor, voice: Any = None) -> Any:
        """Mirror: the room's voice; say: the operator's text through the TTS; conversation: STT -> LLM -> TTS.
        `voice` (a Daily room) lets only the followed participant's audio in."""
        from musetalk.bot.pipeline import build_pipeline

        mode = self.live.mode
        if mode == "mirror":
            return build_pipeline(transport, processor, voice)
        from musetalk.bot.agent import build_conversation_pipeline, build_say_pipeline, build_services

        if self.speech is None:
            raise ConfigError(f"Mode {mode} needs a bot config (its TTS, and for a conversation its STT and LLM).")
        services = build_services(self.speech, "conversation" if mode == "conversation" else "say")
        if mode == "conversation":
            return build_conversation_pipeline(transport, processor, services, voice)
        return build_say_pipeline(transport, processor, services, voice)

    # ---------------------------------------------------------------- speaking (any thread)
    def say(self, text: str) -> int:
        """Queue `text` in every session of this bot (behind what is being said); returns how many."""
        return self._to_sessions(lambda session: _queue_say(session, text), "say something")

    def interrupt(self) -> int:
        """Stop the speech now in every session (queued text, audio and frames are dropped; the bot runs on)."""
        return self._to_sessions(_queue_interruption, "interrupt")

    def _to_sessions(self, action: Callable[[_Session], Any], what: str) -> int:
        if not self.live.lip_syncs_tts:
            raise ConfigError(
                f"Bot {self.bot_id} runs in {self.live.mode} mode, which lip-syncs the room's voice: start it in say "
                f"or conversation mode to {what}."
            )
        loop = self.loop
        with self._lock:
            running = self.state == "running"
        if not running or loop is None or loop.is_closed():
            raise MuseTalkError(f"Bot {self.bot_id} is not running.")

        async def each() -> int:
            sessions = list(self.sessions.values())
            for session in sessions:
                await action(session)
            return len(sessions)

        count = asyncio.run_coroutine_threadsafe(each(), loop).result(_SAY_TIMEOUT_S)
        if count == 0:
            where = f" ({self.url})" if self.url else ""
            raise MuseTalkError(f"Nobody is watching bot {self.bot_id} yet: open its page{where}, then try again.")
        return count

    async def _run_session(self, session: _Session) -> None:
        try:
            await session.runner.run()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.opt(exception=exc).debug("Pipeline crashed")
            if session.viewer:
                with self._lock:
                    self.warning = f"a viewer's pipeline crashed: {readable(exc)}"
            else:
                self.fail(f"The pipeline crashed: {readable(exc)}")
        finally:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
            self._release_viewer_avatars()

    async def _end_sessions(self, reason: str) -> None:
        for key in list(self.sessions):
            await self._end_session(key, reason)

    async def _end_session(self, key: str, reason: str) -> None:
        """Cancel one pipeline and close its connection (idempotent)."""
        session = self.sessions.pop(key, None)
        self._release_viewer_avatars()
        if session is None:
            return
        try:  # its last figures stay on the status line
            self._last_stats = combine_stats([session.processor.stats()])
        except Exception as exc:  # teardown goes on whatever the stats do
            logger.warning("The viewer's last figures are lost: {}", exc)
        await session.runner.cancel(reason=reason)
        if session.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(session.task), timeout=_SESSION_END_TIMEOUT_S)
            except asyncio.TimeoutError:
                logger.warning("The pipeline did not end within {} s; cancelling its task", _SESSION_END_TIMEOUT_S)
                session.task.cancel()
                await asyncio.gather(session.task, return_exceptions=True)
        if session.release is not None:  # a Daily call: left by Pipecat's teardown (or just now), then released
            await session.release()
        if session.connection is not None:
            try:
                await session.connection.disconnect()
            except Exception as exc:  # a connection that is gone already: nothing left to close
                logger.debug("Closing viewer {}'s connection: {}", key, exc)

    async def _viewer_avatar(self, request_data: Any) -> Avatar | None:
        """The avatar a viewer asked for (`?avatar=NAME` on the page), or the bot's own."""
        name = request_data.get("avatar") if isinstance(request_data, dict) else None
        if not name or name == self.avatar_name:
            return self.avatar
        name = validate_name(str(name))
        if name not in self._viewer_avatars:
            if self.store is None:
                raise MuseTalkError(
                    f"This bot shows avatar {self.avatar_name!r} only (no avatar store to load {name!r})."
                )
            self._viewer_avatars[name] = await asyncio.to_thread(self.store.load, name)
        return self._viewer_avatars[name]

    def _release_viewer_avatars(self) -> None:
        """Avatars picked by viewers who all left are no longer in use (they can be deleted, memory freed)."""
        shown = {s.avatar_name for s in self.sessions.values()}
        for name in [n for n in self._viewer_avatars if n not in shown and n not in self._admitting]:
            del self._viewer_avatars[name]

    async def _admit_viewer(self, request_data: Any) -> Callable[[str | None, str], Awaitable[None]]:
        """Before the offer is answered: refuse a viewer past capacity or asking for an unknown avatar.

        Returns `release(pc_id, reason)`, which the page server awaits when the offer fails or its viewer
        does not connect in time: the session (if one started) ends, the avatar is no longer "loading"."""
        if self.stop_requested:
            raise MuseTalkError("The bot is stopping.")
        self._check_capacity()
        name = request_data.get("avatar") if isinstance(request_data, dict) else None
        if name:
            self._admitting.add(str(name))  # kept until its connection starts (or fails to load)
            try:
                await self._viewer_avatar(request_data)
            except BaseException:
                self._admitting.discard(str(name))
                self._release_viewer_avatars()
                raise

        async def release(pc_id: str | None, reason: str) -> None:
            if name:
                self._admitting.discard(str(name))
            if pc_id is not None:
                await self._end_session(pc_id, reason)
            self._release_viewer_avatars()

        return release

    def _check_capacity(self) -> None:
        """Refuse a viewer the shared service cannot serve in real time, before answering its offer."""
        service = self.service
        if service is None:
            return
        limit = service.session_limit()
        if limit is None:  # not measured yet, or a remote backend that admits (or refuses) when the session opens
            return
        # Sessions of this bot whose pipeline is still starting count too: two offers close together would
        # otherwise both pass, and the service would refuse one only when it opens.
        opening = sum(1 for s in self.sessions.values() if not s.processor.joined)
        running = service.stats().sessions + opening
        if running >= limit:
            raise CapacityError(
                f"This device serves {limit} sessions at 25 fps; {running} are running. "
                "Close a viewer or stop a bot, or add a GPU."
            )

    async def _on_connection(self, connection: Any, request_data: Any = None) -> None:
        """A browser connected to the local page: it gets a pipeline and a session of its own."""
        from musetalk.bot.pipeline import transport_params

        name = request_data.get("avatar") if isinstance(request_data, dict) else None
        session = None
        try:
            if self.stop_requested:
                raise MuseTalkError("The bot is stopping.")
            self._check_capacity()
            avatar = await self._viewer_avatar(request_data)
            processor = await self._new_processor(avatar)
            transport = make_local_transport(connection, transport_params(processor))
            key = str(connection.pc_id)

            @transport.event_handler("on_client_connected")
            async def on_connected(_transport, _client: Any) -> None:
                logger.info("Local page: viewer {} connected ({} now)", key, len(self.sessions))

            @transport.event_handler("on_client_disconnected")
            async def on_disconnected(_transport, _client: Any) -> None:
                logger.info("Local page: viewer {} left", key)
                # End it from a task of our own: this handler runs inside the transport.
                asyncio.get_running_loop().create_task(self._end_session(key, "the viewer left"))

            session = await self._start_session(key, processor, transport, connection=connection)
            session.avatar_name = avatar.name
        finally:  # shown by its session now, or failed: either way no longer loading
            if name:
                self._admitting.discard(str(name))
            if session is None:
                self._release_viewer_avatars()


async def _queue_say(session: _Session, text: str) -> None:
    from pipecat.frames.frames import TTSSpeakFrame

    await session.worker.queue_frame(TTSSpeakFrame(text))


async def _queue_interruption(session: _Session) -> None:
    """As Pipecat's own user-turn interruptions do: the worker turns this into an InterruptionFrame at once."""
    from pipecat.frames.frames import InterruptionWorkerFrame
    from pipecat.processors.frame_processor import FrameDirection

    await session.worker.queue_frame(InterruptionWorkerFrame(), FrameDirection.UPSTREAM)


def _drain_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Cancel what is left on the loop and join its executor threads."""
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.run_until_complete(loop.shutdown_default_executor())
