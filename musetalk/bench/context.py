"""What every section of `python -m musetalk.bench report` shares: its settings, its plan, the models.

`ReportSettings` are the command's flags; `Plan` says how much each section measures for a size
and a device (tiny CPU runs are a smoke test of minutes' worth of code in seconds; full-size
CUDA runs are the figures); `Context` holds the models built once for the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from musetalk import accel
from musetalk.avatar.store import Avatar
from musetalk.bench.machine import memory_now, parameter_mb
from musetalk.bench.speed import resolve_device
from musetalk.models import Models
from musetalk.testing import build_random_models, synthetic_avatar, synthetic_features

BATCH_SIZES = (1, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class ReportSettings:
    size: str = "full"  # full: MuseTalk's published architectures; tiny: the test models
    device: str = "auto"  # auto | cuda | cpu | cuda:N
    out: Path = Path("bench-report")
    budget_s: float = 480.0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size not in ("full", "tiny"):
            raise ValueError(f"size must be full or tiny, not {self.size!r}")
        if self.budget_s <= 0:
            raise ValueError("the budget must be positive")


@dataclass(frozen=True)
class TtsPacing:
    """TTS-like audio for the first-mouth measurement: utterances streamed faster than real time."""

    utterances: int = 10
    utterance_s: float = 1.6
    chunk_s: float = 0.1  # audio per TTS chunk
    speed: float = 2.0  # chunks arrive this many times faster than real time
    gap_s: float = 0.4  # silence between utterances


@dataclass(frozen=True)
class Plan:
    """How much each section measures (frames, sessions, seconds) for one size and device."""

    batch_sizes: tuple[int, ...] = BATCH_SIZES
    reference_frames: int = 16  # frames compared with the fp32 reference
    timed_batches: int = 4  # batches per timed pass (at least `min_frames` frames)
    min_frames: int = 32
    stage_batch: int = 16  # the batch whose stage split the stage table shows (the generator's default)
    encode_frames: int = 50
    memory_sessions: int = 4
    streams_seconds: float = 5.0
    streams_limit: int = 64
    mouth: TtsPacing = field(default_factory=TtsPacing)
    speedups: tuple[str, ...] = ("channels_last", "compile")


def plan_for(size: str, device: torch.device) -> Plan:
    if device.type == "cuda":
        return Plan() if size == "full" else Plan(streams_seconds=3.0, mouth=TtsPacing(utterances=5))
    if size == "tiny":
        return Plan(
            reference_frames=8, timed_batches=1, min_frames=4, stage_batch=4, encode_frames=10, memory_sessions=2,
            streams_seconds=1.0, streams_limit=2, mouth=TtsPacing(utterances=2, utterance_s=0.8),
            speedups=("channels_last",),
        )  # fmt: skip
    # full size on CPU: seconds per frame; what fits the budget is measured, the rest is marked skipped
    return Plan(
        reference_frames=4, timed_batches=1, min_frames=4, stage_batch=4, encode_frames=25, memory_sessions=2,
        streams_seconds=3.0, streams_limit=2, mouth=TtsPacing(utterances=2, utterance_s=0.8),
        speedups=("channels_last",),
    )  # fmt: skip


@dataclass
class Context:
    """Built once per run: the device, the fast-path models, a 720p synthetic avatar, audio features."""

    settings: ReportSettings
    plan: Plan
    device: torch.device
    plain: Models  # the fast path's dtype, no speed-ups (speed-up variants are made from it)
    models: Models  # what the product runs: `accel.optimize_for_inference(plain)`
    avatar: Avatar
    features: torch.Tensor  # (frames, 50, D): enough for the largest timed pass
    threads: int  # torch threads of the offline sections (the service sets its own)
    build: dict[str, Any]  # model build time and memory
    log: Callable[[str], None]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)  # section name -> its data

    def frame_cost_s(self, default: float = 0.1) -> float:
        """Seconds per generated frame measured so far (the service's, else the generator's best): for estimates."""
        service_ms = self.results.get("first_mouth", {}).get("frame_cost_ms")
        if service_ms:
            return service_ms / 1000
        fps = [r["fps"] for r in self.results.get("generation", {}).get("batches", []) if r.get("fps")]
        return 1 / max(fps) if fps else default

    def offline_threads(self) -> None:
        """The generation sections run at the thread count the run started with (a service changes it)."""
        torch.set_num_threads(self.threads)


def build_context(settings: ReportSettings, log: Callable[[str], None]) -> Context:
    device = resolve_device(settings.device)
    plan = plan_for(settings.size, device)
    before = memory_now(device)
    start = time.perf_counter()
    plain = build_random_models(tiny=settings.size == "tiny", device=device, seed=settings.seed)
    seconds = time.perf_counter() - start
    after = memory_now(device)
    models = accel.optimize_for_inference(plain, copy_modules=True)
    frames = max(plan.reference_frames, max(plan.batch_sizes) * plan.timed_batches, plan.min_frames)
    build = {
        "seconds": seconds,
        "gpu_mb": None if after["gpu_mb"] is None else after["gpu_mb"] - before["gpu_mb"],
        "rss_mb": after["rss_mb"] - before["rss_mb"],
        "parameters_mb": {n: parameter_mb(getattr(plain, n)) for n in ("unet", "vae", "whisper")},
    }
    log(f"built {settings.size} random models on {device} ({plain.describe()}) in {seconds:.1f} s")
    return Context(
        settings=settings, plan=plan, device=device, plain=plain, models=models,
        avatar=synthetic_avatar(seed=settings.seed), features=synthetic_features(frames, plain.audio_dim, seed=settings.seed + 1),
        threads=torch.get_num_threads(), build=build, log=log,
    )  # fmt: skip
