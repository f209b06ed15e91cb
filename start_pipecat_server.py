#!/usr/bin/env python
"""Start the MuseTalk live avatar bot (Pipecat): in a Daily room, or on a local page.

    python start_pipecat_server.py --room-url https://your-domain.daily.co/room-name [--token T]
    python start_pipecat_server.py --local [--host 127.0.0.1] [--port 7861]

The first avatar of --config is used: `preparation: True` prepares it from its video_path
first, `False` uses the avatar already prepared under that name. Logs go to stderr and to
musetalk_pipecat.log. Ctrl-C stops the bot cleanly.
    python start_pipecat_server.py --local --mode conversation [--bot-config configs/bot/conversation.yaml]

Environment: MUSETALK_MODELS_DIR, MUSETALK_AVATARS_DIR, MUSETALK_DEVICE, DAILY_TOKEN, MUSETALK_ICE_SERVERS,
MUSETALK_PAGE_KEY, and the key variables the bot config names (api_key_env).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import signal
import sys
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # musetalk is imported once the packages it needs are checked (run_checks)
    from musetalk.bot.manager import BotManager
    from musetalk.live.backend import GenerationBackend

LOG_FILE = "musetalk_pipecat.log"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
DEFAULT_CONFIG = "configs/inference/realtime.yaml"
STATS_EVERY_S = 10.0
CPU_WARNING = "No CUDA GPU: real time needs a CUDA GPU; on CPU the bot shows idle video and passes audio through."

HOW_TO = """\
Say where the avatar should appear:
  a Daily room:         python start_pipecat_server.py --room-url https://your-domain.daily.co/room-name [--token T]
  a page on this host:  python start_pipecat_server.py --local   (then open http://127.0.0.1:7861/)
See --help for every option."""

_PACKAGES = (
    # (module, what to install)
    ("torch", "torch"),
    ("diffusers", "diffusers"),
    ("transformers", "transformers"),
    ("cv2", "opencv-python-headless"),
    ("yaml", "pyyaml"),
    ("pipecat", "pipecat-ai[webrtc,daily,runner,silero]==1.14.0"),
    ("aiortc", "pipecat-ai[webrtc]"),
    ("onnxruntime", "onnxruntime (pipecat-ai[silero])"),
    ("fastapi", "pipecat-ai[runner]"),
    ("uvicorn", "pipecat-ai[runner]"),
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="start_pipecat_server.py",
        description="MuseTalk live avatar bot (Pipecat): lip-syncs a prepared avatar in real time, "
        "in a Daily.co room or on a local WebRTC page.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=HOW_TO,
    )
    parser.add_argument(
        "--room-url",
        metavar="URL",
        help="Daily.co room URL (required unless --local), e.g. https://your-domain.daily.co/room-name",
    )
    parser.add_argument(
        "--token",
        metavar="T",
        default=None,
        help="Daily.co room token (optional; private rooms). Also read from DAILY_TOKEN.",
    )
    parser.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help=f"avatar configuration file; the first avatar is used (default: {DEFAULT_CONFIG})",
    )
    parser.add_argument("--verbose", action="store_true", help="verbose (DEBUG) logging")
    parser.add_argument("--skip-checks", action="store_true", help="skip the dependency, weights and GPU checks")
    parser.add_argument(
        "--local",
        action="store_true",
        help="no Daily account needed: serve a page on --host:--port where a browser connects",
    )
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address of the local page (default: 127.0.0.1; 0.0.0.0 for every interface)",
    )
    parser.add_argument(
        "--port", type=int, default=7861, help="port of the local page (default: 7861; 0 picks a free one)"
    )
    parser.add_argument(
        "--ice-servers",
        metavar="SERVERS",
        default=None,
        help="local page behind NAT: STUN/TURN servers, e.g. 'stun:stun.example.com:3478 "
        "user:secret@turn:turn.example.com:3478' or a JSON list of RTCIceServer objects. Also read from MUSETALK_ICE_SERVERS.",
    )
    parser.add_argument(
        "--page-key",
        metavar="KEY",
        default=None,
        help="local page: the key viewers need (?key=KEY on the page address); also read from MUSETALK_PAGE_KEY. "
        "Without one a page on a non-loopback --host gets a random key, printed with the viewer address",
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        metavar="N",
        help="most live sessions (local viewers or rooms) served at once; further viewers are refused with a "
        "message (default: as many as the measured speed of this device serves at 25 fps)",
    )
    parser.add_argument(
        "--backend",
        default="inproc",
        metavar="inproc|ray|ray://HOST:PORT",
        help="where frames are generated: inproc (this process, default), ray (this machine's Ray cluster, "
        "started if absent) or ray://HOST:PORT (a running cluster; needs pip install -r requirements-scale.txt)",
    )
    parser.add_argument(
        "--latency-budget",
        type=float,
        default=None,
        metavar="SECONDS",
        help="how long a frame may wait for the model before it is shown idle (default 0.2); its audio waits "
        "with it, so sync holds at any budget: a slow device with a larger budget shows a late, lip-synced mouth",
    )
    parser.add_argument(
        "--mode",
        choices=("mirror", "say", "conversation", "speech"),
        default="mirror",
        help="mirror: lip-sync the voice heard in the room (default); say: speak the lines typed here (Enter; "
        "'/stop' interrupts) with the bot config's TTS; conversation: answer whoever speaks (STT -> LLM -> TTS, "
        "barge-in); speech: the same as say",
    )
    parser.add_argument(
        "--bot-config",
        default=None,
        metavar="FILE",
        help="say / conversation modes: system prompt and STT, LLM, TTS services "
        "(default: configs/bot/conversation.yaml; keys come from the environment variables it names)",
    )
    add_room_options(parser)
    return parser


def add_room_options(parser: argparse.ArgumentParser) -> None:
    """Options of a bot in a Daily room (--room-url)."""
    room = parser.add_argument_group("Daily room")
    room.add_argument(
        "--bot-name",
        default="MuseTalk avatar",
        metavar="NAME",
        help="the bot's display name in the room (default: MuseTalk avatar)",
    )
    room.add_argument(
        "--follow",
        default="active",
        metavar="active|first|NAME",
        help="whose voice the bot takes, one person at a time: active (the active speaker, switching "
        "between utterances; default), first (the first to join) or a participant's name",
    )
    room.add_argument(
        "--never-follow",
        action="append",
        metavar="NAME",
        help="a participant that is a bot (another avatar, a recorder): never followed; repeatable",
    )
    room.add_argument(
        "--publish-audio",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="publish the avatar's audio: on in say/conversation modes; off in mirror mode (the room "
        "already hears the speaker; --publish-audio turns it on)",
    )
    room.add_argument(
        "--leave-when-alone",
        type=float,
        default=10.0,
        metavar="MIN",
        help="leave after this many minutes with nobody in the room (default 10; 0 = never)",
    )
    room.add_argument(
        "--video-bitrate",
        type=int,
        default=1_000_000,
        metavar="BPS",
        help="bits/s of the one 25 fps video layer the bot publishes (default 1000000)",
    )
    room.add_argument(
        "--simulcast", action="store_true", help="publish Daily's default simulcast layers instead of one 25 fps layer"
    )
    room.add_argument(
        "--share-room",
        action="store_true",
        help="allow this bot in a room another bot of this process serves (on purpose only)",
    )


def setup_logging(verbose: bool) -> None:
    from loguru import logger

    level = "DEBUG" if verbose else "INFO"
    logger.remove()
    logger.add(
        sys.stderr, level=level, format="{time:HH:mm:ss} | {level: <7} | {message}", backtrace=False, diagnose=False
    )
    logger.add(
        LOG_FILE,
        level=level,
        format="{time:YYYY-MM-DD HH:mm:ss.SSS} | {level: <7} | {name}:{line} | {message}",
        rotation="10 MB",
        retention=3,
        backtrace=False,
        diagnose=False,  # never print variable values (a token) in a traceback
    )


def run_checks(daily: bool) -> None:
    """Packages importable, weights present, GPU or a clear CPU warning. Raises MuseTalkError."""
    from loguru import logger

    from musetalk.config import FETCH_COMMAND, ModelPaths, models_dir_from_env
    from musetalk.errors import MissingWeightsError, MuseTalkError

    missing = []
    for module, install in _PACKAGES + ((("daily", "daily-python (pipecat-ai[daily])"),) if daily else ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{install}: {exc}")
    if missing:
        listing = "\n".join(f"  - {m}" for m in missing)
        raise MuseTalkError(
            f"Python packages are missing:\n{listing}\nInstall them with: bash run.sh (or pip install -r requirements.txt)"
        )
    logger.info("Python packages: OK")

    from musetalk.models import check_weights

    paths = ModelPaths(models_dir_from_env())
    problems = check_weights(paths)
    if problems:
        raise MissingWeightsError(problems, str(paths.models_dir), FETCH_COMMAND)
    logger.info("Weights in {}: OK", paths.models_dir)

    import torch

    if torch.cuda.is_available():
        logger.info("GPU: {}", torch.cuda.get_device_name(0))
    else:
        logger.warning(CPU_WARNING)


def check_avatar(entry, config_path: str) -> None:
    """Before loading anything: an avatar to be used as is must be prepared already."""
    from musetalk.avatar.store import AvatarStore
    from musetalk.config import avatars_dir_from_env
    from musetalk.errors import AvatarError, MediaError

    store = AvatarStore(avatars_dir_from_env())
    if entry.preparation:
        if not entry.video_path.is_file():
            raise MediaError(
                f"{config_path}: avatar {entry.name} is to be prepared from {entry.video_path}, which does not exist."
            )
    elif not store.exists(entry.name):
        raise AvatarError(
            f"{config_path}: avatar {entry.name} has preparation: False but is not prepared in {store.root}. "
            f"Set preparation: True (with its video_path) or run: python -m musetalk prepare VIDEO --name {entry.name}"
        )


def load_avatar(models, entry, config_path: str):
    """The first avatar of the config: prepared now if `preparation: True`, else loaded."""
    from loguru import logger

    from musetalk.avatar.store import AvatarStore
    from musetalk.config import PrepareSettings, avatars_dir_from_env

    store = AvatarStore(avatars_dir_from_env())
    if entry.preparation:
        from musetalk.avatar.prepare import prepare_avatar

        logger.info("Preparing avatar {} from {} (preparation: True in {})", entry.name, entry.video_path, config_path)
        last = [-1]

        def progress(fraction: float, message: str) -> None:
            step = int(fraction * 10)
            if step != last[0]:
                last[0] = step
                logger.info("prepare {}: {:3.0%} {}", entry.name, fraction, message)

        prepare_avatar(
            models, store, entry.video_path, entry.name, PrepareSettings(bbox_shift=entry.bbox_shift), progress=progress
        )
    return store.load(entry.name)


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def check_backend(spec: str) -> None:
    """A Ray backend is refused up front when Ray is not installed (before the models load)."""
    from musetalk.serve.backend import INSTALL_HINT, BackendError, BackendSpec, ray_available

    if BackendSpec.parse(spec).kind == "ray" and not ray_available():
        raise BackendError(f"--backend {spec} needs Ray, which is not installed here. Install it with: {INSTALL_HINT}")


def read_say_lines(runner: BotManager, stream=None) -> threading.Thread:
    """Say mode on the command line: each line typed is said; "/stop" interrupts."""
    from loguru import logger

    from musetalk.errors import MuseTalkError

    stream = stream if stream is not None else sys.stdin

    def read() -> None:
        for line in stream:
            text = line.strip()
            if not text:
                continue
            try:
                if text == "/stop":
                    runner.interrupt(None)
                else:
                    runner.say(None, text)
            except MuseTalkError as exc:
                logger.warning("{}", exc)

    thread = threading.Thread(target=read, name="musetalk-say-lines", daemon=True)
    thread.start()
    return thread


def serve(args: argparse.Namespace, transport, entries, live, service_settings, speech=None) -> int:
    """Load models and the avatar, start the bot, report until Ctrl-C or an error."""
    from loguru import logger

    from musetalk.bot.workers import make_bot_runner
    from musetalk.config import ModelPaths, models_dir_from_env, runtime_from_env
    from musetalk.models import load_models
    from musetalk.serve.backend import make_backend

    if not args.skip_checks:
        run_checks(daily=transport.kind == "daily")
    if speech is not None:  # before the models load: a wrong address or key fails at once, with its sentence
        from musetalk.bot.manager import check_speech

        check_speech(live, speech)
    check_avatar(entries[0], args.config)
    logger.info("Loading the models from {}", models_dir_from_env())
    models = load_models(ModelPaths(models_dir_from_env()), runtime_from_env())
    avatar = load_avatar(models, entries[0], args.config)
    if speech is not None:
        logger.info("Mode {}: {}", args.mode, "; ".join(f"{k} {v}" for k, v in speech.config.describe().items()))

    logger.info("Generation backend: {}", args.backend)
    service: GenerationBackend = make_backend(
        args.backend, models=models, models_dir=models_dir_from_env(), runtime=runtime_from_env(),
        settings=service_settings,
    )  # fmt: skip
    # On `--backend ray` the bot runs in a worker process of its own on this machine (musetalk/bot/workers.py).
    runner: BotManager = make_bot_runner(models, service, backend=args.backend)
    try:
        status = runner.start(avatar, transport, live, speech=speech)
        if live.mode in ("say", "speech"):
            read_say_lines(runner)
            logger.info("Type a line and press Enter: the avatar says it ('/stop' stops it speaking)")
        if status.worker_pid:
            logger.info("The bot runs in its own worker process (Ray), pid {}", status.worker_pid)
        if status.url:
            logger.info("Local page: {}  (open it in a browser, allow the microphone; Ctrl-C stops)", status.url)
            show_page_key(args, transport, status.url)
            if transport.host not in LOOPBACK_HOSTS:
                logger.info(
                    "Note: browsers allow the microphone only on https or http://127.0.0.1 pages; from another "
                    "machine use an SSH tunnel (ssh -L {0}:127.0.0.1:{0} this-host) or an https proxy.",
                    status.url.rstrip("/").rsplit(":", 1)[1],
                )
        else:
            logger.info(
                "Bot started for the Daily room {} as {!r} (Ctrl-C stops)", transport.room_url, transport.bot_name
            )
        next_report = time.monotonic() + STATS_EVERY_S
        while True:
            status = runner.status()
            if status.state == "error":
                logger.error("The bot stopped: {}", status.last_error)
                return 1
            if status.state == "stopped":
                logger.info("The bot stopped{}", f" ({status.warning})" if status.warning else "")
                return 0
            if time.monotonic() >= next_report:
                next_report += STATS_EVERY_S
                fps = "-" if status.fps is None else f"{status.fps:.1f}"
                latency = "-" if status.mouth_latency_ms is None else f"{status.mouth_latency_ms:.0f} ms"
                reply = "" if status.turn_latency_ms is None else f" | reply latency {status.turn_latency_ms:.0f} ms"
                following = f" | following {status.following}" if status.following else ""
                logger.info(
                    "up {:.0f} s | viewers {}{} | {} fps | {} frames | mouth latency {}{}{}",
                    status.uptime_s, status.viewers, following, fps, status.frames, latency, reply,
                    f" | {status.warning}" if status.warning else "",
                )  # fmt: skip
            time.sleep(0.25)
    except KeyboardInterrupt:
        logger.info("Stopping")
        final = runner.stop(timeout=15)
        runner.join_closing(15)  # a bot worker process ends once its teardown is done
        service.close()
        if final.last_error:
            logger.warning("While stopping: {}", final.last_error)
        logger.info("Stopped cleanly")
        return 0


def show_page_key(args: argparse.Namespace, transport, url: str) -> None:
    """Tell the operator how viewers get in. A generated key is printed with the viewer URL on stderr only (print,
    not the logger: the key never reaches the log file)."""
    from loguru import logger

    from musetalk.bot.transports import page_url

    if not transport.page_key:
        return
    if getattr(args, "page_key_generated", False):
        print(f"Viewer URL (it holds the page key, made for this run; share it only with viewers): "
              f"{page_url(url, transport.page_key)}", file=sys.stderr, flush=True)  # fmt: skip
        logger.info("The page needs a key: viewers open {}?key=... (the address printed above)", url)
    else:
        logger.info("The page needs its key: viewers open {}?key=<the page key>", url)


def room_settings(args: argparse.Namespace):
    """The Daily room options of the command line."""
    from musetalk.bot.daily import DailyRoomSettings

    return DailyRoomSettings(
        follow=args.follow,
        never_follow=tuple(args.never_follow or ()),
        publish_audio=args.publish_audio,
        leave_when_alone_min=args.leave_when_alone,
        video_bitrate=args.video_bitrate,
        simulcast=args.simulcast,
        share_room=args.share_room,
    )


def load_speech_setup(path: str | None):
    """The bot config, with keys looked up in this process's environment (never written anywhere)."""
    from musetalk.bot.agent_config import SpeechSetup, environment_keys, load_bot_config
    from musetalk.config import models_dir_from_env

    return SpeechSetup(load_bot_config(path), environment_keys(os.environ), models_dir_from_env())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.room_url and not args.local:
        parser.print_usage(sys.stderr)
        print(HOW_TO, file=sys.stderr)
        return 2
    if args.room_url and args.local:
        parser.print_usage(sys.stderr)
        print("error: choose --room-url (a Daily room) or --local (a page on this machine), not both.", file=sys.stderr)
        return 2

    from musetalk.bot.transports import TransportSettings, parse_ice_servers, with_page_key
    from musetalk.config import load_realtime_config
    from musetalk.errors import MuseTalkError
    from musetalk.live.service import ServiceSettings
    from musetalk.live.session import LiveSettings

    token = args.token if args.token is not None else os.environ.get("DAILY_TOKEN") or None
    try:  # everything that can be checked without loading anything
        if args.local:
            ice = parse_ice_servers(
                args.ice_servers if args.ice_servers is not None else os.environ.get("MUSETALK_ICE_SERVERS")
            )
            key = args.page_key if args.page_key is not None else os.environ.get("MUSETALK_PAGE_KEY")
            given = TransportSettings(kind="local", host=args.host, port=args.port, ice_servers=ice, page_key=key)
            transport = with_page_key(given)  # beyond loopback, a page always has a key
            args.page_key_generated = transport.page_key != given.page_key
        else:
            transport = TransportSettings(
                kind="daily", room_url=args.room_url, token=token, bot_name=args.bot_name, daily=room_settings(args)
            )
        live = LiveSettings(mode=args.mode)
        speech = load_speech_setup(args.bot_config) if live.lip_syncs_tts else None
        if args.latency_budget is not None:
            live = dataclasses.replace(live, latency_budget_s=args.latency_budget)
        service_settings = ServiceSettings(max_sessions=args.max_sessions)
        check_backend(args.backend)
        entries = load_realtime_config(args.config)
    except MuseTalkError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    setup_logging(args.verbose)
    from loguru import logger

    # Ctrl-C (even when started from a script that ignores it) and a service manager's stop.
    previous = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return serve(args, transport, entries, live, service_settings, speech)
    except MuseTalkError as exc:
        logger.error("{}", exc)
        return 2
    except KeyboardInterrupt:  # Ctrl-C before the bot was up
        logger.info("Interrupted before the bot started")
        return 0
    except Exception as exc:  # a bug, not a setup problem: one line here, the traceback with --verbose
        logger.opt(exception=exc).debug("Unexpected error")
        logger.error("Unexpected error ({}): {} (run with --verbose for details)", type(exc).__name__, exc)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    sys.exit(main())
