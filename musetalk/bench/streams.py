"""Live-stream benchmark: `python -m musetalk.bench --streams N [--find-max] [--size tiny|full]`.

Paces N sessions of continuous speech in real time (20 ms chunks, as WebRTC delivers them)
against the generation service, through the same `LiveSession` scheduling the bot uses,
and reports per N:

* aggregate generated frames/s and per-session generated fps (25 = every frame lip-synced);
* late frames % (speech frames shown idle because their image missed the latency budget);
* p50 / p95 latency from a frame's last audio sample arriving to its image arriving (frames
  shown generated only: an image that missed its due time was shown idle);
* memory (process peak RSS; GPU peak on CUDA), the service's per-frame cost and mean batch.

Each N runs twice: one shared service (cross-session batching) and one service per session
(each session batches only its own frames, like one bot per process), so the gain is a ratio.
`--find-max` searches the largest N with >= 24 fps per session and < 1 % late frames.
Random weights: `--size tiny` (the test-suite architecture, default on CPU) or `full`
(MuseTalk's published sizes, default on CUDA); the figures are speed only.

`--backend ray[://ADDRESS] [--replicas R]`: the same paced sessions sent to the Ray Serve
deployment through `RayGenerationClient` instead of an in-process service, printed next to the
in-process shared-service row for the same N. The replicas build the same random models
(`ReplicaConfig.random_models`), so the figures compare transport and placement only.
"""

from __future__ import annotations

import dataclasses
import queue
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from musetalk.avatar.store import Avatar
from musetalk.config import AUDIO_SAMPLE_RATE, SAMPLES_PER_VIDEO_FRAME, VIDEO_FPS
from musetalk.live.requests import FrameResult
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.live.session import LiveSession, LiveSettings
from musetalk.models import Models

CHUNK = 320  # 20 ms at 16 kHz
GOOD_FPS = 24.0
GOOD_LATE_PCT = 1.0


@dataclass(frozen=True)
class StreamsOptions:
    seconds: float = 10.0  # speech per session
    latency_budget_s: float = 0.2
    batch_size: int | None = None
    whisper_window_s: float = 30.0
    avatars: int = 4  # distinct avatars, given to sessions in turn
    frame_size: tuple[int, int] = (512, 512)


@dataclass(frozen=True)
class StreamsResult:
    streams: int
    shared: bool
    generated_fps: float  # all sessions together
    session_fps: float  # mean generated fps per session
    min_session_fps: float
    late_pct: float
    p50_ms: float | None  # last audio sample of a frame -> its image
    p95_ms: float | None
    frame_cost_ms: float | None
    mean_batch: float | None
    peak_rss_mb: float
    gpu_peak_mb: float | None

    @property
    def good(self) -> bool:
        return self.min_session_fps >= GOOD_FPS and self.late_pct < GOOD_LATE_PCT


def bench_avatars(opts: StreamsOptions, seed: int = 0) -> list[Avatar]:
    """`opts.avatars` distinct synthetic avatars of `opts.frame_size`, given to sessions in turn."""
    from musetalk.testing import synthetic_avatar

    avatars = []
    for k in range(opts.avatars):
        avatar = synthetic_avatar(frames=10, size=opts.frame_size, face_box=(150, 140, 362, 400), seed=seed + k)
        avatars.append(dataclasses.replace(avatar, manifest=dataclasses.replace(avatar.manifest, name=f"bench{k}")))
    return avatars


def result_dict(r: StreamsResult) -> dict:
    """A row as plain values (for `--json` and the report), with whether it counts as served."""
    return {**dataclasses.asdict(r), "good": r.good}


def speech_like(seconds: float, seed: int) -> np.ndarray:
    """Noise shaped into ~4 syllables a second: float32 16 kHz, no silence gaps longer than 100 ms."""
    rng = np.random.default_rng(seed)
    n = int(seconds * AUDIO_SAMPLE_RATE)
    t = np.arange(n) / AUDIO_SAMPLE_RATE
    envelope = 0.55 + 0.45 * np.sin(2 * np.pi * (3.5 + rng.random()) * t)
    carrier = np.convolve(rng.standard_normal(n), np.ones(8) / 8, mode="same")
    return (0.3 * envelope * carrier).astype(np.float32)


def _peak_rss_mb() -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _Stream:
    """One paced speaker: its session, its audio, the arrival time of each chunk and image."""

    def __init__(self, k: int, service: GenerationService, avatar_id: str, avatar: Avatar, opts: StreamsOptions,
                 start: float, n: int):  # fmt: skip
        self.results: queue.SimpleQueue[tuple[float, FrameResult]] = queue.SimpleQueue()
        info = service.open_session(f"bench-{k}", avatar_id, lambda r: self.results.put((time.monotonic(), r)))
        self.service = service
        self.due: dict[int, float] = {}
        self.session = LiveSession(
            session_id=info.session_id, avatar=avatar, submit=self._submit, context_seconds=info.context_seconds,
            settings=LiveSettings(latency_budget_s=opts.latency_budget_s, max_side=max(opts.frame_size)),
        )  # fmt: skip
        self.session.set_vad(True)
        self.audio = np.concatenate([speech_like(opts.seconds, seed=k), np.zeros(4 * CHUNK, np.float32)])
        self.next_chunk = start + k * (1.0 / VIDEO_FPS) / n  # sessions are not in lockstep
        self.chunk = 0
        self.pushed: list[float] = []
        self.image_at: dict[int, float] = {}

    def _submit(self, request) -> None:
        self.due.update((item.seq, item.due) for item in request.items)
        self.service.submit(request)

    @property
    def done(self) -> bool:
        return self.chunk * CHUNK >= len(self.audio) and self.session.pending == 0

    def step(self, now: float) -> float:
        """Take answers, push due audio, show due frames; returns when to come back."""
        while True:
            try:
                at, result = self.results.get_nowait()
            except queue.Empty:
                break
            for seq in result.images:
                self.image_at.setdefault(seq, at)
            self.session.on_result(result)
        while self.next_chunk <= now and self.chunk * CHUNK < len(self.audio):
            self.session.push_audio(self.audio[self.chunk * CHUNK : (self.chunk + 1) * CHUNK])
            self.pushed.append(self.next_chunk)
            self.chunk += 1
            self.next_chunk += CHUNK / AUDIO_SAMPLE_RATE
        self.session.pop_due()
        return min(self.next_chunk, self.session.next_deadline())

    def latencies(self) -> list[float]:
        """Per frame shown generated (its image arrived by its due time): that arrival minus the
        arrival of the frame's last audio sample."""
        out = []
        for seq, at in self.image_at.items():
            chunk = (seq * SAMPLES_PER_VIDEO_FRAME + SAMPLES_PER_VIDEO_FRAME - 1) // CHUNK
            if chunk < len(self.pushed) and at <= self.due.get(seq, float("inf")):
                out.append(at - self.pushed[chunk])
        return out


def run_streams(models: Models, avatars: list[Avatar], n: int, opts: StreamsOptions, *, shared: bool,
                log: Callable[[str], None] = lambda s: None) -> StreamsResult:  # fmt: skip
    """Pace `n` sessions for `opts.seconds` against one shared service (or one service each)."""
    settings = ServiceSettings(batch_size=opts.batch_size, whisper_window_s=opts.whisper_window_s, admission=False)
    services = [GenerationService(models, settings) for _ in range(1 if shared else n)]
    ids = []
    for service in services:
        ids.append([service.add_avatar(a) for a in avatars])
        service.calibrate(ids[-1][0], repeats=1)  # kernels for the full batch built before the clock starts
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(models.device)
    start = time.monotonic() + 0.5
    streams = []
    for k in range(n):
        service = services[0 if shared else k]
        avatar_k = k % len(avatars)
        streams.append(_Stream(k, service, ids[0 if shared else k][avatar_k], avatars[avatar_k], opts, start, n))
    pace(streams, start, opts)
    elapsed = opts.seconds
    stats = [s.session.stats() for s in streams]
    service_stats = [svc.stats() for svc in services]
    for s in streams:
        s.service.close_session(s.session.session_id)
    for svc in services:
        svc.close()
    fps = [st.generated_frames / elapsed for st in stats]
    late = sum(st.late_frames for st in stats)
    speech = sum(st.late_frames + st.generated_frames for st in stats)
    lat = sorted(x for s in streams for x in s.latencies())
    costs = [st.frame_cost_ms for st in service_stats if st.frame_cost_ms is not None]
    batches = [st.mean_batch for st in service_stats if st.mean_batch is not None]
    gpu = torch.cuda.max_memory_allocated(models.device) / 2**20 if models.device.type == "cuda" else None
    result = StreamsResult(
        streams=n, shared=shared, generated_fps=sum(fps), session_fps=statistics.fmean(fps), min_session_fps=min(fps),
        late_pct=100.0 * late / max(speech, 1), p50_ms=1000 * lat[len(lat) // 2] if lat else None,
        p95_ms=1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        frame_cost_ms=statistics.fmean(costs) if costs else None, mean_batch=statistics.fmean(batches) if batches else None,
        peak_rss_mb=_peak_rss_mb(), gpu_peak_mb=gpu,
    )  # fmt: skip
    stages = service_stats[0].stage_ms_per_frame
    log(
        f"  N={n} {'shared' if shared else 'per-session'}: "
        + ", ".join(f"{k} {v:.1f} ms/frame" for k, v in stages.items())
    )
    return result


def render_reference(models: Models, avatar: Avatar, opts: StreamsOptions, batch_size: int) -> float:
    """Offline speed on the same models and avatar: file-path features + the batched generator, frames/s."""
    from musetalk.audio import AudioFeatureEncoder
    from musetalk.generate import LipSyncGenerator

    encoder = AudioFeatureEncoder(models.whisper, models.feature_extractor, models.device, models.dtype)
    audio = speech_like(min(opts.seconds, 8.0), seed=99)
    generator = LipSyncGenerator(models, avatar, batch_size=batch_size)
    try:
        list(generator.generate(encoder.frame_features(audio[: 2 * AUDIO_SAMPLE_RATE])))  # warm-up
        start = time.perf_counter()
        frames = sum(1 for _ in generator.generate(encoder.frame_features(audio)))
        return frames / (time.perf_counter() - start)
    finally:
        generator.close()


def find_max(measure: Callable[[int], StreamsResult], *, limit: int = 256) -> tuple[int, list[StreamsResult]]:
    """Largest N whose run is good (doubling, then bisection); every run made is returned too."""
    runs: list[StreamsResult] = []
    best, n = 0, 1
    while n <= limit:
        r = measure(n)
        runs.append(r)
        if not r.good:
            break
        best, n = n, n * 2
    lo, hi = best, min(n, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        r = measure(mid)
        runs.append(r)
        lo, hi = (mid, hi) if r.good else (lo, mid)
    return lo, runs


HEADER = (
    "| N | service | generated fps (all) | fps per session (mean / min) | late % | p50 / p95 latency ms "
    "| per-frame ms | mean batch | peak RSS MB | GPU peak MB |"
)


def format_row(r: StreamsResult) -> str:
    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v:.0f}"

    return (
        f"| {r.streams} | {'shared' if r.shared else 'one per session'} | {r.generated_fps:.1f} | "
        f"{r.session_fps:.1f} / {r.min_session_fps:.1f} | {r.late_pct:.1f} | {ms(r.p50_ms)} / {ms(r.p95_ms)} | "
        f"{'-' if r.frame_cost_ms is None else f'{r.frame_cost_ms:.1f}'} | "
        f"{'-' if r.mean_batch is None else f'{r.mean_batch:.1f}'} | {r.peak_rss_mb:.0f} | "
        f"{'-' if r.gpu_peak_mb is None else f'{r.gpu_peak_mb:.0f}'} |"
    )


def main_streams(models: Models, avatars: list[Avatar], streams: list[int], opts: StreamsOptions, *,
                 find: bool, baseline: bool = True, log: Callable[[str], None] = print) -> list[StreamsResult]:  # fmt: skip
    """Run the requested N (or the search), each shared and (with `baseline`) one service per session."""
    rows: list[StreamsResult] = []

    def both(n: int) -> StreamsResult:
        shared = run_streams(models, avatars, n, opts, shared=True, log=log)
        rows.append(shared)
        log(format_row(shared))
        if baseline and n > 1:
            alone = run_streams(models, avatars, n, opts, shared=False, log=log)
            rows.append(alone)
            log(format_row(alone))
            if alone.generated_fps > 0:
                log(
                    f"  gain of cross-session batching at N={n}: {shared.generated_fps / alone.generated_fps:.2f}x frames/s"
                )
        return shared

    batch = opts.batch_size or (8 if models.device.type == "cuda" else 4)
    log(
        f"offline render on the same models: {render_reference(models, avatars[0], opts, batch):.1f} frames/s (batch {batch})"
    )
    log(HEADER)
    log("|" + "---|" * 10)
    if find:
        best, _ = find_max(both, limit=max(streams))
        log(f"largest N with >= {GOOD_FPS:.0f} fps per session and < {GOOD_LATE_PCT:.0f} % late frames: {best}")
    else:
        for n in streams:
            both(n)
    return rows


def pace(streams: list, start: float, opts) -> None:
    """Step every stream in real time from `start` until all are done (or a generous deadline)."""
    time.sleep(max(0.0, start - time.monotonic()))
    deadline = start + opts.seconds + 5.0 + 2 * opts.latency_budget_s
    while not all(s.done for s in streams) and time.monotonic() < deadline:
        now = time.monotonic()
        wake = min(s.step(now) for s in streams)
        time.sleep(min(max(wake - time.monotonic(), 0.0), 0.005))


# ====================================================================== on the Ray Serve deployment
def run_streams_remote(
    client, avatars: list[Avatar], n: int, opts: StreamsOptions, *, prefix: str = "bench"
) -> StreamsResult:
    """Pace `n` sessions for `opts.seconds` against `client` (any backend with the session surface)."""
    ids = [client.add_avatar(a) for a in avatars]
    start = time.monotonic() + 1.0
    streams = []
    for k in range(n):
        stream = _Stream(k, client, ids[k % len(avatars)], avatars[k % len(avatars)], opts, start, n)
        streams.append(stream)
    pace(streams, start, opts)
    stats = [s.session.stats() for s in streams]
    cluster = client.stats()
    for s in streams:
        client.close_session(s.session.session_id)
    fps = [st.generated_frames / opts.seconds for st in stats]
    late = sum(st.late_frames for st in stats)
    speech = sum(st.late_frames + st.generated_frames for st in stats)
    lat = sorted(x for s in streams for x in s.latencies())
    costs = [r.stats.frame_cost_ms for r in cluster.replicas if r.stats.frame_cost_ms is not None]
    batches = [r.stats.mean_batch for r in cluster.replicas if r.stats.mean_batch is not None]
    gpu = [r.stats.gpu_peak_memory_mb for r in cluster.replicas if r.stats.gpu_peak_memory_mb is not None]
    return StreamsResult(
        streams=n, shared=True, generated_fps=sum(fps), session_fps=statistics.fmean(fps), min_session_fps=min(fps),
        late_pct=100.0 * late / max(speech, 1), p50_ms=1000 * lat[len(lat) // 2] if lat else None,
        p95_ms=1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else None,
        frame_cost_ms=statistics.fmean(costs) if costs else None, mean_batch=statistics.fmean(batches) if batches else None,
        peak_rss_mb=_peak_rss_mb(), gpu_peak_mb=max(gpu) if gpu else None,
    )  # fmt: skip


def main_streams_ray(
    models: Models, avatars: list[Avatar], streams: list[int], opts: StreamsOptions, *, address: str | None,
    replicas: int, size: str, seed: int, log: Callable[[str], None] = print,
) -> list[StreamsResult]:  # fmt: skip
    """Per N: the in-process shared service, then the Ray deployment with `replicas` replicas."""
    import ray
    from ray import serve

    from musetalk.serve.backend import RayOptions, _probe, connect_ray
    from musetalk.serve.deployment import APP_NAME, ReplicaConfig, build

    service = {"batch_size": opts.batch_size, "whisper_window_s": opts.whisper_window_s, "admission": False}
    device = "cuda" if models.device.type == "cuda" else "cpu"
    if not ray.is_initialized():
        if address is not None:
            _probe(address, 5.0)
            ray.init(address=address, log_to_driver=False)
        else:  # a local cluster running this checkout's code
            root = str(Path(__file__).resolve().parents[2])
            ray.init(include_dashboard=False, log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": root}})
    config = ReplicaConfig(device=device, service=service, random_models=size, seed=seed)
    serve.run(build(config, replicas=replicas, gpus=1.0 if device == "cuda" else 0.0), name=APP_NAME, route_prefix=None)
    client = connect_ray(address, options=RayOptions(replicas=replicas))
    label = f"ray, {replicas} replica{'s' if replicas > 1 else ''}"
    rows: list[StreamsResult] = []
    try:
        run_streams_remote(client, avatars, min(streams), dataclasses.replace(opts, seconds=2.0))  # warm-up, not shown
        log(HEADER)
        log("|" + "---|" * 10)
        for n in streams:
            local = run_streams(models, avatars, n, opts, shared=True)
            log(format_row(local).replace("| shared |", "| in-process |", 1))
            remote = run_streams_remote(client, avatars, n, opts)
            log(format_row(remote).replace("| shared |", f"| {label} |", 1))
            rows += [local, remote]
    finally:
        client.close()
        serve.delete(APP_NAME)
    return rows


def main_streams_ray_cli(
    spec: str, models: Models, avatars: list[Avatar], streams: list[int], opts: StreamsOptions, replicas: int,
    size: str, seed: int, log: Callable[[str], None] = print,
) -> list[StreamsResult]:  # fmt: skip
    """`musetalk.bench --backend ray[://ADDRESS]`: checks the spec and that Ray is installed first; returns the rows."""
    from musetalk.errors import MuseTalkError
    from musetalk.serve.backend import INSTALL_HINT, BackendSpec, ray_available

    try:
        parsed = BackendSpec.parse(spec)
    except MuseTalkError as exc:
        raise SystemExit(str(exc)) from exc
    if parsed.kind != "ray":
        raise SystemExit(f"--backend must be inproc or ray[://ADDRESS], not {spec!r}")
    if not ray_available():
        raise SystemExit(f"--backend ray needs Ray: {INSTALL_HINT}")
    if replicas < 1:
        raise SystemExit("--replicas must be at least 1")
    try:
        return main_streams_ray(
            models, avatars, streams, opts, address=parsed.address, replicas=replicas, size=size, seed=seed, log=log
        )
    except MuseTalkError as exc:
        raise SystemExit(str(exc)) from exc
