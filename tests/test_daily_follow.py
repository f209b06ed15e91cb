"""Whose voice a Daily bot takes, and how Daily's errors read (no network, no models)."""

from __future__ import annotations

import numpy as np
import pytest

from musetalk.bot.daily import DailyRoomSettings, daily_error_hint, daily_error_message
from musetalk.bot.follow import SpeakerChoice
from musetalk.bot.manager import refuse_shared_room, same_room
from musetalk.bot.transports import TransportSettings
from musetalk.errors import ConfigError

VOICE = (np.sin(np.arange(320) / 3.0) * 4000).astype(np.int16).tobytes()  # 20 ms at 16 kHz, clearly talking
QUIET = np.zeros(320, dtype=np.int16).tobytes()


def talk(
    choice: SpeakerChoice, who: str, start: float, end: float, others: dict[str, bytes] | None = None
) -> list[str]:
    """Feed 20 ms chunks of `who` talking from start to end (others sending what `others` says); who passed."""
    passed = []
    t = start
    while t < end:
        for pid, audio in {who: VOICE, **(others or {})}.items():
            if choice.heard(pid, audio, t):
                passed.append(pid)
        t += 0.02
    return passed


def test_active_speaker_switches_only_between_utterances():
    choice = SpeakerChoice("active")
    choice.joined("a", "alice", 0.0)
    choice.joined("b", "bob", 0.1)
    assert choice.followed_name == "alice"  # the first to join, until someone speaks
    talk(choice, "a", 1.0, 2.0)
    choice.active_speaker("b", 2.0)  # bob is louder now, but alice is mid-sentence
    assert set(talk(choice, "a", 2.0, 4.0, others={"b": VOICE})) == {"a"}
    assert choice.followed_name == "alice"
    # alice stops: her quiet tail still passes for the gap, then bob is followed and only his audio passes
    assert set(talk(choice, "b", 4.0, 4.5, others={"a": QUIET})) == {"a"}
    assert set(talk(choice, "b", 4.7, 6.0, others={"a": QUIET})) == {"b"}
    assert choice.followed_name == "bob"


def test_the_active_speaker_is_taken_at_once_when_the_followed_one_is_quiet():
    choice = SpeakerChoice("active")
    choice.joined("a", "alice", 0.0)
    choice.joined("b", "bob", 0.0)
    choice.active_speaker("b", 5.0)
    assert choice.followed_name == "bob"


def test_bots_are_never_followed_and_keep_nobody_company():
    ours = {"musetalk avatar", "recorder"}
    choice = SpeakerChoice("active", is_bot=lambda name: name.casefold() in ours)
    choice.joined("x", "MuseTalk avatar", 0.0)
    choice.joined("r", "Recorder", 0.0)
    choice.active_speaker("x", 1.0)
    assert choice.followed_name is None and choice.people == 0 and choice.participants == 2
    assert talk(choice, "x", 1.0, 2.0) == []
    choice.joined("a", "alice", 3.0)
    assert choice.followed_name == "alice" and choice.people == 1


def test_follow_by_name_waits_for_that_person():
    choice = SpeakerChoice("Bob")
    choice.joined("a", "alice", 0.0)
    assert choice.followed_name is None
    choice.active_speaker("a", 0.5)
    assert talk(choice, "a", 0.5, 1.0) == []
    choice.joined("b", "bob", 1.0)
    assert choice.followed_name == "bob"
    choice.left("b", 2.0)
    assert choice.followed_name is None


def test_follow_first_keeps_the_first_until_they_leave():
    choice = SpeakerChoice("first")
    choice.joined("a", "alice", 0.0)
    choice.joined("b", "bob", 1.0)
    choice.active_speaker("b", 2.0)
    assert choice.followed_name == "alice"
    choice.left("a", 3.0)
    assert choice.followed_name == "bob"


ROOM = "https://acme.daily.co/connect-demo"


@pytest.mark.parametrize(
    ("raw", "hint"),
    [
        ("ejected", "removed the bot (ejected)"),
        ("Meeting ended: exp-room", "the room has expired"),
        ("Error joining https://acme.daily.co/connect-demo: exp-token", "meeting token has expired"),
        ("Error joining https://acme.daily.co/connect-demo: not-allowed", "access was refused"),
        ("Error joining https://acme.daily.co/connect-demo: meeting-full", "the room is full"),
        ("Disconnected from https://acme.daily.co/connect-demo; app messages will not be sent", "Daily ended"),
        # the room's name holds "connect": no network hint for a token problem or an unknown error
        ("Error joining https://acme.daily.co/connect-demo: something odd", "Daily reported an error"),
    ],
)
def test_daily_errors_are_read_from_codes_not_from_the_room_name(raw, hint):
    assert hint in daily_error_hint(ROOM, raw)


def test_a_room_named_like_a_code_does_not_pick_the_hint():
    room = "https://acme.daily.co/token-timeout-401"
    assert daily_error_hint(room, f"Error joining {room}: weird") == "Daily reported an error"
    message = daily_error_message(room, "ejected", in_call=True)
    assert message.startswith(f"Daily: the bot's call in {room} ended: an owner of the room removed the bot")


def test_room_settings_check_their_values():
    assert DailyRoomSettings().publishes_audio("mirror") is False
    assert DailyRoomSettings().publishes_audio("conversation") is True
    assert DailyRoomSettings(publish_audio=True).publishes_audio("mirror") is True
    one = DailyRoomSettings(video_bitrate=600_000).camera_send_settings(25)
    assert one == {
        "maxQuality": "low",
        "encodings": {"low": {"maxBitrate": 600_000, "maxFramerate": 25, "scaleResolutionDownBy": 1}},
    }
    assert DailyRoomSettings(simulcast=True).camera_send_settings(25) is None
    for bad in ({"leave_when_alone_min": -1}, {"video_bitrate": 10}, {"follow": "x" * 101}):
        with pytest.raises(ConfigError):
            DailyRoomSettings(**bad)


def test_a_second_bot_for_a_room_is_refused_unless_asked_for():
    first = TransportSettings(kind="daily", room_url="https://acme.daily.co/demo")
    again = TransportSettings(kind="daily", room_url="https://ACME.daily.co/demo/")
    assert same_room(first.room_url, again.room_url)
    with pytest.raises(ConfigError, match="bot-1 already serves the room"):
        refuse_shared_room(again, [("bot-1", first)])
    shared = TransportSettings(kind="daily", room_url=again.room_url, daily=DailyRoomSettings(share_room=True))
    refuse_shared_room(shared, [("bot-1", first)])
    other = TransportSettings(kind="daily", room_url="https://acme.daily.co/other")
    refuse_shared_room(other, [("bot-1", first)])
