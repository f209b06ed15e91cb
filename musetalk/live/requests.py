"""What sessions and the generation service exchange: plain, picklable values.

A session refers to its avatar by id and sends the audio the encoder needs (or ready
features); the service answers with finished images keyed by the session's own frame
numbers (`seq`). Nothing here holds a thread, a lock or a callback, so the same values
can cross a process boundary unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class FrameItem:
    """One video frame to generate."""

    seq: int  # the session's own number for this frame (unique within the session)
    frame: int  # frame index within the utterance: picks its feature window
    position: int  # place in the avatar's ping-pong loop
    due: float  # when the session shows it (idle) if no image has arrived; service clock


@dataclass(frozen=True)
class FrameRequest:
    """Frames of one session that share one audio snapshot.

    Either `window` (16 kHz mono float32 audio ending at the newest sample received,
    starting at global 20 ms feature row `first_feature`) or `features`
    (`(len(items), 50, D) float32`, one window per item) is given.
    """

    session_id: str
    items: tuple[FrameItem, ...]
    utterance: int = 0
    window: np.ndarray | None = None
    first_feature: int = 0
    features: np.ndarray | None = None

    def __post_init__(self) -> None:
        if (self.window is None) == (self.features is None):
            raise ValueError("a FrameRequest carries either an audio window or features")
        if self.features is not None and len(self.features) != len(self.items):
            raise ValueError("features need one (50, D) window per frame item")


@dataclass(frozen=True)
class FrameResult:
    """Frames finished (or given up) for one session, from one batch."""

    session_id: str
    images: dict[int, np.ndarray] = field(default_factory=dict)  # seq -> (h, w, 3) uint8 at the output size
    skipped: tuple[int, ...] = ()  # seqs the service dropped: they could not be ready before they were due
    error: str | None = None
    frame_cost_s: float | None = None  # the service's steady model cost per frame (full batches)
    capacity: int | None = None  # sessions the service can serve at 25 fps (None: not measured yet)
    sessions: int | None = None  # sessions open on the service when the result left it


@dataclass(frozen=True)
class SessionInfo:
    """What a session needs to know about the service it joined."""

    session_id: str
    avatar_id: str
    batch_size: int
    context_seconds: float  # audio history worth sending with each request
