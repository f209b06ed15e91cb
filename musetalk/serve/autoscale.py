"""Autoscaling the generation replicas on queued frames and sessions (a Ray Serve policy).

Each replica reports `queued_frames`, `sessions` and `capacity` (sessions it serves at 25 fps)
through `record_autoscaling_stats`. The policy wants enough replicas that:

- the sessions fit the measured capacity with `headroom` sessions to spare per replica, and
- no more than `target_queued_frames` frames wait per replica on average (a queue that grows
  means frames are about to be shown idle).

It scales down one replica at a time and only when both hold with one replica fewer. Serve's
own delays (`upscale_delay_s`, `downscale_delay_s`) and min/max replicas still apply. Plain
Python on plain numbers: no Ray import, tested without a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any


def _total(metrics: Mapping[str, Mapping[Any, float]] | None, name: str) -> float:
    return float(sum((metrics or {}).get(name, {}).values()))


class QueuedFramesPolicy:
    """`policy_function: musetalk.serve.autoscale:QueuedFramesPolicy` in the Serve config."""

    def __init__(self, target_queued_frames: float = 16.0, headroom: int = 1, default_capacity: int = 4):
        self.target_queued_frames = float(target_queued_frames)
        self.headroom = int(headroom)
        self.default_capacity = int(default_capacity)  # per replica, until a replica has measured itself

    def desired(self, metrics: Mapping[str, Mapping[Any, float]] | None, current: int) -> int:
        queued = _total(metrics, "queued_frames")
        sessions = _total(metrics, "sessions")
        capacities = [c for c in (metrics or {}).get("capacity", {}).values() if c > 0]
        per_replica = max(1.0, min(capacities) if capacities else self.default_capacity)
        for_sessions = math.ceil(sessions / max(1.0, per_replica - self.headroom)) if sessions else 1
        for_queue = math.ceil(queued / self.target_queued_frames)
        want = max(1, for_sessions, for_queue)
        if want < current:
            want = current - 1  # down one at a time
        return want

    def __call__(self, ctx) -> tuple[int, dict[str, Any]]:
        want = self.desired(ctx.aggregated_metrics, ctx.current_num_replicas)
        low, high = ctx.capacity_adjusted_min_replicas, ctx.capacity_adjusted_max_replicas
        return max(low, min(high, want)), dict(ctx.policy_state or {})
