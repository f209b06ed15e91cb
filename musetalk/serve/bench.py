"""`python -m musetalk.bench --streams N --backend ray[://ADDRESS] [--replicas R]`.

The same paced sessions as `musetalk.bench_streams` (20 ms audio chunks through `LiveSession`),
sent to the Ray Serve deployment through `RayGenerationClient` instead of an in-process
service; printed next to the in-process shared-service row for the same N. The replicas build
the same random models (`random_models`), so the figures compare transport and placement only.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path

from musetalk.avatar.store import Avatar
from musetalk.bench_streams import (
    HEADER,
    StreamsOptions,
    StreamsResult,
    _peak_rss_mb,
    _Stream,
    format_row,
    pace,
    run_streams,
)
from musetalk.models import Models
from musetalk.serve.backend import RayOptions, connect_ray


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

    from musetalk.serve.backend import _probe
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
    size: str, seed: int,
) -> int:  # fmt: skip
    """`musetalk.bench --backend ray[://ADDRESS]`: checks the spec and that Ray is installed first."""
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
        main_streams_ray(
            models, avatars, streams, opts, address=parsed.address, replicas=replicas, size=size, seed=seed
        )
    except MuseTalkError as exc:
        raise SystemExit(str(exc)) from exc
    return 0
