"""The generation service as a Ray Serve deployment: one replica per GPU, one service per replica.

Each replica loads one copy of the models and runs one `GenerationService`, so the
cross-session batching happens inside the replica. Avatars are Serve "models": the avatar
digest is the multiplexed model id, loaded on first use from the replica's cache (bytes sent
by the caller) or from a shared avatar folder, kept LRU. Sessions talk to their replica
through `open` / `submit` / `cancel` / `close` / `poll` (a long poll for `FrameResult` lists);
the client pins them there (`musetalk.serve.router`).

Due times cross the wire relative to "now" (seconds from the send), so caller and replica
clocks need not agree across machines.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from loguru import logger
from ray import serve
from ray.serve.config import RequestRouterConfig

from musetalk.avatar.store import Avatar, AvatarStore
from musetalk.config import ModelPaths, RuntimeSettings
from musetalk.errors import AvatarNotHeldError, CapacityError, MuseTalkError
from musetalk.live.requests import FrameRequest, FrameResult
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.models import load_models
from musetalk.serve.avatars import AvatarCache

APP_NAME = "musetalk"
DEPLOYMENT_NAME = "MuseTalkGeneration"
MAX_AVATARS_PER_REPLICA = 16
ORPHAN_S = 10.0  # a session whose client stopped polling this long is closed


@dataclasses.dataclass(frozen=True)
class ReplicaConfig:
    """What every replica loads; `serve deploy` passes it as the application's args."""

    models_dir: str = ""
    device: str = "auto"
    dtype: str = "auto"
    service: dict[str, Any] = dataclasses.field(default_factory=dict)  # ServiceSettings fields
    avatar_dir: str | None = None  # shared avatar store (same path on every node), optional
    cache_dir: str | None = None  # where received avatar blobs are kept (default: a temp folder)
    random_models: str | None = None  # benchmarks only: "tiny" or "full" random weights instead of models_dir
    seed: int = 0  # with random_models


def shift_due(request: FrameRequest, delta: float) -> FrameRequest:
    """The request with every item's due moved by `delta` seconds (clock translation)."""
    items = tuple(dataclasses.replace(item, due=item.due + delta) for item in request.items)
    return dataclasses.replace(request, items=items)


class GenerationReplica:
    """One replica: models, one generation service, its avatars and its sessions' result queues."""

    def __init__(self, config: dict[str, Any]):
        cfg = ReplicaConfig(**config)
        models = _load(cfg)
        self.service = GenerationService(models, ServiceSettings(**cfg.service))
        self.cache = AvatarCache(cfg.cache_dir or tempfile.mkdtemp(prefix="musetalk-avatars-"))
        self.shared = AvatarStore(cfg.avatar_dir) if cfg.avatar_dir else None
        self.replica = serve.get_replica_context().replica_id.unique_id
        self._names: dict[str, str] = {}  # digest -> avatar name (for the shared folder)
        self._queues: dict[str, asyncio.Queue] = {}
        self._polled: dict[str, float] = {}  # session -> when its client last asked for results
        self._reaper: asyncio.Task | None = None
        logger.info("MuseTalk replica {} ready on {} (pid {})", self.replica, models.describe(), os.getpid())

    # ------------------------------------------------------------------ avatars (Serve multiplexing)
    @serve.multiplexed(max_num_models_per_replica=MAX_AVATARS_PER_REPLICA)
    async def _avatar(self, key: str) -> Avatar:
        if self.cache.has(key):
            return await asyncio.to_thread(self.cache.load, key)
        name = self._names.get(key)
        if self.shared is not None and name and self.shared.exists(name):
            return await asyncio.to_thread(self.shared.load, name)
        raise AvatarNotHeldError(key)

    # ------------------------------------------------------------------ sessions
    async def open(
        self, session_id: str, key: str, name: str, output_size: tuple[int, int] | None, warm_up: bool,
        blob: bytes | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Open (or re-open) a session here: {"status": "ok" | "missing" | "refused", ...}."""
        loop = asyncio.get_running_loop()
        if blob is not None and not self.cache.has(key):
            await asyncio.to_thread(self.cache.put, key, blob)
        self._names[key] = name
        try:
            avatar = await self._avatar(key)
        except AvatarNotHeldError:
            return {"status": "missing"}
        avatar_id = await asyncio.to_thread(self.service.add_avatar, avatar)
        self._end(session_id)  # a re-attach to this same replica replaces the old session
        queue: asyncio.Queue = asyncio.Queue()

        def sink(result: FrameResult) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, result)

        try:
            info = self.service.open_session(session_id, avatar_id, sink, output_size=output_size, warm_up=warm_up)
        except CapacityError as exc:
            return {"status": "refused", "message": str(exc)}
        self._queues[session_id] = queue
        self._polled[session_id] = time.monotonic()
        if self._reaper is None:
            self._reaper = asyncio.create_task(self._reap())
        return {"status": "ok", "replica": self.replica, "pid": os.getpid(), "info": info}

    async def submit(self, session_id: str, request: FrameRequest) -> bool:
        """Queue frames (dues relative to the send); False: this replica does not hold the session."""
        if session_id not in self._queues:
            return False
        self.service.submit(shift_due(request, self.service.clock()))
        return True

    async def cancel(self, session_id: str) -> bool:
        self.service.cancel(session_id)
        return session_id in self._queues

    async def close(self, session_id: str) -> None:
        self._end(session_id)

    def _end(self, session_id: str) -> None:
        queue = self._queues.pop(session_id, None)
        self._polled.pop(session_id, None)
        self.service.close_session(session_id)
        if queue is not None:
            queue.put_nowait(None)

    async def poll(self, session_id: str, wait_s: float = 0.5) -> list[FrameResult] | None:
        """The session's results so far, waiting up to `wait_s` for the first; None: not held here.

        A long poll rather than a streaming response: Ray Client (`ray://`) cannot stream.
        """
        queue = self._queues.get(session_id)
        if queue is None:
            return None
        self._polled[session_id] = time.monotonic()
        try:
            first = await asyncio.wait_for(queue.get(), timeout=wait_s)
        except asyncio.TimeoutError:
            return [] if self._queues.get(session_id) is queue else None
        if first is None:
            return None
        batch = [first]
        while not queue.empty():
            nxt = queue.get_nowait()
            if nxt is None:
                queue.put_nowait(None)  # the next poll says the session ended
                break
            batch.append(nxt)
        return batch

    async def _reap(self) -> None:
        """Close sessions nobody polls any more (their bot died): frees their capacity."""
        while self._queues:
            await asyncio.sleep(ORPHAN_S / 4)
            now = time.monotonic()
            for session_id in [s for s in self._queues if now - self._polled.get(s, now) > ORPHAN_S]:
                logger.warning("MuseTalk session {} was not polled for {:.0f} s: closing it", session_id, ORPHAN_S)
                self._end(session_id)
        self._reaper = None

    # ------------------------------------------------------------------ reports
    async def stats(self) -> dict[str, Any]:
        return {"replica": self.replica, "pid": os.getpid(), "sessions": sorted(self._queues),
                "stats": await asyncio.to_thread(self.service.stats)}  # fmt: skip

    def record_autoscaling_stats(self) -> dict[str, float]:
        """Custom metrics for the autoscaling policy (`musetalk.serve.autoscale`)."""
        stats = self.service.stats()
        return {"queued_frames": float(stats.queued_frames), "sessions": float(stats.sessions),
                "capacity": float(stats.capacity or 0)}  # fmt: skip

    def __del__(self) -> None:
        service = getattr(self, "service", None)
        if service is not None:
            service.close()


def _load(cfg: ReplicaConfig):
    if cfg.random_models is not None:  # random weights (benchmarks, speed only)
        import torch

        from musetalk import accel
        from musetalk.testing import build_random_models

        device = torch.device(
            "cuda" if cfg.device == "auto" and torch.cuda.is_available() else cfg.device.replace("auto", "cpu")
        )
        models = build_random_models(tiny=cfg.random_models == "tiny", device=device, seed=cfg.seed)
        return accel.optimize_for_inference(models)
    if not cfg.models_dir:
        raise MuseTalkError("The MuseTalk Serve app needs models_dir (the models folder, same path on every node).")
    return load_models(ModelPaths(Path(cfg.models_dir)), RuntimeSettings(device=cfg.device, dtype=cfg.dtype))


def deployment_options(*, gpus: float, replicas: int | None = None) -> dict[str, Any]:
    """Serve options: one GPU (or one CPU) per replica, the pinning router, room for many streams."""
    actor = {"num_gpus": gpus} if gpus else {"num_cpus": 1}
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": 1000,  # every session keeps one results poll open
        "request_router_config": RequestRouterConfig(request_router_class="musetalk.serve.router:PinnedRouter"),
        "health_check_period_s": 2.0,
        "health_check_timeout_s": 10.0,
    }
    if replicas is not None:
        options["num_replicas"] = replicas
    return options


def build(config: ReplicaConfig, *, replicas: int | None = 1, gpus: float | None = None):
    """The Serve application (bind-ready) for `config`."""
    if gpus is None:
        gpus = 0.0 if config.device == "cpu" else (1.0 if _cluster_has_gpus() else 0.0)
    deployment = serve.deployment(GenerationReplica, **deployment_options(gpus=gpus, replicas=replicas))
    return deployment.bind(dataclasses.asdict(config))


def _cluster_has_gpus() -> bool:
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


def app_builder(args: dict[str, Any]):
    """`serve deploy` entry (import_path: musetalk.serve.deployment:app_builder); args are ReplicaConfig fields.

    Replica count, autoscaling and resources come from the config file's `deployments:` section.
    """
    fields = {f.name for f in dataclasses.fields(ReplicaConfig)}
    unknown = set(args) - fields
    if unknown:
        raise ValueError(f"unknown MuseTalk app args {sorted(unknown)}; known: {sorted(fields)}")
    config = ReplicaConfig(**args)
    gpus = 0.0 if config.device == "cpu" else 1.0
    return build(config, replicas=None, gpus=gpus)
