"""One generation service per device: every live session's frames meet in one queue.

- One copy of the models. Sessions open with an avatar id and a sink, then `submit`
  `FrameRequest`s; answers (`FrameResult`) go to the sink from the service's threads.
- One worker thread forms batches across sessions and avatars: sessions in order of their
  most urgent frame, one frame each in turn (round-robin), up to the batch size, so a session
  that speaks all the time gets its share and no more. It waits at most `gather_s` for a batch
  to fill. Per session and batch the newest audio window is encoded once, and the windows of
  all sessions in the batch go through whisper together (each session's windows and last
  encoding: `musetalk.live.features`); then one UNet + VAE pass for the batch, rows from any
  avatar. Blending (and scaling to each session's output size) runs on a CPU thread pool
  while the worker starts the next batch.
- Frames that cannot be ready before they are due are dropped (the session shows them idle);
  if every queued frame is hopeless, one full batch of the newest still runs about once a
  second so the speed estimate follows the device instead of freezing.
- Speed: seconds per batch measured per batch size on real batches (the first batch of each
  size, which builds kernels, does not count); the steady per-frame cost is the best of them,
  in practice the full batch. Admission refuses a session past what that cost serves at 25 fps.
- A session whose sink fails, whose audio cannot be encoded, or which closes mid-utterance
  loses only its own frames; the others go on.

Values crossing the service's boundary are plain (`musetalk.live.requests`), so the same API
(`GenerationBackend`, musetalk/live/backend.py) can sit behind a process boundary.
"""

from __future__ import annotations

import atexit
import itertools
import os
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from loguru import logger

from musetalk.audio import FEATURES_PER_VIDEO_FRAME, WINDOW_SECONDS, positional_encoding
from musetalk.avatar.store import Avatar
from musetalk.config import VIDEO_FPS
from musetalk.errors import CapacityError, ConfigError
from musetalk.generate import compose_frame, model_step
from musetalk.live.backend import Sink
from musetalk.live.features import FeatureCache, FeatureRow, WindowEncoder, batch_features
from musetalk.live.requests import FrameItem, FrameRequest, FrameResult, SessionInfo
from musetalk.live.session import fit_image
from musetalk.models import Models

FRAME_SECONDS = 1.0 / VIDEO_FPS


@dataclass(frozen=True)
class ServiceSettings:
    batch_size: int | None = None  # frames per model batch (default: 8 on CUDA, 4 on CPU)
    whisper_window_s: float = WINDOW_SECONDS  # audio the encoder sees per window (30: MuseTalk's recipe)
    blend_threads: int | None = None  # CPU threads blending frames (default: half the cores, 1-4)
    # Torch intra-op threads on CPU (process-wide; default: the cores left after blending and one for the
    # event loop, at least 1). Measured: OpenMP threads that outnumber the free cores stall each other.
    torch_threads: int | None = None
    max_sessions: int | None = None  # hard cap on open sessions (None: only the measured capacity)
    admission: bool = True  # refuse sessions past the measured real-time capacity
    gather_s: float = 0.02  # how long the worker waits for a batch to fill

    def __post_init__(self) -> None:
        if self.batch_size is not None and not 1 <= self.batch_size <= 64:
            raise ConfigError("batch_size must be between 1 and 64.")
        if not 1.0 <= self.whisper_window_s <= WINDOW_SECONDS:
            raise ConfigError(f"whisper_window_s must be between 1 and {WINDOW_SECONDS} seconds.")
        if self.max_sessions is not None and self.max_sessions < 1:
            raise ConfigError("max_sessions must be at least 1.")
        if not 0.0 <= self.gather_s <= 1.0:
            raise ConfigError("gather_s must be between 0 and 1 second.")


@dataclass(frozen=True)
class ServiceStats:
    device: str
    sessions: int
    queued_frames: int
    batches: int
    frames: int
    skipped_frames: int
    errors: int
    batch_sizes: dict[int, int]  # batch size -> how many batches (since start)
    mean_batch: float | None  # over the last 5 s
    frames_per_s: float  # generated, over the last 5 s
    frame_cost_ms: float | None  # steady model cost per frame (full batches)
    capacity: int | None  # sessions served at 25 fps (None: not measured yet)
    capacity_left: int | None
    gpu_memory_mb: float | None
    gpu_peak_memory_mb: float | None
    stage_ms_per_frame: dict[str, float]  # features / model / blend, averaged over every generated frame


@dataclass
class _AvatarState:
    avatar: Avatar
    latents: torch.Tensor  # (N, 8, 32, 32) on the device, in the models' dtype


@dataclass
class _Pending:
    request: FrameRequest
    item: FrameItem
    index: int  # row in request.features (when given)
    queued: float  # perf_counter when it entered the queue


@dataclass
class _Session:
    id: str
    avatar_id: str
    sink: Sink
    output_size: tuple[int, int] | None
    queue: deque[_Pending] = field(default_factory=deque)
    features: FeatureCache = field(default_factory=FeatureCache)  # its audio windows and last encoding
    warm: bool = True  # a warm-up batch is owed


class GenerationService:
    """Batches the frames of every live session on one device (see the module docstring); a `GenerationBackend`."""

    _shared: dict[int, GenerationService] = {}
    _shared_lock = threading.Lock()

    def __init__(
        self, models: Models, settings: ServiceSettings | None = None, *, clock: Callable[[], float] = time.monotonic
    ):
        self.models = models
        self.settings = settings or ServiceSettings()
        self.batch_size = self.settings.batch_size or (8 if models.device.type == "cuda" else 4)
        self.clock = clock
        self.encoder = WindowEncoder(models, window_seconds=self.settings.whisper_window_s)
        self._pe = positional_encoding(50, models.audio_dim).to(models.device, models.dtype)
        self._timestep = torch.zeros(1, device=models.device, dtype=torch.long)
        self._cond = threading.Condition()
        self._model_lock = threading.Lock()
        self._avatars: dict[str, _AvatarState] = {}
        self._sessions: dict[str, _Session] = {}
        self._worker: threading.Thread | None = None
        self._blender: ThreadPoolExecutor | None = None
        self._batch_s: dict[int, float] = {}  # batch size -> seconds per batch (EMA of steady batches)
        self._sizes_seen: set[int] = set()
        self._last_measured = 0.0
        self._recent: deque[tuple[float, int]] = deque(maxlen=2000)  # (perf_counter, batch size)
        self._counts = Counter()
        self._stage_s: Counter = Counter()  # seconds spent per stage, summed
        self._batch_sizes: Counter = Counter()

    # ------------------------------------------------------------------ sharing
    @classmethod
    def for_models(cls, models: Models, settings: ServiceSettings | None = None) -> GenerationService:
        """The process's service for `models` (created on first use; `settings` only count then)."""
        with cls._shared_lock:
            service = cls._shared.get(id(models))
            if service is None or service.models is not models:
                service = cls._shared[id(models)] = cls(models, settings)
            return service

    # ------------------------------------------------------------------ avatars and sessions
    def add_avatar(self, avatar: Avatar) -> str:
        """Keep `avatar` (its latents on the device) and return its id for `open_session`."""
        base = f"{avatar.name}@{avatar.manifest.created}"
        with self._cond:
            avatar_id, n = base, 1
            while avatar_id in self._avatars and self._avatars[avatar_id].avatar is not avatar:
                n += 1  # another avatar with the same name and time (synthetic ones): keep both
                avatar_id = f"{base}#{n}"
            if avatar_id not in self._avatars:
                latents = avatar.latents.to(self.models.device, self.models.dtype)
                self._avatars[avatar_id] = _AvatarState(avatar, latents)
                self._evict_unused_avatars(keep=avatar_id)
        return avatar_id

    def _evict_unused_avatars(self, keep: str, limit: int = 8) -> None:
        used = {s.avatar_id for s in self._sessions.values()} | {keep}
        unused = [a for a in self._avatars if a not in used]
        for avatar_id in unused[: max(0, len(self._avatars) - limit)]:
            del self._avatars[avatar_id]

    def open_session(
        self, session_id: str, avatar_id: str, sink: Sink, *, output_size: tuple[int, int] | None = None,
        warm_up: bool = True,
    ) -> SessionInfo:  # fmt: skip
        """Join the service; refused with `CapacityError` when it cannot serve one more in real time."""
        with self._cond:
            if avatar_id not in self._avatars:
                raise ConfigError(f"Avatar {avatar_id!r} is not loaded on this service: add_avatar() first.")
            if session_id in self._sessions:
                raise ConfigError(f"Session {session_id!r} is already open.")
            limit = self.session_limit()
            if limit is not None and len(self._sessions) >= limit:
                raise CapacityError(
                    f"This device serves {limit} sessions at {VIDEO_FPS} fps; {len(self._sessions)} are running. "
                    "Stop a bot or add a GPU."
                )
            self._sessions[session_id] = _Session(session_id, avatar_id, sink, output_size, warm=warm_up)
            self._ensure_worker()
            self._cond.notify_all()
        return SessionInfo(session_id, avatar_id, self.batch_size, min(20.0, self.encoder.window_seconds))

    def session_limit(self) -> int | None:
        """Most sessions admitted now: the hard cap and the measured capacity (at least 1)."""
        limits = [self.settings.max_sessions] if self.settings.max_sessions else []
        capacity = self.capacity()
        if self.settings.admission and capacity is not None:
            limits.append(max(1, capacity))
        return min(limits) if limits else None

    def submit(self, request: FrameRequest) -> None:
        """Queue frames of an open session (unknown sessions are ignored: they closed meanwhile)."""
        now = time.perf_counter()
        with self._cond:
            session = self._sessions.get(request.session_id)
            if session is None:
                return
            session.features.offer(request)
            for k, item in enumerate(request.items):
                session.queue.append(_Pending(request, item, k, now))
            self._cond.notify_all()

    def cancel(self, session_id: str) -> None:
        """Drop the session's queued frames (an interruption); frames already in a batch still arrive."""
        with self._cond:
            session = self._sessions.get(session_id)
            if session is not None:
                session.queue.clear()
                session.features.clear()

    def close_session(self, session_id: str) -> None:
        with self._cond:
            self._sessions.pop(session_id, None)
            self._cond.notify_all()

    def close(self) -> None:
        """Close every session and let the worker end."""
        with self._cond:
            self._sessions.clear()
            self._cond.notify_all()
            worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join(timeout=10)

    # ------------------------------------------------------------------ speed
    def frame_cost(self) -> float | None:
        """Steady model seconds per frame: the cheapest per-frame cost of any measured batch size."""
        with self._cond:
            costs = [s / n for n, s in self._batch_s.items()]
        return min(costs) if costs else None

    def capacity(self) -> int | None:
        cost = self.frame_cost()
        return None if cost is None else int(FRAME_SECONDS / cost)

    def _estimate(self, n: int) -> float | None:
        """Seconds a batch of `n` frames takes (the nearest measured size, scaled)."""
        if not self._batch_s:
            return None
        size = min(self._batch_s, key=lambda b: (abs(b - n), -b))
        return self._batch_s[size] / size * n

    def _record(self, n: int, seconds: float) -> None:
        with self._cond:
            self._batch_sizes[n] += 1
            self._recent.append((time.perf_counter(), n))
            if n not in self._sizes_seen:
                self._sizes_seen.add(n)  # the first batch of a size builds kernels: not steady
                return
            old = self._batch_s.get(n)
            self._batch_s[n] = seconds if old is None else 0.7 * old + 0.3 * seconds
            self._last_measured = time.perf_counter()

    def calibrate(self, avatar_id: str, *, repeats: int = 2) -> float:
        """Measure full batches now (a warm-up batch first); returns the steady seconds per frame."""
        self._apply_threads()
        state = self._avatars[avatar_id]
        features = torch.zeros(self.batch_size, FEATURES_PER_VIDEO_FRAME * 5, self.models.audio_dim)
        positions = list(range(self.batch_size))
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with self._model_lock:
                self._faces([state] * self.batch_size, positions, features)
            self._record(self.batch_size, time.perf_counter() - start)
        cost = self.frame_cost()
        assert cost is not None
        return cost

    # ------------------------------------------------------------------ stats
    def stats(self) -> ServiceStats:
        now = time.perf_counter()
        with self._cond:
            recent = [n for t, n in self._recent if now - t <= 5.0]
            sessions = len(self._sessions)
            queued = sum(len(s.queue) for s in self._sessions.values())
            counts = Counter(self._counts)
            sizes = dict(sorted(self._batch_sizes.items()))
            stages = {k: v * 1000 / max(counts["frames"], 1) for k, v in self._stage_s.items()}
        cost = self.frame_cost()
        capacity = self.capacity()
        limit = self.session_limit()
        gpu = peak = None
        if self.models.device.type == "cuda":
            gpu = torch.cuda.memory_allocated(self.models.device) / 2**20
            peak = torch.cuda.max_memory_allocated(self.models.device) / 2**20
        return ServiceStats(
            device=self.models.describe(), sessions=sessions, queued_frames=queued,
            batches=sum(sizes.values()), frames=counts["frames"], skipped_frames=counts["skipped"],
            errors=counts["errors"], batch_sizes=sizes, mean_batch=sum(recent) / len(recent) if recent else None,
            frames_per_s=sum(recent) / 5.0, frame_cost_ms=cost * 1000 if cost is not None else None,
            capacity=capacity, capacity_left=None if limit is None else max(0, limit - sessions),
            gpu_memory_mb=gpu, gpu_peak_memory_mb=peak, stage_ms_per_frame=stages,
        )  # fmt: skip

    # ------------------------------------------------------------------ worker
    def _ensure_worker(self) -> None:
        if self._worker is None:
            self._apply_threads()
            self._blender = ThreadPoolExecutor(max_workers=self._blend_threads(), thread_name_prefix="musetalk-blend")
            self._worker = threading.Thread(target=self._run, name="musetalk-service", daemon=True)
            self._worker.start()
            _RUNNING.add(self)

    @staticmethod
    def default_blend_threads(settings: ServiceSettings) -> int:
        return settings.blend_threads or max(1, min(4, (os.cpu_count() or 2) // 2))

    @staticmethod
    def default_torch_threads(settings: ServiceSettings) -> int:
        """CPU: the cores left after blending and one for the event loop (and encoders), at least 1."""
        cores = os.cpu_count() or 2
        return settings.torch_threads or max(1, cores - GenerationService.default_blend_threads(settings) - 1)

    def _blend_threads(self) -> int:
        return self.default_blend_threads(self.settings)

    def _apply_threads(self) -> None:
        if self.models.device.type == "cpu":
            torch.set_num_threads(self.default_torch_threads(self.settings))

    def _run(self) -> None:
        blender = self._blender
        try:
            while True:
                job = self._next_job()
                if job is None:
                    return
                kind, payload = job
                if kind == "warm":
                    self._warm_up(payload)
                else:
                    self._run_batch(payload)
        finally:
            if blender is not None:
                blender.shutdown(wait=True)

    def _next_job(self) -> tuple[str, object] | None:
        """Block until there is work: a session's warm-up, or a batch. None: no sessions left."""
        with self._cond:
            while True:
                if not self._sessions:
                    self._worker = None
                    self._blender = None
                    return None
                for session in self._sessions.values():
                    if session.warm:
                        session.warm = False
                        return "warm", session
                self._drop_hopeless()
                queued = [s for s in self._sessions.values() if s.queue]
                if not queued:
                    self._cond.wait()
                    continue
                total = sum(len(s.queue) for s in queued)
                waited = time.perf_counter() - min(s.queue[0].queued for s in queued)
                if total >= self.batch_size or waited >= self.settings.gather_s:
                    return "batch", self._take_batch(queued)
                self._cond.wait(timeout=self.settings.gather_s - waited)

    def _drop_hopeless(self) -> None:
        """Frames that cannot be ready before they are due are given up (the session shows them idle)."""
        queued = [p for s in self._sessions.values() for p in s.queue]
        estimate = self._estimate(min(self.batch_size, len(queued)))  # the batch that would run next
        if estimate is None:
            return
        now = self.clock()
        hopeful = [p for p in queued if now + estimate <= p.item.due]
        if hopeful or not queued:
            keep = {id(p) for p in hopeful}
        elif time.perf_counter() - self._last_measured > 1.0:
            newest = sorted(queued, key=lambda p: p.item.due)[-self.batch_size :]  # keeps the estimate fresh
            keep = {id(p) for p in newest}
        else:
            keep = set()
        results = []
        for session in self._sessions.values():
            dropped = [p.item.seq for p in session.queue if id(p) not in keep]
            if dropped:
                session.queue = deque(p for p in session.queue if id(p) in keep)
                self._counts["skipped"] += len(dropped)
                results.append((session, tuple(dropped)))
        cost, capacity = self.frame_cost(), self.capacity()
        for session, dropped in results:
            result = FrameResult(
                session.id, skipped=dropped, frame_cost_s=cost, capacity=capacity, sessions=len(self._sessions)
            )
            self._post(session, result)

    def _take_batch(self, queued: list[_Session]) -> list[tuple[_Session, _Pending]]:
        """Round-robin over sessions ordered by their most urgent frame, up to the batch size."""
        queued.sort(key=lambda s: s.queue[0].item.due)
        batch: list[tuple[_Session, _Pending]] = []
        while len(batch) < self.batch_size and any(s.queue for s in queued):
            for session in queued:
                if session.queue and len(batch) < self.batch_size:
                    batch.append((session, session.queue.popleft()))
        return batch

    def _warm_up(self, session: _Session) -> None:
        """First model call for a session: builds the device's kernels and checks its avatar; not timed."""
        state = self._avatars.get(session.avatar_id)
        if state is None:
            return
        n = min(2, self.batch_size)
        try:
            with self._model_lock:
                self._faces(
                    [state] * n, list(range(n)), torch.zeros(n, FEATURES_PER_VIDEO_FRAME * 5, self.models.audio_dim)
                )
        except Exception as exc:  # reported to that session only
            logger.warning("MuseTalk warm-up for session {} failed: {}", session.id, exc)
            self._post(session, FrameResult(session.id, error=f"warm-up failed: {exc}"))

    def _run_batch(self, batch: list[tuple[_Session, _Pending]]) -> None:
        start = time.perf_counter()
        with self._model_lock:
            rows = [FeatureRow(s.id, s.features, p.request, p.index) for s, p in batch]
            features, failed = batch_features(self.encoder, rows)
            encoded = time.perf_counter()
            good = [(s, p) for (s, p), f in zip(batch, features) if f is not None]
            faces = None
            if good:
                try:
                    states = [self._avatars[s.avatar_id] for s, _ in good]
                    feats = torch.stack([f for f in features if f is not None])
                    faces = self._faces(states, [p.item.position for _, p in good], feats)
                    with self._cond:
                        self._stage_s["features"] += encoded - start
                        self._stage_s["model"] += time.perf_counter() - encoded
                except Exception as exc:  # a model failure fails this batch's frames, not the service
                    logger.exception("MuseTalk batch of {} frames failed", len(good))
                    failed.update({s.id: str(exc) for s, _ in good})
                    good, faces = [], None
        if good:
            self._record(len(batch), time.perf_counter() - start)
        for session_id, message in failed.items():
            session = self._sessions.get(session_id)
            if session is not None:
                self._counts["errors"] += 1
                self._post(session, FrameResult(session_id, error=f"generation failed: {message}"))
        if faces is not None:
            groups: dict[str, list[int]] = {}
            for k, (session, _) in enumerate(good):
                groups.setdefault(session.id, []).append(k)
            for rows in groups.values():
                self._blender.submit(self._deliver, [good[k] for k in rows], faces[rows])

    def _faces(self, states: Sequence[_AvatarState], positions: Sequence[int], features: torch.Tensor) -> np.ndarray:
        """UNet + VAE decode for rows from any avatars -> `(B, 256, 256, 3) uint8` on the host."""
        latents = torch.cat([
            st.latents[st.avatar.frame_index(p)].unsqueeze(0) for st, p in zip(states, positions)
        ])  # fmt: skip
        faces = model_step(self.models, latents, features, self._pe, self._timestep)
        return faces.cpu().numpy()

    def _deliver(self, rows: list[tuple[_Session, _Pending]], faces: np.ndarray) -> None:
        """Blend thread: compose each face into its avatar frame, scale it, hand it to the session."""
        session = rows[0][0]
        if session.id not in self._sessions:
            return  # closed meanwhile
        start = time.perf_counter()
        try:
            state = self._avatars[session.avatar_id]
            images = {}
            for (_, pending), face in zip(rows, faces):
                frame = compose_frame(state.avatar, pending.item.position, face)
                images[pending.item.seq] = fit_image(frame, session.output_size) if session.output_size else frame
        except Exception as exc:
            logger.exception("MuseTalk blending failed for session {}", session.id)
            self._post(session, FrameResult(session.id, error=f"blending failed: {exc}"))
            return
        with self._cond:
            self._counts["frames"] += len(images)
            self._stage_s["blend"] += time.perf_counter() - start
        cost = self.frame_cost()
        result = FrameResult(
            session.id, images=images, frame_cost_s=cost, capacity=self.capacity(), sessions=len(self._sessions)
        )
        self._post(session, result)

    def _post(self, session: _Session, result: FrameResult) -> None:
        """Hand a result to its session; a sink that fails closes that session only."""
        try:
            session.sink(result)
        except Exception as exc:
            logger.error("MuseTalk session {} failed to take its frames ({}): closing it", session.id, exc)
            with self._cond:
                if self._sessions.get(session.id) is session:
                    del self._sessions[session.id]
                    self._counts["errors"] += 1


def new_session_id(prefix: str = "s") -> str:
    return f"{prefix}-{next(_ids)}-{os.getpid()}"


_ids = itertools.count(1)


# Services whose worker thread runs. At interpreter exit each is closed and its worker joined before Python
# finalizes: a daemon thread still inside torch (a warm-up, a batch) would otherwise be unwound through C++
# frames by the finalizer, and the process would abort ("terminate called without an active exception").
_RUNNING: weakref.WeakSet[GenerationService] = weakref.WeakSet()


@atexit.register
def _close_running_services() -> None:
    for service in list(_RUNNING):
        service.close()
