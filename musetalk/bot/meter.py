"""What each local-page viewer actually receives: frames its video track handed to the encoder.

A session's own counters say what the processor produced; a viewer on a slow link or a busy
encoder can receive fewer (one run: status 21.5 fps while the browser decoded 12.5). The frames a
viewer gets are the ones its WebRTC video track gave to the sender, read from the track itself:
aiortc's `VideoStreamTrack` advances its RTP clock by one frame period (90 kHz / 30) for every
frame it returns. `ViewerMeter` samples that count at each status read and turns it into fps.

Reads Pipecat 1.14's SmallWebRTC client and aiortc's track attributes (both pinned in
requirements.txt); a transport without them reads as "unknown" rather than failing the status.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

FPS_WINDOW_S = 5.0
_MIN_SPAN_S = 1.0


def _video_track(transport: Any) -> Any:
    client = getattr(transport, "_client", None)
    return getattr(client, "_video_output_track", None)


def frames_sent(transport: Any) -> int | None:
    """Frames the viewer's video track has handed to the WebRTC sender (None before the track exists)."""
    from aiortc.mediastreams import VIDEO_CLOCK_RATE, VIDEO_PTIME

    track = _video_track(transport)
    timestamp = getattr(track, "_timestamp", None)
    if timestamp is None:
        return None if track is None else 0
    return int(timestamp) // int(VIDEO_PTIME * VIDEO_CLOCK_RATE) + 1


def backlog(transport: Any) -> int:
    """Frames queued for the viewer and not sent yet."""
    buffer = getattr(_video_track(transport), "_video_buffer", None)
    return buffer.qsize() if buffer is not None else 0


@dataclass
class ViewerMeter:
    """One viewer's received-frames counter and fps (sampled on the bot's event loop)."""

    key: str
    samples: deque = field(default_factory=lambda: deque(maxlen=64))  # (monotonic time, frames sent)

    def read(self, transport: Any, connection: Any, now: float | None = None) -> dict[str, Any]:
        now = time.monotonic() if now is None else now
        sent = frames_sent(transport)
        if sent is not None:
            self.samples.append((now, sent))
        return {
            "viewer": self.key[-8:],
            "state": _state(connection),
            "frames_sent": sent or 0,
            "fps": self.fps(now),
            "backlog": backlog(transport),
        }

    def fps(self, now: float) -> float | None:
        """Over the last 5 s of reads, or between the last two reads when the status is read less often."""
        recent = [(t, n) for t, n in self.samples if now - t <= FPS_WINDOW_S]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] < _MIN_SPAN_S:
            recent = list(self.samples)[-2:]
        if len(recent) < 2 or recent[-1][0] - recent[0][0] < _MIN_SPAN_S:
            return None
        (t0, n0), (t1, n1) = recent[0], recent[-1]
        return round((n1 - n0) / (t1 - t0), 1)


def _state(connection: Any) -> str:
    pc = getattr(connection, "pc", None)
    return str(getattr(pc, "connectionState", None) or "unknown")
