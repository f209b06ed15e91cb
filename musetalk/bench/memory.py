"""Report section `memory`: what the models take, and what each extra live session adds.

Models: their parameter bytes, and what building them added (GPU memory allocated on CUDA, process
RSS on CPU). Sessions: speech-mode sessions fed one utterance each, all at once (with a latency
budget long enough that every frame is generated), read after their frames have come back:
1 session, then `n`. The extra per session is (reading at n - reading at 1) / (n - 1), on one
shared service and with one service per session. GPU figures are `memory_allocated` now and its
peak during the step; RSS is the process's resident memory now, read after the freed heap is given
back (`malloc_trim`: on CPU `accel.keep_freed_memory` otherwise keeps the high-water mark).
"""

from __future__ import annotations

import time
from typing import Any

from musetalk import accel
from musetalk.bench.budget import Deadline, OutOfTime
from musetalk.bench.context import Context
from musetalk.bench.machine import memory_now, reset_peak
from musetalk.bench.speaker import TtsSpeaker
from musetalk.bench.streams import speech_like
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.live.session import LiveSettings

UTTERANCE_S = 0.5


def _feed(speakers: list[TtsSpeaker], deadline: Deadline) -> bool:
    """One utterance into each speaker at once; pump until every frame is shown. False: out of time."""
    for k, speaker in enumerate(speakers):
        speaker.push_all(speech_like(UTTERANCE_S, seed=200 + k))
    while any(s.session.pending_speech for s in speakers):
        if deadline.left() <= 0:
            return False
        for speaker in speakers:
            speaker.pump()
        time.sleep(0.005)
    return True


def _settled(ctx: Context) -> dict[str, float | None]:
    """Memory now, with the freed heap given back first (CPU `keep_memory` holds the high-water mark)."""
    kept = accel.memory_kept()
    accel.keep_freed_memory(False)  # trims the heap
    try:
        return memory_now(ctx.device)
    finally:
        if kept:
            accel.keep_freed_memory(True)


def _step(ctx: Context, n: int, shared: bool, deadline: Deadline) -> dict[str, Any]:
    """Memory with `n` fed sessions (one service, or one each)."""
    settings = LiveSettings(mode="speech", max_side=720, latency_budget_s=60.0)
    services = [GenerationService(ctx.models, ServiceSettings(admission=False)) for _ in range(1 if shared else n)]
    speakers = []
    try:
        for k in range(n):
            service = services[0 if shared else k]
            avatar_id = service.add_avatar(ctx.avatar)
            speakers.append(TtsSpeaker(service, avatar_id, ctx.avatar, f"bench-memory-{k}", settings))
        reset_peak(ctx.device)
        complete = _feed(speakers, deadline)
        reading = _settled(ctx)
    finally:
        for speaker in speakers:
            speaker.close()
        for service in services:
            service.close()
    return {"sessions": n, "services": len(services), "complete": complete, **reading}


def _per_extra(one: dict[str, Any], many: dict[str, Any]) -> dict[str, float | None]:
    n = many["sessions"] - one["sessions"]
    out: dict[str, float | None] = {}
    for key in ("gpu_mb", "gpu_peak_mb", "rss_mb"):
        out[key] = None if one[key] is None or many[key] is None else (many[key] - one[key]) / n
    return out


def run_memory(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    n = ctx.plan.memory_sessions
    cost = ctx.frame_cost_s()
    frames = int(UTTERANCE_S * 25) + 4
    steps: list[dict[str, Any]] = []
    skipped = []
    baseline = _settled(ctx)
    try:
        for shared in (True, False):
            for sessions in (1, n):
                if shared is False and sessions == 1:
                    continue  # one session is one service either way
                deadline.check(sessions * frames * cost * 1.2 + 1, f"{sessions} sessions' memory")
                steps.append(_step(ctx, sessions, shared, deadline))
                ctx.log(f"memory: {steps[-1]}")
    except OutOfTime as exc:
        skipped.append(str(exc))
    ctx.offline_threads()
    one = next((s for s in steps if s["sessions"] == 1), None)
    per = {}
    for label, services in (("shared_service", 1), ("service_per_session", n)):
        many = next((s for s in steps if s["sessions"] == n and s["services"] == services), None)
        per[label] = _per_extra(one, many) if one and many and n > 1 else None
    return {
        "models": ctx.build,
        "baseline": baseline,
        "steps": steps,
        "per_extra_session": per,
        "utterance_s": UTTERANCE_S,
        "skipped": skipped + [f"step with {s['sessions']} sessions: out of time" for s in steps if not s["complete"]],
    }
