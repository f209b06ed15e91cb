#!/usr/bin/env python
"""MuseTalk Live control panel (Gradio): prepare avatars, run the live bot, render clips.

    python app.py [--host 127.0.0.1] [--port 7860] [--share] [--auth user:password]
                  [--models-dir models] [--avatars-dir avatars] [--fetch-weights]
                  [--ice-servers 'stun:... user:secret@turn:...'] [--page-key KEY]

Flags, the engine and the launch; the panel lives in `musetalk/panel/`. One copy of the
models is loaded in the background at start and shared by preview, preparation, render and
the live bot. Every action has a stable API name (`preview`, `prepare`, `list_avatars`, ...;
see README, "Control panel"), so `gradio_client` can drive the panel.

On Hugging Face Spaces (SPACE_ID set) missing weights are fetched at start-up in the
background (the banner shows the progress) and the Live tab defaults to a Daily room.
Environment: MUSETALK_MODELS_DIR, MUSETALK_AVATARS_DIR, MUSETALK_DEVICE, HF_ENDPOINT (a hub
mirror), MUSETALK_OFFLINE=1, MUSETALK_ICE_SERVERS, MUSETALK_PAGE_KEY, GRADIO_SERVER_NAME/PORT, SPACE_ID,
and the key variables the bot config names (api_key_env, e.g. LLM_API_KEY).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path
from typing import Any

from loguru import logger

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PANEL_PORT = 7860


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="app.py",
        description="MuseTalk Live control panel (Gradio): prepare avatars, run the live bot, render clips.",
    )
    parser.add_argument(
        "--host", default=None, help=f"address to serve on (default {DEFAULT_HOST}; 0.0.0.0 on Hugging Face Spaces)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help=f"port (default {DEFAULT_PANEL_PORT}, or GRADIO_SERVER_PORT)"
    )
    parser.add_argument(
        "--share", action="store_true", help="also publish a temporary public gradio.live link (needs internet)"
    )
    parser.add_argument("--auth", metavar="USER:PASSWORD", default=None, help="ask for this user name and password")
    parser.add_argument(
        "--models-dir", type=Path, default=None, help="model weights folder (default MUSETALK_MODELS_DIR or ./models)"
    )
    parser.add_argument(
        "--avatars-dir",
        type=Path,
        default=None,
        help="prepared avatars folder (default MUSETALK_AVATARS_DIR or ./avatars)",
    )
    parser.add_argument(
        "--fetch-weights",
        action="store_true",
        help="fetch missing weights in the background at start (always on Hugging Face Spaces)",
    )
    parser.add_argument(
        "--ice-servers",
        metavar="SERVERS",
        default=None,
        help="STUN/TURN servers for the local live page behind NAT, e.g. 'stun:stun.example.com:3478 "
        "user:secret@turn:turn.example.com:3478' (or MUSETALK_ICE_SERVERS; a JSON list of RTCIceServer works too)",
    )
    parser.add_argument(
        "--page-key",
        metavar="KEY",
        default=None,
        help="the key viewers of the local live pages need (?key=KEY; or MUSETALK_PAGE_KEY). Without one, a page "
        "served beyond loopback gets a random key, shown in its link in the Live tab",
    )
    parser.add_argument(
        "--max-bots", type=int, default=4, metavar="N", help="most live bots running at once (default 4)"
    )
    parser.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        metavar="N",
        help="most live sessions (viewers and rooms, all bots together) served at once (default: what the "
        "measured speed of this device serves at 25 fps)",
    )
    parser.add_argument(
        "--bot-config",
        type=Path,
        default=None,
        metavar="FILE",
        help="say / conversation bots: system prompt and STT, LLM, TTS services (default "
        "configs/bot/conversation.yaml; keys come from the environment variables it names)",
    )
    parser.add_argument(
        "--backend",
        default="inproc",
        metavar="inproc|ray|ray://HOST:PORT",
        help="where live frames are generated: inproc (this process, default), ray (this machine's Ray cluster, "
        "started if absent) or ray://HOST:PORT (needs pip install -r requirements-scale.txt)",
    )
    return parser


def resolve_address(
    host: str | None, port: int | None, environ: dict[str, str] | os._Environ = os.environ
) -> tuple[str, int]:
    """Host and port: flags first, then GRADIO_SERVER_NAME/PORT; Spaces (SPACE_ID) serve on 0.0.0.0."""
    if host is None:
        host = environ.get("GRADIO_SERVER_NAME") or ("0.0.0.0" if environ.get("SPACE_ID") else DEFAULT_HOST)
    if port is None:
        port = int(environ.get("GRADIO_SERVER_PORT") or DEFAULT_PANEL_PORT)
    return host, port


def parse_auth(value: str | None) -> tuple[str, str] | None:
    from musetalk.errors import ConfigError

    if value is None:
        return None
    user, sep, password = value.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth must be USER:PASSWORD, e.g. --auth admin:correct-horse")
    return user, password


def engine_options(args: argparse.Namespace, environ: dict[str, str] | os._Environ = os.environ):
    """What the engine may do on its own, from the flags and the environment (the only place that reads it)."""
    from musetalk.bot.agent_config import environment_keys
    from musetalk.bot.transports import check_page_key, parse_ice_servers
    from musetalk.panel.engine import EngineOptions
    from musetalk.weights import FetchOptions

    offline = environ.get("MUSETALK_OFFLINE") == "1" or environ.get("CI") == "true"
    fetch = FetchOptions(
        endpoint=environ.get("HF_ENDPOINT") or None,
        offline="offline mode (MUSETALK_OFFLINE=1 or CI=true)" if offline else None,
    )
    ice = parse_ice_servers(args.ice_servers if args.ice_servers is not None else environ.get("MUSETALK_ICE_SERVERS"))
    return EngineOptions(
        fetch=fetch,
        fetch_at_start=args.fetch_weights or bool(environ.get("SPACE_ID")),
        ice_servers=ice,
        page_key=check_page_key(args.page_key if args.page_key is not None else environ.get("MUSETALK_PAGE_KEY")),
        max_bots=args.max_bots,
        max_sessions=args.max_sessions,
        backend=args.backend,
        bot_config=args.bot_config,
        keys=environment_keys(environ),
    )


def launch(demo, engine, *, host: str = DEFAULT_HOST, port: int = DEFAULT_PANEL_PORT, share: bool = False,
           auth: tuple[str, str] | None = None, prevent_thread_lock: bool = False, quiet: bool = False) -> None:  # fmt: skip
    from musetalk.panel.ui import CSS

    demo.queue(default_concurrency_limit=1)
    demo.launch(
        server_name=host,
        server_port=port,
        share=share,
        auth=auth,
        auth_message="MuseTalk Live control panel",
        allowed_paths=[str(engine.sources_dir)],
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        css=CSS,
        footer_links=["api", "settings"],
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from musetalk.config import avatars_dir_from_env, models_dir_from_env, runtime_from_env
    from musetalk.errors import ConfigError

    try:
        auth = parse_auth(args.auth)
        runtime = runtime_from_env()
        options = engine_options(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from musetalk.panel.engine import Engine
    from musetalk.panel.ui import build_ui

    host, port = resolve_address(args.host, args.port)
    on_spaces = bool(os.environ.get("SPACE_ID"))
    if host not in ("127.0.0.1", "localhost", "::1") and auth is None and not on_spaces:
        logger.warning(
            "Serving on {} without --auth: anyone who reaches this address controls the panel and the bot.", host
        )
    models_dir = args.models_dir or models_dir_from_env()
    engine = Engine(models_dir, args.avatars_dir or avatars_dir_from_env(), runtime, options)
    engine.start_loading()
    demo = build_ui(engine, on_spaces=on_spaces)
    signal.signal(signal.SIGTERM, _interrupt)  # `docker stop`, Spaces: shut down like Ctrl-C (the bot stops cleanly)
    try:
        launch(demo, engine, host=host, port=port, share=args.share, auth=auth)
    finally:
        engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
