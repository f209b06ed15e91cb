"""A bot in a Daily room: the room settings an operator picks, and Daily's errors as sentences.

Daily reports failures in three shapes, and Pipecat 1.14 wraps two of them in its own words:
a failed join ("Error joining <room>: <Daily's error>"), a call that ended under the bot
("Disconnected from <room>; ...", after Daily's call state went to "left"), and Daily's own
`error` event, whose message carries Daily's error type ("ejected", "exp-token", ...). The hint
is decided from that structure and from Daily's error codes as whole words, never from words
anywhere in the message: a room named `connect-demo` or `token-test` must not change the advice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from musetalk.errors import ConfigError

FOLLOW_ACTIVE = "active"  # the active speaker, switching only between utterances
FOLLOW_FIRST = "first"  # the first person to join (then the next earliest, once they leave)
DEFAULT_LEAVE_WHEN_ALONE_MIN = 10.0
DEFAULT_VIDEO_BITRATE = 1_000_000  # bits/s of the one published video layer (256-720 px at 25 fps)
_MIN_VIDEO_BITRATE = 100_000
_MAX_VIDEO_BITRATE = 8_000_000


@dataclass(frozen=True)
class DailyRoomSettings:
    """How a bot behaves in a Daily room.

    * `follow`: whose voice the bot lip-syncs (mirror) or answers (conversation): "active" (the
      active speaker, switching only between utterances), "first" (the first to join), or a
      participant's display name. Other participants' audio never reaches the session.
    * `never_follow`: display names that are bots (e.g. another avatar, a recorder); our own bots
      are never followed anyway.
    * `publish_audio`: None = by mode (mirror publishes video only: the room already hears the
      speaker; say / conversation publish the avatar's speech).
    * `leave_when_alone_min`: leave after this long with no person in the room (0 = never).
    * `video_bitrate`: bits/s of the single 25 fps video layer; `simulcast` keeps Daily's layers.
    * `share_room`: allow a second bot of ours in a room one already serves (on purpose only:
      two mirror bots re-publish each other).
    """

    follow: str = FOLLOW_ACTIVE
    never_follow: tuple[str, ...] = ()
    publish_audio: bool | None = None
    leave_when_alone_min: float = DEFAULT_LEAVE_WHEN_ALONE_MIN
    video_bitrate: int = DEFAULT_VIDEO_BITRATE
    simulcast: bool = False
    share_room: bool = False

    def __post_init__(self) -> None:
        follow = (self.follow or FOLLOW_ACTIVE).strip()
        if not follow or len(follow) > 100:
            raise ConfigError("Follow: use 'active', 'first' or a participant's name (1-100 characters).")
        object.__setattr__(self, "follow", follow)
        names = tuple(n.strip() for n in self.never_follow if n and n.strip())
        object.__setattr__(self, "never_follow", names)
        try:
            minutes = float(self.leave_when_alone_min)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"Leave when alone: {self.leave_when_alone_min!r} is not a number of minutes.") from exc
        if not 0 <= minutes <= 24 * 60:
            raise ConfigError("Leave when alone: use 0 (never) to 1440 minutes.")
        object.__setattr__(self, "leave_when_alone_min", minutes)
        if (
            not isinstance(self.video_bitrate, int)
            or not _MIN_VIDEO_BITRATE <= self.video_bitrate <= _MAX_VIDEO_BITRATE
        ):
            raise ConfigError(
                f"Video bitrate {self.video_bitrate!r}: use {_MIN_VIDEO_BITRATE}-{_MAX_VIDEO_BITRATE} bits/s "
                f"(default {DEFAULT_VIDEO_BITRATE})."
            )

    def publishes_audio(self, mode: str) -> bool:
        """Mirror mode in a room publishes video only unless asked: everyone hears the speaker already."""
        if self.publish_audio is not None:
            return self.publish_audio
        return mode != "mirror"

    def camera_send_settings(self, fps: int) -> dict | None:
        """One video layer at `fps` and the stated bitrate (Daily's sendSettings), or Daily's simulcast."""
        if self.simulcast:
            return None
        return {
            "maxQuality": "low",
            "encodings": {"low": {"maxBitrate": self.video_bitrate, "maxFramerate": fps, "scaleResolutionDownBy": 1}},
        }

    def describe_follow(self) -> str:
        if self.follow == FOLLOW_ACTIVE:
            return "the active speaker"
        if self.follow == FOLLOW_FIRST:
            return "the first person to join"
        return repr(self.follow)


@dataclass(frozen=True)
class _Hint:
    codes: tuple[str, ...]  # Daily's error types / daily-core error names, matched as whole words
    text: str
    case_sensitive: bool = False


# Daily's error types (the `error` event of daily-js and daily-core) and daily-core's error names.
_HINTS = (
    _Hint(("ejected",), "an owner of the room removed the bot (ejected)"),
    _Hint(("exp-room",), "the room has expired (its exp time passed): make a new room or extend it"),
    _Hint(("exp-token",), "the meeting token has expired: make a new token"),
    _Hint(("nbf-room",), "the room is not open yet (its nbf time is in the future)"),
    _Hint(("nbf-token",), "the meeting token is not valid yet (its nbf time is in the future)"),
    _Hint(("meeting-full",), "the room is full (max_participants): stop a participant or raise the limit"),
    _Hint(("no-room", "NoRoom", "RoomNotFound"), "this room does not exist (check the room name)", True),
    _Hint(("not-allowed", "Unauthorized", "Forbidden", "401", "403"), "access was refused (a private room needs a valid --token)"),
    _Hint(("RoomLookup", "NoWorkerForRoom", "WorkerLookupFailed"), "its address does not resolve (no internet, or a wrong Daily subdomain?)", True),
    _Hint(("404",), "this room does not exist (check the room name)"),
)  # fmt: skip
_MISSING_WORDS = ("not found", "no such room", "does not exist")
_DNS_WORDS = ("failed to lookup address", "name or service not known", "temporary failure in name resolution")
_TIMEOUT_WORDS = ("timed out", "timeout")
_JOIN = re.compile(r"^Error joining (?P<room>\S+?): (?P<detail>.*)$", re.S)
_LEAVE = re.compile(r"^Error leaving (?P<room>\S+?): (?P<detail>.*)$", re.S)
_DISCONNECTED = re.compile(r"^Disconnected from (?P<room>\S+?)(;|$)")


def _without_room(text: str, room_url: str) -> str:
    """Daily's words without the room's URL or name, so a room named `connect-demo` cannot pick the hint."""
    for part in sorted({room_url, room_url.rstrip("/").rsplit("/", 1)[-1]} - {""}, key=len, reverse=True):
        text = text.replace(part, " ")
    return text


def _code_hint(detail: str) -> str | None:
    for hint in _HINTS:
        flags = 0 if hint.case_sensitive else re.I
        if any(re.search(rf"(?<![\w-]){re.escape(code)}(?![\w-])", detail, flags) for code in hint.codes):
            return hint.text
    return None


def daily_error_hint(room_url: str, error: str) -> str:
    """What went wrong, decided from the error's shape and Daily's codes (see the module docstring)."""
    error = " ".join(str(error).split())
    if match := _DISCONNECTED.match(error):
        return "Daily ended the bot's call (an owner removed it, the room or the token expired, or the network dropped)"
    match = _JOIN.match(error) or _LEAVE.match(error)
    detail = _without_room(match["detail"] if match else error, room_url)
    hint = _code_hint(detail)
    if hint is not None:
        return hint
    lowered = detail.lower()
    if any(word in lowered for word in _MISSING_WORDS):
        return "this room does not exist (check the room name)"
    if any(word in lowered for word in _DNS_WORDS):
        return "its address does not resolve (no internet, or a wrong Daily subdomain?)"
    if any(word in lowered for word in _TIMEOUT_WORDS):
        return "Daily did not answer in time (network or firewall?)"
    if match is not None and match.re is _LEAVE:
        return "leaving the room failed (the bot is gone from it once its call is released)"
    return "Daily reported an error"


def daily_error_message(room_url: str, error: str, *, in_call: bool = False) -> str:
    """A Daily error as one sentence an operator can act on, with Daily's own words after it.

    `in_call`: the bot had joined, and Daily ended or broke its call (ejected, expired, network).
    """
    hint = daily_error_hint(room_url, error)
    raw = " ".join(str(error).split())
    raw = raw if len(raw) <= 300 else raw[:297] + "..."
    where = f"the bot's call in {room_url} ended" if in_call else f"could not use the room {room_url}"
    return f"Daily: {where}: {hint}. (Daily said: {raw})"
