"""Where the bot's audio and video go: a Daily room, or a local page served by the bot itself.

* `TransportSettings` says which (and never shows the Daily token: not in repr, status or errors).
* `validate_room_url` refuses a malformed Daily URL before anything starts.
* `make_daily_transport` builds Pipecat's `DailyTransport`; `make_local_transport` the
  `SmallWebRTCTransport` of one viewer of the local page (served by musetalk/bot/page.py).
* A local page bound beyond loopback has a viewer key (`with_page_key`, `page_url`): a secret,
  like the Daily token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import ipaddress
import json
import re
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, urlsplit

from loguru import logger

from musetalk.bot.daily import DailyRoomSettings
from musetalk.errors import ConfigError

if TYPE_CHECKING:
    from pipecat.transports.base_transport import TransportParams
    from pipecat.transports.daily.transport import DailyParams, DailyTransport
    from pipecat.transports.smallwebrtc.connection import SmallWebRTCConnection
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

TRANSPORT_KINDS = ("local", "daily")
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7861
DAILY_URL_EXAMPLE = "https://your-domain.daily.co/room-name"
DAILY_LEAVE_TIMEOUT_S = 10.0
PENDING_TIMEOUT_S = 10.0  # an answered offer whose viewer has not connected by then gives its session back
PAGE_KEY_LENGTHS = (8, 200)

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
    page_key: str | None = field(default=None, repr=False)  # local page: the viewers' key (a secret, see with_page_key)
    connect_timeout_s: float = PENDING_TIMEOUT_S  # local page: an answered viewer not connected by then is dropped

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
        object.__setattr__(self, "page_key", check_page_key(self.page_key))
        if not isinstance(self.connect_timeout_s, (int, float)) or not 0 < self.connect_timeout_s <= 3600:
            raise ConfigError(f"connect_timeout_s {self.connect_timeout_s!r} is out of range: use 0-3600 seconds.")


def check_page_key(key: object) -> str | None:
    """The viewers' key as given (empty: none); the message never repeats it."""
    if key is None or key == "":
        return None
    low, high = PAGE_KEY_LENGTHS
    if not isinstance(key, str) or not low <= len(key) <= high or not all("!" <= c <= "~" for c in key):
        raise ConfigError(
            f"The page key must be {low}-{high} characters: letters, digits or punctuation, no spaces "
            "(leave it out on a non-loopback address and one is made for you)."
        )
    return key


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only: 127.0.0.0/8, ::1 or localhost."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def with_page_key(settings: TransportSettings) -> TransportSettings:
    """`settings` with a viewer key wherever the page is reachable from other machines.

    A local page bound beyond loopback (0.0.0.0, a LAN address, a host name) without a key gets a
    new random one (`secrets.token_urlsafe(16)`); a key given stays, loopback without a key stays
    open, a Daily room is untouched. Call it where the settings are built, so that the caller can
    hand the key (`page_url(url, settings.page_key)`) to its viewers; `BotRunner.start` calls it too.
    """
    if settings.kind != "local" or settings.page_key or is_loopback(settings.host):
        return settings
    return dataclasses.replace(settings, page_key=secrets.token_urlsafe(16))


def page_url(url: str, key: str | None) -> str:
    """The page URL a viewer opens: with `?key=KEY` when the page has a key (a secret: never log it)."""
    return f"{url}?key={quote(key, safe='')}" if key else url


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
    * A call still joined when Pipecat cleans up (a stop that came before the pipeline had started skips
      Pipecat's leave) is left before it is released.
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
            pipecat_cleanup = client.cleanup

            async def leave_then_cleanup() -> None:
                await self._leave_if_in_call(DAILY_LEAVE_TIMEOUT_S)
                await pipecat_cleanup()

            client.cleanup = leave_then_cleanup

        async def _on_daily_error(self, message: str) -> None:
            await self._call_event_handler("on_daily_error", message)

        async def _leave_if_in_call(self, timeout_s: float, *, join_cut_short: bool = False) -> None:
            """Leave unless Pipecat's teardown left already (or never joined, unless its join was cut short);
            a leave that hangs is cut short."""
            from pipecat.transports.daily.transport import _CallState

            client = self._client
            done = (_CallState.LEFT,) if join_cut_short else (_CallState.NOT_JOINED, _CallState.LEFT)
            if client._call_state in done or client._client is None:
                return
            client._call_state = _CallState.LEFT  # as Pipecat's leave() does first: "left" is no error now
            try:
                error = await asyncio.wait_for(client._leave(), timeout=timeout_s)
                if error:
                    logger.debug("Leaving the Daily room: {}", error)
            except asyncio.TimeoutError:
                logger.warning("Daily did not confirm the leave within {} s; releasing the call", timeout_s)

        async def release_call(self, leave_timeout_s: float = DAILY_LEAVE_TIMEOUT_S) -> None:
            """Leave (unless Pipecat's teardown left already), then release the call client; idempotent.

            Pipecat skips the leave when its own join was cut short by the stop (it believes it never
            joined, while Daily may have): the leave here covers that. Releasing blocks until a leave
            in progress ends, in a worker thread, so the leave's completion still finds this loop running.
            """
            client = self._client
            await self._leave_if_in_call(leave_timeout_s, join_cut_short=True)
            try:
                await asyncio.to_thread(client._cleanup)
            except RuntimeError as exc:  # Pipecat's own cleanup released it in between
                logger.debug("Daily call already released: {}", exc)

    return MuseTalkDailyTransport


def make_local_transport(connection: SmallWebRTCConnection, params: TransportParams) -> SmallWebRTCTransport:
    """Pipecat's `SmallWebRTCTransport` for one browser connection of the local page."""
    from pipecat.transports.smallwebrtc.transport import SmallWebRTCTransport

    return SmallWebRTCTransport(webrtc_connection=connection, params=params)
