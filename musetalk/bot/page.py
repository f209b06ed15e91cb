"""The local page: the no-account way to see the avatar, served by the bot itself.

`LocalWebRTCServer` is a FastAPI app on `host:port` serving a page (`/`, `/client`) that sends the
microphone and shows the avatar, plus Pipecat's SmallWebRTC signalling (`POST /api/offer` with the
SDP offer, `PATCH /api/offer` with ICE candidates), so Pipecat's own prebuilt client can connect
too. It runs with uvicorn inside the caller's event loop (the bot thread); each new connection is
handed to `on_connection`.

The page guards itself (`_offer` and `_page_of`): a page bound beyond loopback has a viewer key
(`?key=KEY` on the page URL, which the page's client sends on as `Authorization: Bearer KEY`),
asked for by every API endpoint (the static page holds no secret); a request body over 256 KB,
malformed JSON or an SDP that is not an audio+video WebRTC offer is refused before anything is
reserved; an answered offer whose viewer has not connected within 10 s gives back its session,
and one address has at most 4 such pending offers.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import json
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import Request  # module level: FastAPI resolves the handlers' annotations here
from loguru import logger

from musetalk.bot.transports import TransportSettings
from musetalk.errors import ConfigError, MuseTalkError

if TYPE_CHECKING:
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection

STATIC_DIR = Path(__file__).parent / "static"
MAX_BODY_BYTES = 256 * 1024  # a browser's offer is a few KB; larger bodies get 413, unread
MAX_PENDING_PER_CLIENT = 4  # answered, not yet connected offers of one client address


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

    `admit(request_data)` is awaited first, for every new viewer's offer: it raises a `MuseTalkError` to
    refuse it (503), and may return `release(pc_id, reason)`, awaited once if the offer then fails or
    its viewer does not connect within `settings.connect_timeout_s`: it gives back what the offer took (its
    session, the avatar it asked for). An offer is pending from its admission until its viewer
    connects; one client address has at most `MAX_PENDING_PER_CLIENT` pending offers (429 past that).
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
        self._pending: list[_Offer] = []  # admitted offers whose viewer has not connected yet
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
        for offer in self._pending:  # the bot ends their sessions itself
            offer.settled = True
            if offer.watchdog is not None:
                offer.watchdog.cancel()
        self._pending = []
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

    # ------------------------------------------------------------------ offers
    def check_key(self, request: Request) -> None:
        """401 unless the request carries the page's key (`Authorization: Bearer KEY` or `?key=KEY`);
        a page without a key lets everyone in. Compared in constant time; the key is never logged."""
        from fastapi import HTTPException

        key = self.settings.page_key
        if not key:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        given = value.strip() if scheme.lower() == "bearer" else request.query_params.get("key", "")
        if not given:
            detail = "This page needs its key: open the address with ?key=... that the bot's operator gave you."
        elif not hmac.compare_digest(given.encode(), key.encode()):
            detail = "Wrong page key: ask the bot's operator for the address with the right ?key=..."
        else:
            return
        raise HTTPException(status_code=401, detail=detail, headers={"WWW-Authenticate": "Bearer"})

    async def answer_new_viewer(self, client: str, webrtc_request: Any) -> dict[str, Any]:
        """Admit a new viewer's offer and answer it, or give back whatever it took and say why."""
        from fastapi import HTTPException

        if sum(1 for o in self._pending if o.client == client) >= MAX_PENDING_PER_CLIENT:
            raise HTTPException(
                status_code=429,
                detail=f"{MAX_PENDING_PER_CLIENT} connections from this address are still starting: "
                f"wait until they connect (or {self.settings.connect_timeout_s:.0f} s), then try again.",
            )
        offer = _Offer(client)
        self._pending.append(offer)
        try:
            if self._admit is not None:
                offer.release = await self._admit(webrtc_request.request_data)
            answer = await self._handler.handle_web_request(
                request=webrtc_request,
                webrtc_connection_callback=functools.partial(self._connect, offer, webrtc_request.request_data),
            )
            if offer.error is not None:  # Pipecat logs and swallows it, and answers anyway
                raise offer.error
        except BaseException as exc:
            await self._give_back(offer, "its offer failed")
            if isinstance(exc, HTTPException) or not isinstance(exc, Exception):
                raise
            if isinstance(exc, MuseTalkError):
                logger.info("Local page: refused a viewer: {}", exc)
                raise HTTPException(status_code=503, detail=str(exc)) from exc
            logger.warning("Local page: refused a WebRTC offer: {}", exc)  # an SDP aiortc cannot use
            raise HTTPException(status_code=400, detail=f"Could not accept this WebRTC offer: {exc}") from exc
        if not offer.settled:
            offer.watchdog = asyncio.get_running_loop().create_task(self._drop_unless_connected(offer))
        return answer

    async def _connect(self, offer: _Offer, request_data: Any, connection: SmallWebRTCConnection) -> None:
        """Pipecat's callback for a new connection: watch it connect, then start its viewer's pipeline."""
        offer.connection = connection

        async def connected(_connection: Any) -> None:  # the viewer's pipeline reached it: no longer pending
            self._settle(offer)

        async def ended(_connection: Any) -> None:  # closed or failed before it ever connected
            if not offer.settled:
                await self._give_back(offer, "its connection closed before it connected")

        connection.add_event_handler("connected", connected)
        connection.add_event_handler("closed", ended)
        connection.add_event_handler("failed", ended)
        try:
            await self._on_connection(connection, request_data=request_data)
        except Exception as exc:
            offer.error = exc
            raise

    def _settle(self, offer: _Offer) -> bool:
        """No longer pending; False if it was settled already."""
        if offer.settled:
            return False
        offer.settled = True
        if offer in self._pending:
            self._pending.remove(offer)
        if offer.watchdog is not None and offer.watchdog is not asyncio.current_task():
            offer.watchdog.cancel()
        return True

    async def _give_back(self, offer: _Offer, reason: str) -> None:
        """Release what a failed or abandoned offer took, and close its connection (once)."""
        if not self._settle(offer):
            return
        connection = offer.connection
        pc_id = str(connection.pc_id) if connection is not None else None
        if offer.release is not None:
            try:
                await offer.release(pc_id, reason)
            except Exception as exc:  # the connection is closed below whatever the bot says
                logger.warning("Local page: releasing a viewer's offer: {}", exc)
        if connection is not None:
            if self._handler is not None:
                self._handler._pcs_map.pop(pc_id, None)
            with contextlib.suppress(Exception):  # a connection that is gone already
                await connection.disconnect()

    async def _drop_unless_connected(self, offer: _Offer) -> None:
        await asyncio.sleep(self.settings.connect_timeout_s)
        if not offer.settled:
            logger.info(
                "Local page: a viewer at {} did not connect within {:.0f} s: its session ends",
                offer.client, self.settings.connect_timeout_s,
            )  # fmt: skip
            await self._give_back(offer, "the viewer did not connect")


@dataclass(eq=False)
class _Offer:
    """A new viewer's offer, from its admission until its viewer connects (or it is given back)."""

    client: str
    release: Callable[[str | None, str], Awaitable[None]] | None = None
    connection: Any = None  # SmallWebRTCConnection, once Pipecat made it
    error: Exception | None = None  # raised by on_connection (Pipecat swallows it)
    watchdog: asyncio.Task | None = None
    settled: bool = False  # connected, or given back


# ---------------------------------------------------------------------- the local page's endpoints
# Module-level on purpose (see LocalWebRTCServer._build_app): nothing here closes over a server.


def _page_of(request: Request) -> LocalWebRTCServer:
    """The server behind an API request, once the request showed the page's key (if it has one)."""
    from fastapi import HTTPException

    page = getattr(request.app.state, "page", None)
    if page is None:
        raise HTTPException(status_code=503, detail="The bot is stopping.")
    page.check_key(request)
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
    """The request's JSON object, read up to MAX_BODY_BYTES: a larger body gets 413 before it is read whole."""
    from fastapi import HTTPException

    too_large = HTTPException(
        status_code=413, detail=f"The request is larger than {MAX_BODY_BYTES // 1024} KB (an offer is a few KB)."
    )
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
        raise too_large if length.isdigit() else HTTPException(status_code=400, detail="Bad Content-Length.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise too_large
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HTTPException(status_code=400, detail="The request body is not JSON.") from exc
    if not isinstance(data, dict):
        raise HTTPException(status_code=400, detail="The request body must be a JSON object.")
    return data


def _check_offer_sdp(sdp: str) -> None:
    """400 unless `sdp` looks like a WebRTC offer with an audio and a video section (checked before anything
    is reserved; aiortc would answer almost anything, even a single word)."""
    from fastapi import HTTPException

    lines = sdp.lstrip().splitlines()
    kinds = {line[2:].split(" ", 1)[0] for line in lines if line.startswith("m=")}
    if not lines or lines[0].strip() != "v=0" or not {"audio", "video"} <= kinds:
        raise HTTPException(
            status_code=400,
            detail="Not a WebRTC offer with an audio and a video section (the page's offer starts with v=0 and "
            "has m=audio and m=video lines).",
        )


async def _offer(request: Request):
    from fastapi import HTTPException
    from pipecat.transports.smallwebrtc.request_handler import SmallWebRTCRequest

    page = _page_of(request)
    data = await _json_body(request)
    if not isinstance(data.get("sdp"), str) or data.get("type") != "offer":
        raise HTTPException(status_code=400, detail="Expected {'sdp': <offer SDP>, 'type': 'offer'}.")
    _check_offer_sdp(data["sdp"])
    keys = ("sdp", "type", "pc_id", "restart_pc", "request_data", "requestData")
    try:
        webrtc_request = SmallWebRTCRequest.from_dict({k: data[k] for k in keys if k in data})
    except Exception as exc:
        raise HTTPException(status_code=400, detail=f"Could not read this WebRTC offer: {exc}") from exc
    if webrtc_request.pc_id not in page._handler._pcs_map:  # a new viewer (an unknown pc_id is one too)
        webrtc_request.pc_id = None
        client = request.client.host if request.client is not None else "unknown"
        return await page.answer_new_viewer(client, webrtc_request)
    try:  # a renegotiation of a viewer's connection
        answer = await page._handler.handle_web_request(request=webrtc_request, webrtc_connection_callback=_no_viewer)
    except HTTPException:
        raise
    except Exception as exc:
        logger.warning("Local page: refused a WebRTC renegotiation: {}", exc)
        raise HTTPException(status_code=400, detail=f"Could not accept this WebRTC offer: {exc}") from exc
    if answer["pc_id"] != webrtc_request.pc_id:  # that connection ended meanwhile: Pipecat made a new, unadmitted one
        connection = page._handler._pcs_map.pop(answer["pc_id"], None)
        if connection is not None:
            await connection.disconnect()
        raise HTTPException(status_code=404, detail="That connection has ended: start again.")
    return answer


async def _no_viewer(connection: Any) -> None:
    """A renegotiation starts no viewer."""


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
