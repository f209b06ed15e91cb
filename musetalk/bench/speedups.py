"""Report section `speedups`: the optional speed-ups, each measured beside the default fast path.

The opt-ins are `accel.optimize_for_inference`'s: `channels_last` (NHWC convolution weights) and
`compile` (`torch.compile` of the UNet and the VAE decoder; CUDA only here, since compiling takes
minutes on a CPU). Each runs the generator at the stage batch on the same inputs as the default
path (timed before and after the variants; the faster counts). A variant is worth turning on only
where its frames equal the default's exactly and it is faster: the verdict says which holds. This
report adds no speed-up of its own (no CUDA graphs either): the product's defaults are unchanged.
"""

from __future__ import annotations

from typing import Any

from musetalk import accel
from musetalk.bench.budget import Deadline
from musetalk.bench.context import Context
from musetalk.bench.generation import time_generator
from musetalk.bench.machine import free_cuda
from musetalk.bench.timing import compare_frames

VARIANTS: dict[str, dict[str, bool]] = {"channels_last": {"channels_last": True}, "compile": {"compile": True}}
COMPILE_S = 150.0  # what compiling the full UNet and decoder may take (estimate for the budget)
ADDED = "none: this report measures accel's existing opt-ins beside the default and changes no default"


def _verdict(exact: bool, speedup: float) -> str:
    if not exact:
        return "off: frames differ from the default path"
    if speedup <= 1.02:
        return "off: not faster"
    return "on: exact and faster (make it the default)"


def _variant(ctx: Context, name: str, batch: int, frames: int, default: Any) -> dict[str, Any]:
    models = accel.optimize_for_inference(ctx.plain, copy_modules=True, **VARIANTS[name])
    try:
        run, _ = time_generator(models, ctx, batch, frames)
    finally:
        del models
        free_cuda(ctx.device)
    exact, max_diff, differing = compare_frames(run.result, default.result)
    speedup = default.wall / run.wall
    return {
        "name": name, "status": "ok", "fps": frames / run.wall, "speedup": speedup, "exact": exact,
        "max_abs_diff": max_diff, "differing_values": differing, "verdict": _verdict(exact, speedup),
    }  # fmt: skip


def _skip_reason(ctx: Context, name: str, need: float, deadline: Deadline) -> str | None:
    if name == "compile" and ctx.device.type != "cuda":
        return "compile: CUDA only in this report (compiling takes minutes on a CPU)"
    if not deadline.allows(need):
        return f"{name}: budget (needs ~{need:.0f} s, {deadline.left():.0f} s left)"
    return None


def run_speedups(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    ctx.offline_threads()
    batch = ctx.plan.stage_batch
    frames = max(batch * ctx.plan.timed_batches, ctx.plan.min_frames)
    pass_s = (frames + batch) * ctx.frame_cost_s() * 1.3 + 1.0
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []
    if not deadline.allows(2 * pass_s):
        return {"added": ADDED, "batch": batch, "variants": [], "skipped": [f"every variant: budget ({deadline.left():.0f} s left)"]}  # fmt: skip
    default, _ = time_generator(ctx.models, ctx, batch, frames)
    for name in ctx.plan.speedups:
        need = 2 * pass_s + (COMPILE_S if name == "compile" else 0.0)
        reason = _skip_reason(ctx, name, need, deadline)
        if reason is not None:
            skipped.append(reason)
            rows.append({"name": name, "status": "skipped", "reason": reason})
            continue
        try:
            rows.append(_variant(ctx, name, batch, frames, default))
        except Exception as exc:  # a variant that cannot run here is a finding, not the end of the report
            rows.append({"name": name, "status": "failed", "reason": f"{type(exc).__name__}: {exc}"[:300]})
        ctx.log(f"speed-up {name}: {rows[-1].get('verdict', rows[-1].get('reason'))}")
    again, _ = time_generator(ctx.models, ctx, batch, frames) if deadline.allows(pass_s) else (default, None)
    best = min(default.wall, again.wall)
    for row in rows:  # against the faster of the two default passes
        if row["status"] == "ok":
            row["speedup"] = best / (frames / row["fps"])
            row["verdict"] = _verdict(row["exact"], row["speedup"])
    return {"added": ADDED, "batch": batch, "frames": frames, "default_fps": frames / best, "variants": rows, "skipped": skipped}  # fmt: skip
