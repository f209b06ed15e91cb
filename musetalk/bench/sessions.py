"""Report section `sessions`: how many live sessions one device serves at 25 fps.

The `--streams --find-max` benchmark (`musetalk.bench.streams`) inside the report's budget: paced
sessions of continuous speech at the default latency budget, doubling N then bisecting, for the
largest N with >= 24 generated fps per session and < 1 % late frames; once on one shared service
(cross-session batching), once with one service per session (each batches only its own frames).
Every run is kept (fps, late %, p50 / p95 latency from a frame's last audio to its image, memory).
A search cut short by the budget reports the largest N served so far as a lower bound.
"""

from __future__ import annotations

from typing import Any

from musetalk.bench.budget import Deadline, OutOfTime
from musetalk.bench.context import Context
from musetalk.bench.streams import (
    GOOD_FPS,
    GOOD_LATE_PCT,
    StreamsOptions,
    StreamsResult,
    bench_avatars,
    find_max,
    format_row,
    result_dict,
    run_streams,
)


def _search(ctx: Context, avatars: list, opts: StreamsOptions, shared: bool, deadline: Deadline) -> dict[str, Any]:
    rows: list[StreamsResult] = []
    cost = ctx.frame_cost_s()
    batch = opts.batch_size or (8 if ctx.device.type == "cuda" else 4)

    def measure(n: int) -> StreamsResult:
        services = 1 if shared else n
        # each service calibrates 2 full batches, each session warms up on 2 frames; then the paced speech
        setup = (services * 2 * batch + n * 2) * cost * 1.5
        deadline.check(setup + 1.5 + opts.seconds + opts.latency_budget_s + 1.0, f"N={n}")
        r = run_streams(ctx.models, avatars, n, opts, shared=shared, log=ctx.log)
        rows.append(r)
        ctx.log(format_row(r))
        return r

    stopped = None
    try:
        best, _ = find_max(measure, limit=ctx.plan.streams_limit)
    except OutOfTime as exc:
        stopped = f"search stopped: {exc}"
        best = max((r.streams for r in rows if r.good), default=0)
    return {
        "largest_n": best,
        "complete": stopped is None,
        "at_limit": stopped is None and best >= ctx.plan.streams_limit,
        "stopped": stopped,
        "runs": [result_dict(r) for r in rows],
    }


def run_sessions(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    opts = StreamsOptions(seconds=ctx.plan.streams_seconds)
    avatars = bench_avatars(opts, ctx.settings.seed)
    half = Deadline(deadline.clock() + deadline.left() / 2, deadline.clock)
    shared = _search(ctx, avatars, opts, True, half)
    alone = _search(ctx, avatars, opts, False, deadline)
    ctx.offline_threads()
    return {
        "criterion": f">= {GOOD_FPS:.0f} generated fps per session and < {GOOD_LATE_PCT:.0f} % late frames",
        "seconds_per_run": opts.seconds,
        "latency_budget_s": opts.latency_budget_s,
        "frame_size": list(opts.frame_size),
        "limit": ctx.plan.streams_limit,
        "shared_service": shared,
        "service_per_session": alone,
        "skipped": [
            f"{label}: {r['stopped']}" for label, r in (("shared", shared), ("per session", alone)) if r["stopped"]
        ],
    }
