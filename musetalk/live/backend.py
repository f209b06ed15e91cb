"""What a generation backend offers its sessions: the one surface bots and the panel rely on.

Two implementations: `musetalk.live.service.GenerationService` (the models in this process) and
`musetalk.serve.client.RayGenerationClient` (replicas of a Ray Serve app). `make_backend` in
musetalk/serve/backend.py picks one; a session (`MuseTalkProcessor`, `BotRun`) takes either.
Values crossing this surface are the plain ones of `musetalk.live.requests`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from musetalk.live.requests import FrameRequest, FrameResult, SessionInfo

if TYPE_CHECKING:
    from musetalk.avatar.store import Avatar

Sink = Callable[[FrameResult], None]  # where a session's results go (called from the backend's threads)


class BackendStats(Protocol):
    """The figures every backend reports (`ServiceStats` in process, `ClusterStats` on Ray add more)."""

    @property
    def sessions(self) -> int: ...  # sessions open now
    @property
    def queued_frames(self) -> int: ...
    @property
    def frames(self) -> int: ...  # generated since start
    @property
    def skipped_frames(self) -> int: ...
    @property
    def frames_per_s(self) -> float: ...  # generated, over the last 5 s
    @property
    def capacity(self) -> int | None: ...  # sessions served at 25 fps (None: not measured yet)
    @property
    def capacity_left(self) -> int | None: ...


@runtime_checkable
class GenerationBackend(Protocol):
    """Sessions of live frames on a generation backend: open one per viewer, submit, get results in the sink."""

    def add_avatar(self, avatar: Avatar) -> str:
        """Keep `avatar` where the frames are generated; returns its id for `open_session`."""
        ...

    def open_session(
        self, session_id: str, avatar_id: str, sink: Sink, *, output_size: tuple[int, int] | None = None,
        warm_up: bool = True,
    ) -> SessionInfo:  # fmt: skip
        """Join; refused with `CapacityError` when the backend cannot serve one more in real time."""
        ...

    def submit(self, request: FrameRequest) -> None:
        """Queue frames of an open session (unknown sessions are ignored: they closed meanwhile)."""
        ...

    def cancel(self, session_id: str) -> None:
        """Drop the session's queued frames (an interruption)."""
        ...

    def close_session(self, session_id: str) -> None: ...

    def session_limit(self) -> int | None:
        """Most sessions admitted now (checked before a viewer is answered); None: `open_session` admits or refuses."""
        ...

    def capacity(self) -> int | None:
        """Sessions served at 25 fps (None: not measured yet)."""
        ...

    def stats(self) -> BackendStats: ...

    def close(self) -> None:
        """Close every session and end the backend's threads."""
        ...
