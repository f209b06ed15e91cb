"""The Ray backend seen from a bot: the same session surface as the in-process service.

`RayGenerationClient` is a `GenerationBackend` (musetalk/live/backend.py) like
`GenerationService`, so `LiveSession` and `MuseTalkProcessor` take either. Behind it:

- `open_session` routes by avatar digest (Serve model multiplexing); a replica lacking the
  avatar answers "missing" and gets the bytes in a second call. The session is then pinned to
  the replica that opened it (`musetalk.serve.router`).
- A background event loop (one thread) sends submits in order and long-polls each session's
  results, handing every `FrameResult` to the session's sink from that thread.
- Faults: when a replica dies, the results polls of its sessions fail at once; each of its sessions
  re-opens on another replica (or the restarted one, whichever Serve routes to) and re-sends
  the frames it still waits for, so only frames that fall due during the re-attach are lost
  (shown idle by the session). If no replica takes the session within `reattach_s`, the
  session gets an error result.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from musetalk.avatar.store import Avatar
from musetalk.errors import BackendError, CapacityError, MuseTalkError
from musetalk.live.backend import Sink
from musetalk.live.requests import FrameRequest, FrameResult, SessionInfo
from musetalk.live.service import ServiceStats
from musetalk.serve.avatars import PackedAvatars
from musetalk.serve.deployment import shift_due
from musetalk.serve.router import KNOWN_REPLICAS, pinned_id

POLL_S = 0.5  # longest wait of one results poll (answers return as soon as there are any)


@dataclass
class _Remote:
    id: str
    key: str  # avatar digest
    sink: Sink
    output_size: tuple[int, int] | None
    replica: str = ""
    pid: int = 0
    closed: bool = False
    attached: bool = True  # False while re-attaching: new frames wait in `pending`
    reattaches: int = 0
    pending: OrderedDict[int, FrameRequest] = field(default_factory=OrderedDict)  # id(request) -> request
    open_seqs: set[int] = field(default_factory=set)  # frames sent and not answered yet
    pump: Future | None = None

    @property
    def pin(self) -> str:
        return pinned_id(self.key, self.replica)


@dataclass(frozen=True)
class ReplicaReport:
    replica: str
    pid: int
    sessions: list[str]
    stats: ServiceStats


@dataclass(frozen=True)
class ClusterStats:
    """Per-replica service stats and their sums (what the panel's service view shows)."""

    replicas: list[ReplicaReport]
    sessions: int
    frames_per_s: float
    queued_frames: int
    skipped_frames: int
    frames: int
    capacity: int | None
    capacity_left: int | None


class RayGenerationClient:
    """Sessions on a Ray Serve deployment of the generation service (see the module docstring)."""

    def __init__(self, handle: Any, *, call_timeout_s: float = 120.0, reattach_s: float = 30.0):
        self._handle = handle
        self.call_timeout_s = call_timeout_s
        self.reattach_s = reattach_s
        self._packed = PackedAvatars()
        self._sessions: dict[str, _Remote] = {}
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="musetalk-ray-client", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ plumbing
    def _call(self, coro, timeout: float | None = None):
        """Run `coro` on the client's loop and wait (never from that loop itself)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout or self.call_timeout_s)

    def _session(self, session_id: str) -> _Remote | None:
        with self._lock:
            return self._sessions.get(session_id)

    # ------------------------------------------------------------------ the service surface
    def add_avatar(self, avatar: Avatar) -> str:
        """Pack the avatar once (its digest is its id); replicas get the bytes only when they ask."""
        return self._packed.add(avatar)

    def open_session(
        self, session_id: str, avatar_id: str, sink: Sink, *, output_size: tuple[int, int] | None = None,
        warm_up: bool = True,
    ) -> SessionInfo:  # fmt: skip
        remote = _Remote(session_id, avatar_id, sink, output_size)
        with self._lock:
            if session_id in self._sessions:
                raise MuseTalkError(f"Session {session_id!r} is already open.")
            self._sessions[session_id] = remote
        try:
            reply = self._call(self._open(remote, warm_up))
        except BaseException:
            with self._lock:
                self._sessions.pop(session_id, None)
            raise
        remote.pump = asyncio.run_coroutine_threadsafe(self._pump(remote), self._loop)
        return reply["info"]

    def submit(self, request: FrameRequest) -> None:
        remote = self._session(request.session_id)
        if remote is None or remote.closed:
            return
        self._loop.call_soon_threadsafe(self._send, remote, request)

    def cancel(self, session_id: str) -> None:
        remote = self._session(session_id)
        if remote is not None:
            self._loop.call_soon_threadsafe(self._cancel, remote)

    def close_session(self, session_id: str) -> None:
        with self._lock:
            remote = self._sessions.pop(session_id, None)
        if remote is None:
            return
        remote.closed = True
        self._loop.call_soon_threadsafe(self._close, remote)

    def close(self) -> None:
        """Close every session of this client and stop its loop thread."""
        with self._lock:
            ids = list(self._sessions)
        for session_id in ids:
            self.close_session(session_id)
        try:
            self._call(asyncio.sleep(0.1), timeout=5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)

    def session_replica(self, session_id: str) -> tuple[str, int, int]:
        """(replica id, replica pid, re-attaches so far) of an open session."""
        remote = self._session(session_id)
        if remote is None:
            raise MuseTalkError(f"Session {session_id!r} is not open.")
        return remote.replica, remote.pid, remote.reattaches

    def stats(self) -> ClusterStats:
        reports = self._call(self._stats(), timeout=30)
        caps = [r.stats.capacity for r in reports]
        lefts = [r.stats.capacity_left for r in reports]
        return ClusterStats(
            replicas=reports, sessions=sum(r.stats.sessions for r in reports),
            frames_per_s=sum(r.stats.frames_per_s for r in reports),
            queued_frames=sum(r.stats.queued_frames for r in reports),
            skipped_frames=sum(r.stats.skipped_frames for r in reports), frames=sum(r.stats.frames for r in reports),
            capacity=sum(caps) if caps and None not in caps else None,  # type: ignore[arg-type]
            capacity_left=sum(lefts) if lefts and None not in lefts else None,  # type: ignore[arg-type]
        )  # fmt: skip

    def capacity(self) -> int | None:
        return self.stats().capacity

    def session_limit(self) -> int | None:
        """None: the cluster admits a session (or refuses it with `CapacityError`) when it opens."""
        return None

    # ------------------------------------------------------------------ on the client's loop
    async def _open(self, remote: _Remote, warm_up: bool) -> dict[str, Any]:
        handle = self._handle.options(multiplexed_model_id=remote.key)
        args = (remote.id, remote.key, self._packed.name(remote.key), remote.output_size, warm_up)
        reply = await handle.open.remote(*args)
        if reply["status"] == "missing":
            reply = await handle.open.remote(*args, self._packed.blob(remote.key))
        if reply["status"] == "refused":
            raise CapacityError(reply["message"])
        if reply["status"] != "ok":
            raise BackendError(f"replica could not open session {remote.id}: {reply}")
        remote.replica, remote.pid = reply["replica"], reply["pid"]
        return reply

    def _pinned(self, remote: _Remote):
        return self._handle.options(multiplexed_model_id=remote.pin)

    def _send(self, remote: _Remote, request: FrameRequest) -> None:
        if remote.closed:
            return
        remote.pending[id(request)] = request
        remote.open_seqs.update(item.seq for item in request.items)
        if remote.attached:
            self._loop.create_task(self._send_now(remote, request))

    async def _send_now(self, remote: _Remote, request: FrameRequest) -> None:
        replica = remote.replica
        try:
            known = await self._pinned(remote).submit.remote(remote.id, shift_due(request, -time.monotonic()))
        except Exception as exc:  # the replica died: the results poll notices, re-attaches and re-sends these frames
            logger.warning("Frames for session {} did not reach replica {} ({}); re-sent once it re-attaches",
                           remote.id, replica, exc)  # fmt: skip
            return
        if not known and not remote.closed and remote.attached and remote.replica == replica:
            logger.warning("replica {} lost session {}: re-attaching", replica, remote.id)
            self._restart_pump(remote)

    def _cancel(self, remote: _Remote) -> None:
        remote.pending.clear()
        remote.open_seqs.clear()
        self._loop.create_task(self._quiet("cancel", remote.id, self._pinned(remote).cancel.remote(remote.id)))

    def _close(self, remote: _Remote) -> None:
        if remote.pump is not None:
            remote.pump.cancel()
        self._loop.create_task(self._quiet("close", remote.id, self._pinned(remote).close.remote(remote.id)))

    @staticmethod
    async def _quiet(action: str, session_id: str, response) -> None:
        """Await a best-effort call: a replica that cannot take it (gone, restarting) no longer holds the session."""
        try:
            await response
        except Exception as exc:
            logger.debug(
                "MuseTalk session {}: {} not delivered, its replica no longer holds it: {}", session_id, action, exc
            )

    def _restart_pump(self, remote: _Remote) -> None:
        remote.attached = False
        if remote.pump is not None:
            remote.pump.cancel()
        remote.pump = asyncio.run_coroutine_threadsafe(self._pump(remote, reattach=True), self._loop)

    async def _pump(self, remote: _Remote, reattach: bool = False) -> None:
        """Long-poll the session's results; when its replica fails or forgets it, re-attach and go on."""
        failures = 0
        while not remote.closed:
            if reattach:
                if failures > 1:  # a replica that takes the session but cannot keep it: back off
                    await asyncio.sleep(min(2.0, 0.05 * 2**failures))
                if not await self._reattach(remote):
                    return
            reattach = True
            try:
                while not remote.closed:
                    batch = await self._pinned(remote).poll.remote(remote.id, POLL_S)
                    if batch is None:
                        break
                    failures = 0
                    for result in batch:
                        self._deliver(remote, result)
                reason = "its replica no longer holds the session"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = f"{type(exc).__name__}: {exc}"
            failures += 1
            remote.attached = False
            if not remote.closed:
                logger.warning(
                    "MuseTalk session {} lost replica {} ({}); re-attaching", remote.id, remote.replica, reason
                )

    def _deliver(self, remote: _Remote, result: FrameResult) -> None:
        if remote.closed:
            return
        answered = set(result.images) | set(result.skipped)
        remote.open_seqs -= answered
        for key, request in list(remote.pending.items()):
            if not any(item.seq in remote.open_seqs for item in request.items):
                del remote.pending[key]
        try:
            remote.sink(result)
        except Exception as exc:
            logger.error("MuseTalk session {} failed to take its frames ({}): closing it", remote.id, exc)
            self.close_session(remote.id)

    async def _reattach(self, remote: _Remote) -> bool:
        """Open the session again wherever Serve routes it, then re-send the frames still owed."""
        deadline = time.monotonic() + self.reattach_s
        delay, last = 0.05, "no attempt"
        while not remote.closed:
            try:
                await asyncio.wait_for(self._open(remote, warm_up=False), timeout=max(1.0, deadline - time.monotonic()))
                remote.reattaches += 1
                remote.attached = True
                for request in list(remote.pending.values()):
                    owed = tuple(item for item in request.items if item.seq in remote.open_seqs)
                    if owed:
                        self._loop.create_task(self._send_now(remote, _subset(request, owed)))
                logger.info("MuseTalk session {} re-attached to replica {}", remote.id, remote.replica)
                return True
            except Exception as exc:
                last = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(1.0, delay * 2)
        if not remote.closed:
            message = f"no generation replica took the session back within {self.reattach_s:.0f} s ({last})"
            self.close_session(remote.id)
            try:
                remote.sink(FrameResult(remote.id, error=message))
            except Exception as exc:  # the consumer is gone or broken; the error must still reach the log
                logger.warning("MuseTalk session {} lost: {} (its consumer failed too: {})", remote.id, message, exc)
        return False

    async def _stats(self) -> list[ReplicaReport]:
        reports: dict[str, ReplicaReport] = {}
        if not _known_replicas():  # this process's router starts with its first request: ask any replica once
            await self._ask_stats([""], reports)
        await self._ask_stats(sorted(_known_replicas() - set(reports)), reports)
        return [reports[k] for k in sorted(reports)]

    async def _ask_stats(self, replica_ids: list[str], reports: dict[str, ReplicaReport]) -> None:
        replies = await asyncio.gather(
            *(self._handle.options(multiplexed_model_id=pinned_id("stats", r) if r else "").stats.remote()
              for r in replica_ids),
            return_exceptions=True,
        )  # fmt: skip
        for reply in replies:
            if isinstance(reply, BaseException):
                logger.warning("a MuseTalk replica did not report its stats: {}", reply)
            elif isinstance(reply, dict):
                reports[reply["replica"]] = ReplicaReport(
                    reply["replica"], reply["pid"], reply["sessions"], reply["stats"]
                )


def _known_replicas() -> set[str]:
    """Replica ids this process's routers have seen (every deployment of the app)."""
    return {replica for replicas in KNOWN_REPLICAS.values() for replica in replicas}


def _subset(request: FrameRequest, items: tuple) -> FrameRequest:
    if request.features is None:
        return dataclasses.replace(request, items=items)
    rows = [k for k, item in enumerate(request.items) if item in items]
    return dataclasses.replace(request, items=items, features=request.features[rows])
