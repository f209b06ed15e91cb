"""Report section `first_mouth`: first TTS audio in -> first moving-mouth frame out, in process.

One live session in speech mode at the default latency budget (`LiveSettings().latency_budget_s`)
on the shared generation service, fed TTS-like utterances (`TtsPacing`: chunks faster than real
time, a pause between replies) by `TtsSpeaker`. One utterance warms up and is not counted; p50 and
p95 are over the utterances that got a moving mouth at all (the rest are counted: on a device
slower than real time every frame misses the budget and is shown idle with its audio).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict
from typing import Any

from musetalk.bench.budget import Deadline
from musetalk.bench.context import Context
from musetalk.bench.speaker import TtsSpeaker
from musetalk.bench.streams import speech_like
from musetalk.live.service import GenerationService, ServiceSettings
from musetalk.live.session import LiveSettings


def percentile(values: list[float], q: float) -> float | None:
    """The nearest-rank percentile (`q` in 0..100) of `values`; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(1, math.ceil(q / 100 * len(ordered))) - 1]


def run_first_mouth(ctx: Context, deadline: Deadline) -> dict[str, Any]:
    pacing = ctx.plan.mouth
    settings = LiveSettings(mode="speech", max_side=720)
    service = GenerationService(ctx.models, ServiceSettings(admission=False))
    avatar_id = service.add_avatar(ctx.avatar)
    frame_cost = service.calibrate(avatar_id, repeats=1)
    speaker = TtsSpeaker(service, avatar_id, ctx.avatar, "bench-mouth", settings)
    one = pacing.utterance_s / pacing.speed + settings.latency_budget_s + pacing.gap_s + 1.0
    utterances, skipped = [], []
    try:
        speaker.idle(0.2)  # the session's warm-up batch
        speaker.say(speech_like(pacing.utterance_s, seed=100), pacing)  # warm-up, not counted
        for k in range(pacing.utterances):
            if not deadline.allows(one + pacing.utterance_s):  # a slow device plays it in real time
                skipped.append(f"utterances {k + 1}-{pacing.utterances}: budget ({deadline.left():.0f} s left)")
                break
            speaker.idle(pacing.gap_s)
            utterances.append(speaker.say(speech_like(pacing.utterance_s, seed=101 + k), pacing))
    finally:
        speaker.close()
        service.close()
    ctx.offline_threads()
    mouths = [1000 * u.first_mouth_s for u in utterances if u.first_mouth_s is not None]
    p50 = percentile(mouths, 50)
    ctx.log(f"first mouth: {len(mouths)} of {len(utterances)} utterances" + (f", p50 {p50:.0f} ms" if p50 else ""))
    return {
        "latency_budget_s": settings.latency_budget_s,
        "pacing": asdict(pacing),
        "service_batch": service.batch_size,
        "frame_cost_ms": 1000 * frame_cost,
        "utterances": len(utterances),
        "with_mouth": len(mouths),
        "p50_ms": percentile(mouths, 50),
        "p95_ms": percentile(mouths, 95),
        "min_ms": min(mouths, default=None),
        "max_ms": max(mouths, default=None),
        "mean_ms": statistics.fmean(mouths) if mouths else None,
        "generated_share": [u.generated / max(u.frames, 1) for u in utterances],
        "skipped": skipped,
    }
