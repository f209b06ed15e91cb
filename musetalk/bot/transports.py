"""Where the bot's audio and video go: a Daily room, or a local page served by the bot itself.

* `TransportSettings` says which (and never shows the Daily token: not in repr, status or errors).
* `validate_room_url` refuses a malformed Daily URL before anything starts.
* `make_daily_transport` builds Pipecat's `DailyTransport`.
* `LocalWebRTCServer` is the no-account option: a FastAPI app on `host:port` serving a page
  (`/`, `/client`) that sends the microphone and shows the avatar, plus Pipecat's SmallWebRTC
  signalling (`POST /api/offer` with the SDP offer, `PATCH /api/offer` with ICE candidates),
  so Pipecat's own prebuilt client can connect too. It runs with uvicorn inside the caller's
  event loop (the bot thread); each new connection is handed to `on_connection`.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import json
import re
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from loguru import logger

from musetalk.bot.daily import DailyRoomSettings
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.daily.transport import DailyParams, DailyTransport
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

STATIC_DIR = Path(__file__).parent / "static"
TRANSPORT_KINDS = ("local", "daily")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7861
DAILY_URL_EXAMPLE = "https://your-domain.daily.co/room-name"
DAILY_LEAVE_TIMEOUT_S = 10.0

_HOST_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_ROOM_SEGMENT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


@dataclass(frozen=True)
class IceServerSpec:
    """A STUN or TURN server for the local page's WebRTC connections (the browser's RTCIceServer)."""

    urls: tuple[str, ...]
    username: str | None = field(default=None, repr=False)
    credential: str | None = field(default=None, repr=False)

    def to_browser(self) -> dict[str, Any]:
        data: dict[str, Any] = {"urls": list(self.urls)}
        if self.username is not None:
            data.update(username=self.username, credential=self.credential or "")
        return data


def parse_ice_servers(text: str | None) -> tuple[IceServerSpec, ...]:
    """ICE servers from `--ice-servers` / `MUSETALK_ICE_SERVERS`.

    Either a JSON list of RTCIceServer objects (`[{"urls": "turn:host:3478", "username": "u",
    "credential": "p"}]`) or URLs separated by spaces or commas, TURN credentials written as
    `user:secret@turn:host:3478`. Empty: no ICE servers (host candidates only).
    """
    text = (text or "").strip()
    if not text:
        return ()
    if text.startswith("["):
        try:
            items = json.loads(text)
            servers = [_ice_from_dict(item) for item in items]
        except (ValueError, TypeError, AttributeError, KeyError) as exc:
            raise ConfigError(
                f"ICE servers: not a JSON list of {{urls, username, credential}} objects ({exc})."
            ) from exc
    else:
        servers = [_ice_from_text(item) for item in re.split(r"[\s,]+", text) if item]
    return tuple(servers)


def _ice_from_dict(item: dict[str, Any]) -> IceServerSpec:
    urls = item["urls"] if isinstance(item["urls"], list) else [item["urls"]]
    return _checked_ice(IceServerSpec(tuple(str(u) for u in urls), item.get("username"), item.get("credential")))


def _ice_from_text(item: str) -> IceServerSpec:
    match = re.fullmatch(r"(?:(?P<user>[^:@]+):(?P<secret>.*)@)?(?P<url>(?:stun|stuns|turn|turns):.+)", item)
    if match is None:
        raise ConfigError(
            f"ICE server {item.split('@')[-1]!r} is not a stun:, turn: or turns: URL "
            "(e.g. stun:stun.example.com:3478 or user:secret@turn:turn.example.com:3478)."
        )
    return _checked_ice(IceServerSpec((match["url"],), match["user"], match["secret"]))


def _checked_ice(server: IceServerSpec) -> IceServerSpec:
    for url in server.urls:
        if not re.fullmatch(r"(stun|stuns|turn|turns):[^\s@]+", url):
            raise ConfigError(f"ICE server {url!r} is not a stun:, turn: or turns: URL.")
        if url.startswith("turn") and not server.username:
            raise ConfigError(f"The TURN server {url} needs a user name and credential (user:secret@{url}).")
    return server


@dataclass(frozen=True)
class TransportSettings:
    """Where the bot goes: `local` (a page on host:port) or `daily` (a Daily room).

    `token` is a secret: it is left out of `repr`, of the runner's status and of error
    messages. `port` 0 picks a free port (the local page URL then says which).
    """

    kind: str = "local"
    room_url: str | None = None
    token: str | None = field(default=None, repr=False)
    bot_name: str = "MuseTalk avatar"
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    ice_servers: tuple[IceServerSpec, ...] = field(default=(), repr=False)  # local page: STUN/TURN behind NAT
    daily: DailyRoomSettings = field(default_factory=DailyRoomSettings)  # whom to follow, audio, leaving, video

    def __post_init__(self) -> None:
        if self.kind not in TRANSPORT_KINDS:
            raise ConfigError(f"Unknown transport {self.kind!r}: use 'local' (a page on this machine) or 'daily'.")
        if self.kind == "daily":
            object.__setattr__(self, "room_url", validate_room_url(self.room_url))
            if self.token is not None and (not isinstance(self.token, str) or any(c.isspace() for c in self.token)):
                raise ConfigError("The Daily token must be one word without spaces (copy it again from Daily).")
            if not self.token:
                object.__setattr__(self, "token", None)
        if not isinstance(self.port, int) or not 0 <= self.port <= 65535:
            raise ConfigError(f"Port {self.port!r} is out of range: use 1-65535 (or 0 for any free port).")
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigError(f"Host {self.host!r} is not a valid address (e.g. 127.0.0.1 or 0.0.0.0).")
        if not isinstance(self.bot_name, str) or not self.bot_name.strip() or len(self.bot_name) > 100:
            raise ConfigError("The bot name must be 1-100 characters.")
        object.__setattr__(self, "bot_name", self.bot_name.strip())
        if not isinstance(self.daily, DailyRoomSettings):
            raise ConfigError("TransportSettings.daily must be a DailyRoomSettings.")


def validate_room_url(url: str | None) -> str:
    """A Daily room URL, checked before anything starts: `https://<sub>.daily.co/<room>`.

    Every Daily room lives on a `<subdomain>.daily.co` host, so any other host is refused here
    rather than after a ~20 s join attempt. Returns the URL without surrounding whitespace;
    raises `ConfigError` saying what is wrong otherwise. A query string is refused: a token
    belongs in the token field, not in a URL that gets logged.
    """
    if url is None or not isinstance(url, str) or not url.strip():
        raise ConfigError(f"A Daily room URL is required, e.g. {DAILY_URL_EXAMPLE}")
    url = url.strip()
    if any(c.isspace() for c in url):
        raise ConfigError(f"The Daily room URL {url!r} contains spaces; copy it again, e.g. {DAILY_URL_EXAMPLE}")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(
            f"The Daily room URL {url!r} is malformed ({exc}); expected e.g. {DAILY_URL_EXAMPLE}"
        ) from exc
    if parts.scheme.lower() != "https":
        raise ConfigError(f"The Daily room URL must start with https:// (got {url!r}); e.g. {DAILY_URL_EXAMPLE}")
    host = (parts.hostname or "").lower()
    if parts.username is not None or parts.password is not None:
        raise ConfigError("The Daily room URL must not contain a user name or password.")
    labels = host.split(".")
    if len(labels) < 2 or not all(_HOST_LABEL.fullmatch(label) for label in labels) or port == 0:
        raise ConfigError(f"The Daily room URL {url!r} has no valid host name; expected e.g. {DAILY_URL_EXAMPLE}")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise ConfigError(
            "The Daily room URL must not have a query (?...) or fragment (#...): pass a meeting token "
            "with --token (or the token field), not inside the URL."
        )
    segments = [s for s in parts.path.split("/") if s]
    if not segments:
        raise ConfigError(f"The Daily room URL {url!r} names no room; expected e.g. {DAILY_URL_EXAMPLE}")
    if "//" in parts.path.rstrip("/") or not all(_ROOM_SEGMENT.fullmatch(s) for s in segments):
        raise ConfigError(
            f"The Daily room URL {url!r} has an invalid room path: use letters, digits, '-', '_' and '.'."
        )
    if host == "daily.co":
        raise ConfigError(f"The Daily room URL needs your Daily subdomain, e.g. {DAILY_URL_EXAMPLE}")
    if not host.endswith(".daily.co"):
        raise ConfigError(
            f"{host} is not a Daily host: a Daily room URL looks like {DAILY_URL_EXAMPLE} "
            "(copy it from your Daily dashboard), or use the local page instead."
        )
    if len(labels) != 3:
        raise ConfigError(f"The Daily room URL {url!r} should be https://<subdomain>.daily.co/<room>.")
    if len(segments) != 1:
        raise ConfigError(f"The Daily room URL {url!r} should have exactly one room name after the domain.")
    return url


def make_daily_transport(settings: TransportSettings, params: TransportParams) -> DailyTransport:
    """Pipecat's `DailyTransport` for the room in `settings`, with Daily's own error event and a release that
    always happens (see `_daily_transport_class`)."""
    from pipecat.transports.daily.transport import DailyParams

    if settings.kind != "daily":
        raise ConfigError("make_daily_transport needs TransportSettings(kind='daily', room_url=...).")
    room_url = validate_room_url(settings.room_url)
    daily_params: DailyParams = params if isinstance(params, DailyParams) else DailyParams(**params.model_dump())
    return _daily_transport_class()(room_url, settings.token, settings.bot_name, params=daily_params)


@functools.cache
def _daily_transport_class() -> type:
    """`DailyTransport` plus two things a long-running panel needs (a class made on first use: Pipecat's Daily
    module loads daily-python, which only Daily bots need).

    * Daily's `error` event (its message names Daily's error type: "ejected", "exp-token", ...), which
      Pipecat 1.14 does not handle, reaches the `on_daily_error` event handlers.
    * `release_call()` releases the Daily call client even when Pipecat's own teardown was cut short
      (a leave that hangs): no ghost participant stays in the room, and no Daily callback can reach
      the bot's event loop once it is closed.
    """
    from pipecat.transports.daily.transport import DailyTransport

    class MuseTalkDailyTransport(DailyTransport):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._register_event_handler("on_daily_error")
            client = self._client
            # daily-python calls its event handler's methods by name: this one goes through Pipecat's event queue.
            client.on_error = lambda message: client._call_event_callback(self._on_daily_error, message)

        async def _on_daily_error(self, message: str) -> None:
            await self._call_event_handler("on_daily_error", message)

        async def release_call(self, leave_timeout_s: float = DAILY_LEAVE_TIMEOUT_S) -> None:
            """Leave (unless Pipecat's teardown left already), then release the call client; idempotent.

            Pipecat skips the leave when its own join was cut short by the stop (it believes it never
            joined, while Daily may have): the leave here covers that. Releasing blocks until a leave
            in progress ends, in a worker thread, so the leave's completion still finds this loop running.
            """
            from pipecat.transports.daily.transport import _CallState

            client = self._client
            if client._call_state != _CallState.LEFT and client._client is not None:
                client._call_state = _CallState.LEFT  # as Pipecat's leave() does first: "left" is no error now
                try:
                    error = await asyncio.wait_for(client._leave(), timeout=leave_timeout_s)
                    if error:
                        logger.debug("Leaving the Daily room: {}", error)
                except asyncio.TimeoutError:
                    logger.warning("Daily did not confirm the leave within {} s; releasing the call", leave_timeout_s)
            try:
                await asyncio.to_thread(client._cleanup)
            except RuntimeError as exc:  # Pipecat's own cleanup released it in between
                logger.debug("Daily call already released: {}", exc)

    return MuseTalkDailyTransport


def make_local_transport(connection: SmallWebRTCConnection, params: TransportParams) -> SmallWebRTCTransport:
    """Pipecat's `SmallWebRTCTransport` for one browser connection of the local page."""
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    return SmallWebRTCTransport(webrtc_connection=connection, params=params)


def _bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket, or a `MuseTalkError` saying why it cannot be had."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"Cannot serve the local page on {host}: unknown address ({exc.strerror}).") from exc
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise MuseTalkError(
                f"Port {port} on {host} is already in use (another bot or program?): stop it or pick another port."
            ) from exc
        raise MuseTalkError(f"Cannot serve the local page on {host}:{port}: {exc.strerror or exc}.") from exc
    return sock


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


class LocalWebRTCServer:
    """The local page and SmallWebRTC signalling, served by uvicorn in the current event loop.

    Usage (inside a coroutine): `await server.start()` binds the port (raising a readable
    `MuseTalkError` if it is taken), `server.url` is the page, `await server.stop()` closes
    every peer connection and frees the port. `on_connection(connection, request_data=...)` is awaited for each
    new browser connection, before the SDP answer goes back; it starts that viewer's pipeline.
    `status()` feeds `GET /api/status` (shown on the page) and must hold no secrets.
    """

    def __init__(
        self,
        settings: TransportSettings,
        on_connection: Callable[..., Awaitable[None]],
        *,
        status: Callable[[], dict[str, Any]] | None = None,
        admit: Callable[[Any], Awaitable[None]] | None = None,
    ):
        if settings.kind != "local":
            raise ConfigError("LocalWebRTCServer needs TransportSettings(kind='local').")
        self.settings = settings
        self._on_connection = on_connection
        self._status = status or (lambda: {})
        # Checked before an offer is answered: Pipecat's handler logs and swallows errors raised in
        # `on_connection`, so a refusal (capacity, unknown avatar) must happen here to reach the viewer.
        self._admit = admit
        self._socket: socket.socket | None = None
        self._server: Any = None  # uvicorn.Server
        self._serve_task: asyncio.Task | None = None
        self._handler: Any = None  # SmallWebRTCRequestHandler
        self.port: int | None = None
        self.app = self._build_app()

    @property
    def url(self) -> str:
        port = self.port if self.port is not None else self.settings.port
        return f"http://{_url_host(self.settings.host)}:{port}/"

    # ------------------------------------------------------------------ app
    def _build_app(self):
        """The page app. Its endpoints are module-level functions that find this server through
        `app.state.page`: FastAPI caches facts about every endpoint callable in a module-level LRU,
        so per-instance closures would keep each server (and through `on_connection` its bot and
        avatar) alive for the life of the process."""
        from pipecat.transports.smallwebrtc.connection import IceServer
        from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequestHandler

        ice = [
            IceServer(urls=list(i.urls), username=i.username, credential=i.credential)
            for i in self.settings.ice_servers
        ]
        self._handler = SmallWebRTCRequestHandler(ice_servers=ice or None)
        app = _page_app()
        app.state.page = self
        return app

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind the port and start serving in the running event loop."""
        import uvicorn

        self._socket = _bind(self.settings.host, self.settings.port)
        self.port = self._socket.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            access_log=False,
            timeout_graceful_shutdown=2,
            ws="none",
        )
        self._server = uvicorn.Server(config)
        self._serve_task = asyncio.create_task(self._server.serve(sockets=[self._socket]), name="musetalk-local-page")
        for _ in range(200):  # uvicorn sets `started` once the socket accepts connections
            if self._server.started or self._serve_task.done():
                break
            await asyncio.sleep(0.01)
        if self._serve_task.done():
            exc = self._serve_task.exception()
            self._socket.close()
            raise MuseTalkError(f"The local page server failed to start: {exc}")
        logger.info("Local page: open {} in a browser (every viewer gets its own session)", self.url)

    async def disconnect_all(self) -> None:
        """Close every browser peer connection."""
        if self._handler is not None:
            await self._handler.close()

    async def stop(self) -> None:
        """Close the peer connections, stop uvicorn and free the port (idempotent)."""
        try:
            await asyncio.wait_for(self.disconnect_all(), timeout=5)
        except Exception as exc:  # closing must go on whatever one connection does
            logger.warning("Local page: closing peer connections: {}", exc)
        if self._server is not None:
            self._server.should_exit = True
        if self._serve_task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._serve_task), timeout=5)
            except asyncio.TimeoutError:
                self._server.force_exit = True
                self._serve_task.cancel()
                await asyncio.gather(self._serve_task, return_exceptions=True)
            except BaseException as exc:  # uvicorn exits with SystemExit on a failed startup
                if isinstance(exc, asyncio.CancelledError):
                    raise
                logger.debug("Local page server ended with {!r}", exc)
            self._serve_task = None
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        self.app.state.page = None  # a request still in flight finds "stopping", not this server


# ---------------------------------------------------------------------- the local page's endpoints
# Module-level on purpose (see LocalWebRTCServer._build_app): nothing here closes over a server.


def _page_of(request: Request) -> LocalWebRTCServer:
    from fastapi import HTTPException

    page = getattr(request.app.state, "page", None)
    if page is None:
        raise HTTPException(status_code=503, detail="The bot is stopping.")
    return page


def _page_file(name: str, media_type: str):
    from fastapi.responses import FileResponse

    return FileResponse(STATIC_DIR / name, media_type=media_type, headers={"Cache-Control": "no-store"})


async def _index(request: Request):
    return _page_file("index.html", "text/html")


async def _client_slash(request: Request):
    from fastapi.responses import RedirectResponse

    return RedirectResponse(url="/client")


async def _client_js(request: Request):
    return _page_file("client.js", "text/javascript")


async def _ice_servers(request: Request):
    """The page's RTCPeerConnection uses the same STUN/TURN servers as the bot."""
    from fastapi.responses import JSONResponse

    servers = [i.to_browser() for i in _page_of(request).settings.ice_servers]
    return JSONResponse({"iceServers": servers}, headers={"Cache-Control": "no-store"})


async def _status(request: Request):
    from fastapi.responses import JSONResponse

    return JSONResponse(_page_of(request)._status(), headers={"Cache-Control": "no-store"})


async def _json_body(request: Request) -> dict[str, Any]:
    from fastapi import HTTPException

    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(status_code=400, detail="The request body is not JSON.") from exc
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail="The request body must be a JSON object.")
    return data


async def _offer(request: Request):
    from fastapi import HTTPException
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest

    page = _page_of(request)
    data = await _json_body(request)
    if not isinstance(data.get("sdp"), str) or data.get("type") != "offer":
        raise HTTPException(status_code=400, detail="Expected {'sdp': <offer SDP>, 'type': 'offer'}.")
    keys = ("sdp", "type", "pc_id", "restart_pc", "request_data", "requestData")
    try:
        webrtc_request = SmallWebRTCRequest.from_dict({k: data[k] for k in keys if k in data})
    except Exception as exc:
        raise HTTPException(status_code=400, detail=f"Could not read this WebRTC offer: {exc}") from exc
    if page._admit is not None and not webrtc_request.pc_id:  # a new viewer (not a renegotiation)
        try:
            await page._admit(webrtc_request.request_data)
        except MuseTalkError as exc:
            logger.info("Local page: refused a viewer: {}", exc)
            raise HTTPException(status_code=503, detail=str(exc)) from exc
    try:
        return await page._handler.handle_web_request(
            request=webrtc_request,
            # The page's `?avatar=NAME` travels in request_data; each viewer may pick its own avatar.
            webrtc_connection_callback=functools.partial(page._on_connection, request_data=webrtc_request.request_data),
        )
    except HTTPException:
        raise
    except Exception as exc:  # an SDP aiortc cannot use: tell the client, keep serving
        logger.warning("Local page: refused a WebRTC offer: {}", exc)
        raise HTTPException(status_code=400, detail=f"Could not accept this WebRTC offer: {exc}") from exc


async def _ice_candidates(request: Request):
    from fastapi import HTTPException
    from pipecat.transports.smallwebrtc.request_handler import IceCandidate, SmallWebRTCPatchRequest

    page = _page_of(request)
    data = await _json_body(request)
    try:
        patch = SmallWebRTCPatchRequest(
            pc_id=str(data["pc_id"]),
            candidates=[
                IceCandidate(
                    candidate=c.get("candidate") or "",
                    sdp_mid=c.get("sdp_mid", c.get("sdpMid")),
                    sdp_mline_index=c.get("sdp_mline_index", c.get("sdpMLineIndex")),
                )
                for c in data.get("candidates", [])
            ],
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise HTTPException(
            status_code=400,
            detail="Expected {'pc_id': ..., 'candidates': [{candidate, sdp_mid, sdp_mline_index}]}.",
        ) from exc
    try:
        await page._handler.handle_patch_request(patch)
    except HTTPException:
        raise
    except Exception as exc:
        raise HTTPException(status_code=400, detail=f"Bad ICE candidate: {exc}") from exc
    return {"status": "success"}


def _page_app():
    """A new FastAPI app for one page server, wired to the module-level endpoints."""
    from fastapi import FastAPI

    app = FastAPI(title="MuseTalk live avatar", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_api_route("/", _index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/client", _index, methods=["GET"], include_in_schema=False)
    app.add_api_route("/client/", _client_slash, methods=["GET"], include_in_schema=False)
    app.add_api_route("/client.js", _client_js, methods=["GET"], include_in_schema=False)
    app.add_api_route("/api/ice-servers", _ice_servers, methods=["GET"])
    app.add_api_route("/api/status", _status, methods=["GET"])
    app.add_api_route("/api/offer", _offer, methods=["POST"])
    app.add_api_route("/api/offer", _ice_candidates, methods=["PATCH"])
    return app
