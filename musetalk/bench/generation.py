"""Report section `generation`: frames/s of the product's generator per batch size, and its exactness.

The fast path is `LipSyncGenerator` on `accel.optimize_for_inference` models in the device's dtype
(fp16 on CUDA, fp32 on CPU), blending overlapped with the next batch as in a render. Its first
frames are compared with the fp32 reference: MuseTalk's own loop (`official_loop`, batch 8) on the
same weights in fp32 (on CUDA a separate fp32 copy, dropped afterwards). Per batch size: frames/s,
the stage split (UNet, VAE decode, blend per frame), the largest difference of a frame's uint8
values from the reference, and the GPU memory peak. 64 runs only where memory allows.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from musetalk.bench.budget import Deadline
from musetalk.bench.context import Context
from musetalk.bench.machine import free_cuda, memory_now, reset_peak
from musetalk.bench.official import OFFICIAL_BATCH, official_loop
from musetalk.bench.timing import StageTimer, timed
from musetalk.generate import LipSyncGenerator
from musetalk.models import Models
from musetalk.testing import build_random_models


@dataclass
class BatchRun:
    batch: int
    status: str  # ok | skipped | out of memory
    reason: str | None = None
    frames: int = 0
    fps: float | None = None
    unet_ms: float | None = None  # per frame
    vae_decode_ms: float | None = None
    blend_ms: float | None = None
    max_abs_diff: int | None = None  # vs the fp32 reference, over `compared` frames
    differing_pct: float | None = None  # share of uint8 values that differ
    compared: int = 0
    gpu_peak_mb: float | None = None


def reference_frames(ctx: Context) -> tuple[list[np.ndarray], float]:
    """The fp32 reference's first frames (MuseTalk's loop at batch 8) and the seconds they took."""
    n = ctx.plan.reference_frames
    start = time.perf_counter()
    if ctx.plain.dtype == torch.float32:
        frames = official_loop(ctx.plain, ctx.avatar, ctx.features[:n], batch_size=OFFICIAL_BATCH)
    else:
        fp32 = build_random_models(
            tiny=ctx.settings.size == "tiny", device=ctx.device, dtype=torch.float32, seed=ctx.settings.seed
        )
        frames = official_loop(fp32, ctx.avatar, ctx.features[:n], batch_size=OFFICIAL_BATCH)
        del fp32
        free_cuda(ctx.device)
    return frames, time.perf_counter() - start


def _compare(frames: list[np.ndarray], reference: list[np.ndarray]) -> tuple[int, float, int]:
    """(max abs difference, % of values that differ, frames compared) over the frames both have."""
    n = min(len(frames), len(reference))
    if n == 0:
        return 0, 0.0, 0
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(frames[:n], reference[:n])]
    values = sum(d.size for d in diffs)
    return max(int(d.max()) for d in diffs), 100.0 * sum(int(np.count_nonzero(d)) for d in diffs) / values, n


def time_generator(models: Models, ctx: Context, batch: int, frames: int) -> tuple[Any, dict[str, float]]:
    """One warm-up batch, then one timed pass of `frames` frames: (Timed with the frames, stage seconds)."""
    timer = StageTimer(ctx.device)
    timer.hook("unet", models.unet)
    timer.hook("vae_decode", models.vae.post_quant_conv, models.vae.decoder)
    generator = LipSyncGenerator(models, ctx.avatar, batch_size=batch)
    compose = generator.compose

    def timed_compose(position: int, face: np.ndarray) -> np.ndarray:
        with timer.cpu_stage("blend"):
            return compose(position, face)

    generator.compose = timed_compose  # type: ignore[method-assign]
    try:
        timer.enabled = False
        list(generator.generate(ctx.features[:batch]))
        timer.enabled = True
        run = timed(lambda: list(generator.generate(ctx.features[:frames])), ctx.device)
        return run, timer.totals()
    finally:
        generator.close()
        timer.remove()


def _run_batch(ctx: Context, batch: int, reference: list[np.ndarray]) -> BatchRun:
    frames = max(batch * ctx.plan.timed_batches, ctx.plan.min_frames)
    reset_peak(ctx.device)
    run, stages = time_generator(ctx.models, ctx, batch, frames)
    diff, pct, compared = _compare(run.result, reference)
    per = lambda stage: 1000 * stages.get(stage, 0.0) / frames  # noqa: E731
    return BatchRun(
        batch=batch, status="ok", frames=frames, fps=frames / run.wall, unet_ms=per("unet"),
        vae_decode_ms=per("vae_decode"), blend_ms=per("blend"), max_abs_diff=diff, differing_pct=pct,
        compared=compared, gpu_peak_mb=memory_now(ctx.device)["gpu_peak_mb"],
    )  # fmt: skip


def _skip_reason(ctx: Context, batch: int, runs: list[BatchRun], deadline: Deadline) -> str | None:
    """Why batch `batch` is not measured (None: measure it): the time left, or the GPU's memory."""
    done = [r for r in runs if r.status == "ok" and r.fps]
    if any(r.status == "out of memory" for r in runs):
        return "a smaller batch ran out of GPU memory"
    frames = max(batch * ctx.plan.timed_batches, ctx.plan.min_frames)
    if done:  # cost per frame only falls with the batch: the last one is an upper bound
        need = (frames + batch) / done[-1].fps * 1.2 + 1.0
        if not deadline.allows(need):
            return f"budget: needs ~{need:.0f} s, {deadline.left():.0f} s of this section's time left"
        last = done[-1]
        if ctx.device.type == "cuda" and last.gpu_peak_mb:
            total = torch.cuda.get_device_properties(ctx.device).total_memory / 2**20
            if last.gpu_peak_mb * batch / last.batch > 0.9 * total:
                return f"GPU memory: batch {last.batch} peaked at {last.gpu_peak_mb:.0f} MB of {total:.0f}"
    return None


def run_generation(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    ctx.offline_threads()
    reference, ref_s = reference_frames(ctx)
    ctx.log(f"fp32 reference: {len(reference)} frames in {ref_s:.1f} s")
    runs: list[BatchRun] = []
    for batch in ctx.plan.batch_sizes:
        reason = _skip_reason(ctx, batch, runs, deadline)
        if reason is not None:
            runs.append(BatchRun(batch=batch, status="skipped", reason=reason))
            continue
        try:
            runs.append(_run_batch(ctx, batch, reference))
        except torch.cuda.OutOfMemoryError as exc:
            free_cuda(ctx.device)
            runs.append(BatchRun(batch=batch, status="out of memory", reason=str(exc).split("\n")[0][:200]))
        r = runs[-1]
        ctx.log(f"batch {batch}: {r.status}" + (f", {r.fps:.2f} frames/s, max diff {r.max_abs_diff}" if r.fps else ""))
    return {
        "reference": {
            "path": f"MuseTalk's loop (official_loop), batch {OFFICIAL_BATCH}, float32",
            "frames": len(reference),
            "seconds": ref_s,
        },
        "fast_path": f"LipSyncGenerator on accel.optimize_for_inference models, {str(ctx.models.dtype)[6:]}",
        "threads": torch.get_num_threads(),
        "batches": [asdict(r) for r in runs],
        "skipped": [f"batch {r.batch}: {r.reason}" for r in runs if r.status != "ok"],
    }
