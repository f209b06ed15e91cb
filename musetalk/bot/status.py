"""What the operator sees of a bot: its status, and its sessions' figures combined into one line.

Plain values only (no thread, no Pipecat): the panel, the CLI and the Ray bot workers all read
and send them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

STATES = ("stopped", "starting", "running", "stopping", "error")


@dataclass(frozen=True)
class BotStatus:
    """What the operator sees of one bot. Never holds the Daily token."""

    state: str = "stopped"  # stopped | starting | running | stopping | error
    avatar: str | None = None
    transport: str | None = None  # local | daily
    url: str | None = None  # the local page, when local
    mode: str | None = None  # mirror | speech
    viewer_connected: bool = False
    uptime_s: float = 0.0
    fps: float | None = None  # the slowest viewer's received fps (local page), else what the session produced
    frames: int = 0
    mouth_latency_ms: float | None = None
    realtime: bool | None = None
    warning: str | None = None
    last_error: str | None = None
    bot_id: str | None = None
    viewers: int = 0  # local page: connected viewers (each its own session); Daily: participants
    room_url: str | None = None  # the Daily room (no token)
    following: str | None = None  # Daily: the participant whose voice the bot takes now (None: nobody yet)
    # local page: each viewer's state, frames its video track actually sent, its fps and backlog (frames queued)
    viewer_stats: tuple[dict, ...] = ()
    worker_pid: int | None = None  # the bot's own worker process (Ray backend), None when it runs in this process
    model_ms_per_frame: float | None = None  # what one generated frame costs the device (slowest session)
    # say / conversation modes
    speaking: bool = False  # TTS audio is being lip-synced now
    first_mouth_ms: float | None = None  # first TTS audio in -> first moving-mouth frame out (last utterance)
    first_mouth_p95_ms: float | None = None
    turn_latency_ms: float | None = None  # conversation: end of the user's speech -> first avatar audio (last reply)
    turn_latency_p50_ms: float | None = None
    transcript: tuple[dict, ...] = ()  # the newest turns: role user|avatar|error, text, at_s, interrupted, latency_ms
    speech_config: dict | None = None  # the services it speaks with (no keys)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _CombinedStats:
    """Several viewers' `LiveStats` as one status line: mean fps, summed frames, worst latency."""

    fps: float | None
    frames: int
    mouth_latency_ms: float | None
    realtime: bool | None
    warning: str | None
    model_ms_per_frame: float | None = None
    speaking: bool = False
    first_mouth_ms: float | None = None
    first_mouth_p95_ms: float | None = None


def combine_stats(stats: list[Any]) -> _CombinedStats | None:
    if not stats:
        return None
    fps = [s.fps for s in stats if getattr(s, "fps", None) is not None]
    latency = [s.mouth_latency_ms for s in stats if getattr(s, "mouth_latency_ms", None) is not None]
    realtime = [s.realtime for s in stats if getattr(s, "realtime", None) is not None]
    warning = next((s.warning for s in stats if getattr(s, "warning", None)), None)
    cost = [s.model_ms_per_frame for s in stats if getattr(s, "model_ms_per_frame", None) is not None]
    mouth = [s for s in stats if getattr(s, "first_mouth_ms", None) is not None]
    return _CombinedStats(
        fps=round(sum(fps) / len(fps), 2) if fps else None,
        frames=sum(int(getattr(s, "frames", 0) or 0) for s in stats),
        mouth_latency_ms=max(latency) if latency else None,
        realtime=all(realtime) if realtime else None,
        warning=warning,
        model_ms_per_frame=round(max(cost), 1) if cost else None,
        speaking=any(getattr(s, "speaking", False) for s in stats),
        first_mouth_ms=max(s.first_mouth_ms for s in mouth) if mouth else None,
        first_mouth_p95_ms=max(s.first_mouth_p95_ms or s.first_mouth_ms for s in mouth) if mouth else None,
    )
